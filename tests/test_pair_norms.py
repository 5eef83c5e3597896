"""Per-pair gradient norms of LinearHeads from B × B Grams (docs/math.md §4.1) against the brute-force per-pair
gradients, and factorised self-influence from projections + norms against the G-based
``LowRankSolver.quadratic(pair_gradients())``."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import ecif_fast as ef
from ecif_fast.core.pair_norms import heads_pair_sq_norms, score_gradient_terms, structured_norms_blocks
from ecif_fast.core.pair_terms import pair_score_gradients
from ecif_fast.kernels import ops
from problems import heads

N = 22  # batches of 8: the last one holds 6 pairs


SOFT_EPS = 5.0   # of the order of the embeddings' norms (random raw heads, median 7): ρ is far from |z|


def _engine(normalize, train_scale, negative_term, dtype, batches=8, scale=8.0, n=N, seed=0, **kw):
    """``normalize``: False, True or ``"soft"`` (``norm_eps = SOFT_EPS``)."""
    model, _ = heads(bool(normalize), train_scale=train_scale, scale=scale, seed=seed,
                     norm_eps=SOFT_EPS if normalize == "soft" else 0.0)
    model = model.to(dtype)
    g = torch.Generator().manual_seed(seed + 7)
    X = torch.randn(n, 6, generator=g, dtype=torch.float64).to(dtype)
    Y = torch.randn(n, 5, generator=g, dtype=torch.float64).to(dtype)
    kw.setdefault("solver", "cg")
    kw.setdefault("rank", 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return ef.ECIF(model, damping=0.1, batches=batches, negative_term=negative_term, **kw).fit(X, Y), X, Y


def _structured(engine, X, Y, ks_of=None):
    """``(n,)`` the structured norms of every pair (or of ``ks_of(batch)`` positions, NaN elsewhere)."""
    blocks = structured_norms_blocks(engine.model, engine.space.names)
    named = {**{k: p.detach() for k, p in engine.model.named_parameters()}, **engine.space.unflatten(engine.theta)}
    out = torch.full((engine.n,), float("nan"), dtype=torch.float64)
    for g in engine.plan.groups():
        ks = None if ks_of is None else ks_of(g)
        got = heads_pair_sq_norms(X[g], Y[g], named["image_proj.weight"], named["text_proj.weight"],
                                  engine.log_scale, normalize=blocks["normalize"],
                                  exact=engine.negative_term == "exact", image=blocks["image"],
                                  text=blocks["text"], scale=blocks["scale"], ks=ks, norm_eps=blocks["norm_eps"])
        out[g if ks is None else g[ks]] = got
    return out


def _tolerance(dtype):
    """Relative to the largest norm of the batch set: the rounding of the oracle's own arithmetic (its per-pair
    gradients are formed in ``dtype`` from ``B``-term sums) times a margin; float64 to 1e-12."""
    return 1e-12 if dtype == torch.float64 else 64 * math.sqrt(8) * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("scale", [1.0, 40.0])
def test_structured_score_gradients_equal_the_dense_ones(exact, scale):
    g = torch.Generator().manual_seed(1)
    S = scale * torch.randn(9, 9, generator=g, dtype=torch.float64)
    ks = torch.tensor([3, 0, 7, 8])
    T = score_gradient_terms(S, exact, ks)
    E = pair_score_gradients(S, exact, ks)
    assert float((T.dense() - E).abs().max()) <= 1e-14 * float(E.abs().max())
    if exact and scale > 1:  # the special form at p → 1 is exercised
        assert T.row_idx.numel() > 0 and T.col_idx.numel() > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("negative_term", ["exact", "taylor"])
@pytest.mark.parametrize("train_scale", [False, True])
@pytest.mark.parametrize("normalize", [False, True, "soft"])
def test_structured_norms_equal_brute_force(normalize, train_scale, negative_term, dtype):
    engine, X, Y = _engine(normalize, train_scale, negative_term, dtype)
    assert engine.plan.sizes.tolist() == [8, 8, 6]
    G = engine.pair_gradients().double()
    ref = (G * G).sum(1)
    got = _structured(engine, X, Y)
    assert float((got - ref).abs().max()) <= _tolerance(dtype) * float(ref.max())
    # the oracle tells the cases apart: the other negative term, or a scale that is not counted, is caught
    other, _, _ = _engine(normalize, train_scale, "taylor" if negative_term == "exact" else "exact", dtype)
    assert float((_structured(other, X, Y) - ref).abs().max()) > 100 * _tolerance(dtype) * float(ref.max())
    if train_scale:
        gs = G[:, engine.space.slices()["logit_scale"]][:, 0]
        assert float((got - gs ** 2 - ref).abs().max()) > 100 * _tolerance(dtype) * float(ref.max())


def test_structured_norms_of_some_pairs_and_custom_batches():
    ids = torch.tensor([2, 0, 1, 2, 0, 0, 1, 2, 2, 1, 0, 0, 2, 1, 2, 0, 1, 1, 2, 0, 2, 2])  # sizes 7, 6, 9
    engine, X, Y = _engine(True, True, "exact", torch.float64, batches=ids)
    G = engine.pair_gradients().double()
    ref = (G * G).sum(1)
    some = _structured(engine, X, Y, ks_of=lambda g: torch.arange(0, g.numel(), 2))
    done = ~some.isnan()
    assert int(done.sum()) == 4 + 3 + 5
    assert float((some[done] - ref[done]).abs().max()) <= 1e-12 * float(ref.max())


@pytest.mark.parametrize("params", [["image_proj.weight"], ["text_proj.weight", "logit_scale"]])
def test_structured_norms_of_selected_parameters(params):
    engine, X, Y = _engine(True, True, "exact", torch.float64, params=params)
    assert set(engine.space.names) == set(params)
    G = engine.pair_gradients()
    ref = (G * G).sum(1)
    assert float((_structured(engine, X, Y) - ref).abs().max()) <= 1e-12 * float(ref.max())


def test_projections_are_pair_gradients_along_the_directions():
    """The sign and normalisation of ``ecif_reductions``: positive + negative is ``g_kᵀ h`` for every direction."""
    engine, _, _ = _engine(True, True, "exact", torch.float64)
    H = engine.factor.vecs
    dU, dV, ds = engine._directions(H)
    pos, neg = ops.ecif_reductions(engine.U, engine.V, engine.log_scale.exp(), engine.plan, dU, dV, ds,
                                   engine.negative_term)
    ref = engine.pair_gradients() @ H
    assert float(((pos + neg).T - ref).abs().max()) <= 1e-12 * float(ref.abs().max())


def _g_based(engine):
    return engine.factor.quadratic(engine.pair_gradients()).double()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("negative_term", ["exact", "taylor"])
@pytest.mark.parametrize("normalize", [False, True, "soft"])
def test_factor_self_influence_equals_the_g_based_quadratic(normalize, negative_term, dtype, monkeypatch):
    engine, _, _ = _engine(normalize, True, negative_term, dtype, chunk_size=10)  # chunks of 2 and 1 batches
    ref = _g_based(engine)
    G = engine.pair_gradients().double()

    def no_pair_gradients(*a, **k):
        raise AssertionError("per-pair parameter gradients were formed")

    monkeypatch.setattr(engine, "_gradient_blocks", no_pair_gradients)
    got = engine.self_influence(method="factor").double()
    assert got.dtype == torch.float64 or dtype == torch.float32
    # the remainder ||g||² − ||a||² is a difference: its error is relative to ||g||², weighted by 1/(λ̄ + δ)
    f = engine.factor
    scale = (G * G).sum(1).max() / (f.rest + f.damping)
    eps = torch.finfo(dtype).eps
    assert float((got - ref).abs().max()) <= 256 * eps * float(scale)
    assert float(((got - ref).abs() / ref).median()) <= 1e3 * eps
    some = engine.self_influence([17, 3, 20], method="factor")
    assert torch.equal(some, engine.self_influence(method="factor")[[17, 3, 20]])


def test_factor_self_influence_with_custom_batches_and_lowrank_solver():
    ids = torch.tensor([2, 0, 1, 2, 0, 0, 1, 2, 2, 1, 0, 0, 2, 1, 2, 0, 1, 1, 2, 0, 2, 2])
    engine, _, _ = _engine(True, False, "exact", torch.float64, batches=ids, solver="lowrank", rank=12)
    assert engine.factor is engine.solver and engine.factor.rest == 0.0
    ref = _g_based(engine)
    got = engine.self_influence(method="factor")
    assert float(((got - ref).abs() / ref).max()) <= 1e-9


class _OwnEncoder(ef.LinearHeads):
    def encode_image(self, x):
        return super().encode_image(x)


def test_other_models_keep_the_g_based_path():
    model, _ = heads(True, train_scale=True, scale=8.0)
    own = _OwnEncoder(6, 5, 8, normalize=True, train_scale=True).double()
    own.load_state_dict(model.state_dict())
    space = ef.ECIF(own, damping=0.1).space
    assert structured_norms_blocks(own, space.names) is None
    assert structured_norms_blocks(model, space.names) is not None
    biased = ef.LinearHeads(6, 5, 8).double()
    biased.image_proj = torch.nn.Linear(6, 8, bias=True).double()
    assert structured_norms_blocks(biased, ["image_proj.weight", "image_proj.bias"]) is None
    g = torch.Generator().manual_seed(3)
    X, Y = torch.randn(N, 6, generator=g, dtype=torch.float64), torch.randn(N, 5, generator=g, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        engine = ef.ECIF(own, damping=0.1, batches=8, solver="cg", rank=6).fit(X, Y)
    assert torch.equal(engine.self_influence(method="factor"), engine.factor.quadratic(engine.pair_gradients()))
