"""Torch twin of ``ecif_reductions``: the influence of every training pair along query directions.

docs/math.md §4: with ``δS_ij = t(<δu_i, v_j> + <u_i, δv_j>) + δs·S_ij``, row means ``m_i = Σ_j p_ij δS_ij``,
column means ``m'_j = Σ_i q_ij δS_ij``::

    positive_k = (m_k − δS_kk) + (m'_k − δS_kk)
    negative_k = Σ_{i≠k} w_ik (δS_ik − m_i) + Σ_{j≠k} w'_kj (δS_kj − m'_j)

Every term is a softmax-weighted reduction, written as products of ``(B, B)`` weight matrices with
``(B, d)`` embeddings, so ``δS`` is never formed per query. Entries at a line maximum use the
cancellation-free form of :mod:`ecif_fast.core.lines` (exact weights).

Batches larger than the chunk size (:data:`common.CHUNK`, e.g. "all" negatives at large n) are
streamed over ``chunk x chunk`` tiles, never forming the ``B x B`` block: pass 1 gathers per-row and
per-column statistics (log-sum-exp, argmax, log-sum-exp without the argmax); pass 2 accumulates every
weighted reduction that does not need the means ``m, m'``; pass 3 the two that do (``m Wr``, ``m' Wcᵀ``).
Extra memory O(Q·B·d + chunk²).
"""
from __future__ import annotations

import torch

from ...core.batches import BatchPlan
from .common import chunk_size, prepare_directions, spans
from ...core.lines import Tile, line_weights, stream_line_stats


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1)


def ecif_reductions(U, V, scale, plan: BatchPlan, dU, dV, dlog_scale=None, negative_term: str = "exact", *,
                    chunk: int | None = None):
    """Positive and negative influence parts of every pair along ``Q`` query directions.

    Args:
        U, V: ``(n, d)`` embeddings at the optimum. scale: ``t`` (float or 0-d tensor).
        plan: the training batches.
        dU, dV: ``(Q, n, d)`` (or ``(n, d)``) directional derivatives ``J·h`` of the embeddings.
        dlog_scale: ``(Q,)`` (or scalar) derivative of ``s = log t`` along ``h``; ``None`` if fixed.
        negative_term: ``"exact"`` (``w = p/(1-p)``) or ``"taylor"`` (``w = p``).
        chunk: batches with more pairs are streamed over tiles (default :data:`common.CHUNK`).
    Returns:
        ``positive, negative``: ``(Q, n)`` (``(n,)`` for 2-D ``dU``), accumulation dtype.
    """
    exact = negative_term == "exact"
    U, V, dU, dV, t, ds, squeeze = prepare_directions(U, V, scale, dU, dV, dlog_scale)
    Q = dU.shape[0]
    ds = None if ds is None else ds[:, None]

    def with_scale(value, weighted_scores):
        return value if ds is None else value + ds * weighted_scores

    C = chunk_size(chunk)
    positive = U.new_zeros(Q, plan.n)
    negative = U.new_zeros(Q, plan.n)
    for idx in plan.groups():
        Ub, Vb, dUb, dVb = U[idx], V[idx], dU[:, idx], dV[:, idx]
        if len(idx) > C:
            positive[:, idx], negative[:, idx] = _stream_batch(Ub, Vb, dUb, dVb, t, ds, exact, C)
            continue
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


def _stream_batch(Ub, Vb, dUb, dVb, t, ds, exact: bool, chunk: int):
    """``(positive, negative)`` ``(Q, B)`` of one batch, streamed over tiles (same formulas as above)."""
    B = Ub.shape[0]
    parts = spans(B, chunk)
    rows, cols = stream_line_stats(Ub, Vb, t, parts)

    def with_scale(value, weighted_scores):
        return value if ds is None else value + ds * weighted_scores

    # pass 2: every reduction that needs only the line statistics
    z, zq, zs = torch.zeros_like(Ub), torch.zeros_like(dUb), Ub.new_zeros(B)
    PV, PdV, PS = z.clone(), zq.clone(), zs.clone()      # Σ_j p_ij (v_j, δv_j, S_ij)       by row i
    QU, QdU, QS = z.clone(), zq.clone(), zs.clone()      # Σ_i q_ij (u_i, δu_i, S_ij)       by column j
    WU, WdU, WS = z.clone(), zq.clone(), zs.clone()      # Σ_i w_ik (u_i, δu_i, S_ik)       by entry k
    XV, XdV, XS = z.clone(), zq.clone(), zs.clone()      # Σ_j w'_kj (v_j, δv_j, S_kj)      by entry k
    if exact:
        RV, RdV, RS = z.clone(), zq.clone(), zs.clone()  # Σ_j r_ij (v_j, δv_j, S_ij)       by row i
        CU, CdU, CS = z.clone(), zq.clone(), zs.clone()  # Σ_i r'_ij (u_i, δu_i, S_ij)      by column j
    for i0, i1 in parts:
        I = slice(i0, i1)
        Ui, dUi = Ub[I], dUb[:, I]
        for j0, j1 in parts:
            J = slice(j0, j1)
            Vj, dVj = Vb[J], dVb[:, J]
            S = t * (Ui @ Vj.T)
            w = Tile(S, i0, j0, rows, cols)  # each (I, J) weight is used, then dropped
            P = w.P()
            PV[I] += P @ Vj
            PdV[:, I] += P @ dVj
            PS[I] += (P * S).sum(1)
            W = w.Wr(P, exact)
            del P
            WU[J] += W.T @ Ui
            WdU[:, J] += W.T @ dUi
            WS[J] += (W * S).sum(0)
            Qc = w.Qc()
            QU[J] += Qc.T @ Ui
            QdU[:, J] += Qc.T @ dUi
            QS[J] += (Qc * S).sum(0)
            W = w.Wc(Qc, exact)
            del Qc
            XV[I] += W @ Vj
            XdV[:, I] += W @ dVj
            XS[I] += (W * S).sum(1)
            del W
            if exact:
                R = w.R()
                RV[I] += R @ Vj
                RdV[:, I] += R @ dVj
                RS[I] += (R * S).sum(1)
                R = w.Rc()
                CU[J] += R.T @ Ui
                CdU[:, J] += R.T @ dUi
                CS[J] += (R * S).sum(0)
                del R
    m = with_scale(t * (_rowdot(dUb, PV) + _rowdot(Ub, PdV)), PS)
    mc = with_scale(t * (_rowdot(QdU, Vb) + _rowdot(QU, dVb)), QS)
    diag = with_scale(t * (_rowdot(dUb, Vb) + _rowdot(Ub, dVb)), t * _rowdot(Ub, Vb))
    positive = m + mc - 2 * diag

    # pass 3: the two reductions of the means, Σ_i m_i w_ik and Σ_j w'_kj m'_j
    mW = torch.zeros_like(m)
    mcX = torch.zeros_like(m)
    for i0, i1 in parts:
        I = slice(i0, i1)
        Ui = Ub[I]
        for j0, j1 in parts:
            J = slice(j0, j1)
            S = t * (Ui @ Vb[J].T)
            w = Tile(S, i0, j0, rows, cols)
            mW[:, J] += m[:, I] @ w.Wr(w.P(), exact)
            mcX[:, I] += mc[:, J] @ w.Wc(w.Qc(), exact).T
    a1 = with_scale(t * (_rowdot(WdU, Vb) + _rowdot(WU, dVb)), WS)
    c1 = with_scale(t * (_rowdot(dUb, XV) + _rowdot(Ub, XdV)), XS)
    neg = a1 - mW + c1 - mcX
    if exact:
        own = torch.arange(B, device=Ub.device)
        # row maxima (i, a_i): p_ia (δS_ia − Σ_{j≠a} r_ij δS_ij), credited to pair a_i
        a = rows.arg
        dS_a = with_scale(t * (_rowdot(dUb, Vb[a]) + _rowdot(Ub, dVb[:, a])), rows.top)
        m_rest = with_scale(t * (_rowdot(dUb, RV) + _rowdot(Ub, RdV)), RS)
        neg.index_add_(1, a, torch.exp(rows.top - rows.lse) * (dS_a - m_rest) * (a != own))
        # column maxima (b_j, j): q_bj (δS_bj − Σ_{i≠b} r'_ij δS_ij), credited to pair b_j
        b = cols.arg
        dS_b = with_scale(t * (_rowdot(dUb[:, b], Vb) + _rowdot(Ub[b], dVb)), cols.top)
        m_rest = with_scale(t * (_rowdot(CdU, Vb) + _rowdot(CU, dVb)), CS)
        neg.index_add_(1, b, torch.exp(cols.top - cols.lse) * (dS_b - m_rest) * (b != own))
    return positive, neg
