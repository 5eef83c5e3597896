"""Trust-region Newton-CG training (ecif_fast/trust_region.py, docs/math.md §2.2) against dense Newton, its
pieces against brute force, and LinearHeads on whitened features (docs/math.md §2.1)."""
import math

import pytest
import torch

import ecif_fast as ef
from ecif_fast import training, trust_region
from ecif_fast.core.batches import resolve_batches
from ecif_fast.core.loss import contrastive_loss
from ecif_fast.models.params import select_params


def _pairs(seed=0, n=40, di=7, dt=5):
    g = torch.Generator().manual_seed(seed)
    X = 3 * torch.randn(n, di, generator=g, dtype=torch.float64) + 5      # badly scaled, off-centre
    Y = X[:, :dt] @ torch.randn(dt, dt, generator=g, dtype=torch.float64) + 0.5 * torch.randn(n, dt, generator=g,
                                                                                               dtype=torch.float64)
    return X, Y


def _heads(X, Y, d=4, normalize=True, train_scale=False, seed=0):
    torch.manual_seed(seed)
    m = ef.LinearHeads(X.shape[1], Y.shape[1], d, normalize=normalize, logit_scale=math.log(5.0),
                       train_scale=train_scale).double()
    ref = torch.cat([p.detach().flatten() for p in m.parameters() if p.requires_grad]).clone()
    return m, ref


def _theta(m):
    return torch.cat([p.detach().flatten() for p in m.parameters() if p.requires_grad])


def _start(X, Y, normalize, train_scale, whiten):
    if not whiten:
        return _heads(X, Y, normalize=normalize, train_scale=train_scale)
    # softly normalised heads with a trained logit scale have a nearly flat direction (the heads' scales against
    # t, held only by ε and the damping): there the block-preconditioned Newton-CG stops at R's rounding near
    # max|∇R| = 1.4e-7 on one thread (the automatic choice with a trained scale is Newton or L-BFGS), so that
    # case is checked with the exact normalisation
    m = ef.LinearHeads.from_features(X, Y, 4, normalize=normalize, logit_scale=math.log(5.0),
                                     train_scale=train_scale, soft_norm=0.0 if train_scale else 0.1)
    return m, _theta(m).clone()


# raw plain heads on these badly scaled features are slow for every method (dense Newton: 113 steps), and with
# a trained scale on raw features Newton-CG does not converge (the automatic choice then is L-BFGS): whitened.
# dense: the dense Gauss–Newton preconditioner (LinearHeads with a fixed scale, small P), else the block one.
@pytest.mark.parametrize("normalize,train_scale,whiten,dense", [
    (True, False, False, True), (True, False, False, False), (False, False, True, True), (False, False, True, False),
    (True, False, True, True), (True, False, True, False), (True, True, True, False)])
def test_newton_cg_reaches_a_minimum_dense_newton_confirms(normalize, train_scale, whiten, dense, monkeypatch):
    if not dense:
        monkeypatch.setattr(training, "DENSE_PRECONDITIONER_MAX_P", 0)
    used = []
    real = trust_region.DensePreconditioner
    monkeypatch.setattr(trust_region, "DensePreconditioner", lambda *a: used.append(1) or real(*a))
    X, Y = _pairs()
    b, ref = _start(X, Y, normalize, train_scale, whiten)
    rb = ef.train(b, X, Y, batches=10, damping=0.3, theta_ref=ref, method="newton-cg", tol=1e-7)
    assert rb.grad_norm < 1e-7 and rb.iterations > 0
    assert bool(used) == dense
    # dense Newton from there stays (a stationary point) and the dense Hessian is positive definite (a minimum);
    # from the random start the two methods may end in different local minima of this non-convex R
    a, _ = _start(X, Y, normalize, train_scale, whiten)
    with torch.no_grad():
        for p, q in zip(a.parameters(), b.parameters()):
            p.copy_(q)
    ra = ef.train(a, X, Y, batches=10, damping=0.3, theta_ref=ref, method="newton")
    assert ra.grad_norm < 1e-7 and abs(ra.loss - rb.loss) <= 1e-10 * abs(ra.loss)
    torch.testing.assert_close(_theta(b), _theta(a), rtol=1e-5, atol=1e-7)
    R, theta, *_ = training._objective(a, X, Y, 10, 0.3, ref, None)
    H = training._dense_hessian(torch.func.grad(R), theta, theta.numel())
    assert float(torch.linalg.eigvalsh(0.5 * (H + H.T))[0]) > 0


@pytest.mark.parametrize("params", [None, ["text_proj.weight"]])
def test_dense_gauss_newton_preconditioner_is_the_closed_form_matrix_plus_damping(params):
    X, Y = _pairs()
    m = ef.LinearHeads.from_features(X, Y, 4, logit_scale=math.log(5.0))
    with torch.no_grad():
        m.image_proj.weight.add_(0.3)
    _, theta, space, _, plan, _, _, _, dense = training._objective(m, X, Y, 10, 0.3, None, params)
    C = dense(theta)
    # the engine's Gauss–Newton matrix of the same parameters, built column by column
    engine = ef.ECIF(m, damping=0.3, batches=10, solver="cg", params=params, precondition=False).fit(X, Y)
    ref = engine.curvature._dense_gauss_newton()
    assert torch.allclose(C, ref, rtol=0, atol=1e-11 * float(ref.abs().max()))
    M = trust_region.DensePreconditioner(C.clone(), 0.3)
    v = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    Mv = M.apply(v, 1)
    torch.testing.assert_close(Mv, 0.5 * (C + C.T) @ v + 0.3 * v, rtol=1e-10, atol=1e-10 * float(Mv.abs().max()))
    torch.testing.assert_close(M.apply(Mv, -1), v, rtol=1e-8, atol=1e-8)
    # a trained logit scale, or an encoder overridden: no closed form, the block preconditioner
    s = ef.LinearHeads.from_features(X, Y, 4, train_scale=True)
    assert training._objective(s, X, Y, 10, 0.3, None, None)[-1] is None

    class Shifted(ef.LinearHeads):
        def encode_text(self, y):
            return super().encode_text(y + 1.0)
    o = Shifted(X.shape[1], Y.shape[1], 4).double()
    assert training._objective(o, X, Y, 10, 0.3, None, None)[-1] is None


def test_a_dense_preconditioner_that_cannot_be_factored_falls_back_to_the_block_one(monkeypatch):
    X, Y = _pairs()
    m, ref = _start(X, Y, True, False, True)

    def fail(*a):
        raise torch.linalg.LinAlgError("not positive definite")
    monkeypatch.setattr(trust_region, "DensePreconditioner", fail)
    blocks = []
    real = trust_region.build_preconditioner
    monkeypatch.setattr(trust_region, "build_preconditioner", lambda *a: blocks.append(1) or real(*a))
    res = ef.train(m, X, Y, batches=10, damping=0.3, theta_ref=ref, method="newton-cg", tol=1e-7)
    assert res.grad_norm < 1e-7 and len(blocks) == res.iterations


def test_auto_picks_newton_for_small_linear_heads(monkeypatch):
    X, Y = _pairs()
    m, ref = _heads(X, Y)
    monkeypatch.setattr(trust_region, "newton_cg", lambda *a, **k: pytest.fail("Newton-CG for a small problem"))
    assert ef.train(m, X, Y, batches=10, damping=0.3, theta_ref=ref, tol=1e-8).grad_norm < 1e-8


@pytest.mark.parametrize("limit", ["size", "passes"])
def test_auto_picks_newton_cg_for_linear_heads_beyond_small_problems(monkeypatch, limit):
    X, Y = _pairs()
    m, ref = _heads(X, Y)
    if limit == "size":
        monkeypatch.setattr(training, "AUTO_NEWTON_MAX_P", ref.numel() - 1)
    else:   # the Hessian in more column blocks than AUTO_NEWTON_MAX_PASSES
        monkeypatch.setattr(training, "HESSIAN_BLOCK_MEMORY", 1)
    called = []
    real = trust_region.newton_cg
    monkeypatch.setattr(trust_region, "newton_cg", lambda *a, **k: called.append(1) or real(*a, **k))
    res = ef.train(m, X, Y, batches=10, damping=0.3, theta_ref=ref, tol=1e-8)
    assert called and res.grad_norm < 1e-8


def _space_theta(m):
    space = select_params(m, None)
    return space, space.flat(m)


def _skew(d, g):
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    return A - A.T


@pytest.mark.parametrize("normalize", [True, False])
def test_orbit_complement_is_the_orthogonal_projector_off_the_symmetry_tangent(normalize):
    X, Y = _pairs()
    m, _ = _heads(X, Y, d=4, normalize=normalize)
    space, theta = _space_theta(m)
    P = trust_region.orbit_complement(m, space, theta)
    g = torch.Generator().manual_seed(1)
    sl = space.slices()
    Wi, Wt = theta[sl["image_proj.weight"]].view(4, -1), theta[sl["text_proj.weight"]].view(4, -1)
    tangents = []
    for _ in range(3):
        S = _skew(4, g)
        tangents.append(torch.cat([(S @ Wi).flatten(), (S @ Wt).flatten()]))
    if normalize:
        tangents += [torch.cat([Wi.flatten(), 0 * Wt.flatten()]), torch.cat([0 * Wi.flatten(), Wt.flatten()])]
    for t in tangents:
        assert float(P(t).norm()) <= 1e-10 * float(t.norm())
    v = torch.randn(theta.numel(), generator=g, dtype=torch.float64)
    pv = P(v)
    torch.testing.assert_close(P(pv), pv, rtol=1e-10, atol=1e-12)        # idempotent
    for t in tangents:
        assert abs(float(pv @ t)) <= 1e-10 * float(v.norm() * t.norm())   # orthogonal to the tangent
    w = torch.randn(theta.numel(), generator=g, dtype=torch.float64)
    assert abs(float(P(w) @ v) - float(w @ pv)) <= 1e-10 * float(v.norm() * w.norm())   # symmetric


def test_symmetry_step_keeps_every_score_and_lowers_the_weight_decay():
    X, Y = _pairs()
    m, ref = _heads(X, Y)
    ef.train(m, X, Y, batches=10, damping=0.3, theta_ref=ref, method="lbfgs", max_iter=5)
    space, theta = _space_theta(m)
    # move theta along a symmetry: a random rotation and scales
    g = torch.Generator().manual_seed(3)
    Q = torch.linalg.matrix_exp(0.7 * _skew(4, g))
    sl = space.slices()
    moved = theta.clone()
    for name, c in (("image_proj.weight", 1.7), ("text_proj.weight", 0.6)):
        moved[sl[name]] = (c * Q @ theta[sl[name]].view(4, -1)).flatten()
    out = trust_region.head_symmetry_step(m, space, moved, ref)
    R, *_ = training._objective(m, X, Y, 10, 0.3, ref, None)
    R0 = R(moved)
    loss = lambda th: float(R(th)) - 0.15 * float(((th - ref) ** 2).sum())
    assert abs(loss(out) - loss(moved)) <= 1e-10 * abs(loss(moved))
    assert float(R(out)) <= float(R(theta)) + 1e-10 and float(R(out)) < float(R0)
    # at the closed-form minimum over the orbit, ∇R has no part along the orbit's tangent
    grad = torch.func.grad(R)(out)
    P = trust_region.orbit_complement(m, space, out)
    assert float((grad - P(grad)).norm()) <= 1e-8 * float(grad.norm())


def test_pair_curvature_is_the_trace_of_each_embeddings_hessian_block():
    g = torch.Generator().manual_seed(0)
    n, d, t = 7, 3, 2.5
    U, V = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    plan = resolve_batches(torch.tensor([0, 1, 0, 0, 1, 1, 0]), n)
    ci, ct = trust_region.pair_curvature(U, V, t, plan)
    HU = torch.func.hessian(lambda u: contrastive_loss(u, V, t, plan))(U)      # (n, d, n, d)
    HV = torch.func.hessian(lambda v: contrastive_loss(U, v, t, plan))(V)
    for k in range(n):
        assert abs(float(HU[k, :, k, :].trace()) - float(ci[k])) <= 1e-12 * max(1.0, abs(float(ci[k])))
        assert abs(float(HV[k, :, k, :].trace()) - float(ct[k])) <= 1e-12 * max(1.0, abs(float(ct[k])))


def test_from_features_whitens_each_side_and_starts_at_canonical_directions():
    X, Y = _pairs(n=60)
    Y = torch.cat([Y, Y[:, :1] + Y[:, 1:2]], dim=1)      # a linearly dependent text column: rank 5 of 6
    m = ef.LinearHeads.from_features(X, Y, 4)
    assert (m.image_rank, m.text_rank) == (7, 5) and m.image_proj.weight.shape == (4, 7)
    for side, Z in (("image", X), ("text", Y)):
        W = m.proj_input(Z, side)
        torch.testing.assert_close(W.mean(0), torch.zeros(W.shape[1], dtype=W.dtype), atol=1e-10, rtol=0)
        torch.testing.assert_close(W.T @ W / Z.shape[0], torch.eye(W.shape[1], dtype=W.dtype), atol=1e-8, rtol=0)
    # rows of the heads are canonical pairs: the whitened sides' cross-covariance is diagonal in them
    Xw, Yw = m.proj_input(X, "image"), m.proj_input(Y, "text")
    C = (m.image_proj.weight @ (Xw.T @ Yw / X.shape[0]) @ m.text_proj.weight.T).detach()
    off = C - torch.diag(C.diagonal())
    assert float(off.abs().max()) < 1e-10 and bool((C.diagonal()[:-1] >= C.diagonal()[1:] - 1e-12).all())
    # more embedding rows than canonical pairs: the extra rows start at zero
    wide = ef.LinearHeads.from_features(X, Y, 6)
    assert float(wide.image_proj.weight[5:].abs().max()) == 0 and float(wide.text_proj.weight[5:].abs().max()) == 0
    assert ef.LinearHeads.from_features(X.float(), Y.float(), 4).image_map.dtype == torch.float32
    # max_rank keeps the directions of largest variance: the whitened features span the top principal components
    low = ef.LinearHeads.from_features(X, Y, 3, max_rank=3)
    assert (low.image_rank, low.text_rank) == (3, 3)
    Xc = X - X.mean(0)
    top = torch.linalg.eigh(Xc.T @ Xc)[1][:, -3:]
    span = low.image_map / low.image_map.norm(dim=0)
    torch.testing.assert_close(top @ (top.T @ span), span, atol=1e-10, rtol=0)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_rank"):
            ef.LinearHeads.from_features(X, Y, 3, max_rank=bad)


def test_from_features_refuses_bad_features():
    X, Y = _pairs()
    with pytest.raises(ef.ECIFInputError, match="text features are constant"):
        ef.LinearHeads.from_features(X, torch.ones_like(Y), 3)
    bad = X.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ef.ECIFInputError, match="image features must be finite"):
        ef.LinearHeads.from_features(bad, Y, 3)
    with pytest.raises(ef.ECIFInputError, match="same n"):
        ef.LinearHeads.from_features(X, Y[:-1], 3)


def test_whitened_heads_train_to_the_optimum_and_score_like_any_model():
    X, Y = _pairs(n=48)
    m = ef.LinearHeads.from_features(X, Y, 4)
    ref = _theta(m).clone()
    res = ef.train(m, X, Y, batches=12, damping=1.0, theta_ref=ref, method="newton-cg", tol=1e-9)
    assert res.grad_norm < 1e-9
    e = ef.ECIF(m, damping=1.0, batches=12, solver="exact", progress=False).fit(X, Y)
    si = e.self_influence()
    # the structured (no per-pair gradient) norms see the whitened inputs: factor at full rank == exact
    full = ef.ECIF(m, damping=1.0, batches=12, rank=ref.numel(), progress=False).fit(X, Y)
    torch.testing.assert_close(full.self_influence(method="factor"), si, rtol=1e-6, atol=1e-9)


def test_soft_normalisation_is_z_over_sqrt_norm2_plus_eps2_and_breaks_only_the_scale_symmetry():
    X, Y = _pairs(n=30)
    g = torch.Generator().manual_seed(4)
    m = ef.LinearHeads(X.shape[1], Y.shape[1], 4, norm_eps=2.0).double()
    Z = X @ m.image_proj.weight.T
    u = m.encode_image(X)
    torch.testing.assert_close(u, Z / (Z.pow(2).sum(1, keepdim=True) + 4.0).sqrt(), rtol=1e-14, atol=0)
    assert bool((u.norm(dim=1) < 1).all()) and not m.scale_invariant
    assert ef.LinearHeads(3, 3, 2).scale_invariant and not ef.LinearHeads(3, 3, 2, normalize=False).scale_invariant
    for bad, kw in ((-1.0, {}), (float("nan"), {}), (0.5, {"normalize": False})):
        with pytest.raises(ValueError, match="norm_eps"):
            ef.LinearHeads(3, 3, 2, norm_eps=bad, **kw)
    # from_features: ε is soft_norm × the median norm of the starting embeddings; 0 keeps the exact normalisation
    soft = ef.LinearHeads.from_features(X, Y, 4, soft_norm=0.2)
    with torch.no_grad():
        start = torch.cat([(soft.proj_input(X, "image") @ soft.image_proj.weight.T).norm(dim=1),
                           (soft.proj_input(Y, "text") @ soft.text_proj.weight.T).norm(dim=1)])
    assert soft.norm_eps == pytest.approx(0.2 * float(start.median()), rel=1e-12)
    assert ef.LinearHeads.from_features(X, Y, 4, soft_norm=0.0).norm_eps == 0.0
    assert ef.LinearHeads.from_features(X, Y, 4, normalize=False).norm_eps == 0.0
    for bad in (-0.1, 1.0, True):
        with pytest.raises(ValueError, match="soft_norm"):
            ef.LinearHeads.from_features(X, Y, 4, soft_norm=bad)
    # a head's scale now changes the scores, a joint rotation does not: only rotations are taken out in training
    space, theta = _space_theta(soft)
    sl = space.slices()
    Wi, Wt = theta[sl["image_proj.weight"]].view(4, -1), theta[sl["text_proj.weight"]].view(4, -1)
    scaled = torch.cat([(1.5 * Wi).flatten(), Wt.flatten()])
    Q = torch.linalg.matrix_exp(0.7 * _skew(4, g))
    rotated = torch.cat([(Q @ Wi).flatten(), (Q @ Wt).flatten()])
    R, *_ = training._objective(soft, X, Y, 10, 0.0, theta, None)
    assert abs(float(R(rotated)) - float(R(theta))) <= 1e-12 * abs(float(R(theta)))
    assert abs(float(R(scaled)) - float(R(theta))) > 1e-6 * abs(float(R(theta)))
    P = trust_region.orbit_complement(soft, space, theta)
    scale_dir = torch.cat([Wi.flatten(), 0 * Wt.flatten()])
    S = _skew(4, g)
    rot_dir = torch.cat([(S @ Wi).flatten(), (S @ Wt).flatten()])
    assert float(P(rot_dir).norm()) <= 1e-10 * float(rot_dir.norm())
    assert float(P(scale_dir).norm()) > 0.1 * float(scale_dir.norm())
    assert trust_region.orbit_complement(soft, space, theta, rotations=False) is None
    # the symmetry step rotates back towards θ_ref but does not rescale
    back = trust_region.head_symmetry_step(soft, space, torch.cat([(1.5 * Q @ Wi).flatten(), (Q @ Wt).flatten()]),
                                           theta)
    torch.testing.assert_close(back, scaled, rtol=0, atol=1e-10)
