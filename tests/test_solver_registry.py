"""The solver registry (docs/math.md §4): every solver builds from the engine by name, unknown names are refused,
a solver registered from outside is usable by name, the default policy, and the deprecated ``hessian=`` alias."""
import dataclasses
import re
import subprocess
import sys

import pytest
import torch

import ecif_fast as ef
from ecif_fast import ECIFInputError
from ecif_fast.cli.main import build_parser
from ecif_fast.solvers import (CLOSED_FORM_EXACT_MAX_PARAMS, DEFAULT_POLICY, EXACT_MAX_PARAMS, SOLVERS, Curvature,
                               Solver, SolverOptions, default_solver, register_solver, solver_class, solver_names,
                               unregister_solver)
from problems import heads, paired_features

N, N_TEST, BATCH, DAMPING = 16, 4, 4, 5.0
SMALL = dict(image_dim=4, text_dim=3, embed_dim=4)  # P = 28


@pytest.fixture(scope="module")
def trained():
    """A float64 model at the optimum of R (damping DAMPING towards θ_ref) and its training / test pairs."""
    X, Y = paired_features(N + N_TEST, image_dim=4, text_dim=3, latent=3, seed=1)
    X, Y = 0.5 * X, 0.5 * Y
    model, ref = heads(False, scale=3.0, seed=1, **SMALL)
    assert ef.train(model, X[:N], Y[:N], batches=BATCH, damping=DAMPING, theta_ref=ref).grad_norm < 1e-9
    return model, X[:N], Y[:N], X[N:], Y[N:]


class DenseLU(Solver):
    """A toy solver: LU factors of the dense ``C + δI``."""

    name = "toy-lu"
    needs_dense = True

    @classmethod
    def from_engine(cls, curvature, damping, dense, options):
        return cls(dense + damping * torch.eye(dense.shape[0], dtype=dense.dtype))

    def __init__(self, H):
        self.LU, self.pivots = torch.linalg.lu_factor(H)

    def solve(self, B):
        return torch.linalg.lu_solve(self.LU, self.pivots, B.reshape(B.shape[0], -1)).reshape(B.shape)


@pytest.fixture
def toy():
    register_solver(DenseLU)
    try:
        yield DenseLU
    finally:
        unregister_solver(DenseLU.name)


@pytest.mark.parametrize("curvature", ["hessian", "gauss-newton"])
@pytest.mark.parametrize("name", solver_names())
def test_every_solver_builds_from_the_engine_and_solves(trained, name, curvature):
    model, X, Y, _, _ = trained
    engine = ef.ECIF(model, damping=DAMPING, batches=BATCH, curvature=curvature, solver=name, rank=10_000,
                     cg_tol=1e-13).fit(X, Y)
    cls = solver_class(name)
    assert cls.name == name and engine.solver_name == name and isinstance(engine.solver, cls)
    assert set(cls.option_names) <= {f.name for f in dataclasses.fields(SolverOptions)}

    C = engine.curvature.dense()
    P = C.shape[0]
    H = C + DAMPING * torch.eye(P, dtype=C.dtype)
    B = torch.randn(P, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    options = SolverOptions(rank=P, seed=0, cg_tol=1e-13, cg_maxiter=None)
    built = cls.from_engine(engine.curvature, DAMPING, C if cls.needs_dense else None, options)
    for solver in (engine.solver, built):
        for rhs in (B, B[:, 0]):                      # (P, Q) and (P,)
            x = solver.solve(rhs)
            assert x.shape == rhs.shape
            torch.testing.assert_close(x, torch.linalg.solve(H, rhs), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["exact", "cg"])
def test_dense_curvature_only_for_solvers_that_need_it(trained, monkeypatch, name):
    """The engine forms the dense matrix once for a solver with ``needs_dense`` (shared with damping="auto"), never
    for the others (their "auto" damping is a Hutchinson estimate; CG's preconditioner is off here: on a model this
    small its rank-64 factor is the dense matrix itself)."""
    model, X, Y, _, _ = trained
    calls = []
    dense = Curvature.dense
    monkeypatch.setattr(Curvature, "dense", lambda self: calls.append(1) or dense(self))
    ef.ECIF(model, damping="auto", batches=BATCH, curvature="gauss-newton", solver=name, precondition=False).fit(X, Y)
    assert len(calls) == int(solver_class(name).needs_dense) == int(name == "exact")


def test_unknown_solver_lists_the_registered_names(trained):
    model = trained[0]
    names = list(solver_names())
    assert names[:3] == ["exact", "cg", "lowrank"] and list(SOLVERS) == names
    for bad in ("kfac", "", 3, ["cg"]):
        message = re.escape(f"solver must be one of {names}, got {bad!r}")
        with pytest.raises(ECIFInputError, match=message):
            ef.ECIF(model, damping=DAMPING, solver=bad, curvature="hessian")
        with pytest.raises(ECIFInputError, match=message):
            solver_class(bad)


def test_registered_solver_is_usable_by_name(trained, toy):
    model, X, Y, Xt, Yt = trained
    assert toy.name in solver_names() and toy.name in SOLVERS
    argv = ["value", "--train", "t", "--model", "m", "--val", "v", "--out", "o", "--solver", toy.name]
    assert build_parser().parse_args(argv).solver == toy.name      # the command line offers it too
    for damping in (DAMPING, "auto"):                # "auto" gets the exact trace from the shared dense matrix
        kw = dict(damping=damping, batches=BATCH, curvature="gauss-newton")   # PSD: any damping > 0 will do
        exact = ef.ECIF(model, solver="exact", **kw).fit(X, Y)
        mine = ef.ECIF(model, solver=toy.name, **kw).fit(X, Y)
        assert isinstance(mine.solver, DenseLU) and mine.damping == exact.damping
        ref, res = exact.influence(Xt, Yt), mine.influence(Xt, Yt)
        torch.testing.assert_close(res.total, ref.total, rtol=1e-9, atol=0)
        torch.testing.assert_close(res.negative, ref.negative, rtol=1e-9, atol=0)


def test_registration_is_checked(toy):
    with pytest.raises(ValueError, match="already registered"):
        register_solver(DenseLU)
    with pytest.raises(TypeError, match="subclass of ecif_fast.solvers.Solver"):
        register_solver(object)

    class Nameless(Solver):
        pass

    with pytest.raises(ValueError, match="must declare its registry name"):
        register_solver(Nameless)
    unregister_solver(toy.name)
    assert toy.name not in solver_names()
    with pytest.raises(ECIFInputError, match="solver must be one of"):
        ef.ECIF(heads(False, **SMALL)[0], damping=DAMPING, solver=toy.name)
    register_solver(DenseLU)                          # for the fixture's clean-up


def test_default_policy():
    assert default_solver(1) == "exact" and default_solver(EXACT_MAX_PARAMS) == "exact"
    assert default_solver(EXACT_MAX_PARAMS + 1) == "cg"
    assert default_solver(EXACT_MAX_PARAMS + 1, closed_form=True) == "exact"
    assert default_solver(CLOSED_FORM_EXACT_MAX_PARAMS + 1, closed_form=True) == "cg"
    assert DEFAULT_POLICY == (f"exact up to {EXACT_MAX_PARAMS} parameters ({CLOSED_FORM_EXACT_MAX_PARAMS} for linear "
                              "heads with Gauss–Newton curvature), else cg")
    assert ef.ECIF(heads(False, **SMALL)[0], damping=DAMPING).solver_name == "exact"


def test_cli_solver_options_come_from_the_registry_without_torch():
    """--solver's choices and default are the registry's, and building the parser does not load torch."""
    code = ("import sys; from ecif_fast.cli.main import build_parser; p = build_parser(); "
            "assert 'torch' not in sys.modules, 'torch loaded'; "
            "a = p._subparsers._group_actions[0].choices['detect']; "
            "s = next(x for x in a._actions if x.dest == 'solver'); print(list(s.choices)); print(s.help)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == [repr(list(solver_names())), f"inverse-curvature solver (default: {DEFAULT_POLICY})"]


def test_hessian_is_a_deprecated_alias_of_solver(trained):
    model, X, Y, Xt, Yt = trained
    with pytest.warns(DeprecationWarning, match=r"ECIF\(hessian=\.\.\.\) is deprecated.*solver='cg'"):
        old = ef.ECIF(model, damping=DAMPING, batches=BATCH, hessian="cg", cg_tol=1e-13, curvature="hessian")
    assert old.solver_name == "cg"
    new = ef.ECIF(model, damping=DAMPING, batches=BATCH, solver="cg", cg_tol=1e-13, curvature="hessian")
    assert torch.equal(old.fit(X, Y).influence(Xt, Yt).total, new.fit(X, Y).influence(Xt, Yt).total)
    with pytest.warns(DeprecationWarning):
        assert ef.ECIF(model, damping=DAMPING, solver="lowrank", hessian="lowrank", curvature="hessian").solver_name == "lowrank"
    with pytest.warns(DeprecationWarning), pytest.raises(ECIFInputError, match="solver='exact' and its deprecated "
                                                                              "alias hessian='cg' disagree"):
        ef.ECIF(model, damping=DAMPING, solver="exact", hessian="cg", curvature="hessian")
    with pytest.warns(DeprecationWarning), pytest.raises(ECIFInputError, match="solver must be one of"):
        ef.ECIF(model, damping=DAMPING, hessian="kfac", curvature="hessian")
