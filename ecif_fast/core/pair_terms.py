"""Per-pair embedding-space gradients and group-removal objectives (docs/math.md §3, §4).

``ℓ̃_k = ℓ_k + Σ_{i≠k} (ℓ_i(b) − ℓ_i(b∖k))`` is the part of ``R`` that pair ``k`` accounts for; its
gradient is ``g_k``. With respect to the scores of its batch (exact or taylor weights ``w``, ``w'``)::

    ∂ℓ̃_k/∂S_ij = δ_ik(p_kj − δ_jk) + δ_jk(q_ik − δ_ik) + w_ik(δ_jk − p_ij) + w'_kj(δ_ik − q_ij)

(for ``φ(p) = −log(1−p)`` and for ``φ(p) = p`` the derivative of ``φ(p_ik)`` has the same form
``w_ik (e_k − p_i·)``). Contracting with ``δS`` gives back the formulas of ``reductions.py``.
"""
from __future__ import annotations

import torch

from .lines import line_weights


def pair_score_gradients(S: torch.Tensor, exact: bool, ks: torch.Tensor | None = None) -> torch.Tensor:
    """``(K, B, B)`` tensor ``E[a] = ∂ℓ̃_{ks[a]}/∂S`` for one ``(B, B)`` score block (all pairs if ``ks`` is None).

    Exact weights are assembled without forming ``w·(1 − p)`` (see :mod:`.lines`): the entry at
    column ``k`` of row ``i`` is ``p_ik`` itself and the others are ``−w_ik p_ij`` (``−p_ik r_ij`` at a maximum).
    """
    B = S.shape[0]
    ks = torch.arange(B, device=S.device) if ks is None else ks
    a = torch.arange(ks.numel(), device=S.device)
    rw = line_weights(S, exact)
    cw = line_weights(S.T, exact)
    P, Qc = rw.P, cw.P.T
    Wr, Wc = rw.low, cw.low.T  # [i, k], [k, j]
    E = -(Wr.T[ks][:, :, None] * P[None]) - (Wc[ks][:, None, :] * Qc[None])
    if exact:
        rows = (rw.arg[None, :] == ks[:, None]) & rw.special[None, :]  # (K, B): rows i whose maximum is k
        cols = (cw.arg[None, :] == ks[:, None]) & cw.special[None, :]  # (K, B): columns j whose maximum is k
        E -= (rows * rw.p_max)[:, :, None] * rw.rest[None] + (cols * cw.p_max)[:, None, :] * cw.rest.T[None]
        off = 1 - torch.eye(B, dtype=S.dtype, device=S.device)
        E[a, :, ks] = (P * off)[:, ks].T
        E[a, ks, :] = (Qc * off)[ks]
    else:
        E[a, :, ks] += Wr.T[ks]
        E[a, ks, :] += Wc[ks]
    return _add_own_loss_gradients(E, P, Qc, ks)


def _add_own_loss_gradients(E: torch.Tensor, P: torch.Tensor, Qc: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """``E[a] += ∂ℓ_k/∂S`` for ``k = ks[a]``, the pair's own loss ``ℓ_k = −log p_kk − log q_kk``: row ``k`` is
    ``p_k· − e_k``, column ``k`` is ``q_·k − e_k`` (``P``, ``Qc``: row and column softmax). In place; returns ``E``."""
    a = torch.arange(ks.numel(), device=E.device)
    E[a, ks, :] += P[ks]
    E[a, :, ks] += Qc.T[ks]
    E[a, ks, ks] -= 2
    return E


def pair_embedding_gradients(Ub, Vb, t, exact: bool, with_scale: bool, ks: torch.Tensor | None = None):
    """Gradients of every ``ℓ̃_k`` of one batch with respect to that batch's embeddings.

    Args:
        Ub, Vb: ``(B, d)`` embeddings of the batch; t: 0-d scale tensor; ks: ``(K,)`` positions of the
            pairs inside the batch (default: all).
    Returns:
        ``gU (K, B, d)``, ``gV (K, B, d)`` (leading axis = pair k), ``gs (K,)`` derivative with respect
        to ``s = log t`` (``None`` unless ``with_scale``).
    """
    S = t * (Ub @ Vb.T)
    E = pair_score_gradients(S, exact, ks)
    gU = t * (E @ Vb)
    gV = t * (E.transpose(1, 2) @ Ub)
    gs = (E * S).sum((1, 2)) if with_scale else None
    return gU, gV, gs


def removal_objective(S: torch.Tensor, removed: torch.Tensor, exact: bool):
    """Positive and negative parts of ``Σ_{k∈D*} ℓ_k + Σ_{i∉D*} (ℓ_i(b) − ℓ_i(b∖D*))`` for one batch.

    Args:
        S: ``(B, B)`` scores (differentiable). removed: ``(B,)`` bool, the pairs of ``D*`` in this batch.
    Returns:
        ``(positive, negative)`` 0-d tensors. Exact: the negative part is the difference of the
        log-sum-exps over all and over the remaining columns/rows (docs/math.md §3, no ``log(1−P)``
        cancellation); taylor: ``Σ_{i∉D*} Σ_{k∈D*} (p_ik + q_ki)``.
    """
    diag = S.diagonal()
    L_row = torch.logsumexp(S, dim=1)
    L_col = torch.logsumexp(S, dim=0)
    positive = (L_row + L_col - 2 * diag)[removed].sum()
    keep = ~removed
    if not bool(keep.any()) or not bool(removed.any()):
        return positive, S.new_zeros(())
    Sk = S[keep][:, keep]
    if exact:
        negative = (L_row[keep] - torch.logsumexp(Sk, dim=1)).sum() + (L_col[keep] - torch.logsumexp(Sk, dim=0)).sum()
    else:
        P = torch.softmax(S, dim=1)
        Qc = torch.softmax(S, dim=0)
        negative = P[keep][:, removed].sum() + Qc[removed][:, keep].sum()
    return positive, negative


def pair_fit_gradients(Ub: torch.Tensor, Vb: torch.Tensor, t: torch.Tensor, ks: torch.Tensor):
    """Each pair's own fit in its batch and its gradients with respect to the batch's embeddings.

    The fits of pair ``k``: its cosine ``c_k = <u_k, v_k>/(|u_k||v_k|)`` and its loss
    ``ℓ_k = −log p_kk − log q_kk`` (row and column softmax of ``S = t·U Vᵀ``).

    Args:
        Ub, Vb: ``(B, d)`` the batch's embeddings; t: 0-d scale; ks: ``(K,)`` positions in the batch.
    Returns:
        ``(cos (K,), loss (K,), (cU, cV, cs), (lU, lV, ls))``: cotangents ``(K, B, d)`` (nonzero in row ``k`` only
        for the cosine) and ``(K,)`` derivatives with respect to ``s = log t`` (0 for the cosine).
    """
    B, K = Ub.shape[0], ks.numel()
    a = torch.arange(K, device=Ub.device)
    u, v = Ub[ks], Vb[ks]
    nu, nv = u.norm(dim=1, keepdim=True), v.norm(dim=1, keepdim=True)
    cos = (u * v).sum(1, keepdim=True) / (nu * nv)
    cU, cV = Ub.new_zeros(K, B, Ub.shape[1]), Vb.new_zeros(K, B, Vb.shape[1])
    cU[a, ks] = v / (nu * nv) - cos * u / nu ** 2
    cV[a, ks] = u / (nu * nv) - cos * v / nv ** 2
    S = t * (Ub @ Vb.T)
    logP, logQ = torch.log_softmax(S, dim=1), torch.log_softmax(S, dim=0)
    E = _add_own_loss_gradients(S.new_zeros(K, B, B), logP.exp(), logQ.exp(), ks)
    lU, lV = t * (E @ Vb), t * (E.transpose(1, 2) @ Ub)
    loss = -(logP[ks, ks] + logQ[ks, ks])
    return cos[:, 0], loss, (cU, cV, S.new_zeros(K)), (lU, lV, (E * S).sum((1, 2)))
