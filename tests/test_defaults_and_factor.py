"""``ECIF(model)`` with no other argument, the "auto" damping rule, CG preconditioned by the spectral factor, and
self-influence from that factor (docs/math.md §4) against the exact dense solve."""
from __future__ import annotations

import math

import pytest
import torch

import ecif_fast as ef
from ecif_fast.errors import ECIFInputError
from ecif_fast.solvers import LowRankSolver, registry
from ecif_fast.solvers.damping import AUTO_FRACTION, relative_floor
from problems import heads
from tiny_hf_clip import pairs, tiny_clip

N, BATCH, DAMPING = 48, 12, 0.1


@pytest.fixture(scope="module")
def trained():
    """Plain heads trained to the optimum (float64): ``(model, X, Y, Xt, Yt)``; P = 8·(7 + 6) = 104."""
    torch.manual_seed(3)
    model, *_ = heads(False, image_dim=7, text_dim=6, embed_dim=8)
    X, Y = torch.randn(N, 7, dtype=torch.float64), torch.randn(N, 6, dtype=torch.float64)
    ef.train(model, X, Y, batches=BATCH, damping=DAMPING, method="newton", tol=1e-12)
    Xt, Yt = torch.randn(6, 7, dtype=torch.float64), torch.randn(6, 6, dtype=torch.float64)
    return model, X, Y, Xt, Yt


def _exact_self_influence(engine):
    """``g_kᵀ (C + δI)⁻¹ g_k`` from the dense curvature and all per-pair gradients (the reference)."""
    C = engine.curvature.dense()
    H = C + engine.damping * torch.eye(C.shape[0], dtype=C.dtype)
    G = engine.pair_gradients()
    return (G * torch.linalg.solve(H, G.T).T).sum(1), C


def test_defaults_on_linear_heads(trained):
    model, X, Y, Xt, Yt = trained
    engine = ef.ECIF(model).fit(X, Y)
    assert engine.curvature_kind == "gauss-newton" and engine.solver_name == "exact"
    C = engine.curvature.dense()
    top = float(torch.linalg.eigvalsh(C).abs().max())
    assert engine.damping >= AUTO_FRACTION * float(torch.diagonal(C).sum()) / C.shape[0] * (1 - 1e-12)
    assert engine.damping >= 0.5 * relative_floor(torch.float64) * top  # power iteration: a lower bound of |λ|max
    explicit = ef.ECIF(model, damping=engine.damping, curvature="gauss-newton", solver="exact").fit(X, Y)
    assert torch.equal(engine.influence(Xt, Yt).total, explicit.influence(Xt, Yt).total)
    assert torch.isfinite(engine.self_influence()).all()


def test_auto_damping_keeps_float32_conditioning(trained):
    """In float32 the floor ``sqrt(eps)·|λ|max`` binds: the damped matrix's condition number stays below
    ``1/sqrt(eps)`` (times the slack of the power-iteration estimate)."""
    model, X, Y, _, _ = trained
    m32 = heads(False, image_dim=7, text_dim=6, embed_dim=8)[0].float()
    m32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    engine = ef.ECIF(m32).fit(X.float(), Y.float())
    lam = torch.linalg.eigvalsh(engine.curvature.dense().double())
    kappa = float((lam.max() + engine.damping) / (lam.clamp_min(0).min() + engine.damping))
    assert kappa <= 2 / relative_floor(torch.float32)
    assert engine.cg_tol is None  # the dtype's default applies: 1e-4 in float32


def test_defaults_on_an_untrained_hf_clip():
    """A tiny randomly initialised CLIP (all ~2,100 parameters, indefinite Hessian): the defaults fit and answer."""
    model = ef.wrap(tiny_clip(seed=1))
    px, ids = pairs(16)
    tpx, tids = pairs(4, seed=2)
    engine = ef.ECIF(model, batches=8).fit(px, ids)
    assert engine.curvature_kind == "gauss-newton" and engine.damping > 0
    assert torch.isfinite(engine.influence(tpx, tids).total).all()
    assert (engine.self_influence() > 0).all()


def test_solver_chosen_by_size(trained, monkeypatch):
    model, X, Y, Xt, Yt = trained
    monkeypatch.setattr(registry, "EXACT_MAX_PARAMS", 50)  # P = 104 is now "large"
    monkeypatch.setattr(registry, "CLOSED_FORM_EXACT_MAX_PARAMS", 50)
    engine = ef.ECIF(model, damping=DAMPING).fit(X, Y)
    assert engine.solver_name == "cg" and engine.solver.preconditioner is engine.factor
    exact = ef.ECIF(model, damping=DAMPING, solver="exact").fit(X, Y)
    got, want = engine.influence(Xt, Yt).total, exact.influence(Xt, Yt).total
    assert float((got - want).norm() / want.norm()) < 1e-8


@pytest.mark.parametrize("rank", [4, 16, 48])
def test_preconditioned_cg_same_answer_fewer_iterations(trained, rank):
    model, X, Y, Xt, Yt = trained
    kw = dict(damping=DAMPING, batches=BATCH, solver="cg", rank=rank, cg_tol=1e-12)
    pcg, plain = ef.ECIF(model, **kw).fit(X, Y), ef.ECIF(model, precondition=False, **kw).fit(X, Y)
    a, b = pcg.influence(Xt, Yt).total, plain.influence(Xt, Yt).total
    assert float((a - b).norm() / b.norm()) < 1e-9
    assert pcg.solver.last_iterations <= plain.solver.last_iterations


def test_factor_of_full_rank_is_exact(trained):
    model, X, Y, _, _ = trained
    engine = ef.ECIF(model, damping=DAMPING, batches=BATCH, solver="cg", rank=200).fit(X, Y)
    exact, _ = _exact_self_influence(engine)
    got = engine.self_influence(method="factor")
    assert engine.factor_summary()["captured"] == 1.0
    assert float(((got - exact).abs() / exact).max()) < 1e-9


@pytest.mark.parametrize("rank", [2, 10, 40, 80])
def test_factor_self_influence_within_the_spectral_bound(trained, rank):
    """With the exact top eigenvectors, ``g⊥`` (outside them) is weighted by ``1/(λ̄ + δ)`` instead of ``H⁻¹``'s
    ``1/(λ + δ)``, ``λ`` in the dropped spectrum: the ratio to the exact value lies in
    ``[min(1, (λ_min + δ)/(λ̄ + δ)), max(1, (λ_{r+1} + δ)/(λ̄ + δ))]``, and the error shrinks with the rank."""
    model, X, Y, _, _ = trained
    engine = ef.ECIF(model, damping=DAMPING, batches=BATCH, solver="exact").fit(X, Y)
    exact, C = _exact_self_influence(engine)
    factor = LowRankSolver(engine.curvature, DAMPING, rank=rank, dense=C, warn=False, remainder="mean")
    got = factor.quadratic(engine.pair_gradients())
    lam = torch.linalg.eigvalsh(C).flip(0)
    dropped = lam[rank:]
    assert factor.rest == pytest.approx(max(float(dropped.mean()), 0.0), rel=1e-9, abs=1e-12)
    low = min(1.0, float(dropped.min() + DAMPING) / (factor.rest + DAMPING))
    high = max(1.0, float(dropped.max() + DAMPING) / (factor.rest + DAMPING))
    ratio = got / exact
    assert float(ratio.min()) >= low * (1 - 1e-9) and float(ratio.max()) <= high * (1 + 1e-9)


def test_self_influence_methods(trained):
    model, X, Y, _, _ = trained
    exact_engine = ef.ECIF(model, damping=DAMPING, batches=BATCH, solver="exact").fit(X, Y)
    exact, _ = _exact_self_influence(exact_engine)
    # exact solver: "auto" solves; the dense solve is the reference
    assert float(((exact_engine.self_influence() - exact).abs() / exact).max()) < 1e-10
    cg = ef.ECIF(model, damping=DAMPING, batches=BATCH, solver="cg", rank=8, cg_tol=1e-12).fit(X, Y)
    solved = cg.self_influence(method="solve")
    assert float(((solved - exact).abs() / exact).max()) < 1e-8
    factored = cg.self_influence()  # "auto" is the factor for CG
    assert torch.equal(factored, cg.self_influence(method="factor"))
    assert not torch.equal(factored, solved)
    assert torch.equal(cg.self_influence(indices=[3, 1]), factored[[3, 1]])
    with pytest.raises(ECIFInputError, match="method"):
        cg.self_influence(method="dense")


def test_factor_is_deterministic(trained):
    model, X, Y, _, _ = trained
    kw = dict(damping=DAMPING, batches=BATCH, solver="cg", rank=8, seed=4)
    a = ef.ECIF(model, **kw).fit(X, Y).self_influence()
    b = ef.ECIF(model, **kw).fit(X, Y).self_influence()
    assert torch.equal(a, b) and bool(torch.isfinite(a).all()) and not math.isnan(float(a.sum()))
