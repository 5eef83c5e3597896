"""docs/math.md §6.2: the embedding-space path equals brute-force autograd (``g_k = ∇R − ∇R_{−k}``) to 1e-10."""
import itertools

import pytest
import torch

import ecif_fast as ef
from ecif_fast.oracle import brute_force_pair_gradients, dense_hessian
from problems import heads, paired_features

N, N_TEST = 18, 6
DAMPING = 300.0  # the models here are not trained: a large damping keeps H positive definite
GRID = list(itertools.product([False, True], [False, True], ["all", "batch"], ["exact", "taylor"]))


def _batches(kind):
    return None if kind == "all" else torch.tensor([0, 1, 2, 1, 0, 2, 2, 1, 0, 0, 1, 2, 2, 2, 0, 1, 1, 3])


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def data():
    X, Y = paired_features(N + N_TEST, seed=3)
    X, Y = 0.3 * X, 0.3 * Y  # moderate logits for the un-normalised heads (p→1 is tested in the kernels)
    return X[:N], Y[:N], X[N:], Y[N:]


@pytest.mark.parametrize("normalize,train_scale,negatives,term", GRID)
def test_influence_equals_autograd_oracle(data, normalize, train_scale, negatives, term):
    X, Y, Xt, Yt = data
    model, _ = heads(normalize, train_scale=train_scale, scale=3.0)
    batches = _batches(negatives)
    engine = ef.ECIF(model, damping=DAMPING, batches=batches, negative_term=term, curvature="hessian").fit(X, Y)
    G, Gpos = brute_force_pair_gradients(model, X, Y, batches=batches, negative_term=term)
    Hinv = torch.linalg.inv(dense_hessian(model, X, Y, batches=batches, damping=DAMPING))

    # F = summed test loss
    res = engine.influence(Xt, Yt)
    grad_F = engine._test_gradients(Xt, Yt, None, False)[0]
    assert _rel(res.total, G @ Hinv @ grad_F) < 1e-10
    assert _rel(res.positive, Gpos @ Hinv @ grad_F) < 1e-10
    assert torch.allclose(res.total, res.positive + res.negative, rtol=0, atol=1e-14 * res.total.abs().max())

    # one F per test pair
    per = engine.influence(Xt, Yt, per_test=True)
    J = engine._test_gradients(Xt, Yt, None, True)
    assert per.total.shape == (N_TEST, N)
    assert _rel(per.total, (G @ Hinv @ J.T).T) < 1e-10
    assert _rel(per.positive, (Gpos @ Hinv @ J.T).T) < 1e-10

    # per-pair gradients and self-influence
    assert _rel(engine.pair_gradients(), G) < 1e-10
    assert _rel(engine.self_influence(), (G * (G @ Hinv)).sum(1)) < 1e-10


def test_test_gradient_is_autograd_of_test_loss(data):
    X, Y, Xt, Yt = data
    model, _ = heads(True, train_scale=True, scale=3.0)
    engine = ef.ECIF(model, damping=DAMPING, batches=6, curvature="hessian").fit(X, Y)
    g = engine._test_gradients(Xt, Yt, None, False)[0]
    loss = ef.contrastive_loss(model.encode_image(Xt), model.encode_text(Yt), model.logit_scale.exp())
    ref = torch.autograd.grad(loss, [model.logit_scale, model.image_proj.weight, model.text_proj.weight])
    order = engine.space.names
    lookup = dict(zip(["logit_scale", "image_proj.weight", "text_proj.weight"], ref))
    assert _rel(g, torch.cat([lookup[n].reshape(-1) for n in order])) < 1e-12


def test_fn_callable_matches_test_pairs(data):
    X, Y, Xt, Yt = data
    model, _ = heads(False)
    engine = ef.ECIF(model, damping=DAMPING, batches=6, curvature="hessian").fit(X, Y)
    by_pairs = engine.influence(Xt, Yt)

    def val_loss(m):
        return ef.contrastive_loss(m.encode_image(Xt), m.encode_text(Yt), m.logit_scale.exp())

    by_fn = engine.influence(fn=val_loss)
    assert _rel(by_fn.total, by_pairs.total) < 1e-12
    several = engine.influence(fn=[val_loss, lambda m: 2 * val_loss(m)])
    assert several.total.shape == (2, N)
    assert _rel(several.total[1], 2 * by_pairs.total) < 1e-12


@pytest.mark.parametrize("term", ["exact", "taylor"])
def test_group_of_one_equals_single_influence(data, term):
    X, Y, Xt, Yt = data
    model, _ = heads(True, train_scale=True, scale=3.0)
    engine = ef.ECIF(model, damping=DAMPING, batches=_batches("batch"), negative_term=term, curvature="hessian").fit(X, Y)
    single = engine.influence(Xt, Yt)
    for k in (0, 7, 17):
        group = engine.group_influence([k], Xt, Yt)
        assert abs(float(group.total) - float(single.total[k])) < 1e-10 * float(single.total.abs().max())
        assert abs(float(group.positive) - float(single.positive[k])) < 1e-10 * float(single.total.abs().max())


def test_group_gradient_matches_retraining_gradient_difference(data):
    """Exact group formula: g(D*) = ∇R − ∇R_{−D*}, with D* deleted from every anchor's denominator."""
    X, Y, Xt, Yt = data
    model, _ = heads(True, scale=3.0)
    batches = _batches("batch")
    engine = ef.ECIF(model, damping=DAMPING, batches=batches, curvature="hessian").fit(X, Y)
    removed = torch.tensor([1, 4, 5, 11])
    keep = torch.ones(N, dtype=torch.bool)
    keep[removed] = False
    from ecif_fast.oracle import _loss_on
    from ecif_fast.core.batches import resolve_batches
    theta = engine.space.flat(model).requires_grad_(True)
    full = torch.autograd.grad(_loss_on(engine.fm, theta, X, Y, resolve_batches(batches, N)), theta)[0]
    rest = torch.autograd.grad(_loss_on(engine.fm, theta, X[keep], Y[keep], resolve_batches(batches[keep], int(keep.sum()))), theta)[0]
    assert _rel(engine.group_gradient(removed), full - rest) < 1e-10
    # and the group influence uses the same g(D*)
    grad_F = engine._test_gradients(Xt, Yt, None, False)[0]
    expected = float(engine.solver.solve(grad_F) @ (full - rest))
    assert abs(float(engine.group_influence(removed, Xt, Yt).total) - expected) < 1e-10 * abs(expected)


# Every kernel backend on the same oracle: the engine's LOO and oracle checks hold on every backend.
# The exact solver does not call a kernel; the Gauss–Newton CG solve does, so both paths are covered.
BACKENDS = ["torch", "cpp", "triton"]


@pytest.fixture
def backend_env(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the Triton backend runs on CPU tensors in its interpreter
    monkeypatch.delenv("ECIF_FAST_BACKEND", raising=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize,train_scale,negatives,term",
                         [(True, True, "batch", "exact"), (False, False, "all", "exact"),
                          (True, False, "all", "taylor"), (False, True, "batch", "taylor")])
def test_every_backend_equals_autograd_oracle(data, backend_env, backend, normalize, train_scale, negatives, term):
    X, Y, Xt, Yt = data
    model, _ = heads(normalize, train_scale=train_scale, scale=3.0)
    batches = _batches(negatives)
    G, Gpos = brute_force_pair_gradients(model, X, Y, batches=batches, negative_term=term)
    Hinv = torch.linalg.inv(dense_hessian(model, X, Y, batches=batches, damping=DAMPING))
    engine = ef.ECIF(model, damping=DAMPING, batches=batches, negative_term=term, backend=backend, curvature="hessian").fit(X, Y)
    per = engine.influence(Xt, Yt, per_test=True)
    J = engine._test_gradients(Xt, Yt, None, True)
    assert _rel(per.total, (G @ Hinv @ J.T).T) < 1e-10
    assert _rel(per.positive, (Gpos @ Hinv @ J.T).T) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_gauss_newton_cg_equals_dense(data, backend_env, backend):
    """CG on the Gauss–Newton product of each backend solves the same system as the dense GN matrix."""
    X, Y, Xt, Yt = data
    model, _ = heads(True, train_scale=True, scale=3.0)
    batches = _batches("batch")
    dense = ef.ECIF(model, damping=DAMPING, batches=batches, curvature="gauss-newton", backend="torch").fit(X, Y)
    cg = ef.ECIF(model, damping=DAMPING, batches=batches, curvature="gauss-newton", solver="cg", cg_tol=1e-13,
                 backend=backend).fit(X, Y)
    ref = dense.influence(Xt, Yt).total
    assert _rel(cg.influence(Xt, Yt).total, ref) < 1e-9
