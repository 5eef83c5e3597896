"""Low-rank + damping factorisation ``H⁻¹ ≈ V (Λ+δ)⁻¹ Vᵀ + (I − VVᵀ)/δ`` reused across queries."""
from __future__ import annotations

import torch

from ..errors import ECIFInputError, NotPositiveDefiniteError
from .curvature import Curvature


def top_eigenpairs(curvature: Curvature, rank: int, *, oversample: int = 10, iters: int = 4, seed: int = 0,
                   dense: torch.Tensor | None = None):
    """Top-``rank`` eigenpairs (largest magnitude) of the curvature.

    Dense ``eigh`` when the matrix is given or ``rank + oversample >= P``; otherwise randomized subspace
    iteration with ``iters`` power steps (``(iters + 1)·(rank + oversample)`` matrix-vector products),
    deterministic under ``seed``.
    Returns ``(eigenvalues (r,), eigenvectors (P, r))``, ordered by decreasing magnitude.
    """
    P = curvature.size
    dtype = curvature.theta.dtype
    if dense is not None or rank + oversample >= P:
        C = curvature.dense() if dense is None else dense
        lam, vecs = torch.linalg.eigh(C)
    else:
        g = torch.Generator().manual_seed(seed)
        Y = curvature.matvec(torch.randn(P, rank + oversample, generator=g, dtype=dtype))
        for _ in range(iters):
            Qm, _ = torch.linalg.qr(Y)
            Y = curvature.matvec(Qm)
        Qm, _ = torch.linalg.qr(Y)
        T = Qm.T @ curvature.matvec(Qm)
        lam, W = torch.linalg.eigh(0.5 * (T + T.T))
        vecs = Qm @ W
    order = lam.abs().argsort(descending=True)[:rank]
    return lam[order], vecs[:, order]


class LowRankSolver:
    """Inverse of ``C + δI`` restricted to the top-``rank`` eigenspace of ``C`` plus ``1/δ`` elsewhere.

    Exact when ``rank = P``.
    """

    name = "lowrank"

    def __init__(self, curvature: Curvature, damping: float, rank: int = 64, seed: int = 0,
                 dense: torch.Tensor | None = None):
        if rank < 1:
            raise ECIFInputError(f"rank must be >= 1, got {rank}")
        self.rank = min(rank, curvature.size)
        self.lam, self.vecs = top_eigenpairs(curvature, self.rank, seed=seed, dense=dense)
        if bool((self.lam + damping <= 0).any()):
            lam = float(self.lam.min())
            raise NotPositiveDefiniteError(
                f"damped {curvature.kind} matrix is not positive definite: eigenvalue {lam:.4e} with damping "
                f"{damping:.4e}; increase damping above {-lam:.4e} or use curvature='gauss-newton'")
        self.damping = damping

    def solve(self, B: torch.Tensor) -> torch.Tensor:
        """``H⁻¹ B`` for ``B`` of shape ``(P,)`` or ``(P, Q)``."""
        coef = self.vecs.T @ B
        inner = self.vecs @ (coef / (self.lam + self.damping).reshape(-1, *([1] * (B.dim() - 1))))
        return inner + (B - self.vecs @ coef) / self.damping
