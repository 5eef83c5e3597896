"""Torch twin of the ``lse`` op: per-batch row and column log-sum-exp of ``S = t·U Vᵀ`` (docs/math.md §2)."""
from __future__ import annotations

import torch

from ...core.batches import BatchPlan
from .common import acc_dtype, batch_scores


def lse(U: torch.Tensor, V: torch.Tensor, scale, plan: BatchPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column log-sum-exp of the scores of every batch.

    Args:
        U: ``(n, d)`` image embeddings. V: ``(n, d)`` text embeddings. scale: ``t`` (float or 0-d tensor).
        plan: the batches.
    Returns:
        ``row (n,)``: ``row[i] = log Σ_{j∈b(i)} exp(t<u_i, v_j>)``;
        ``col (n,)``: ``col[j] = log Σ_{i∈b(j)} exp(t<u_i, v_j>)``; float32 (float64 for float64 input).
    """
    dt = acc_dtype(U)
    row = torch.empty(plan.n, dtype=dt, device=U.device)  # every pair is in one batch
    col = torch.empty(plan.n, dtype=dt, device=U.device)
    for idx in plan.groups():
        S = batch_scores(U, V, scale, idx)
        row[idx] = torch.logsumexp(S, dim=1)
        col[idx] = torch.logsumexp(S, dim=0)
    return row, col
