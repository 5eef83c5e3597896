"""The contrastive loss (docs/math.md §2) in plain torch, differentiable by autograd (twice: Newton training
and exact Hessians use it); also the torch twin of the fused loss."""
from __future__ import annotations

import torch

from .batches import BatchPlan


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype (docs/math.md §5): float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def batch_loss(S: torch.Tensor) -> torch.Tensor:
    """``Σ_k ℓ_k`` of one ``(B, B)`` score block: row term + column term, summed, no ½."""
    diag = S.diagonal()
    return (torch.logsumexp(S, dim=1) - diag).sum() + (torch.logsumexp(S, dim=0) - diag).sum()


def per_pair_loss(S: torch.Tensor) -> torch.Tensor:
    """``(B,)`` the per-pair terms ``ℓ_k`` of one score block."""
    diag = S.diagonal()
    return torch.logsumexp(S, dim=1) + torch.logsumexp(S, dim=0) - 2 * diag


def contrastive_loss(U: torch.Tensor, V: torch.Tensor, scale, plan: BatchPlan) -> torch.Tensor:
    """``Σ_batches Σ_{k∈b} ℓ_k`` for embeddings ``U, V (n, d)`` and scale ``t``; a 0-d tensor.

    Differentiable with respect to ``U``, ``V`` and a tensor ``scale``. Half-precision inputs are
    computed in float32.
    """
    dt = acc_dtype(U)
    U = U.to(dt)
    V = V.to(dt)
    t = scale.to(dt) if torch.is_tensor(scale) else torch.tensor(scale, dtype=dt, device=U.device)
    total = U.new_zeros(())
    # batches of equal size are stacked and scored by one batched matmul (few distinct sizes in practice)
    sizes = plan.sizes
    for b in sorted(set(sizes.tolist())):
        idx = torch.cat([g for g, k in zip(plan.groups(), sizes.tolist()) if k == b]).reshape(-1, b)
        S = t * torch.bmm(U[idx], V[idx].transpose(1, 2))
        diag = S.diagonal(dim1=1, dim2=2).sum()
        total = total + torch.logsumexp(S, dim=2).sum() + torch.logsumexp(S, dim=1).sum() - 2 * diag
    return total
