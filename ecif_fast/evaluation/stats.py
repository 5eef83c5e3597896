"""Correlations with bootstrap confidence intervals (percentile bootstrap over the paired items)."""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def _np(x) -> np.ndarray:
    return np.asarray(x.detach().cpu().double() if hasattr(x, "detach") else x, dtype=np.float64).reshape(-1)


def pearson(a, b) -> float:
    a, b = _np(a), _np(b)
    a, b = a - a.mean(), b - b.mean()
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / den) if den > 0 else float("nan")


def spearman(a, b) -> float:
    return pearson(rankdata(_np(a)), rankdata(_np(b)))


def correlations(pred, actual, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """``{"pearson", "spearman", "pearson_ci", "spearman_ci", "n"}`` of ``pred`` vs ``actual`` (both ``(m,)``).

    The CIs resample the ``m`` items with replacement ``n_boot`` times (seeded).
    """
    p, a = _np(pred), _np(actual)
    if p.shape != a.shape or p.size < 3:
        raise ValueError(f"need two equal-length vectors of >= 3 items, got {p.shape} and {a.shape}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, p.size, size=(n_boot, p.size))
    rp, ra = rankdata(p), rankdata(a)
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    out = {"pearson": pearson(p, a), "spearman": pearson(rp, ra), "n": int(p.size)}
    for key, (x, y) in (("pearson", (p, a)), ("spearman", (rp, ra))):
        boots = np.array([pearson(x[i], y[i]) for i in idx])
        boots = boots[np.isfinite(boots)]
        out[f"{key}_ci"] = [float(np.percentile(boots, lo)), float(np.percentile(boots, hi))]
    return out


def mean_std(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}
