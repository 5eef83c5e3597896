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


def prepare_directions(U, V, scale, dU, dV, dlog_scale):
    """Common prologue of the directional ops: cast to the accumulation dtype, add the query axis.

    Returns ``(U, V, dU (Q, n, d), dV (Q, n, d), t (0-d), ds (Q,) or None, squeeze)`` where ``squeeze``
    says the caller passed 2-D directions and expects the query axis dropped again.
    """
    squeeze = dU.dim() == 2
    dt = acc_dtype(U)
    U, V, dU, dV = U.to(dt), V.to(dt), dU.to(dt), dV.to(dt)
    if squeeze:
        dU, dV = dU.unsqueeze(0), dV.unsqueeze(0)
    t = torch.as_tensor(scale, dtype=dt, device=U.device)
    ds = None
    if dlog_scale is not None:
        ds = torch.as_tensor(dlog_scale, dtype=dt, device=U.device).reshape(-1).expand(dU.shape[0])
    return U, V, dU, dV, t, ds, squeeze
