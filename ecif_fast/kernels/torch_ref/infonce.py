"""Torch twin of the fused ``infonce`` op: contrastive loss forward + backward (docs/math.md §2, §4).

For one batch with scores ``S = t·U Vᵀ``, row LSE ``r`` and column LSE ``c``::

    loss        = Σ_i r_i + Σ_j c_j − 2 Σ_k S_kk
    G = ∂loss/∂S = exp(S − r[:, None]) + exp(S − c[None, :]) − 2 I
    dU = t·G V,   dV = t·Gᵀ U,   dlog_scale = Σ G ∘ S        (s = log t)

Batches of at most :data:`~ecif_fast.kernels.torch_ref.common.CHUNK` pairs materialise their ``B x B``
block. Larger ones ("all" negatives at large n) stream over ``chunk x chunk`` tiles in two passes,
like flash-attention: pass 1 merges per-tile row/column log-sum-exps (``logaddexp``), pass 2
recomputes each tile and accumulates the gradients; extra memory is O(B·d + chunk²).
"""
from __future__ import annotations

from typing import Optional

import torch

from ...core.batches import BatchPlan
from .common import acc_dtype, chunk_size, scale_value, spans


def stream_lse(Ub: torch.Tensor, Vb: torch.Tensor, t: torch.Tensor, chunk: int):
    """Row and column log-sum-exp of ``t·Ub Vbᵀ`` without forming it: ``(B,)``, ``(B,)``."""
    B = Ub.shape[0]
    row = Ub.new_full((B,), float("-inf"))
    col = Ub.new_full((B,), float("-inf"))
    parts = spans(B, chunk)
    for i0, i1 in parts:
        Ui = Ub[i0:i1]
        for j0, j1 in parts:
            S = t * (Ui @ Vb[j0:j1].T)
            row[i0:i1] = torch.logaddexp(row[i0:i1], torch.logsumexp(S, 1))
            col[j0:j1] = torch.logaddexp(col[j0:j1], torch.logsumexp(S, 0))
    return row, col


def _batch_dense(Ub, Vb, t, with_scale):
    S = t * (Ub @ Vb.T)
    r = torch.logsumexp(S, 1)
    c = torch.logsumexp(S, 0)
    loss = r.sum() + c.sum() - 2 * S.diagonal().sum()
    G = torch.exp(S - r[:, None]) + torch.exp(S - c[None, :])
    G.diagonal().sub_(2)
    ds = (G * S).sum() if with_scale else None
    return loss, t * (G @ Vb), t * (G.T @ Ub), ds


def _batch_stream(Ub, Vb, t, with_scale, chunk):
    r, c = stream_lse(Ub, Vb, t, chunk)
    loss = r.sum() + c.sum() - 2 * t * torch.dot(Ub.reshape(-1), Vb.reshape(-1))  # no (B, d) temporary
    gU = torch.zeros_like(Ub)
    gV = torch.zeros_like(Vb)
    ds = Ub.new_zeros(()) if with_scale else None
    parts = spans(Ub.shape[0], chunk)
    for i0, i1 in parts:
        Ui = Ub[i0:i1]
        for j0, j1 in parts:
            Vj = Vb[j0:j1]
            S = t * (Ui @ Vj.T)
            G = torch.exp(S - r[i0:i1, None])
            G += torch.exp(S - c[None, j0:j1])
            if i0 == j0:  # same spans on both axes: the diagonal of S lies in the diagonal tiles
                G.diagonal().sub_(2)
            if with_scale:
                ds += (G * S).sum()
            gU[i0:i1] += G @ Vj
            gV[j0:j1] += G.T @ Ui
    return loss, gU.mul_(t), gV.mul_(t), ds


def infonce(U: torch.Tensor, V: torch.Tensor, scale, plan: BatchPlan, with_scale: bool, *,
            chunk: Optional[int] = None):
    """Fused loss and gradients of ``Σ_batches Σ_{k∈b} ℓ_k`` (docs/math.md §2; row + column terms, summed).

    Args:
        U, V: ``(n, d)`` embeddings (float16/bfloat16/float32/float64). scale: ``t`` (number or 0-d
            tensor; not tracked by autograd here). plan: the batches. with_scale: also return the
            derivative with respect to ``s = log t``.
        chunk: tile size for streaming large batches (default :data:`common.CHUNK`).
    Returns:
        ``(loss 0-d, dU (n, d), dV (n, d), dlog_scale 0-d or None)``, float32 (float64 for float64 input).
    """
    dt = acc_dtype(U)
    C = chunk_size(chunk)
    t = scale_value(scale, dt, U.device)
    U, V = U.to(dt), V.to(dt)
    loss = U.new_zeros(())
    ds = U.new_zeros(()) if with_scale else None
    whole = plan.is_single  # "all" negatives: no gather copies (the loss is the same in any pair order)
    if not whole:
        dU = torch.zeros_like(U)
        dV = torch.zeros_like(V)
    for idx in plan.groups():
        if whole:
            Ub, Vb = U, V
        else:
            Ub, Vb = U[idx], V[idx]
        if Ub.shape[0] <= C:
            l, gU, gV, g = _batch_dense(Ub, Vb, t, with_scale)
        else:
            l, gU, gV, g = _batch_stream(Ub, Vb, t, with_scale, C)
        loss += l
        if whole:
            dU, dV = gU, gV
        else:
            dU[idx] = gU
            dV[idx] = gV
        if with_scale:
            ds += g
    return loss, dU, dV, ds
