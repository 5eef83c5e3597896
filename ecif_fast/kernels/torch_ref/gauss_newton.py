"""Torch twin of the embedding-space Gauss–Newton product (docs/math.md §4).

``(H_S δS)_ij = p_ij(δS_ij − m_i) + q_ij(δS_ij − m'_j)`` is the Hessian of the loss with respect to
the scores applied to ``δS``; it is mapped back to the embeddings by ``∂/∂u_i = t Σ_j G_ij v_j``,
``∂/∂v_j = t Σ_i G_ij u_i`` and to ``s = log t`` by ``Σ_ij G_ij S_ij``.

Batches larger than the chunk size (:data:`common.CHUNK`) are streamed over ``chunk x chunk`` tiles:
pass 1 row/column log-sum-exp, pass 2 the means ``m, m'``, pass 3 ``G`` tile by tile (a few queries at
a time) mapped back to the embeddings. Extra memory O(Q·B·d + chunk²).
"""
from __future__ import annotations

import torch

from ...core.batches import BatchPlan
from .common import chunk_size, prepare_directions, spans
from .infonce import stream_lse

# queries handled together when forming (Q, chunk, chunk) tiles of G in the streaming path
QUERY_GROUP = 2


def gauss_newton_product(U, V, scale, plan: BatchPlan, dU, dV, dlog_scale=None, *, chunk: int | None = None):
    """Gauss–Newton product in embedding space.

    Args:
        U, V: ``(n, d)``; scale: ``t``; plan: batches.
        dU, dV: ``(Q, n, d)`` or ``(n, d)`` perturbations; dlog_scale: ``(Q,)``/scalar or ``None``.
        chunk: batches with more pairs are streamed over tiles (default :data:`common.CHUNK`).
    Returns:
        ``gU, gV`` with the shape of ``dU``, and ``gs`` (``(Q,)`` / scalar, zeros when ``dlog_scale`` is None).
    """
    U, V, dU, dV, t, ds, squeeze = prepare_directions(U, V, scale, dU, dV, dlog_scale)
    Q = dU.shape[0]
    gU = torch.zeros_like(dU)
    gV = torch.zeros_like(dV)
    gs = U.new_zeros(Q)
    C = chunk_size(chunk)
    for idx in plan.groups():
        Ub, Vb = U[idx], V[idx]
        if len(idx) > C:
            gU[:, idx], gV[:, idx], g = _stream_batch(Ub, Vb, dU[:, idx], dV[:, idx], t, ds, C)
            if ds is not None:
                gs = gs + g
            continue
        S = t * (Ub @ Vb.T)
        P = torch.softmax(S, dim=1)
        Qc = torch.softmax(S, dim=0)
        dS = t * (dU[:, idx] @ Vb.T + Ub @ dV[:, idx].transpose(1, 2))
        if ds is not None:
            dS = dS + ds[:, None, None] * S
        m = (P * dS).sum(2, keepdim=True)
        mc = (Qc * dS).sum(1, keepdim=True)
        G = P * (dS - m) + Qc * (dS - mc)
        gU[:, idx] = t * (G @ Vb)
        gV[:, idx] = t * (G.transpose(1, 2) @ Ub)
        if ds is not None:
            gs = gs + (G * S).sum((1, 2))
    if squeeze:
        return gU[0], gV[0], gs[0]
    return gU, gV, gs


def _prob_tiles(Ub, Vb, t, r, c, parts):
    """Yield ``(I, J, S, P, Q)`` for every tile: scores and row/column softmax from the batch LSEs."""
    for i0, i1 in parts:
        I = slice(i0, i1)
        for j0, j1 in parts:
            J = slice(j0, j1)
            S = t * (Ub[I] @ Vb[J].T)
            yield I, J, S, torch.exp(S - r[I, None]), torch.exp(S - c[None, J])


def _stream_batch(Ub, Vb, dUb, dVb, t, ds, chunk: int):
    """``(gU, gV, gs)`` of one batch, streamed over tiles (``gs`` None when ``ds`` is None)."""
    B, Q = Ub.shape[0], dUb.shape[0]
    parts = spans(B, chunk)
    r, c = stream_lse(Ub, Vb, t, chunk)
    # pass 2: m_i = Σ_j p_ij δS_ij, m'_j = Σ_i q_ij δS_ij as weighted sums of embeddings
    PV, PdV, PS = torch.zeros_like(Ub), torch.zeros_like(dUb), Ub.new_zeros(B)
    QU, QdU, QS = torch.zeros_like(Ub), torch.zeros_like(dUb), Ub.new_zeros(B)
    for I, J, S, P, Qc in _prob_tiles(Ub, Vb, t, r, c, parts):
        Ui, dUi, Vj = Ub[I], dUb[:, I], Vb[J]
        PV[I] += P @ Vj
        PdV[:, I] += P @ dVb[:, J]
        QU[J] += Qc.T @ Ui
        QdU[:, J] += Qc.T @ dUi
        if ds is not None:
            PS[I] += (P * S).sum(1)
            QS[J] += (Qc * S).sum(0)
    m = t * ((dUb * PV).sum(-1) + (Ub * PdV).sum(-1))
    mc = t * ((QdU * Vb).sum(-1) + (QU * dVb).sum(-1))
    if ds is not None:
        m = m + ds[:, None] * PS
        mc = mc + ds[:, None] * QS
    # pass 3: G = P (δS − m) + Q (δS − m') tile by tile, mapped back to the embeddings
    gU, gV = torch.zeros_like(dUb), torch.zeros_like(dVb)
    gs = Ub.new_zeros(Q) if ds is not None else None
    for I, J, S, P, Qc in _prob_tiles(Ub, Vb, t, r, c, parts):
        Ui, Vj = Ub[I], Vb[J]
        for q0 in range(0, Q, QUERY_GROUP):
            qs = slice(q0, min(q0 + QUERY_GROUP, Q))
            dS = t * (dUb[qs, I] @ Vj.T + Ui @ dVb[qs, J].transpose(1, 2))
            if ds is not None:
                dS = dS + ds[qs, None, None] * S
            G = (dS - m[qs, I, None]).mul_(P)  # in place: few (q, I, J) temporaries alive
            G += dS.sub_(mc[qs, None, J]).mul_(Qc)
            del dS
            gU[qs, I] += G @ Vj
            gV[qs, J] += G.transpose(1, 2) @ Ui
            if ds is not None:
                gs[qs] += (G * S).sum((1, 2))
    return t * gU, t * gV, gs
