"""Helpers shared by the torch twins."""
from __future__ import annotations

import torch


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype (SPEC §5): float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def as_scale(scale, dtype: torch.dtype, device) -> torch.Tensor:
    return torch.as_tensor(scale, dtype=dtype, device=device)


def batch_scores(U, V, scale, idx: torch.Tensor) -> torch.Tensor:
    """``S_b = t · U_b V_bᵀ`` for the pairs ``idx`` of one batch, in the accumulation dtype."""
    dt = acc_dtype(U)
    Ub = U[idx].to(dt)
    Vb = V[idx].to(dt)
    return as_scale(scale, dt, U.device) * (Ub @ Vb.T)
