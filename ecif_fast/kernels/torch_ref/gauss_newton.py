"""Torch twin of the embedding-space Gauss–Newton product (SPEC §4).

``(H_S δS)_ij = p_ij(δS_ij − m_i) + q_ij(δS_ij − m'_j)`` is the Hessian of the loss with respect to
the scores applied to ``δS``; it is mapped back to the embeddings by ``∂/∂u_i = t Σ_j G_ij v_j``,
``∂/∂v_j = t Σ_i G_ij u_i`` and to ``s = log t`` by ``Σ_ij G_ij S_ij``.
"""
from __future__ import annotations

import torch

from ..batching import BatchPlan
from .common import prepare_directions


def gauss_newton_product(U, V, scale, plan: BatchPlan, dU, dV, dlog_scale=None):
    """Gauss–Newton product in embedding space.

    Args:
        U, V: ``(n, d)``; scale: ``t``; plan: batches.
        dU, dV: ``(Q, n, d)`` or ``(n, d)`` perturbations; dlog_scale: ``(Q,)``/scalar or ``None``.
    Returns:
        ``gU, gV`` with the shape of ``dU``, and ``gs`` (``(Q,)`` / scalar, zeros when ``dlog_scale`` is None).
    """
    U, V, dU, dV, t, ds, squeeze = prepare_directions(U, V, scale, dU, dV, dlog_scale)
    Q = dU.shape[0]
    gU = torch.zeros_like(dU)
    gV = torch.zeros_like(dV)
    gs = U.new_zeros(Q)
    for idx in plan.groups():
        Ub, Vb = U[idx], V[idx]
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
