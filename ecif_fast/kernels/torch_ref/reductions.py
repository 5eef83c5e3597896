"""Torch twin of ``ecif_reductions``: the influence of every training pair along query directions.

SPEC §4: with ``δS_ij = t(<δu_i, v_j> + <u_i, δv_j>) + δs·S_ij``, row means ``m_i = Σ_j p_ij δS_ij``,
column means ``m'_j = Σ_i q_ij δS_ij``::

    positive_k = (m_k − δS_kk) + (m'_k − δS_kk)
    negative_k = Σ_{i≠k} w_ik (δS_ik − m_i) + Σ_{j≠k} w'_kj (δS_kj − m'_j)

Every term is a softmax-weighted reduction, written as products of ``(B, B)`` weight matrices with
``(B, d)`` embeddings, so ``δS`` is never formed per query. Entries at a line maximum use the
cancellation-free form of ``softmax.py`` (exact weights).
"""
from __future__ import annotations

import torch

from ..batching import BatchPlan
from .common import prepare_directions
from .softmax import line_weights


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
    U, V, dU, dV, t, ds, squeeze = prepare_directions(U, V, scale, dU, dV, dlog_scale)
    Q = dU.shape[0]
    ds = None if ds is None else ds[:, None]

    def with_scale(value, weighted_scores):
        return value if ds is None else value + ds * weighted_scores

    positive = U.new_zeros(Q, plan.n)
    negative = U.new_zeros(Q, plan.n)
    for idx in plan.groups():
        Ub, Vb, dUb, dVb = U[idx], V[idx], dU[:, idx], dV[:, idx]
        S = t * (Ub @ Vb.T)
        rw = line_weights(S, exact)    # rows i, entries k
        cw = line_weights(S.T, exact)  # columns j, entries k
        P, Qc = rw.P, cw.P.T
        m = with_scale(t * (_rowdot(dUb, P @ Vb) + _rowdot(Ub, P @ dVb)), (P * S).sum(1))
        mc = with_scale(t * (_rowdot(Qc.T @ dUb, Vb) + _rowdot(Qc.T @ Ub, dVb)), (Qc * S).sum(0))
        diag = with_scale(t * (_rowdot(dUb, Vb) + _rowdot(Ub, dVb)), S.diagonal())
        positive[:, idx] = m + mc - 2 * diag

        Wr, Wc = rw.low, cw.low.T  # [i, k] and [k, j]
        a1 = with_scale(t * (_rowdot(Wr.T @ dUb, Vb) + _rowdot(Wr.T @ Ub, dVb)), (Wr * S).sum(0))
        c1 = with_scale(t * (_rowdot(dUb, Wc @ Vb) + _rowdot(Ub, Wc @ dVb)), (Wc * S).sum(1))
        neg = a1 - m @ Wr + c1 - mc @ Wc.T
        if exact:
            # row maxima (i, a_i): p_ia (δS_ia − Σ_{j≠a} r_ij δS_ij), credited to pair a_i
            a, R = rw.arg, rw.rest
            dS_a = with_scale(t * (_rowdot(dUb, Vb[a]) + _rowdot(Ub, dVb[:, a])), S[torch.arange(len(a)), a])
            m_rest = with_scale(t * (_rowdot(dUb, R @ Vb) + _rowdot(Ub, R @ dVb)), (R * S).sum(1))
            neg.index_add_(1, a, rw.p_max * (dS_a - m_rest) * rw.special)
            # column maxima (b_j, j): q_bj (δS_bj − Σ_{i≠b} r'_ij δS_ij), credited to pair b_j
            b, RT = cw.arg, cw.rest
            dS_b = with_scale(t * (_rowdot(dUb[:, b], Vb) + _rowdot(Ub[b], dVb)), S[b, torch.arange(len(b))])
            m_rest = with_scale(t * (_rowdot(RT @ dUb, Vb) + _rowdot(RT @ Ub, dVb)), (RT * S.T).sum(1))
            neg.index_add_(1, b, cw.p_max * (dS_b - m_rest) * cw.special)
        negative[:, idx] = neg
    if squeeze:
        return positive[0], negative[0]
    return positive, negative
