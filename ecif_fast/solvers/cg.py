"""Matrix-free conjugate gradients on ``(C + δI) x = b`` (Hessian or Gauss–Newton products)."""
from __future__ import annotations

import warnings

import torch

from ..errors import NotPositiveDefiniteError
from .curvature import Curvature


class CGSolver:
    """Block of independent CG runs, one per right-hand side column, sharing each matvec call.

    Args:
        tol: stop when ``||r|| <= tol·||b||`` for every column. maxiter: default ``max(100, 2P)``.
    """

    name = "cg"

    def __init__(self, curvature: Curvature, damping: float, tol: float = 1e-10, maxiter: int | None = None):
        self.curvature = curvature
        self.damping = damping
        self.tol = tol
        self.maxiter = maxiter or max(100, 2 * curvature.size)
        self.last_iterations = 0

    def _apply(self, X: torch.Tensor) -> torch.Tensor:
        return self.curvature.matvec(X) + self.damping * X

    def solve(self, B: torch.Tensor) -> torch.Tensor:
        """``H⁻¹ B`` for ``B`` of shape ``(P,)`` or ``(P, Q)``."""
        vec = B.dim() == 1
        B = B.reshape(B.shape[0], -1)
        X = torch.zeros_like(B)
        R = B.clone()
        Pd = R.clone()
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
            alpha = rs[cols] / pAp
            X[:, cols] += alpha * Pd[:, cols]
            R[:, cols] -= alpha * AP
            rs_new = (R[:, cols] * R[:, cols]).sum(0)
            Pd[:, cols] = R[:, cols] + (rs_new / rs[cols]) * Pd[:, cols]
            rs[cols] = rs_new
        else:
            if bool((rs.sqrt() > self.tol * bnorm).any()):
                worst = float((rs.sqrt() / bnorm).max())
                warnings.warn(f"CG stopped after {self.maxiter} iterations with relative residual {worst:.2e} "
                              f"> tol {self.tol:.1e}; raise maxiter or damping", RuntimeWarning, stacklevel=2)
        self.last_iterations = it
        return X[:, 0] if vec else X
