"""Data valuation: the influence of every training pair on a trusted validation set (docs/math.md §1, §3)."""
from __future__ import annotations

from ..engine import ECIF, TestFn
from .pairs import PairInfo, score_table


def value_data(ecif: ECIF, val_images=None, val_texts=None, *, fn: TestFn | None = None,
               info: PairInfo | None = None):
    """Value of each training pair for the validation loss (or ``fn``), split into its two roles.

    Args:
        ecif: a fitted :class:`~ecif_fast.ECIF`.
        val_images, val_texts: ``(m, ...)`` trusted validation pairs; ``F`` = their docs/math.md §2 loss as one batch.
        fn: instead of validation pairs, a scalar test function ``fn(model)``.
        info: metadata (ids, captions, paths) to carry into the table.
    Returns:
        pandas DataFrame, one row per training pair in pair order: metadata, ``total`` (predicted change
        of ``F`` when the pair is removed), ``positive`` (own-term role), ``negative`` (negative role).
        For a loss ``F``: ``total > 0`` = valuable, ``total < 0`` = harmful; sort by ``total``.
    """
    res = ecif.influence(val_images, val_texts, fn=fn)
    if res.total.dim() != 1:
        raise ValueError("value_data needs one test function; for several, call ecif.influence(...) directly")
    return score_table(ecif.n, info, {"total": res.total, "positive": res.positive, "negative": res.negative})
