"""Experiment 5: runtime next to the peers on the same problem in the same run, and ECIF time vs n.

Every method computes the influence of every training pair on F (the validation loss); ECIF's time includes
``fit`` (embeddings, curvature, factorisation). Scaling: LinearHeads on synthetic pairs, batch negatives, n
doubling; the exponent is the slope of log(time) on log(n).
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

import ecif_fast as ef

from .problems import Problem, paired_features


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def peer_runtimes(problem: Problem, *, repeats: int = 3) -> dict:
    """Median seconds of each method on ``problem`` (all pairs' influence on F), measured side by side."""
    from . import peers
    from .methods import tracin

    def ecif():
        return problem.ecif().influence(problem.Xv, problem.Yv).total

    def ecif_self():
        return problem.ecif().self_influence()

    runs = {"ecif": lambda: _timed(ecif)[1], "ecif_self_influence": lambda: _timed(ecif_self)[1],
            "tracin": lambda: _timed(tracin, problem)[1],
            "dattri_positive_only": lambda: peers.dattri_positive_only(problem, compare=False)[1],
            "trak": lambda: peers.trak_scores(problem, compare=False)[1],
            "kronfluence_ekfac": lambda: peers.kronfluence_scores(problem, ("ekfac",), compare=False)[1]}
    times = {m: [] for m in runs}
    for _ in range(repeats):
        for m, f in runs.items():  # interleaved, so drifting machine load hits every method alike
            times[m].append(f())
    out = {m: float(np.median(v)) for m, v in times.items()}
    out["ratios_vs_ecif"] = {m: out[m] / out["ecif"] for m in runs}
    return out


def scaling(sizes, *, dims=(16, 16, 16), batch: int = 256, seed: int = 0) -> dict:
    """ECIF fit + influence seconds vs n (float32 LinearHeads, batches of ``batch``, Gauss–Newton curvature) and the
    fitted exponent."""
    di, dt, de = dims
    rows = {}
    for n in sizes:
        X, Y = paired_features(n + 256, di, dt, latent=8, seed=seed)
        X, Y = X.float(), Y.float()
        torch.manual_seed(seed)
        model = ef.LinearHeads(di, dt, de, normalize=True, logit_scale=math.log(10.0))
        # an untrained model: the Gauss–Newton curvature (PSD) so the exact solve exists; timing is what is measured
        eng, t_fit = _timed(ef.ECIF(model, damping=1.0, batches=batch, curvature="gauss-newton").fit, X[:n], Y[:n])
        _, t_inf = _timed(eng.influence, X[n:], Y[n:])
        _, t_self = _timed(eng.self_influence)
        rows[str(n)] = {"fit": t_fit, "influence": t_inf, "self_influence": t_self, "fit_plus_influence": t_fit + t_inf}
    ns = np.array([float(n) for n in sizes])
    out = {"sizes": list(sizes), "dims": list(dims), "batch": batch, "seconds": rows}
    for key in ("fit_plus_influence", "self_influence"):
        t = np.array([rows[str(n)][key] for n in sizes])
        out[f"exponent_{key}"] = float(np.polyfit(np.log(ns), np.log(t), 1)[0])
    return out
