"""Experiment 3: cleaning (docs/math.md §7 Tables 1–2 analogues). Remove the top ``fraction`` most suspicious pairs by
each method's detection score, retrain from θ̂ on the rest (same batches and damping), and measure zero-shot
accuracy on the held-out test digits; references: no removal, a seeded random removal, and removing only
truly swapped pairs (as many as the others remove, the best a detector can do). For ECIF the closed-form update
``θ̂ + H⁻¹g(D*)`` (``ECIF.cleaned_model``, removal by ECIF's validation influence: the paper's "harmful" pairs)
is also compared with retraining: accuracy and wall time.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from .digits import DigitRun


def _retrain_without(run: DigitRun, remove: np.ndarray):
    p = run.problem
    keep = torch.ones(p.n, dtype=torch.bool)
    keep[torch.as_tensor(remove)] = False
    t0 = time.perf_counter()
    model = p.retrain(keep)
    return model, time.perf_counter() - t0


def cleaning(run: DigitRun, scores: dict, *, fraction: float = 0.1, update_method: str = "ecif",
             seed: int = 0) -> dict:
    """``{"accuracy": {setting: acc}, "removed_misaligned": {setting: fraction of removed that were swapped},
    "ecif_update": {"accuracy", "seconds"}, "retrain_seconds": {setting: s}}``."""
    p = run.problem
    k = int(round(fraction * p.n))
    mis = p.misaligned.numpy()
    acc = {"none": run.accuracy()}
    hit, secs = {}, {}
    removals = {m: np.argsort(-s, kind="stable")[:k] for m, s in scores.items()}
    rng = np.random.default_rng(seed + 17)
    removals["random"] = rng.permutation(p.n)[:k]
    removals["true_misaligned"] = rng.permutation(np.flatnonzero(mis))[:k]
    for m, rem in removals.items():
        model, secs[m] = _retrain_without(run, rem)
        acc[m] = run.accuracy(model)
        hit[m] = float(mis[rem].mean())
    ecif = p.ecif()
    t0 = time.perf_counter()
    updated = ecif.cleaned_model(torch.as_tensor(removals[update_method]))
    t_update = time.perf_counter() - t0
    from .detection import detection_metrics_of

    detection = detection_metrics_of({m: s for m, s in scores.items()}, p.misaligned)
    return {"removed": k, "accuracy": acc, "detection": detection, "removed_misaligned": hit, "retrain_seconds": secs,
            "ecif_update": {"scoring": update_method, "accuracy": run.accuracy(updated), "seconds": t_update,
                            "retrain_accuracy": acc[update_method], "retrain_seconds": secs[update_method]}}
