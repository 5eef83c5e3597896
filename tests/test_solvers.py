"""Solvers and curvature (docs/math.md §4): exact vs CG vs low-rank, Gauss–Newton built independently, damping, subsampling."""
import re

import pytest
import torch
from torch.func import functional_call, hessian, jacrev

import ecif_fast as ef
from ecif_fast import ECIFInputError, NotPositiveDefiniteError
from ecif_fast.core.batches import resolve_batches
from ecif_fast.oracle import dense_hessian
from ecif_fast.solvers import AUTO_FRACTION, CGSolver, LowRankSolver, resolve_damping, top_eigenpairs
from problems import heads, paired_features

N, N_TEST, BATCH = 16, 4, 4  # four batches of four
TRAIN_DAMPING = 5.0
SMALL = dict(image_dim=4, text_dim=3, embed_dim=4)  # P = 28 (+1 with a trained scale)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _problem(normalize, *, train_scale=False, dims=SMALL, seed=1, n=N, batch=BATCH):
    """A float64 model trained to the optimum of R with damping TRAIN_DAMPING towards θ_ref.

    (Normalised heads: not every seed / damping has a well-posed optimum, see docs/math.md §6; this one does.)
    """
    X, Y = paired_features(n + N_TEST, image_dim=dims["image_dim"], text_dim=dims["text_dim"], latent=3, seed=seed)
    X, Y = 0.5 * X, 0.5 * Y
    model, ref = heads(normalize, train_scale=train_scale, scale=3.0, seed=seed, **dims)
    result = ef.train(model, X[:n], Y[:n], batches=batch, damping=TRAIN_DAMPING, theta_ref=ref)
    assert result.grad_norm < 1e-9
    return model, X[:n], Y[:n], X[n:], Y[n:]


@pytest.fixture(scope="module", params=[False, True], ids=["raw", "normalized"])
def trained(request):
    return _problem(request.param, train_scale=request.param)


class _Matrix:
    """A duck-typed Curvature for a given symmetric matrix (to test the solvers in isolation)."""

    kind = "test"

    def __init__(self, A):
        self.A, self.size, self.theta = A, A.shape[0], torch.zeros(A.shape[0], dtype=A.dtype)

    def matvec(self, v):
        return self.A @ v

    def dense(self):
        return self.A.clone()


# ---------------------------------------------------------------- exact vs CG vs low-rank(rank = P)
@pytest.mark.parametrize("curvature", ["hessian", "gauss-newton"])
def test_solvers_agree(trained, curvature):
    model, X, Y, Xt, Yt = trained
    kw = dict(damping=TRAIN_DAMPING, batches=BATCH, curvature=curvature)
    exact = ef.ECIF(model, solver="exact", **kw).fit(X, Y)
    P = exact.space.size
    cg = ef.ECIF(model, solver="cg", cg_tol=1e-13, **kw).fit(X, Y)
    low = ef.ECIF(model, solver="lowrank", rank=P, **kw).fit(X, Y)
    assert low.solver.rank == P

    ref = exact.influence(Xt, Yt)
    for other in (cg, low):
        res = other.influence(Xt, Yt)
        assert _rel(res.total, ref.total) < 1e-9
        assert _rel(res.positive, ref.positive) < 1e-9
    assert 0 < cg.solver.last_iterations <= 3 * P  # at most P steps in exact arithmetic, a few more in floats

    # against a dense solve of C + δI, one and several right-hand sides (CG: see test_cg_block_solve)
    C = exact.curvature.dense()
    H = C + TRAIN_DAMPING * torch.eye(P, dtype=C.dtype)
    B = torch.randn(P, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    truth = torch.linalg.solve(H, B)
    for solver in (exact.solver, low.solver):
        assert _rel(solver.solve(B), truth) < 1e-9
        assert _rel(solver.solve(B[:, 0]), truth[:, 0]) < 1e-9
    assert _rel(low.self_influence(), exact.self_influence()) < 1e-9


def test_hessian_at_optimum_is_the_oracle_hessian(trained):
    model, X, Y, _, _ = trained
    engine = ef.ECIF(model, damping=TRAIN_DAMPING, batches=BATCH, curvature="hessian").fit(X, Y)
    C = dense_hessian(model, X, Y, batches=BATCH)
    assert _rel(engine.curvature.dense(), C) < 1e-12
    v = torch.randn(engine.space.size, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert _rel(engine.curvature.matvec(v), C @ v) < 1e-12


# ---------------------------------------------------------------- low-rank approximation error
def test_lowrank_error_improves_with_rank():
    # P = 88. Normalised heads and the exact Hessian: the spectrum has no exact zeros to rank 88 (the raw
    # heads' Gauss–Newton matrix has rank ≤ 30: S depends on θ only through W_imgᵀ W_txt).
    model, X, Y, Xt, Yt = _problem(True, dims=dict(image_dim=6, text_dim=5, embed_dim=8), n=40, batch=10)
    engine = ef.ECIF(model, damping=TRAIN_DAMPING, batches=10, curvature="hessian").fit(X, Y)
    C = engine.curvature.dense()
    P, delta = C.shape[0], TRAIN_DAMPING
    assert P == 88
    Hinv = torch.linalg.inv(C + delta * torch.eye(P, dtype=C.dtype))
    lam = torch.linalg.eigvalsh(C)
    lam = lam[lam.abs().argsort(descending=True)]  # the order the low-rank solver keeps them in
    assert float(lam[60].abs()) > 1e-3  # λ_61 is not negligible, so rank 60 is still an approximation
    g = engine._test_gradients(Xt, Yt, None, False)[0]
    op_err, fro_err, vec_err = [], [], []
    for rank in (5, 20, 60, P):
        approx = LowRankSolver(engine.curvature, delta, rank=rank, dense=C).solve(torch.eye(P, dtype=C.dtype))
        # the eigenpairs left out get 1/δ instead of 1/(λ+δ): an error f = |λ|/(δ|λ+δ|) along each of them;
        # the operator norm is the largest f, the Frobenius norm the root sum of their squares
        rest = lam[rank:]
        f = rest.abs() / (delta * (rest + delta).abs())
        op_err.append(float(torch.linalg.matrix_norm(approx - Hinv, ord=2)))
        fro_err.append(float(torch.linalg.matrix_norm(approx - Hinv)))
        assert op_err[-1] == pytest.approx(float(f.max()) if rank < P else 0.0, rel=1e-8, abs=1e-12)
        assert fro_err[-1] == pytest.approx(float(f.norm()), rel=1e-8, abs=1e-12)
        vec_err.append(float((approx @ g - Hinv @ g).norm()))
    # The operator norm sees only the worst direction left out, so it need not improve with every rank:
    # the exact Hessian is indefinite, and a dropped eigenvalue between −δ and 0 outweighs larger positive
    # ones (f = |λ|/(δ(δ − |λ|)) against λ/(δ(λ + δ))). In one trained state λ = −2.28 (f = 0.167) set the
    # error of rank 5 and of rank 20 alike, above λ = 12.2 (f = 0.142). It never grows; the Frobenius
    # norm, which sees every dropped direction, shrinks with every rank.
    # (equal errors come from different solves: compare to rounding)
    never_grows = all(a >= b * (1 - 1e-10) for a, b in zip(op_err[:2], op_err[1:3]))
    assert never_grows and op_err[2] > 1e3 * op_err[3] and op_err[3] < 1e-12
    assert fro_err[0] > fro_err[1] > fro_err[2] > 1e3 * fro_err[3]
    assert op_err[0] < 1 / delta  # never worse than ignoring the curvature
    assert vec_err[0] > vec_err[1] > vec_err[2] > 1e3 * vec_err[3]
    assert vec_err[3] < 1e-10 * float((Hinv @ g).norm())


def test_randomized_eigenpairs_match_dense():
    """Subspace iteration (rank + oversample < P) finds the top eigenpairs of a decaying spectrum."""
    g = torch.Generator().manual_seed(3)
    P = 60
    Qm, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    lam = 100.0 * 0.6 ** torch.arange(P, dtype=torch.float64)
    lam[7] = -lam[7]  # largest *magnitude* first, signs kept
    curv = _Matrix(Qm @ torch.diag(lam) @ Qm.T)
    vals, vecs = top_eigenpairs(curv, 8, seed=0)
    order = lam.abs().argsort(descending=True)[:8]
    assert torch.allclose(vals, lam[order], rtol=1e-8, atol=0)
    overlap = (vecs.T @ Qm[:, order]).diagonal().abs()
    assert torch.allclose(overlap, torch.ones(8, dtype=torch.float64), atol=1e-6)
    again = top_eigenpairs(curv, 8, seed=0)
    assert torch.equal(vals, again[0]) and torch.equal(vecs, again[1])


def test_lowrank_rank_is_validated():
    with pytest.raises(ECIFInputError, match="rank must be >= 1, got 0"):
        LowRankSolver(_Matrix(torch.eye(3, dtype=torch.float64)), 1.0, rank=0)


# ---------------------------------------------------------------- Gauss–Newton built independently
def _batch_scores(model, space, Xb, Yb):
    def S(theta):
        U, V, s = functional_call(model, space.unflatten(theta), (Xb, Yb))  # LinearHeads.forward
        return (s.exp() * (U @ V.T)).reshape(-1)
    return S


def _score_loss(S):
    return torch.logsumexp(S, 1).sum() + torch.logsumexp(S, 0).sum() - 2 * S.diagonal().sum()


@pytest.mark.parametrize("normalize,train_scale", [(False, False), (True, False), (False, True), (True, True)])
def test_gauss_newton_is_JT_HS_J(normalize, train_scale):
    X, Y = paired_features(10, **{k: SMALL[k] for k in ("image_dim", "text_dim")}, latent=3, seed=4)
    model, _ = heads(normalize, train_scale=train_scale, scale=3.0, **SMALL)
    batches = torch.tensor([0, 1, 0, 2, 1, 0, 2, 1, 0, 2])  # ragged: 4, 3, 3
    engine = ef.ECIF(model, damping=1.0, batches=batches, curvature="gauss-newton", solver="cg").fit(X, Y)
    theta, space = engine.theta, engine.space
    P = space.size
    GN = torch.zeros(P, P, dtype=torch.float64)
    second_order = torch.zeros(P, P, dtype=torch.float64)  # Σ_ij (∂L/∂S_ij) ∇²S_ij
    for g in resolve_batches(batches, 10).groups():
        S_fn = _batch_scores(model, space, X[g], Y[g])
        B = len(g)
        S = S_fn(theta).reshape(B, B).detach()
        J = jacrev(S_fn)(theta)  # (B², P)
        H_S = torch.autograd.functional.hessian(_score_loss, S).reshape(B * B, B * B)
        GN += J.T @ H_S @ J
        dL = torch.func.grad(_score_loss)(S).reshape(-1)
        second_order += hessian(lambda th: (dL * S_fn(th)).sum())(theta)
    # H_S is the Hessian of a log-sum-exp: PSD, so GN is too
    assert float(torch.linalg.eigvalsh(GN)[0]) > -1e-10 * float(GN.abs().max())
    assert _rel(engine.curvature.dense(), GN) < 1e-11
    V = torch.randn(P, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert _rel(engine.curvature.matvec(V), GN @ V) < 1e-11
    # exact Hessian = Gauss–Newton + the second-order term of the scores
    H = dense_hessian(model, X, Y, batches=batches)
    assert _rel(GN + second_order, H) < 1e-11
    assert _rel(GN, H) > 1e-3  # the second-order term is not negligible here


# ---------------------------------------------------------------- not positive definite
def test_exact_solver_not_positive_definite_message():
    X, Y = paired_features(N, **{k: SMALL[k] for k in ("image_dim", "text_dim")}, latent=3, seed=1)
    model, _ = heads(True, scale=5.0, **SMALL)  # untrained: the Hessian is indefinite
    damping = 1e-6
    lam = float(torch.linalg.eigvalsh(dense_hessian(model, X, Y, batches=BATCH, damping=damping))[0])
    assert lam < 0
    with pytest.raises(NotPositiveDefiniteError, match="smallest eigenvalue") as info:
        ef.ECIF(model, damping=damping, batches=BATCH, curvature="hessian").fit(X, Y)
    msg = str(info.value)
    reported = float(re.search(r"smallest eigenvalue (\S+) ", msg).group(1))
    assert abs(reported - lam) <= 1e-4 * abs(lam)
    assert "damping 1.0000e-06" in msg and "gauss-newton" in msg
    # the suggested damping is enough
    above = float(re.search(r"increase damping above (\S+),", msg).group(1))
    ef.ECIF(model, damping=1.01 * above, batches=BATCH, curvature="hessian").fit(X, Y)
    # Gauss–Newton is PSD: tiny damping works there
    ef.ECIF(model, damping=damping, batches=BATCH, curvature="gauss-newton").fit(X, Y)


def test_cg_block_solve():
    """Several right-hand sides converge independently (columns stop at different iterations)."""
    g = torch.Generator().manual_seed(6)
    Qm, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    A = Qm @ torch.diag(torch.logspace(-2, 3, 30, dtype=torch.float64)) @ Qm.T
    B = torch.randn(30, 3, generator=g, dtype=torch.float64)
    B[:, 1] = Qm[:, 0]  # an eigenvector: converges in one step
    solver = CGSolver(_Matrix(A), damping=0.5, tol=1e-13)
    truth = torch.linalg.solve(A + 0.5 * torch.eye(30, dtype=torch.float64), B)
    assert _rel(solver.solve(B), truth) < 1e-11
    # Qm[:, 0] is an eigenvector of the rounded A (and of its matvec) only to ~P·eps·||A||, so the one step
    # that solves it leaves a relative residual of up to P·eps·||A||/(λ + δ) ≈ 6.5e-12 (2e-13 seen on one CPU:
    # tol = 1e-13 then took 3 steps). Ten times that floor still fails a right-hand side that needs a second
    # step: a generic one leaves a residual of order 1 after the first.
    floor = 30 * torch.finfo(torch.float64).eps * float(torch.linalg.matrix_norm(A, ord=2)) / (0.01 + 0.5)
    one_step = CGSolver(_Matrix(A), damping=0.5, tol=10 * floor)
    assert _rel(one_step.solve(B[:, 1]), truth[:, 1]) < 1e-12 and one_step.last_iterations == 1
    with pytest.warns(RuntimeWarning, match="CG stopped after 1 iterations"):
        CGSolver(_Matrix(A), damping=0.5, tol=10 * floor, maxiter=1).solve(B[:, 0])
    with pytest.warns(RuntimeWarning, match="CG stopped after 3 iterations"):
        CGSolver(_Matrix(A), damping=0.5, tol=1e-13, maxiter=3).solve(B)


def test_cg_not_positive_definite_on_indefinite_matrix():
    A = torch.diag(torch.tensor([1.0, -3.0, 1.0], dtype=torch.float64))
    with pytest.raises(NotPositiveDefiniteError, match="non-positive curvature"):
        CGSolver(_Matrix(A), damping=1e-3).solve(torch.ones(3, dtype=torch.float64))
    # negative curvature found only after a few steps
    lam = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, -0.5], dtype=torch.float64)
    Qm, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    with pytest.raises(NotPositiveDefiniteError, match="not positive definite"):
        CGSolver(_Matrix(Qm @ torch.diag(lam) @ Qm.T), damping=0.1).solve(torch.ones(6, dtype=torch.float64))
    # the same matrix, damped enough, solves
    M = Qm @ torch.diag(lam) @ Qm.T
    x = CGSolver(_Matrix(M), damping=1.0, tol=1e-14).solve(torch.ones(6, dtype=torch.float64))
    assert _rel(x, torch.linalg.solve(M + torch.eye(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64))) < 1e-12


def test_cg_not_positive_definite_in_engine():
    X, Y = paired_features(N, **{k: SMALL[k] for k in ("image_dim", "text_dim")}, latent=3, seed=1)
    model, _ = heads(True, scale=5.0, **SMALL)
    engine = ef.ECIF(model, damping=1e-6, batches=BATCH, solver="cg", curvature="hessian").fit(X, Y)
    with pytest.raises(NotPositiveDefiniteError, match="non-positive curvature"):
        engine.influence(X[:4], Y[:4])


def test_lowrank_not_positive_definite():
    A = torch.diag(torch.tensor([4.0, -2.0, 1.0], dtype=torch.float64))
    with pytest.raises(NotPositiveDefiniteError, match="eigenvalue -2.0000e"):
        LowRankSolver(_Matrix(A), 1.0, rank=3)


# ---------------------------------------------------------------- damping="auto"
def _doubled(X, Y):
    """The training set twice, the copy in its own batches: every batch loss appears twice, so C doubles."""
    ids = torch.arange(N) // BATCH
    return torch.cat([X, X]), torch.cat([Y, Y]), torch.cat([ids, ids + int(ids.max()) + 1])


def test_auto_damping_exact(trained):
    model, X, Y, _, _ = trained
    engine = ef.ECIF(model, damping="auto", batches=BATCH, curvature="gauss-newton").fit(X, Y)
    C = engine.curvature.dense()
    expected = AUTO_FRACTION * float(torch.diagonal(C).sum()) / C.shape[0]
    assert engine.damping > 0
    assert engine.damping == pytest.approx(expected, rel=1e-14)
    again = ef.ECIF(model, damping="auto", batches=BATCH, curvature="gauss-newton").fit(X, Y)
    assert again.damping == engine.damping
    # same rule for the exact Hessian (trace of the oracle Hessian)
    H = dense_hessian(model, X, Y, batches=BATCH)
    auto_h = resolve_damping("auto", engine.curvature, H)
    assert auto_h == pytest.approx(AUTO_FRACTION * float(torch.diagonal(H).sum()) / H.shape[0], rel=1e-14)
    # the loss doubles -> the curvature doubles -> auto damping doubles
    X2, Y2, ids2 = _doubled(X, Y)
    doubled = ef.ECIF(model, damping="auto", batches=ids2, curvature="gauss-newton").fit(X2, Y2)
    assert _rel(doubled.curvature.dense(), 2 * C) < 1e-12
    assert doubled.damping == pytest.approx(2 * engine.damping, rel=1e-12)


def test_auto_damping_matrix_free():
    model, X, Y, _, _ = _problem(False)
    exact = ef.ECIF(model, damping="auto", batches=BATCH, curvature="gauss-newton").fit(X, Y)
    cg = ef.ECIF(model, damping="auto", batches=BATCH, curvature="gauss-newton", solver="cg").fit(X, Y)
    # a fresh estimate with the fixed seed gives the same value bitwise: deterministic
    assert cg.damping == AUTO_FRACTION * cg.curvature.trace_estimate() / cg.space.size
    assert cg.damping > 0
    assert cg.damping == pytest.approx(exact.damping, rel=0.3)  # Hutchinson estimate of the same trace


@pytest.mark.parametrize("train_scale", [False, True])
def test_gauss_newton_trace_estimate_is_the_parameter_space_hutchinson_sum(train_scale):
    """The Gauss–Newton trace estimate works in embedding space ((Jz)ᵀ H_S (Jz)); it must equal the
    parameter-space Hutchinson sum zᵀ(Cz) with the same probes, and chunking must not change it."""
    model, X, Y, _, _ = _problem(True, train_scale=train_scale)
    for chunk in (3, 1000):
        eng = ef.ECIF(model, damping=1.0, batches=BATCH, curvature="gauss-newton", solver="cg",
                      chunk_size=chunk).fit(X, Y)
        C = eng.curvature
        Z = torch.randint(0, 2, (C.size, 32), generator=torch.Generator().manual_seed(0)).to(torch.float64) * 2 - 1
        assert C.trace_estimate() == pytest.approx(float((Z * C.matvec(Z)).sum() / 32), rel=1e-12)
        assert C.trace_estimate(probes=4096, seed=3) == pytest.approx(float(torch.diagonal(C.dense()).sum()), rel=0.05)


@pytest.mark.parametrize("batches", [BATCH, None], ids=["batch", "all-negatives"])
@pytest.mark.parametrize("train_scale", [False, True])
def test_chunking_does_not_change_results(train_scale, batches):
    """``chunk_size`` (pairs per encoder call, also inside a batch bigger than it) and ``tangent_chunk``
    (vectors per vmapped call) bound memory; per-test influence, self-influence, pair gradients, group
    removal and curvature products must not depend on them."""
    model, X, Y, Xt, Yt = _problem(True, train_scale=train_scale)
    kw = dict(damping=1.0, batches=batches, curvature="gauss-newton")
    ref = ef.ECIF(model, **kw).fit(X, Y)
    assert (ref.chunk_size, ref.tangent_chunk) == ef.engine.default_chunks(model) == (4096, 256)
    want = ref.influence(Xt, Yt, per_test=True).total
    ref_hessian = ef.ECIF(model, damping=5.0, batches=batches, solver="cg", curvature="hessian").fit(X, Y)
    for chunk, tangents in ((3, 1), (5, 2), (1000, 7)):
        eng = ef.ECIF(model, chunk_size=chunk, tangent_chunk=tangents, **kw).fit(X, Y)
        torch.testing.assert_close(eng.influence(Xt, Yt, per_test=True).total, want, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(eng.self_influence(), ref.self_influence(), rtol=1e-10, atol=0)
        torch.testing.assert_close(eng.pair_gradients([4, 0]), ref.pair_gradients()[[4, 0]], rtol=1e-12, atol=0)
        Z = torch.randn(eng.space.size, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        torch.testing.assert_close(eng.curvature.matvec(Z), ref.curvature.matvec(Z), rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(eng.curvature.dense(), ref.curvature.dense(), rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(eng.group_gradient([1, 6, 13]), ref.group_gradient([1, 6, 13]), rtol=1e-10,
                                   atol=1e-14)
        g_eng, g_ref = eng.group_influence([1, 6, 13], Xt, Yt), ref.group_influence([1, 6, 13], Xt, Yt)
        torch.testing.assert_close(g_eng.total, g_ref.total, rtol=1e-10, atol=1e-14)
        hess = ef.ECIF(model, damping=5.0, batches=batches, solver="cg", chunk_size=chunk,
                       tangent_chunk=tangents, curvature="hessian").fit(X, Y)
        torch.testing.assert_close(hess.curvature.matvec(Z), ref_hessian.curvature.matvec(Z), rtol=1e-10, atol=1e-14)


def test_chunk_arguments_are_checked():
    model, *_ = _problem(True)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ECIFInputError, match="tangent_chunk must be an int >= 1"):
            ef.ECIF(model, damping=1.0, tangent_chunk=bad, curvature="hessian")


def test_auto_damping_rejects_non_positive_trace():
    with pytest.raises(ECIFInputError, match="'auto' damping failed"):
        resolve_damping("auto", _Matrix(-torch.eye(3, dtype=torch.float64)), -torch.eye(3, dtype=torch.float64))


# ---------------------------------------------------------------- Hessian subsampling
@pytest.mark.parametrize("curvature", ["hessian", "gauss-newton"])
def test_hessian_batches(trained, curvature):
    model, X, Y, Xt, Yt = trained
    kw = dict(damping=TRAIN_DAMPING, batches=BATCH, curvature=curvature)
    full = ef.ECIF(model, **kw).fit(X, Y)
    every = ef.ECIF(model, hessian_batches=[3, 1, 0, 2], **kw).fit(X, Y)
    assert torch.equal(every.curvature.dense(), full.curvature.dense())
    assert torch.equal(every.influence(Xt, Yt).total, full.influence(Xt, Yt).total)

    sub_damping = 50.0  # half the data's Hessian need not be positive definite at the full optimum
    sub = ef.ECIF(model, hessian_batches=[0, 2], **{**kw, "damping": sub_damping}).fit(X, Y)
    groups = resolve_batches(BATCH, N).groups()
    if curvature == "hessian":
        parts = [dense_hessian(model, X[groups[b]], Y[groups[b]]) for b in (0, 2)]
    else:  # solver="cg" builds no factorisation at fit time
        parts = [ef.ECIF(model, damping=1.0, curvature=curvature, solver="cg").fit(X[groups[b]], Y[groups[b]])
                 .curvature.dense() for b in (0, 2)]
    expected = 2.0 * (parts[0] + parts[1])  # 4 batches / 2 used
    assert _rel(sub.curvature.dense(), expected) < 1e-12
    v = torch.randn(sub.space.size, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert _rel(sub.curvature.matvec(v), expected @ v) < 1e-12
    # and the solver uses the subsampled curvature
    H = expected + sub_damping * torch.eye(sub.space.size, dtype=torch.float64)
    assert _rel(sub.solver.solve(v), torch.linalg.solve(H, v)) < 1e-10
    # the gradients g_k are not subsampled: only the curvature changes
    assert torch.equal(sub.pair_gradients([0, 5]), full.pair_gradients([0, 5]))


@pytest.mark.parametrize("bad", [[4], [-1], []])
def test_hessian_batches_out_of_range(bad):
    model, _ = heads(False, **SMALL)
    X, Y = paired_features(N, **{k: SMALL[k] for k in ("image_dim", "text_dim")}, latent=3)
    with pytest.raises(ECIFInputError, match=r"hessian_batches must list batch numbers in \[0, 4\)"):
        ef.ECIF(model, damping=1.0, batches=BATCH, hessian_batches=bad, curvature="hessian").fit(X, Y)
