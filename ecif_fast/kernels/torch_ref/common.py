"""Helpers shared by the torch twins."""
from __future__ import annotations

from typing import Optional

import torch

from ...core.loss import acc_dtype  # noqa: F401  (the twins' accumulation dtype)

# Batches with more pairs than this are processed in CHUNK x CHUNK tiles of the score matrix (streaming,
# O(B·d) extra memory) instead of materialising the B x B block. Read at call time, so tests can
# monkeypatch it (or pass ``chunk=`` to an op) to exercise the streaming path at small n.
CHUNK = 2048


def chunk_size(chunk: Optional[int]) -> int:
    """``chunk`` if given, else the module default :data:`CHUNK` (read now, so it can be patched)."""
    c = CHUNK if chunk is None else int(chunk)
    if c < 1:
        raise ValueError(f"chunk size must be >= 1, got {c}")
    return c


def spans(B: int, chunk: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` covering ``range(B)`` in pieces of at most ``chunk``."""
    return [(a, min(a + chunk, B)) for a in range(0, B, chunk)]


def scale_value(scale, dtype: torch.dtype, device) -> torch.Tensor:
    """``t`` as a detached 0-d tensor of ``dtype`` (a tensor scale is not tracked by the raw ops)."""
    if torch.is_tensor(scale):
        scale = scale.detach().reshape(())
    return torch.as_tensor(scale, dtype=dtype, device=device)


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
