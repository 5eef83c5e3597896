"""Negative-role weights of one batch (SPEC §3–§4), arranged so that p → 1 never cancels.

For a line (row) ``i`` of scores, the exact weight of entry ``k`` is ``w_ik = p_ik / (1 − p_ik)``.
Only the line maximum can have ``p > 1/2``; every other entry has ``w ≤ 1`` and is safe. At the
maximum ``a_i``, ``w`` can exceed the float range (``1 − p`` rounds to 0), so the formulas never use
it directly: ``w_ia (δS_ia − m_i) = p_ia (δS_ia − Σ_{j≠a} r_ij δS_ij)`` and ``w_ia p_ij = p_ia r_ij``, with
``r`` the softmax of the line with ``a_i`` removed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LineWeights:
    """Row-wise removal weights of a ``(B, B)`` block (use ``S.T`` for columns).

    Attributes:
        P: ``(B, B)`` row softmax.
        low: ``(B, B)`` weights ``w_ik`` with the diagonal zeroed and, for ``exact``, the row maxima zeroed too.
        arg: ``(B,)`` column of each row's maximum.
        special: ``(B,)`` bool, rows whose maximum is off the diagonal and handled by the exact form
            (always False for ``taylor``).
        p_max: ``(B,)`` ``p_{i a_i}``. rest: ``(B, B)`` ``r_ij`` (0 at ``a_i``).
    """

    P: torch.Tensor
    low: torch.Tensor
    arg: torch.Tensor
    special: torch.Tensor
    p_max: torch.Tensor
    rest: torch.Tensor


def line_weights(S: torch.Tensor, exact: bool) -> LineWeights:
    B = S.shape[0]
    eye = torch.eye(B, dtype=torch.bool, device=S.device)
    L = torch.logsumexp(S, dim=1, keepdim=True)
    P = torch.exp(S - L)
    arg = S.argmax(dim=1)
    own = torch.arange(B, device=S.device)
    zeros = torch.zeros_like(S)
    if not exact or B == 1:
        low = torch.where(eye, zeros, P) if not exact else zeros
        none = torch.zeros(B, dtype=torch.bool, device=S.device)
        return LineWeights(P, low, arg, none, P.gather(1, arg[:, None])[:, 0], zeros)
    is_max = torch.zeros_like(S, dtype=torch.bool).scatter_(1, arg[:, None], True)
    lse_excl = L + torch.log1p(-P.clamp(max=0.5))  # exact where p <= 1/2, i.e. off the maxima
    low = torch.where(eye | is_max, zeros, torch.exp(S - lse_excl))
    rest = torch.softmax(S.masked_fill(is_max, float("-inf")), dim=1)
    return LineWeights(P, low, arg, arg != own, P.gather(1, arg[:, None])[:, 0], rest)


def removal_weights(S: torch.Tensor, dim: int, exact: bool) -> torch.Tensor:
    """Dense weights ``w`` (diagonal 0) along ``dim``: entry ``[i, k]`` (rows) or ``[k, j]`` (columns).

    For inspection and tests; may hold ``inf`` where ``1 − p`` underflows. The kernels use
    :func:`line_weights` instead.
    """
    Sl = S if dim == 1 else S.T
    lw = line_weights(Sl, exact)
    W = lw.low.clone()
    if exact:
        rows = lw.special.nonzero().flatten()
        cols = lw.arg[rows]
        masked = Sl[rows].scatter(1, cols[:, None], float("-inf"))
        W[rows, cols] = torch.exp(Sl[rows, cols] - torch.logsumexp(masked, dim=1))
    return W if dim == 1 else W.T
