"""Ranking metrics of misalignment detection, used by the apps and by the report (numpy only).

Conventions, for every function here:

- ``scores`` ``(n,)``: higher = more suspicious; ``labels`` ``(n,)``: True (or 1) = misaligned.
- Ties never depend on input order: AUROC counts a tied (misaligned, clean) pair as ½ (the Mann–Whitney
  form, with averaged ranks); average precision and precision@k treat a run of tied scores as one
  threshold, a cut through a tie taking its share of the tie's positives (the mean over the tie's orders).
- Non-finite scores: the metrics (:func:`auroc`, :func:`average_precision`, :func:`precision_at_k`,
  :func:`detection_metrics`) refuse them with ``ValueError`` (a NaN would silently decide a number); the
  curves drawn by the report (:func:`roc_curve`, :func:`precision_curve`) rank them as least suspicious.
- A class that is missing makes AUROC NaN (and the ROC curve empty); no positive makes AP NaN.
"""
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
    return s, y


def _finite(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """Scores and labels for a metric: non-finite scores refused."""
    s, y = _as_arrays(scores, labels)
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or Inf")
    return s, y


def _for_curve(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """Scores and labels for a curve: non-finite scores ranked last (as -inf)."""
    s, y = _as_arrays(scores, labels)
    return np.where(np.isfinite(s), s, -np.inf), y


def _ties(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(positives, size)`` of each run of tied scores, most suspicious run first."""
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]]) if s.size else np.zeros(0, dtype=np.int64)
    positives = np.add.reduceat(y.astype(np.int64), starts) if s.size else np.zeros(0, dtype=np.int64)
    return positives, np.diff(np.r_[starts, s.size])


def _auroc(s: np.ndarray, y: np.ndarray) -> float:
    """Mann–Whitney AUROC with averaged ranks over ties; NaN when one class is missing."""
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="stable")
    ranks = np.empty(s.size)
    ranks[order] = np.arange(1, s.size + 1)
    _, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    sums = np.zeros(counts.size)
    np.add.at(sums, inv, ranks)
    ranks = (sums / counts)[inv]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _precision_curve(s: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``(n,)`` precision of the top ``k = 1..n``; a cut through a tie takes its share of the tie's positives."""
    positives, size = _ties(s, y)
    before_tp = np.cumsum(positives) - positives      # positives ranked above each tie
    before_k = np.cumsum(size) - size                 # pairs ranked above each tie
    tie = np.repeat(np.arange(size.size), size)       # the tie of each rank
    k = np.arange(1, s.size + 1)
    return (before_tp[tie] + (k - before_k[tie]) * positives[tie] / size[tie]) / k


def auroc(scores, labels) -> float:
    """Area under the ROC curve: the probability that a misaligned pair outscores a clean one (ties ½)."""
    return _auroc(*_finite(scores, labels))


def average_precision(scores, labels) -> float:
    """Average precision: ``Σ_t (recall_t − recall_{t−1}) · precision_t`` over the thresholds ``t`` (each
    run of tied scores is one threshold); the mean of precision@k over the true positives when no scores tie."""
    s, y = _finite(scores, labels)
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    positives, size = _ties(s, y)
    hit = positives > 0
    terms = (positives * np.cumsum(positives) / np.cumsum(size))[hit]
    return float(terms.sum() / n_pos)


def precision_at_k(scores, labels, k: int) -> float:
    """Fraction of true positives among the ``k`` highest scores (a tie at the cut counts by its share)."""
    s, y = _finite(scores, labels)
    if not 1 <= k <= s.size:
        raise ValueError(f"k must lie in [1, {s.size}], got {k}")
    return float(_precision_curve(s, y)[k - 1])


def detection_metrics(scores, labels, k: int | None = None) -> dict[str, float]:
    """``{"auroc", "average_precision", "precision_at_k", "k"}``; ``k`` defaults to the number of positives."""
    s, y = _finite(scores, labels)
    k = int(y.sum()) if k is None else int(k)
    return {"auroc": auroc(s, y), "average_precision": average_precision(s, y),
            "precision_at_k": precision_at_k(s, y, k) if k >= 1 else float("nan"), "k": k}


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, float]:
    """ROC of "flag when score ≥ threshold": ``(fpr, tpr, auroc)``, curves of shape ``(m,)`` from ``(0, 0)``.

    A run of tied scores is one step (a diagonal segment), so the area under the curve is :func:`auroc`'s
    Mann–Whitney value. Without positives or negatives the curve is empty and AUROC is NaN.
    """
    s, y = _for_curve(scores, labels)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return np.zeros(0), np.zeros(0), float("nan")
    positives, size = _ties(s, y)
    tpr = np.r_[0.0, np.cumsum(positives) / n_pos]
    fpr = np.r_[0.0, np.cumsum(size - positives) / n_neg]
    return fpr, tpr, _auroc(s, y)


def precision_curve(scores, labels) -> np.ndarray:
    """``(n,)`` precision@k for ``k = 1..n`` (the curve of :func:`precision_at_k`)."""
    return _precision_curve(*_for_curve(scores, labels))
