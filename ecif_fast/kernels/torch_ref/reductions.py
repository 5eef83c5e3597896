"""Torch twin of ``ecif_reductions``: the influence of every training pair along query directions.

SPEC §4: with ``δS_ij = t(<δu_i, v_j> + <u_i, δv_j>) + δs·S_ij``, row means ``m_i = Σ_j p_ij δS_ij``,
column means ``m'_j = Σ_i q_ij δS_ij``::

    positive_k = (m_k − δS_kk) + (m'_k − δS_kk)
    negative_k = Σ_{i≠k} w_ik (δS_ik − m_i) + Σ_{j≠k} w'_kj (δS_kj − m'_j)

Every term is a softmax-weighted reduction, written here as products of ``(B, B)`` weight matrices
with ``(B, d)`` embeddings, so ``δS`` is never formed per query.
"""
from __future__ import annotations

import torch

from ..batching import BatchPlan
from .common import acc_dtype
from .softmax import removal_weights


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1)


def ecif_reductions(U, V, scale, plan: BatchPlan, dU, dV, dlog_scale=None, negative_term: str = "exact"):
    """Positive and negative influence parts of every pair along ``Q`` query directions.

    Args:
        U, V: ``(n, d)`` embeddings at the optimum. scale: ``t`` (float or 0-d tensor).
        plan: the training batches.
        dU, dV: ``(Q, n, d)`` (or ``(n, d)``) directional derivatives ``J·h`` of the embeddings.
        dlog_scale: ``(Q,)`` (or scalar) derivative of ``s = log t`` along ``h``; ``None`` if fixed.
        negative_term: ``"exact"`` (``w = p/(1-p)``) or ``"taylor"`` (``w = p``).
    Returns:
        ``positive, negative``: ``(Q, n)`` (``(n,)`` for 2-D ``dU``), accumulation dtype.
    """
    exact = negative_term == "exact"
    squeeze = dU.dim() == 2
    dt = acc_dtype(U)
    U, V = U.to(dt), V.to(dt)
    dU, dV = dU.to(dt), dV.to(dt)
    if squeeze:
        dU, dV = dU.unsqueeze(0), dV.unsqueeze(0)
    Q = dU.shape[0]
    t = torch.as_tensor(scale, dtype=dt, device=U.device)
    ds = None
    if dlog_scale is not None:
        ds = torch.as_tensor(dlog_scale, dtype=dt, device=U.device).reshape(-1).expand(Q)[:, None]
    positive = U.new_zeros(Q, plan.n)
    negative = U.new_zeros(Q, plan.n)
    for idx in plan.groups():
        Ub, Vb, dUb, dVb = U[idx], V[idx], dU[:, idx], dV[:, idx]
        S = t * (Ub @ Vb.T)
        P = torch.softmax(S, dim=1)
        Qc = torch.softmax(S, dim=0)
        Wr = removal_weights(S, dim=1, exact=exact)  # [i, k]: weight of pair k in row i
        Wc = removal_weights(S, dim=0, exact=exact)  # [k, j]: weight of pair k in column j
        m = t * (_rowdot(dUb, P @ Vb) + _rowdot(Ub, P @ dVb))
        mc = t * (_rowdot(Qc.T @ dUb, Vb) + _rowdot(Qc.T @ Ub, dVb))
        diag = t * (_rowdot(dUb, Vb) + _rowdot(Ub, dVb))
        a1 = t * (_rowdot(Wr.T @ dUb, Vb) + _rowdot(Wr.T @ Ub, dVb))
        c1 = t * (_rowdot(dUb, Wc @ Vb) + _rowdot(Ub, Wc @ dVb))
        if ds is not None:
            m = m + ds * (P * S).sum(1)
            mc = mc + ds * (Qc * S).sum(0)
            diag = diag + ds * S.diagonal()
            a1 = a1 + ds * (Wr * S).sum(0)
            c1 = c1 + ds * (Wc * S).sum(1)
        positive[:, idx] = m + mc - 2 * diag
        negative[:, idx] = a1 - m @ Wr + c1 - mc @ Wc.T
    if squeeze:
        return positive[0], negative[0]
    return positive, negative
