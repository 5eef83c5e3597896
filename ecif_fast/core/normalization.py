"""The embeddings' normaliser, exact or soft (docs/math.md §2.3)."""
from __future__ import annotations

import torch


def embedding_norm(Z: torch.Tensor, norm_eps: float = 0.0) -> torch.Tensor:
    """``(n, 1)`` the normaliser ``ρ = sqrt(|z|² + ε²)`` of the rows of ``Z (n, d)`` (``|z|`` when ``ε = 0``)."""
    if norm_eps > 0:
        return (Z.pow(2).sum(-1, keepdim=True) + norm_eps ** 2).sqrt()
    return Z.norm(dim=-1, keepdim=True)


def normalized_side(F: torch.Tensor, W: torch.Tensor, normalize: bool, norm_eps: float = 0.0):
    """One side of linear heads: ``(u (B, d), x̃ (B, r))`` with ``u = z/ρ`` and ``x̃ = F/ρ`` for ``z = F Wᵀ``
    (``ρ = 1`` without ``normalize``). The normalisation's Jacobian is ``(I − u uᵀ)/ρ``, exact or soft alike
    (docs/math.md §2.3), so the closed forms written with ``u`` and ``x̃`` serve both."""
    Z = F @ W.T
    if not normalize:
        return Z, F
    rho = embedding_norm(Z, norm_eps)
    return Z / rho, F / rho
