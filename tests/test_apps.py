"""The application layer (valuation, detection, trace-back, cleaning) against independent oracles:
scikit-learn's ranking metrics, the engine's own quantities computed directly, brute-force losses and
retraining without the removed pairs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

import ecif_fast as ef
from ecif_fast.apps import (PairInfo, clean, detect_misaligned, detection_metrics, precision_at_k, trace_back,
                            value_data, zero_shot_logits, zero_shot_losses)
from ecif_fast.apps.detection import cleaned_scores
from ecif_fast.apps.metrics import auroc, average_precision
from ecif_fast.training import objective
from problems import heads, paired_features

N, B, DAMP = 96, 24, 1.0


@pytest.fixture(scope="module")
def fitted():
    X, Y = paired_features(N + 40, seed=3)
    X, Y, Xv, Yv = X[:N], Y[:N].clone(), X[N:], Y[N:]
    g = torch.Generator().manual_seed(5)
    bad = torch.randperm(N, generator=g)[:14]
    Y[bad] = Y[bad.roll(1)]  # misaligned captions
    labels = torch.zeros(N, dtype=torch.bool)
    labels[bad] = True
    model, ref = heads(False)
    ef.train(model, X, Y, batches=B, damping=DAMP, theta_ref=ref)
    ecif = ef.ECIF(model, damping=DAMP, batches=B, curvature="hessian").fit(X, Y)
    return ecif, X, Y, Xv, Yv, labels, ref


def test_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.random(200) < 0.2
        s = rng.normal(size=200) + y + np.round(rng.normal(size=200), 1) * 0  # ties via rounding below
        s = np.round(s, 1)
        assert auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        # sklearn's AP treats tied scores as one threshold; compare on untied scores
        u = s + 1e-9 * rng.normal(size=200)
        assert average_precision(u, y) == pytest.approx(average_precision_score(y, u), abs=1e-12)
    y = np.array([1, 0, 1, 0, 0], dtype=bool)
    assert precision_at_k([5, 4, 3, 2, 1], y, 2) == 0.5
    m = detection_metrics([5, 4, 3, 2, 1], y)
    assert m["k"] == 2 and m["precision_at_k"] == 0.5
    with pytest.raises(ValueError, match="same length"):
        auroc([1, 2], [True])
    with pytest.raises(ValueError, match="NaN"):
        auroc([1, float("nan")], [True, False])


def test_metrics_do_not_depend_on_the_order_of_tied_scores():
    """A run of tied scores is one threshold (as in scikit-learn's AP); a cut through it at precision@k takes its
    share of the run's positives; the ROC curve's area is the Mann–Whitney AUROC."""
    from ecif_fast.apps.metrics import precision_curve, roc_curve

    rng = np.random.default_rng(1)
    s = rng.integers(0, 6, 120).astype(float)  # many ties
    y = rng.random(120) < 0.3
    first = None
    for _ in range(4):
        p = rng.permutation(s.size)
        out = (auroc(s[p], y[p]), average_precision(s[p], y[p]), precision_at_k(s[p], y[p], 17),
               precision_curve(s[p], y[p]), roc_curve(s[p], y[p]))
        first = first or out
        assert out[:3] == pytest.approx(first[:3], abs=1e-12)
        np.testing.assert_allclose(out[3], first[3], atol=1e-12)
    assert first[1] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    fpr, tpr, auc = first[4]
    assert auc == first[0] == pytest.approx(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2), abs=1e-12)
    top = s >= np.sort(s)[::-1][16]            # the 17th score's run straddles the cut
    above = s > np.sort(s)[::-1][16]
    run = top & ~above
    expected = (y[above].sum() + (17 - above.sum()) * y[run].mean()) / 17
    assert first[2] == pytest.approx(expected, abs=1e-12) and first[3][16] == first[2]


def test_value_data_is_the_influence_with_metadata(fitted):
    ecif, X, Y, Xv, Yv, labels, _ = fitted
    caps = [f"caption {i}" for i in range(N)]
    table = value_data(ecif, Xv, Yv, info=PairInfo(pair_ids=np.arange(N) + 1000, captions=caps,
                                                   extra={"flag": labels}))
    res = ecif.influence(Xv, Yv)
    assert list(table.columns) == ["pair_id", "caption", "flag", "total", "positive", "negative"]
    np.testing.assert_array_equal(table["total"].to_numpy(), res.total.numpy())
    np.testing.assert_array_equal(table["negative"].to_numpy(), res.negative.numpy())
    assert table["pair_id"].iloc[7] == 1007 and table["caption"].iloc[7] == "caption 7"
    with pytest.raises(ef.ECIFInputError, match="one entry per training pair"):
        value_data(ecif, Xv, Yv, info=PairInfo(captions=caps[:-1]))


def _brute_losses(S: torch.Tensor) -> np.ndarray:
    """ℓ_k of every pair of one batch's scores ``S (B, B)`` straight from docs/math.md §2 (row + column
    cross-entropy)."""
    target = torch.arange(S.shape[0])
    return (torch.nn.functional.cross_entropy(S, target, reduction="none")
            + torch.nn.functional.cross_entropy(S.T, target, reduction="none")).numpy()


def _brute_pair_loss(ecif):
    """ℓ_k of every pair in its batch at θ̂."""
    out = torch.empty(ecif.n, dtype=torch.float64)
    t = ecif.log_scale.exp()
    for g in ecif.plan.groups():
        out[g] = torch.from_numpy(_brute_losses(t * (ecif.U[g] @ ecif.V[g].T)))
    return out


def test_detection_scores_and_metrics(fitted):
    ecif, X, Y, Xv, Yv, labels, _ = fitted
    det = detect_misaligned(ecif, Xv, Yv, scoring=["validation", "self", "combined"], labels=labels)
    res = ecif.influence(Xv, Yv)
    self_inf = ecif.self_influence()
    np.testing.assert_allclose(det.scores["ecif"], -res.total.numpy())
    np.testing.assert_allclose(det.scores["positive_only"], -res.positive.numpy())
    np.testing.assert_allclose(det.scores["ecif_self"], self_inf.numpy())
    cos = torch.nn.functional.cosine_similarity(ecif.U, ecif.V)
    np.testing.assert_allclose(det.scores["clip_score"], -cos.numpy(), rtol=1e-12)
    np.testing.assert_allclose(det.scores["loss"], _brute_pair_loss(ecif).numpy(), rtol=1e-10)
    # the combined score is the mean percentile rank: its order agrees with the sum of the two ranks
    r1 = det.scores["ecif"].argsort().argsort()
    r2 = det.scores["ecif_self"].argsort().argsort()
    np.testing.assert_allclose(det.scores["ecif_combined"], (r1 + r2) / (2 * (N - 1)))
    for m, s in det.scores.items():
        assert det.metrics[m]["auroc"] == pytest.approx(roc_auc_score(labels.numpy(), s))
    assert det.metrics["ecif"]["auroc"] > 0.7  # well above chance; the demo test checks real detection quality
    top = det.top(5)
    assert list(top["rank"]) == [1, 2, 3, 4, 5]
    assert list(top.index) == list(np.argsort(-det.scores["ecif"], kind="stable")[:5])
    assert "misaligned" in det.table and det.table["misaligned"].sum() == 14


def test_detection_without_validation_data(fitted):
    ecif = fitted[0]
    det = detect_misaligned(ecif, scoring="self")
    assert det.metrics is None and "total" not in det.table
    np.testing.assert_array_equal(det.table["score"].to_numpy(), det.scores["ecif_self"])
    # the default scoring is "cleaned", as on the command line; with validation pairs that is still the primary
    # score and the validation influence is a second column
    default = detect_misaligned(ecif)
    np.testing.assert_array_equal(default.table["score"].to_numpy(), default.scores["ecif_cleaned"])
    assert "score_ecif" not in default.table
    with pytest.raises(ef.ECIFInputError, match="validation pairs"):
        detect_misaligned(ecif, scoring="validation")
    Xv, Yv = fitted[3], fitted[4]
    with_val = detect_misaligned(ecif, Xv, Yv)
    np.testing.assert_array_equal(with_val.table["score"].to_numpy(), default.scores["ecif_cleaned"])
    np.testing.assert_array_equal(with_val.table["score_ecif"].to_numpy(), with_val.scores["ecif"])
    assert "total" in with_val.table
    with pytest.raises(ef.ECIFInputError, match="scoring must be one of"):
        detect_misaligned(ecif, scoring="nope")


def test_cleaned_scoring_is_each_pairs_loss_after_the_closed_form_removal(fitted):
    """By hand: the 20 % of highest held-out loss removed by ``cleaned_model`` (θ̂ + H⁻¹g(D*)), every pair's loss
    in its batch recomputed from that model's embeddings, the ranking repeated once more."""
    ecif, X, Y, Xv, Yv, labels, _ = fitted
    det = detect_misaligned(ecif, labels=labels)
    s = ecif.held_out_fit()["loss_held_out"].numpy()
    k = round(0.2 * N)
    for _ in range(2):
        model = ecif.cleaned_model(np.argsort(-s, kind="stable")[:k].tolist())
        with torch.no_grad():
            U, V, log_scale = model(X, Y)
        t = float(log_scale.exp())
        s = np.concatenate([_brute_losses(t * (U[i:i + B] @ V[i:i + B].T)) for i in range(0, N, B)])
    np.testing.assert_allclose(det.scores["ecif_cleaned"], s, rtol=1e-10)
    # the model's own fit of the misaligned pairs is no longer there to hide them: ahead of the loss at θ̂ here
    assert det.metrics["ecif_cleaned"]["auroc"] > det.metrics["loss"]["auroc"]
    with pytest.raises(ef.ECIFInputError, match="fraction"):
        cleaned_scores(ecif, fraction=1.0)


def test_trace_back_of_test_pairs_is_relative_influence(fitted):
    ecif, X, Y, Xv, Yv, labels, _ = fitted
    k = 4
    table = trace_back(ecif, Xv[:3], Yv[:3], k=k)
    rel = ecif.relative_influence(Xv[:3], Yv[:3], per_test=True)
    assert len(table) == 3 * k
    for j in range(3):
        rows = table[table["test_id"] == j]
        expect = torch.argsort(rel[j], stable=True)[:k].numpy()
        np.testing.assert_array_equal(rows["train_index"].to_numpy(), expect)
        np.testing.assert_allclose(rows["relative_influence"].to_numpy(), rel[j, expect].numpy(), rtol=1e-10)
        assert (np.diff(rows["relative_influence"].to_numpy()) >= 0).all()  # most responsible first


def test_zero_shot_trace_back(fitted):
    ecif, X, Y, Xv, Yv, labels, _ = fitted
    classes = Yv[:3]
    fns = zero_shot_losses(Xv[:2], [2, 0], classes)
    model = ecif.model
    logits = model.logit_scale.exp() * (model.encode_image(Xv[:2]) @ model.encode_text(classes).T)
    assert torch.allclose(zero_shot_logits(model, Xv[:2], classes), logits)
    ce = torch.nn.functional.cross_entropy(logits, torch.tensor([2, 0]), reduction="none")
    assert torch.allclose(torch.stack([f(model) for f in fns]), ce)
    table = trace_back(ecif, fn=fns, k=3, test_ids=["a", "b"])
    assert list(table["test_id"]) == ["a"] * 3 + ["b"] * 3
    direct = ecif.influence(fn=fns).total
    idx = table["train_index"].to_numpy()[:3].copy()
    np.testing.assert_allclose(table["influence"].to_numpy()[:3], direct[0, idx].numpy(), rtol=1e-10)
    with pytest.raises(ef.ECIFInputError, match="one entry per test image"):
        zero_shot_losses(Xv[:2], [0], classes)
    with pytest.raises(ef.ECIFInputError, match=r"labels must lie in \[0, 3\)"):
        zero_shot_losses(Xv[:2], [0, 3], classes)


def test_clean_matches_removal_update_and_retraining(fitted):
    ecif, X, Y, Xv, Yv, labels, ref = fitted
    remove = (~labels).nonzero().flatten()[:2]

    def evaluate(m):
        U, V = m.encode_image(Xv), m.encode_text(Yv)
        return {"val_loss": float(ef.contrastive_loss(U, V, m.logit_scale.exp()))}

    res = clean(ecif, remove, retrain=True, train_kwargs={"theta_ref": ref}, evaluate=evaluate)
    state = ecif.removal_update(remove)
    for name, p in res.model.named_parameters():
        assert torch.equal(p.detach(), state[name])
    assert list(res.table["setting"]) == ["no removal", "ECIF update", "retrain"]
    # oracle: retraining without the pairs from scratch of the warm start reaches the reduced optimum
    keep = torch.ones(N, dtype=torch.bool)
    keep[remove] = False
    theta0 = ecif.theta
    new = ecif.space.flat(res.model) - theta0
    true = ecif.space.flat(res.retrained) - theta0
    assert float((new - true).norm() / true.norm()) < 0.1  # one Newton step vs the actual retrained change
    losses = res.table["val_loss"].to_numpy()
    assert abs(losses[1] - losses[2]) < 0.25 * abs(losses[2] - losses[0])  # predicted vs actual change
    assert torch.equal(ecif.space.flat(ecif.model), theta0)  # the original model is untouched


def test_self_influence_is_computed_once_per_fit(fitted, monkeypatch):
    """Detection, trace-back and RelatIF share one all-pairs self-influence per fit (a copy each time)."""
    ecif, X, Y, Xv, Yv, labels, _ = fitted
    calls = []
    real = type(ecif)._gradient_blocks  # the per-pair gradient stream behind self-influence
    monkeypatch.setattr(type(ecif), "_gradient_blocks", lambda self, idx: calls.append(idx) or real(self, idx))
    ecif.fit(X, Y)
    first = ecif.self_influence()
    first.zero_()                                    # the caller's copy, not the cache
    again = ecif.self_influence()
    trace_back(ecif, Xv[:2], Yv[:2], k=2)
    detect_misaligned(ecif, scoring="self")
    assert len(calls) == 1 and bool((again > 0).all())
    G = ecif.pair_gradients()
    np.testing.assert_allclose(again.numpy(), (G * ecif.solver.solve(G.T.contiguous()).T).sum(1).numpy(),
                               rtol=1e-12)
    assert torch.equal(ecif.self_influence([3, 4]), ecif._self_influence_of([3, 4], "solve")) and len(calls) == 4
    ecif.fit(X, Y)                                   # a new fit computes it afresh
    ecif.self_influence()
    assert len(calls) == 5


def test_objective_reports_the_training_optimum(fitted):
    """``objective`` evaluates R and max|∇R| where ``train`` left the model: the same loss, a tiny gradient."""
    ecif, X, Y, _, _, _, ref = fitted
    import copy
    m = copy.deepcopy(ecif.model)
    res = ef.train(m, X, Y, batches=B, damping=DAMP, theta_ref=ref)
    at = objective(m, X, Y, batches=B, damping=DAMP, theta_ref=ref)
    assert at.loss == pytest.approx(res.loss, rel=1e-14) and at.grad_norm == pytest.approx(res.grad_norm, abs=1e-12)
    moved = objective(m, X, Y, batches=B, damping=DAMP, theta_ref=ref + 0.1)
    assert moved.grad_norm > 1e-3  # away from its optimum R has a visible gradient
