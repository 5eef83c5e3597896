"""Matrix-free conjugate gradients on ``(C + δI) x = b`` (Hessian or Gauss–Newton products), optionally
preconditioned by a low-rank spectral factor of the same matrix (docs/math.md §4)."""
from __future__ import annotations

import contextlib
import functools
import warnings

import torch

from ..errors import NotPositiveDefiniteError
from ..validation import check_int, check_tolerance
from .curvature import Curvature
from .registry import Solver, SolverOptions


class CGSolver(Solver):
    """Block of independent CG runs, one per right-hand side column, sharing each matvec call.

    Args:
        tol: stop a column when ``||r|| <= tol·||b||``; a number in (0, 1). maxiter: an int >= 1, default
            ``max(100, 2P)``.
        preconditioner: optional ``M`` with ``M.solve(R)`` ≈ ``H⁻¹ R`` for ``R (P, Q)``, symmetric positive definite
            (a :class:`~ecif_fast.solvers.LowRankSolver`: its top eigendirections are inverted exactly, so CG
            iterates on ``(λ_{r+1} + δ)/δ`` instead of ``(λ_1 + δ)/δ`` as condition number). The answer is
            the same (to ``tol``); only the iteration count changes.

    After each :meth:`solve`: ``last_iterations``, ``last_unconverged`` (columns that stopped at ``maxiter``
    above ``tol``) and ``last_residual`` (the largest relative residual ``||r|| / ||b||``). A solve that
    stops at ``maxiter`` warns (RuntimeWarning), unless ``log`` is a list: then it appends
    ``(columns, unconverged, worst residual)`` there instead, and the caller reports once (``ECIF`` does,
    once per public call).
    """

    name = "cg"
    option_names = ("cg_tol", "cg_maxiter", "precondition", "rank", "seed")

    @classmethod
    def from_engine(cls, curvature: Curvature, damping: float, dense: torch.Tensor | None,
                    options: SolverOptions) -> "CGSolver":
        factor = None
        if options.precondition and curvature.kind == "gauss-newton":  # PSD: the factor is positive definite
            from .lowrank import LowRankSolver
            factor = LowRankSolver(curvature, damping, options.rank, options.seed, warn=False, remainder="mean")
        return cls(curvature, damping, options.cg_tol, options.cg_maxiter, preconditioner=factor)

    def __init__(self, curvature: Curvature, damping: float, tol: float = 1e-10, maxiter: int | None = None,
                 preconditioner=None):
        self.curvature = curvature
        self.preconditioner = preconditioner
        self.damping = damping
        self.tol = check_tolerance(tol, "tol")
        maxiter = check_int(maxiter, "maxiter", minimum=1, allow_none=True)
        self.maxiter = max(100, 2 * curvature.size) if maxiter is None else maxiter
        self.last_iterations = 0
        self.last_unconverged = 0
        self.last_residual = 0.0
        self.log: list | None = None

    def _precondition(self, R: torch.Tensor) -> torch.Tensor:
        return R.clone() if self.preconditioner is None else self.preconditioner.solve(R)

    def _apply(self, X: torch.Tensor) -> torch.Tensor:
        return self.curvature.matvec(X) + self.damping * X

    def solve(self, B: torch.Tensor) -> torch.Tensor:
        """``H⁻¹ B`` for ``B`` of shape ``(P,)`` or ``(P, Q)``."""
        vec = B.dim() == 1
        B = B.reshape(B.shape[0], -1)
        X = torch.zeros_like(B)
        R = B.clone()
        Z = self._precondition(R)
        Pd = Z.clone()
        rz = (R * Z).sum(0)  # rᵀM⁻¹r (= rᵀr without a preconditioner)
        rs = (R * R).sum(0)
        bnorm = B.norm(dim=0).clamp_min(torch.finfo(B.dtype).tiny)
        active = torch.ones(B.shape[1], dtype=torch.bool)
        it = 0
        for it in range(1, self.maxiter + 1):
            active = rs.sqrt() > self.tol * bnorm
            if not bool(active.any()):
                it -= 1
                break
            cols = active.nonzero().flatten()
            AP = self._apply(Pd[:, cols])
            pAp = (Pd[:, cols] * AP).sum(0)
            if bool((pAp <= 0).any()):
                raise NotPositiveDefiniteError(
                    f"CG met a direction of non-positive curvature (pᵀHp = {float(pAp.min()):.4e}) with "
                    f"damping {self.damping:.4e}: the damped {self.curvature.kind} matrix is not positive "
                    "definite; increase damping or use curvature='gauss-newton'")
            alpha = rz[cols] / pAp
            X[:, cols] += alpha * Pd[:, cols]
            R[:, cols] -= alpha * AP
            Zc = self._precondition(R[:, cols])
            rz_new = (R[:, cols] * Zc).sum(0)
            Pd[:, cols] = Zc + (rz_new / rz[cols]) * Pd[:, cols]
            rz[cols] = rz_new
            rs[cols] = (R[:, cols] * R[:, cols]).sum(0)
        rel = rs.sqrt() / bnorm
        self.last_iterations = it
        self.last_unconverged = int((rel > self.tol).sum())
        self.last_residual = float(rel.max()) if rel.numel() else 0.0
        if self.log is not None:
            self.log.append((B.shape[1], self.last_unconverged, self.last_residual))
        elif self.last_unconverged:
            warnings.warn(f"CG stopped after {self.maxiter} iterations with relative residual "
                          f"{self.last_residual:.2e} > tol {self.tol:.1e}; raise maxiter or damping",
                          RuntimeWarning, stacklevel=2)
        return X[:, 0] if vec else X

    def state_dict(self) -> dict:
        """``{"tol", "maxiter", "damping", ..., "preconditioner": registry name or None}`` plus the
        preconditioner's own state under ``"preconditioner."`` (see :meth:`Solver.state_dict`); the curvature
        is not saved (the loader rebuilds it from the settings)."""
        state = self._attribute_state(skip=("curvature", "preconditioner", "log"))
        pre = self.preconditioner
        state["preconditioner"] = None if pre is None else pre.name
        if pre is not None:
            state.update({f"preconditioner.{k}": v for k, v in pre.state_dict().items()})
        return state

    @classmethod
    def from_state_dict(cls, curvature: Curvature, damping: float, state: dict,
                        options: SolverOptions) -> "CGSolver":
        """CG over ``curvature`` with the saved tolerances and preconditioner (rebuilt from its state)."""
        from .registry import solver_class

        prefix = "preconditioner."
        own = {k: v for k, v in state.items() if not k.startswith(prefix) and k != "preconditioner"}
        pre = state.get("preconditioner")
        if pre is not None:
            sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            pre = solver_class(pre).from_state_dict(curvature, damping, sub, options)
        return cls._from_attributes(own, curvature=curvature, preconditioner=pre, damping=damping, log=None)


@contextlib.contextmanager
def cg_summary(owner, name: str):
    """While the block runs, the CG solves of ``owner.solver`` (when it is a :class:`CGSolver`) are logged instead
    of each warning; after it, one warning names ``name`` and says how many right-hand sides did not converge, of
    how many, and the worst residual. Nested summaries report in the outermost one."""
    solver = getattr(owner, "solver", None)
    if not isinstance(solver, CGSolver) or solver.log is not None:
        yield
        return
    solver.log = []
    try:
        yield
        log = solver.log
    finally:
        solver.log = None
    bad = sum(entry[1] for entry in log)
    if bad:
        worst = max(entry[2] for entry in log)
        total = sum(entry[0] for entry in log)
        warnings.warn(
            f"{name}: CG did not converge for {bad} of {total} right-hand side(s) in "
            f"cg_maxiter = {solver.maxiter} iterations (worst relative residual {worst:.2e} > cg_tol "
            f"{solver.tol:.1e}), so these results are approximate; raise cg_maxiter or damping, loosen cg_tol, "
            "or use solver='exact' (up to a few thousand parameters) or 'lowrank'", RuntimeWarning, stacklevel=4)


def cg_summary_per_call(method):
    """Decorate a public method of an object whose ``solver`` may be a :class:`CGSolver` (the engine): its solves
    are summarised in one warning (:func:`cg_summary`, named ``ECIF.<method>``)."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        with cg_summary(self, f"ECIF.{method.__name__}"):
            return method(self, *args, **kwargs)

    return call
