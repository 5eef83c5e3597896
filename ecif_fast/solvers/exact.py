"""Exact solver: dense damped curvature, Cholesky factorisation (the reference)."""
from __future__ import annotations

import torch

from ..errors import NotPositiveDefiniteError
from .curvature import Curvature


class ExactSolver:
    """``H = C + δI`` formed densely and Cholesky-factorised once; ``P`` up to a few thousand."""

    name = "exact"

    def __init__(self, curvature: Curvature, damping: float, dense: torch.Tensor | None = None):
        C = curvature.dense() if dense is None else dense
        H = C + damping * torch.eye(C.shape[0], dtype=C.dtype)
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) != 0:
            lam = float(torch.linalg.eigvalsh(H)[0])
            # Gauss–Newton is PSD in exact arithmetic: failing there means rounding swamped a huge curvature
            hint = ("the curvature is ill-conditioned (an embedding close to zero norm?); rescale the model or "
                    "check it is at an optimum" if curvature.kind == "gauss-newton" else
                    "use curvature='gauss-newton' (positive semi-definite), or check the model is at an optimum")
            raise NotPositiveDefiniteError(
                f"damped {curvature.kind} matrix is not positive definite: smallest eigenvalue {lam:.4e} "
                f"with damping {damping:.4e}; increase damping above {damping - lam:.4e}, or {hint}")
        self.L = L
        self.damping = damping

    def solve(self, B: torch.Tensor) -> torch.Tensor:
        """``H⁻¹ B`` for ``B`` of shape ``(P,)`` or ``(P, Q)``."""
        vec = B.dim() == 1
        X = torch.cholesky_solve(B.reshape(B.shape[0], -1).to(self.L.dtype), self.L)
        return X[:, 0] if vec else X
