"""Choosing the whitened rank of LinearHeads by approximate leave-one-out loss (ecif_fast/rank_selection.py,
docs/math.md §2.4): the ladder, the choice against an independent recomputation, the early stop."""
from __future__ import annotations

import pytest
import torch

import ecif_fast as ef
from ecif_fast import rank_selection
from ecif_fast.rank_selection import choose_rank, rank_ladder


def _pairs(n=64, seed=0):
    """Four classes: a class signal in 3 of 12 image and 3 of 10 text dimensions, noise in all; 20 % of
    captions shifted to another pair's."""
    g = torch.Generator().manual_seed(seed)
    lab = torch.arange(n) % 4
    ci, ct = 2 * torch.randn(4, 3, generator=g, dtype=torch.float64), 2 * torch.randn(4, 3, generator=g,
                                                                                       dtype=torch.float64)
    X = torch.cat([ci[lab], torch.zeros(n, 9, dtype=torch.float64)], 1) + torch.randn(n, 12, generator=g,
                                                                                       dtype=torch.float64)
    Y = torch.cat([ct[lab], torch.zeros(n, 7, dtype=torch.float64)], 1) + torch.randn(n, 10, generator=g,
                                                                                       dtype=torch.float64)
    bad = torch.rand(n, generator=g) < 0.2
    Y[bad] = Y[bad].roll(1, 0)
    return X, Y


def test_rank_ladder():
    assert rank_ladder(79) == [8, 12, 16, 24, 32, 48, 64, 79]
    assert rank_ladder(300)[-4:] == [128, 192, 256, 300]
    assert rank_ladder(16) == [8, 12, 16] and rank_ladder(8) == [8] and rank_ladder(5) == [5]


def test_the_choice_is_the_least_held_out_loss_and_its_heads_are_trained_as_by_hand():
    X, Y = _pairs()
    choice = choose_rank(X, Y, batches=16, damping=1.0, ranks=[2, 3, 5])
    losses = [e["held_out_loss"] for e in choice.tried]
    assert [e["rank"] for e in choice.tried][:2] == [2, 3]
    assert choice.rank == choice.tried[losses.index(min(losses))]["rank"]
    # independently: the same heads from from_features + train, and their held-out loss from the engine
    by_hand = ef.LinearHeads.from_features(X, Y, choice.rank, max_rank=choice.rank)
    ref = torch.cat([p.detach().reshape(-1) for p in by_hand.parameters() if p.requires_grad]).clone()
    torch.testing.assert_close(choice.theta_ref, ref, rtol=0, atol=0)
    ef.train(by_hand, X, Y, batches=16, damping=1.0, theta_ref=ref)
    for a, b in zip(by_hand.state_dict().values(), choice.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    held = ef.ECIF(by_hand, damping=1.0, batches=16).fit(X, Y).held_out_fit()["loss_held_out"].mean()
    entry = next(e for e in choice.tried if e["rank"] == choice.rank)
    assert entry["held_out_loss"] == pytest.approx(float(held), rel=1e-12)
    assert entry["parameters"] == 2 * choice.rank * choice.rank and entry["grad_norm"] < 1e-8


def test_the_ladder_stops_at_the_first_rise(monkeypatch):
    X, Y = _pairs()
    curve = iter([5.0, 4.0, 4.5, 3.0])      # falls, rises at the third rank: the fourth is never trained
    trained = []
    real_train = rank_selection.train

    def counting_train(model, *a, **k):
        trained.append(model.image_rank)
        return real_train(model, *a, **k)

    def fake_held_out(self, indices=None):
        n = self.n if indices is None else len(indices)
        return {"loss_held_out": torch.full((n,), next(curve), dtype=torch.float64)}

    monkeypatch.setattr(rank_selection, "train", counting_train)
    monkeypatch.setattr(ef.ECIF, "held_out_fit", fake_held_out)
    seen = []
    choice = choose_rank(X, Y, batches=16, damping=1.0, ranks=[2, 3, 4, 5], on_rank=seen.append)
    assert trained == [2, 3, 4] and [e["rank"] for e in choice.tried] == [2, 3, 4] and seen == choice.tried
    assert choice.rank == 3 and choice.model.image_rank == 3


def test_many_pairs_are_scored_on_a_seeded_subset_and_bad_ranks_are_refused(monkeypatch):
    X, Y = _pairs(n=48)
    monkeypatch.setattr(rank_selection, "HELD_OUT_PAIRS", 20)
    got = []
    real = ef.ECIF.held_out_fit

    def spy(self, indices=None):
        got.append(indices)
        return real(self, indices)

    monkeypatch.setattr(ef.ECIF, "held_out_fit", spy)
    choose_rank(X, Y, batches=16, damping=1.0, ranks=[2, 3], seed=1)
    assert len(got) == 2 and torch.equal(got[0], got[1]) and got[0].numel() == 20
    assert bool((got[0][1:] > got[0][:-1]).all())
    for bad in ([], [0], [2.5], [True]):
        with pytest.raises(ValueError, match="ranks"):
            choose_rank(X, Y, batches=16, damping=1.0, ranks=bad)


def test_no_rank_with_more_parameters_than_pairs_is_trained_after_the_first(monkeypatch):
    X, Y = _pairs(n=40)
    curve = iter([5.0, 4.0, 3.0, 2.0])      # always falling: only the parameter count stops the ladder
    monkeypatch.setattr(ef.ECIF, "held_out_fit",
                        lambda self, indices=None: {"loss_held_out": torch.full((self.n,), next(curve))})
    choice = choose_rank(X, Y, batches=20, damping=1.0, ranks=[2, 3, 5, 6])      # P = 8, 18, 50, 72 for 40 pairs
    assert [e["rank"] for e in choice.tried] == [2, 3] and choice.rank == 3
    first = choose_rank(X, Y, batches=20, damping=1.0, ranks=[5, 2])               # the first is always tried
    assert [e["rank"] for e in first.tried] == [5, 2]
