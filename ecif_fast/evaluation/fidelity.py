"""Experiment 1: fidelity to retraining — leave-one-out and the linear datamodeling score (LDS).

LOO: for a seeded sample of pairs, retrain without the pair and compare the actual ``F(θ̂_{−k}) − F(θ̂)`` with
each method's prediction. LDS: ``n_subsets`` seeded random subsets holding half of the pairs each are retrained;
a method predicts ``F(θ_S) − F(θ̂)`` as the sum of its single-pair influences over the removed half (ECIF's exact
group formula as ``ecif_group``), and the LDS is the Spearman correlation across subsets. CIs: bootstrap.
"""
from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from .methods import all_methods
from .problems import Problem
from .stats import correlations


def loo_actual(problem: Problem, pairs: torch.Tensor, progress: bool = True) -> torch.Tensor:
    """``(m,)`` actual ``F(θ̂_{−k}) − F(θ̂)`` for the pairs ``pairs``."""
    base = problem.F()
    out = torch.empty(pairs.numel(), dtype=torch.float64)
    for j, k in enumerate(tqdm(pairs.tolist(), desc=f"{problem.name}: LOO retrains", disable=not progress,
                               leave=False)):
        keep = torch.ones(problem.n, dtype=torch.bool)
        keep[k] = False
        out[j] = problem.F(problem.retrain(keep)) - base
    return out


def half_subsets(n: int, n_subsets: int, seed: int) -> torch.Tensor:
    """``(n_subsets, n)`` bool keep-masks, each keeping exactly ``n // 2`` pairs (seeded)."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n_subsets, n, dtype=torch.bool)
    for s in range(n_subsets):
        masks[s, torch.randperm(n, generator=g)[: n // 2]] = True
    return masks


def lds_actual(problem: Problem, masks: torch.Tensor, progress: bool = True) -> torch.Tensor:
    base = problem.F()
    return torch.tensor([problem.F(problem.retrain(m)) - base
                         for m in tqdm(masks, desc=f"{problem.name}: LDS retrains", disable=not progress,
                                       leave=False)], dtype=torch.float64)


def headline(fid: dict) -> dict:
    """``{method: {"pearson", "spearman"}}``: the LOO correlations, the top-level keys of a problem's results."""
    return {m: {"pearson": c["pearson"], "spearman": c["spearman"]} for m, c in fid["loo"].items()}


def run_fidelity(problem: Problem, *, n_loo: int | None, n_subsets: int, seed: int, n_boot: int = 1000,
                 with_trak: bool = True, progress: bool = True) -> dict:
    """LOO and LDS correlations of every method on ``problem``.

    Returns ``{"loo": {method: correlations}, "lds": {method: correlations}, "method_seconds", "setup", ...}``
    where the top-level ``{method: {"pearson", "spearman"}}`` are the LOO numbers (the results.json headline).
    """
    t0 = time.perf_counter()
    scores, secs = all_methods(problem, with_trak=with_trak)
    g = torch.Generator().manual_seed(seed)
    pairs = torch.randperm(problem.n, generator=g)
    pairs = pairs if n_loo is None or n_loo >= problem.n else pairs[:n_loo]
    t_loo = time.perf_counter()
    actual = loo_actual(problem, pairs, progress)
    t_loo = time.perf_counter() - t_loo
    loo = {m: correlations(s[pairs], actual, n_boot=n_boot, seed=seed) for m, s in scores.items()}
    out: dict = {"description": problem.description, "n_train": problem.n, "loo_pairs": int(pairs.numel()),
                 "loo_pair_ids": pairs.tolist(),
                 "loo": loo, "method_seconds": secs}
    if n_subsets:
        masks = half_subsets(problem.n, n_subsets, seed + 1)
        t_lds = time.perf_counter()
        actual_s = lds_actual(problem, masks, progress)
        t_lds = time.perf_counter() - t_lds
        preds = {m: torch.stack([s[~mk].sum() for mk in masks]) for m, s in scores.items()}
        ecif = problem.ecif()
        preds["ecif_group"] = torch.stack([ecif.group_influence((~mk).nonzero().flatten(), problem.Xv,
                                                                problem.Yv).total.double() for mk in masks])
        out["lds"] = {m: correlations(p, actual_s, n_boot=n_boot, seed=seed) for m, p in preds.items()}
        out["lds_subsets"] = int(n_subsets)
        out["retrain_seconds"] = {"loo": t_loo, "lds": t_lds}
    else:
        out["retrain_seconds"] = {"loo": t_loo}
    out.update(headline(out))
    out["total_seconds"] = time.perf_counter() - t0
    out["loo_actual"] = actual.tolist()
    out["loo_predicted"] = {m: s[pairs].tolist() for m, s in scores.items()}
    return out
