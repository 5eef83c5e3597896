"""Experiment 2: misalignment detection (AUROC, average precision, precision@k; higher score = more suspicious).

Validation scorings use F = the loss of trusted validation pairs: a misaligned pair should be *harmful*
(removing it lowers F), so the score is ``−influence``. Self scorings need no validation data.

- ``ecif`` (validation) / ``ecif_self`` (``g_kᵀH⁻¹g_k``, g_k with both roles); ``ecif_taylor`` /
  ``ecif_taylor_self``: the same with the paper's first-order negative term;
- ``positive_only`` / ``positive_only_self``: classical IF, the pair's own term only (``∇ℓ_k``);
- ``tracin`` (``−∇Fᵀ∇ℓ_k``) / ``tracin_self`` (``‖∇ℓ_k‖²``), at the trained checkpoint;
- ``trak``: ``−`` TRAK's CLIP-task score summed over the validation pairs;
- ``clip_score`` (``−cos(u_k, v_k)``), ``loss`` (``ℓ_k``), ``random`` (a seeded permutation).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ecif_fast.apps import detect_misaligned
from ecif_fast.apps.metrics import detection_metrics

from .methods import own_loss_gradients, tracin
from .problems import Problem


def detection_scores(problem: Problem, *, with_trak: bool = True, seed: int = 0) -> tuple[dict, dict]:
    """``({method: (n,) numpy score}, {method: seconds})`` on a problem with ``misaligned`` labels."""
    secs = {}
    t0 = time.perf_counter()
    ecif = problem.ecif()
    secs["ecif_fit"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    det = detect_misaligned(ecif, problem.Xv, problem.Yv, scoring=["validation", "self"])
    secs["ecif_scores"] = time.perf_counter() - t0
    scores = dict(det.scores)
    t0 = time.perf_counter()
    taylor = problem.ecif(negative_term="taylor")
    scores["ecif_taylor"] = (-taylor.influence(problem.Xv, problem.Yv).total).double().numpy()
    scores["ecif_taylor_self"] = taylor.self_influence().double().numpy()
    secs["ecif_taylor"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    G = own_loss_gradients(problem)
    secs["own_gradients"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores["positive_only_self"] = (G * ecif.solver.solve(G.T.contiguous()).T).sum(1).numpy()
    secs["positive_only_self"] = time.perf_counter() - t0 + secs["own_gradients"]
    t0 = time.perf_counter()
    scores["tracin"] = (-tracin(problem, G)).numpy()
    scores["tracin_self"] = (G * G).sum(1).numpy()
    secs["tracin"] = time.perf_counter() - t0 + secs["own_gradients"]
    if with_trak:
        from .peers import trak_scores

        trak, secs["trak"], _ = trak_scores(problem, seed=seed)
        scores["trak"] = (-trak).numpy()
    scores["random"] = np.random.default_rng(seed).permutation(problem.n).astype(np.float64)
    return scores, secs


def detection_metrics_of(scores: dict, labels) -> dict:
    y = labels.numpy() if torch.is_tensor(labels) else np.asarray(labels)
    return {m: detection_metrics(s, y) for m, s in scores.items()}


def summarise(runs: list[dict]) -> dict:
    """Mean and std over seeds of every metric: ``{method: {metric: mean, metric + "_std": std}}``."""
    out = {}
    for m in runs[0]:
        out[m] = {}
        for key in ("auroc", "average_precision", "precision_at_k"):
            v = np.array([r[m][key] for r in runs])
            out[m][key] = float(v.mean())
            out[m][key + "_std"] = float(v.std(ddof=1)) if v.size > 1 else 0.0
        out[m]["seeds"] = len(runs)
    return out
