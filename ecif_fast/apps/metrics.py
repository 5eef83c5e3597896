"""Ranking metrics for misalignment detection: higher score = more suspicious, label True = misaligned."""
from __future__ import annotations

import numpy as np


def _as_arrays(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("labels must be boolean (True = misaligned) or 0/1")
        y = y.astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels must have the same length, got {s.size} and {y.size}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or Inf")
    return s, y


def auroc(scores, labels) -> float:
    """Area under the ROC curve (ties count one half). NaN when only one class is present."""
    s, y = _as_arrays(scores, labels)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="stable")
    ranks = np.empty(s.size)
    ranks[order] = np.arange(1, s.size + 1)
    # average ranks over ties
    uniq, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    sums = np.zeros(uniq.size)
    np.add.at(sums, inv, ranks)
    ranks = (sums / counts)[inv]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(scores, labels) -> float:
    """Average precision: mean of precision@k over the ranks k of the true positives (score descending)."""
    s, y = _as_arrays(scores, labels)
    if not y.any():
        return float("nan")
    hits = y[np.argsort(-s, kind="stable")]
    prec = np.cumsum(hits) / np.arange(1, hits.size + 1)
    return float(prec[hits].mean())


def precision_at_k(scores, labels, k: int) -> float:
    """Fraction of true positives among the ``k`` highest scores."""
    s, y = _as_arrays(scores, labels)
    if not 1 <= k <= s.size:
        raise ValueError(f"k must lie in [1, {s.size}], got {k}")
    return float(y[np.argsort(-s, kind="stable")[:k]].mean())


def detection_metrics(scores, labels, k: int | None = None) -> dict[str, float]:
    """``{"auroc", "average_precision", "precision_at_k", "k"}``; ``k`` defaults to the number of positives."""
    s, y = _as_arrays(scores, labels)
    k = int(y.sum()) if k is None else int(k)
    return {"auroc": auroc(s, y), "average_precision": average_precision(s, y),
            "precision_at_k": precision_at_k(s, y, k) if k >= 1 else float("nan"), "k": k}
