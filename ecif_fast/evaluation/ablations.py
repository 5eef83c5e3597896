"""Experiment 4: ablations on the leave-one-out problem (a) and on detection (digits).

- roles: LOO correlation of the positive part, the negative part and their sum (exact and Taylor);
- damping: ECIF's δ moved away from the δ the model was trained with (LOO on (a); detection AUROC);
- batch size: the model retrained with other fixed batch sizes (LOO on (a); detection AUROC);
- solver: exact (Cholesky) vs CG vs low-rank — agreement with the exact solve, LOO correlation and wall time.
"""
from __future__ import annotations

import time

import torch

from ecif_fast.apps.metrics import auroc

from .fidelity import loo_actual
from .problems import Problem, linear_plain
from .stats import pearson, spearman


def _corr(pred, actual) -> dict:
    return {"pearson": pearson(pred, actual), "spearman": spearman(pred, actual)}


def roles(problem: Problem, pairs, actual) -> dict:
    out = {}
    for term in ("exact", "taylor"):
        res = problem.ecif(negative_term=term).influence(problem.Xv, problem.Yv)
        out[f"total_{term}"] = _corr(res.total[pairs], actual)
        out[f"negative_only_{term}"] = _corr(res.negative[pairs], actual)
    out["positive_only"] = _corr(res.positive[pairs], actual)
    return out


def damping_sweep(problem: Problem, pairs, actual, factors=(1, 3, 10, 30, 100)) -> dict:
    """ECIF with δ' = factor × the training δ (factor 1 = the true Hessian of R)."""
    out = {}
    for f in factors:
        res = problem.ecif(damping=problem.damping * f).influence(problem.Xv, problem.Yv)
        out[f"{f}x"] = {"damping": problem.damping * f, **_corr(res.total[pairs], actual),
                        "positive_only": _corr(res.positive[pairs], actual)}
    return out


def batch_sweep(sizes, n_loo: int, seed: int, progress: bool) -> dict:
    """Problem (a) retrained with each fixed batch size (``n`` = "all" negatives)."""
    out = {}
    for b in sizes:
        p = linear_plain(batch=b)
        pairs = torch.randperm(p.n, generator=torch.Generator().manual_seed(seed))[:n_loo]
        actual = loo_actual(p, pairs, progress)
        out[str(b)] = roles(p, pairs, actual)
    return out


def solver_sweep(problem: Problem, pairs=None, actual=None, ranks=(8, 32)) -> dict:
    """Influence of every pair by each solver vs the exact solve (Pearson, max relative error) and seconds."""
    t0 = time.perf_counter()
    ref = problem.ecif(solver="exact").influence(problem.Xv, problem.Yv).total
    rows = {"exact": {"seconds": time.perf_counter() - t0}}
    configs = {"cg": {"solver": "cg", "cg_maxiter": 3000}}
    configs.update({f"lowrank_{r}": {"solver": "lowrank", "rank": r} for r in ranks})
    for name, kw in configs.items():
        t0 = time.perf_counter()
        tot = problem.ecif(**kw).influence(problem.Xv, problem.Yv).total
        rows[name] = {"seconds": time.perf_counter() - t0, "pearson_vs_exact": pearson(tot, ref),
                      "max_rel_err": float((tot - ref).abs().max() / ref.abs().max())}
        if actual is not None:
            rows[name]["loo_pearson"] = pearson(tot[pairs], actual)
    if actual is not None:
        rows["exact"]["loo_pearson"] = pearson(ref[pairs], actual)
    return rows


def detection_sweeps(data, setting, noise: float, seed: int, dampings, batch_sizes) -> dict:
    """AUROC of ECIF (validation, self) and positive-only vs ECIF damping and vs training batch size."""
    from dataclasses import replace

    from ecif_fast.apps import detect_misaligned

    from .digits import digit_run

    from ecif_fast.errors import NotPositiveDefiniteError

    def aurocs(run, **kw):
        p = run.problem
        try:
            ecif = p.ecif(**kw)
        except NotPositiveDefiniteError as e:  # δ of ECIF below −λ_min of the loss Hessian: no exact solve
            return {"error": str(e).split(";")[0]}
        det = detect_misaligned(ecif, p.Xv, p.Yv, scoring=["validation", "self"])
        y = p.misaligned.numpy()
        return {m: auroc(det.scores[m], y) for m in ("ecif", "ecif_self", "positive_only", "loss")}

    run = digit_run(data, setting, noise, seed)
    out = {"damping": {f"{d:g}": aurocs(run, damping=d) for d in dampings}, "batch_size": {}}
    for b in batch_sizes:
        r = digit_run(data, replace(setting, batch_size=b), noise, seed)
        out["batch_size"][str(b)] = aurocs(r)
    return out
