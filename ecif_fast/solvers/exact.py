"""Exact solver: dense damped curvature, Cholesky factorisation (the reference)."""
from __future__ import annotations

import torch

from ..errors import ECIFInputError, NotPositiveDefiniteError
from .curvature import Curvature
from .registry import Solver, SolverOptions


def check_dense(A: torch.Tensor, kind: str) -> torch.Tensor:
    """``A`` (the curvature or products with it) must be finite before a factorisation."""
    if not bool(torch.isfinite(A).all()):
        raise ECIFInputError(
            f"the {kind} matrix has NaN or Inf entries: the loss overflows at these parameters; check that the "
            "model's parameters are finite, rescale or standardise the features, and lower the logit scale")
    return A


def eigvalsh_or_raise(A: torch.Tensor, kind: str, vectors: bool = False):
    """``eigvalsh(A)`` (``eigh`` with ``vectors``) of a finite symmetric matrix; a LAPACK failure becomes a
    :class:`NotPositiveDefiniteError` with the fix."""
    check_dense(A, kind)
    try:
        return torch.linalg.eigh(A) if vectors else torch.linalg.eigvalsh(A)
    except torch.linalg.LinAlgError as err:
        raise NotPositiveDefiniteError(
            f"the eigendecomposition of the {kind} matrix failed ({err}); the matrix is too ill-conditioned: "
            "increase damping, use curvature='gauss-newton', or check the model is at an optimum") from None


class ExactSolver(Solver):
    """``H = C + δI`` formed densely and Cholesky-factorised once; ``P`` up to a few thousand.

    Raises :class:`~ecif_fast.ECIFInputError` when ``C`` is not finite and :class:`NotPositiveDefiniteError`
    (with the smallest eigenvalue and the damping that would do) when ``H`` is not positive definite.
    """

    name = "exact"
    needs_dense = True

    @classmethod
    def from_engine(cls, curvature: Curvature, damping: float, dense: torch.Tensor | None,
                    options: SolverOptions) -> "ExactSolver":
        # the engine's dense matrix is its own copy, used for nothing else afterwards: damp it in place
        return cls(curvature, damping, dense, overwrite=True)

    def __init__(self, curvature: Curvature, damping: float, dense: torch.Tensor | None = None, *,
                 overwrite: bool = False):
        """``overwrite``: ``dense`` may be damped in place (saves one ``P × P`` copy); it is always when the
        matrix is formed here."""
        C = check_dense(curvature.dense() if dense is None else dense, curvature.kind)
        H = C if overwrite or dense is None else C.clone()
        H.diagonal().add_(damping)
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) != 0:
            lam = float(eigvalsh_or_raise(H, curvature.kind)[0])
            # Gauss–Newton is PSD in exact arithmetic: failing there means rounding swamped a huge curvature
            hint = ("the curvature is ill-conditioned (an embedding close to zero norm?); rescale the model or "
                    "check it is at an optimum" if curvature.kind == "gauss-newton" else
                    "use curvature='gauss-newton' (positive semi-definite), or check the model is at an optimum")
            raise NotPositiveDefiniteError(
                f"damped {curvature.kind} matrix is not positive definite: smallest eigenvalue {lam:.4e} "
                f"with damping {damping:.4e}; increase damping above {damping - lam:.4e}, or {hint}")
        # row-major, as a loaded state holds it: the triangular solves then take the same path (same rounding)
        self.L = L.contiguous()
        self.damping = damping

    def solve(self, B: torch.Tensor) -> torch.Tensor:
        """``H⁻¹ B`` for ``B`` of shape ``(P,)`` or ``(P, Q)``."""
        vec = B.dim() == 1
        X = torch.cholesky_solve(B.reshape(B.shape[0], -1).to(self.L.dtype), self.L)
        return X[:, 0] if vec else X

    def quadratic(self, G: torch.Tensor) -> torch.Tensor:
        """``(K,)`` ``g_kᵀ H⁻¹ g_k = ||L⁻¹ g_k||²`` for the rows of ``G (K, P)``: one triangular solve (half the
        work of :meth:`solve`)."""
        Z = self.triangular(G)
        return (Z * Z).sum(0)

    def triangular(self, G: torch.Tensor) -> torch.Tensor:
        """``(P, K)`` ``L⁻¹ Gᵀ`` for the rows of ``G (K, P)``: ``aᵀH⁻¹b = (L⁻¹a)ᵀ(L⁻¹b)``."""
        return torch.linalg.solve_triangular(self.L, G.T.to(self.L.dtype).contiguous(), upper=False)

    def state_dict(self) -> dict:
        """``{"L": (P, P) lower Cholesky factor of C + δI, "damping": δ}`` (see :meth:`Solver.state_dict`)."""
        return self._attribute_state()

    @classmethod
    def from_state_dict(cls, curvature: Curvature, damping: float, state: dict,
                        options: SolverOptions) -> "ExactSolver":
        """The saved factor as it was: no curvature product, no factorisation."""
        return cls._from_attributes(state, damping=damping)
