"""Negative-role weights of one batch (docs/math.md §3–§4), arranged so that p → 1 never cancels.

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


# ---------------------------------------------------------------------------------------------------
# Streaming form (batches larger than the chunk size): per-line statistics merged over tiles, then
# the same weights as :func:`line_weights`, one tile at a time.


@dataclass
class LineStats:
    """Per-line (row or column) statistics of a score block, gathered tile by tile.

    Attributes:
        top: ``(B,)`` the line maximum ``S_{i a_i}``. arg: ``(B,)`` its position ``a_i`` in the line.
        rest: ``(B,)`` log-sum-exp of the line without ``a_i`` (``-inf`` for a line of one entry).
        lse: ``(B,)`` log-sum-exp of the whole line, ``logaddexp(top, rest)``.
    """

    top: torch.Tensor
    arg: torch.Tensor
    rest: torch.Tensor
    lse: torch.Tensor = None

    @classmethod
    def empty(cls, B: int, like: torch.Tensor) -> "LineStats":
        ninf = like.new_full((B,), float("-inf"))
        return cls(ninf, torch.zeros(B, dtype=torch.int64, device=like.device), ninf.clone())

    def merge_tile(self, S: torch.Tensor, dim: int, lines: slice, offset: int) -> None:
        """Fold the tile ``S`` into lines ``lines``; ``dim`` runs along the lines (1: rows, 0: columns),
        ``offset`` is the position of the tile's first entry along the line.

        Online "top-1 + rest": the new maximum is the larger of the running and the tile maximum; the
        smaller one joins the rest, ``rest = logsumexp(rest, tile_rest, loser)``. Ties keep the earlier
        entry (either choice is exact: the special form of :func:`line_weights` is an identity).
        """
        tv, ti = S.max(dim)
        trest = torch.logsumexp(S.scatter(dim, ti.unsqueeze(dim), float("-inf")), dim)
        top, arg, rest = self.top[lines], self.arg[lines], self.rest[lines]
        new = tv > top
        loser = torch.where(new, top, tv)
        self.rest[lines] = torch.logsumexp(torch.stack([rest, trest, loser]), 0)
        self.top[lines] = torch.where(new, tv, top)
        self.arg[lines] = torch.where(new, ti + offset, arg)

    def finish(self) -> "LineStats":
        self.lse = torch.logaddexp(self.top, self.rest)
        return self


def stream_line_stats(Ub: torch.Tensor, Vb: torch.Tensor, t: torch.Tensor, parts) -> tuple[LineStats, LineStats]:
    """Row and column :class:`LineStats` of ``S = t·Ub Vbᵀ`` over the tiles ``parts × parts``."""
    B = Ub.shape[0]
    rows, cols = LineStats.empty(B, Ub), LineStats.empty(B, Ub)
    for i0, i1 in parts:
        Ui = Ub[i0:i1]
        for j0, j1 in parts:
            S = t * (Ui @ Vb[j0:j1].T)
            rows.merge_tile(S, 1, slice(i0, i1), j0)
            cols.merge_tile(S, 0, slice(j0, j1), i0)
    return rows.finish(), cols.finish()


class Tile:
    """One tile ``S = scores[i0:i0+I, j0:j0+J]`` of a block whose line statistics are known. Its methods
    give the matching entries of :func:`line_weights` for rows (``P``, ``Wr = low``, ``R = rest``) and
    for columns (``Qc``, ``Wc``, ``Rc``, transposed so that every matrix is indexed ``[i, j]``), one
    at a time so that the caller can drop each ``(I, J)`` temporary after use."""

    def __init__(self, S: torch.Tensor, i0: int, j0: int, rows: LineStats, cols: LineStats):
        I, J = S.shape
        self.S, self.rows, self.cols = S, rows, cols
        self.ri, self.cj = slice(i0, i0 + I), slice(j0, j0 + J)
        self.gi = torch.arange(i0, i0 + I, device=S.device)
        self.gj = torch.arange(j0, j0 + J, device=S.device)
        self.zero = S.new_zeros(())

    def P(self) -> torch.Tensor:
        return torch.exp(self.S - self.rows.lse[self.ri, None])

    def Qc(self) -> torch.Tensor:
        return torch.exp(self.S - self.cols.lse[None, self.cj])

    def _diag(self):
        return self.gi[:, None] == self.gj[None, :]

    def _row_max(self):
        return self.rows.arg[self.ri, None] == self.gj[None, :]

    def _col_max(self):
        return self.cols.arg[None, self.cj] == self.gi[:, None]

    def Wr(self, P: torch.Tensor, exact: bool) -> torch.Tensor:
        """Row weights ``w_ik`` from the tile's ``P``: 0 on the diagonal (and, exact, at the row maxima)."""
        if not exact:
            return torch.where(self._diag(), self.zero, P)
        # off the line maxima p <= 1/2, so p/(1-p) is as accurate as line_weights' exp(S - L - log1p(-p))
        # (a few ulps) at a division instead of two transcendentals; the maxima are masked out.
        return torch.where(self._diag() | self._row_max(), self.zero, P / (1 - P.clamp(max=0.5)))

    def Wc(self, Qc: torch.Tensor, exact: bool) -> torch.Tensor:
        """Column weights ``w'_kj`` (indexed ``[k, j]``) from the tile's ``Qc``."""
        if not exact:
            return torch.where(self._diag(), self.zero, Qc)
        return torch.where(self._diag() | self._col_max(), self.zero, Qc / (1 - Qc.clamp(max=0.5)))

    def R(self) -> torch.Tensor:
        """``r_ij``: row softmax without the row maximum (0 there)."""
        return torch.where(self._row_max(), self.zero, torch.exp(self.S - self.rows.rest[self.ri, None]))

    def Rc(self) -> torch.Tensor:
        """``r'_ij``: column softmax without the column maximum (0 there)."""
        return torch.where(self._col_max(), self.zero, torch.exp(self.S - self.cols.rest[None, self.cj]))
