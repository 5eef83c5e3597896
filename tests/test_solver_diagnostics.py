"""Solver diagnostics: the low-rank solver reports what it leaves out, CG non-convergence is summarised once
per public call, and the exact Hessian product handles many columns at once (checked against the column loop
and the dense Hessian)."""
import warnings

import pytest
import torch

import ecif_fast as ef
from ecif_fast.solvers import CGSolver, LowRankSolver
from ecif_fast.solvers import curvature as curvature_module
from ecif_fast.solvers.lowrank import DROPPED_ERROR_WARN
from problems import heads, paired_features

N, N_TEST, BATCH = 40, 6, 10
DAMPING = 5.0


@pytest.fixture(scope="module")
def trained():
    """Normalised heads (P = 88) at the optimum of R: a spectrum without exact zeros."""
    X, Y = paired_features(N + N_TEST, image_dim=6, text_dim=5, latent=3, seed=1)
    X, Y = 0.5 * X, 0.5 * Y
    model, ref = heads(True, scale=3.0, seed=1)
    assert ef.train(model, X[:N], Y[:N], batches=BATCH, damping=DAMPING, theta_ref=ref).grad_norm < 1e-9
    return model, X[:N], Y[:N], X[N:], Y[N:]


@pytest.fixture(scope="module")
def exact(trained):
    model, X, Y, _, _ = trained
    return ef.ECIF(model, damping=DAMPING, batches=BATCH, curvature="hessian").fit(X, Y)


def _lowrank_warnings(record):
    return [w for w in record if issubclass(w.category, RuntimeWarning) and "low-rank solver" in str(w.message)]


# ---------------------------------------------------------------- low-rank: what is left out
@pytest.mark.parametrize("rank", [5, 20, 60, 78])
def test_lowrank_reports_the_dropped_spectrum_exactly(exact, rank):
    C = exact.curvature.dense()
    P = C.shape[0]
    lam = torch.linalg.eigvalsh(C)
    lam = lam[lam.abs().argsort(descending=True)]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        solver = LowRankSolver(exact.curvature, DAMPING, rank=rank, dense=C)
    dropped = float(lam[rank:].sum())
    assert solver.trace_exact
    assert solver.dropped_trace == pytest.approx(dropped, rel=1e-9, abs=1e-9)
    # 1 − ||H − Ĥ||_F² / ||H||_F², from the dense matrices themselves
    H = C + DAMPING * torch.eye(P, dtype=C.dtype)
    H_approx = solver.vecs @ torch.diag(solver.lam + DAMPING) @ solver.vecs.T + DAMPING * (
        torch.eye(P, dtype=C.dtype) - solver.vecs @ solver.vecs.T)
    assert solver.captured == pytest.approx(1 - float((H - H_approx).pow(2).sum() / H.pow(2).sum()), rel=1e-9)
    rms = float((lam[rank:] / DAMPING).pow(2).mean().sqrt())  # 1/δ instead of 1/(λ+δ): relative error λ/δ
    assert solver.dropped_error == pytest.approx(rms, rel=1e-9)
    # the relative error of H⁻¹ along each dropped eigenvector is exactly λ/δ: its RMS is dropped_error
    Hinv = torch.linalg.inv(C + DAMPING * torch.eye(P, dtype=C.dtype))
    evals, evecs = torch.linalg.eigh(C)
    out = evecs[:, evals.abs().argsort(descending=True)[rank:]]
    rel = ((out * solver.solve(out)).sum(0) / (out * (Hinv @ out)).sum(0) - 1)
    assert float(rel.pow(2).mean().sqrt()) == pytest.approx(solver.dropped_error, rel=1e-8)
    assert float(rel.abs().max()) >= solver.dropped_error >= float(rel.abs().mean())
    assert len(_lowrank_warnings(record)) == (1 if rms > DROPPED_ERROR_WARN else 0)


def test_lowrank_full_rank_captures_everything(exact):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        solver = LowRankSolver(exact.curvature, DAMPING, rank=exact.space.size)
    assert solver.captured == 1.0 and solver.dropped_error == 0.0


def test_lowrank_randomized_path_estimates_the_dropped_trace(exact):
    C = exact.curvature.dense()
    rank = 20  # rank + oversample < P: randomized subspace iteration, Hutchinson estimate of the rest
    with pytest.warns(RuntimeWarning, match=r"low-rank solver: rank 20 of 88 leaves out 68 eigenvalues .*"
                                            r"\(Hutchinson estimates\).*raise rank, or use solver='cg' or 'exact'"):
        solver = LowRankSolver(exact.curvature, DAMPING, rank=rank)
    assert not solver.trace_exact
    lam = torch.linalg.eigvalsh(C)
    rest = lam[lam.abs().argsort(descending=True)[rank:]]
    # deflated probes: the estimates' noise comes from the dropped part of C only
    assert solver.dropped_trace == pytest.approx(float(rest.sum()), rel=0.3)
    assert solver.dropped_error == pytest.approx(float((rest / DAMPING).pow(2).mean().sqrt()), rel=0.1)


def test_engine_lowrank_warns_once_per_fit_when_self_influence_is_off(trained, exact):
    model, X, Y, _, _ = trained
    with pytest.warns(RuntimeWarning) as record:
        low = ef.ECIF(model, damping=DAMPING, batches=BATCH, solver="lowrank", rank=5, curvature="hessian").fit(X, Y)
    assert len(_lowrank_warnings(record)) == 1
    msg = str(_lowrank_warnings(record)[0].message)
    assert f"off by about {100 * low.solver.dropped_error:.0f} % (RMS) in those directions" in msg
    ratio = low.self_influence() / exact.self_influence()
    assert float((ratio - 1).abs().max()) > 0.1  # what the warning is about
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        full = ef.ECIF(model, damping=DAMPING, batches=BATCH, solver="lowrank", rank=exact.space.size, curvature="hessian").fit(X, Y)
    assert torch.allclose(full.self_influence(), exact.self_influence(), rtol=1e-9)


# ---------------------------------------------------------------- CG: one summary per public call
@pytest.fixture(scope="module")
def capped(trained):
    model, X, Y, _, _ = trained
    return ef.ECIF(model, damping=DAMPING, batches=BATCH, solver="cg", cg_maxiter=2, tangent_chunk=7, curvature="hessian").fit(X, Y)


def _cg_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, RuntimeWarning) and "CG" in str(w.message)]


@pytest.mark.parametrize("call,name,rhs", [
    (lambda e, Xt, Yt: e.self_influence(method="solve"), "self_influence", N),            # 6 blocks of <= 7 right-hand sides
    (lambda e, Xt, Yt: e.influence(Xt, Yt, per_test=True), "influence", N_TEST),
    (lambda e, Xt, Yt: e.relative_influence(Xt, Yt), "relative_influence", 1),  # self-influence: the factor
    (lambda e, Xt, Yt: e.group_influence([0, 3], Xt, Yt), "group_influence", 1),
    (lambda e, Xt, Yt: e.removal_update([0, 3]), "removal_update", 1),
    (lambda e, Xt, Yt: e.cleaned_model([0, 3]), "cleaned_model", 1),
], ids=["self", "influence", "relative", "group", "removal", "cleaned"])
def test_cg_non_convergence_warns_once_per_call(trained, capped, call, name, rhs):
    _, _, _, Xt, Yt = trained
    capped._self_influence = {}  # relative_influence recomputes the self-influence inside the same call
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        call(capped, Xt, Yt)
    messages = _cg_warnings(record)
    assert len(messages) == 1, messages
    assert messages[0].startswith(f"ECIF.{name}: CG did not converge for {rhs} of {rhs} right-hand side(s) in "
                                  "cg_maxiter = 2 iterations (worst relative residual ")
    assert "raise cg_maxiter or damping" in messages[0]
    assert capped.solver.log is None  # collection ends with the call


def test_cg_summary_reports_the_worst_residual(trained):
    model, X, Y, Xt, Yt = trained
    engine = ef.ECIF(model, damping=DAMPING, batches=BATCH, solver="cg", cg_maxiter=3, curvature="hessian").fit(X, Y)
    with pytest.warns(RuntimeWarning) as record:
        engine.influence(Xt, Yt, per_test=True)
    worst = float(_cg_warnings(record)[0].split("worst relative residual ")[1].split(" ")[0])
    assert worst == pytest.approx(engine.solver.last_residual, rel=1e-2)
    assert engine.solver.last_unconverged == N_TEST


def test_converged_cg_is_silent_and_direct_solves_keep_their_warning(trained, capped):
    model, X, Y, Xt, Yt = trained
    engine = ef.ECIF(model, damping=DAMPING, batches=BATCH, solver="cg", cg_tol=1e-8, curvature="hessian").fit(X, Y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        engine.influence(Xt, Yt)
        engine.self_influence()
    B = torch.ones(capped.space.size, 3, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match=r"CG stopped after 2 iterations with relative residual"):
        capped.solver.solve(B)
    assert isinstance(capped.solver, CGSolver) and capped.solver.last_unconverged == 3


def test_cg_summary_survives_an_error_inside_the_call(capped):
    with pytest.raises(ef.ECIFInputError):
        capped.influence(torch.zeros(1, 6, dtype=torch.float64), torch.zeros(1, 5, dtype=torch.float64))
    assert capped.solver.log is None


# ---------------------------------------------------------------- exact Hessian products, many columns at once
def _columns(P, Q, seed=0):
    return torch.randn(P, Q, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("batches,subsample", [(BATCH, None), (None, None), (torch.arange(N) % 3, None), (BATCH, [0, 2])],
                         ids=["batches", "all-negatives", "ragged", "subsampled"])
def test_batched_hessian_product_equals_column_loop_and_dense(trained, batches, subsample):
    model, X, Y, _, _ = trained
    model = heads(True, train_scale=True, scale=3.0, seed=1)[0]  # the scale is a parameter too
    engine = ef.ECIF(model, damping=DAMPING, batches=batches, solver="cg", hessian_batches=subsample,
                     tangent_chunk=16, curvature="hessian").fit(X, Y)
    curv = engine.curvature
    V = _columns(curv.size, 40)  # several tangent chunks
    dense = curv.dense()
    fast = curv.matvec(V)
    assert curv._vmap_hvp
    scale = float((dense @ V).abs().max())
    assert float((fast - curv._hessian_columnwise(V)).abs().max()) < 1e-12 * scale
    assert float((fast - dense @ V).abs().max()) < 1e-12 * scale
    assert float((curv.matvec(V[:, 3]) - dense @ V[:, 3]).abs().max()) < 1e-12 * scale  # a single vector


def test_batched_hessian_product_falls_back_to_the_column_loop(exact, monkeypatch):
    curv = exact.curvature
    V = _columns(curv.size, 5)
    expected = curv.dense() @ V

    def no_vmap(fn, *args, **kwargs):
        raise RuntimeError("vmap: no batching rule for this op")

    monkeypatch.setattr(curvature_module, "vmap", no_vmap)
    monkeypatch.setattr(curv, "_vmap_hvp", True)
    out = curv.matvec(V)
    assert not curv._vmap_hvp
    assert float((out - expected).abs().max()) < 1e-12 * float(expected.abs().max())


def test_batched_hessian_product_respects_the_score_budget(exact, monkeypatch):
    curv = exact.curvature
    V = _columns(curv.size, 9)
    expected = curv.matvec(V)
    calls = []
    real = curvature_module.vmap

    def counting(fn, *args, **kwargs):
        mapped = real(fn, *args, **kwargs)
        return lambda x: calls.append(x.shape[0]) or mapped(x)

    monkeypatch.setattr(curvature_module, "vmap", counting)
    monkeypatch.setattr(curvature_module, "HVP_SCORE_BUDGET", 2 * N * BATCH)  # 2 columns' score entries per call
    out = curv.matvec(V)
    assert calls and max(calls) == 2
    assert float((out - expected).abs().max()) < 1e-12 * float(expected.abs().max())


def test_batched_hessian_product_on_a_tiny_hf_clip():
    pytest.importorskip("transformers")
    from tiny_hf_clip import pairs, tiny_clip

    model = ef.wrap(tiny_clip())
    px, ids = pairs(8)
    # the last block of each tower: layer norms whose input and weight both depend on θ
    engine = ef.ECIF(model, damping=5e6, batches=4, params="last:1", solver="cg", tangent_chunk=4, curvature="hessian").fit(px, ids)
    curv = engine.curvature
    V = _columns(curv.size, 6)
    fast = curv.matvec(V)
    assert curv._vmap_hvp
    slow = curv._hessian_columnwise(V)
    assert float((fast - slow).abs().max()) < 1e-10 * float(slow.abs().max())
