"""The embeddings' normaliser, exact or soft (docs/math.md §2.3)."""
from __future__ import annotations

import torch


def embedding_norm(Z: torch.Tensor, norm_eps: float = 0.0) -> torch.Tensor:
    """``(n, 1)`` the normaliser ``ρ = sqrt(|z|² + ε²)`` of the rows of ``Z (n, d)`` (``|z|`` when ``ε = 0``)."""
    if norm_eps > 0:
        return (Z.pow(2).sum(-1, keepdim=True) + norm_eps ** 2).sqrt()
    return Z.norm(dim=-1, keepdim=True)
