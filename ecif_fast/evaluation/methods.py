"""Influence estimates of every method on a :class:`Problem`, all in one convention (docs/math.md §3): the predicted
change of the test function F when a training pair is removed (``(n,)`` float64, > 0 = the pair is valuable).

- ``ecif``: ECIF with the exact negative term; ``ecif_taylor``: the paper's first-order negative term;
- ``positive_only``: classical influence functions (only the pair's own loss term ``ℓ_k``: ``∇Fᵀ H⁻¹ ∇ℓ_k``);
- ``tracin``: TracIn at the trained checkpoint, ``∇Fᵀ ∇ℓ_k`` (no curvature; training on k for one step of size
  1 lowers F by that much, so removing it raises F by it);
- ``oracle``: the brute-force VIF-style oracle (``g_k = ∇R − ∇R_{−k}`` by autograd, dense autograd Hessian);
- ``trak``: TRAK's CLIP task (``peers.trak_scores``).
"""
from __future__ import annotations

import time

import torch
from torch.func import grad, jacrev

from ecif_fast.core.loss import batch_loss, per_pair_loss
from ecif_fast.models.functional import FunctionalModel
from ecif_fast.models.params import select_params
from ecif_fast.oracle import brute_force_influence

from .problems import Problem


def _functional(problem: Problem):
    space = select_params(problem.model, problem.params)
    return FunctionalModel(problem.model, space), space.flat(problem.model)


def test_gradient(problem: Problem) -> torch.Tensor:
    """``(P,)`` ∇F at θ̂ by autograd (F = validation loss as one batch)."""
    fm, theta = _functional(problem)

    def F(th):
        U, V, s = fm.embed(th, problem.Xv, problem.Yv)
        return batch_loss(s.exp() * (U @ V.T))

    return grad(F)(theta)


def own_loss_gradients(problem: Problem) -> torch.Tensor:
    """``(n, P)`` ∇ℓ_k: each pair's own loss term in its batch (positive role only), by autograd per batch."""
    fm, theta = _functional(problem)
    out = torch.empty(problem.n, theta.numel(), dtype=theta.dtype)
    for b in problem.batch_ids.unique():
        rows = (problem.batch_ids == b).nonzero().flatten()

        def losses(th):
            U, V, s = fm.embed(th, problem.X[rows], problem.Y[rows])
            return per_pair_loss(s.exp() * (U @ V.T))

        out[rows] = jacrev(losses)(theta)
    return out


def ecif_methods(problem: Problem, **kwargs) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """``ecif``, ``ecif_taylor`` and ``positive_only`` (the positive part of the exact ECIF), with seconds."""
    scores, secs = {}, {}
    for name, term in (("ecif", "exact"), ("ecif_taylor", "taylor")):
        t0 = time.perf_counter()
        res = problem.ecif(negative_term=term, **kwargs).influence(problem.Xv, problem.Yv)
        secs[name] = time.perf_counter() - t0
        scores[name] = res.total.double()
        if term == "exact":
            scores["positive_only"] = res.positive.double()
            secs["positive_only"] = secs[name]
    return scores, secs


def tracin(problem: Problem, G_own: torch.Tensor | None = None) -> torch.Tensor:
    """``(n,)`` TracIn (trained checkpoint): ``∇F(θ̂)ᵀ ∇ℓ_k(θ̂)``."""
    G_own = own_loss_gradients(problem) if G_own is None else G_own
    return G_own @ test_gradient(problem)


def oracle(problem: Problem) -> torch.Tensor:
    """``(n,)`` the brute-force VIF-style influence (exact negative term)."""
    total, _ = brute_force_influence(problem.model, problem.X, problem.Y, test_gradient(problem),
                                     batches=problem.batch_ids, params=problem.params, damping=problem.damping)
    return total.double()


def all_methods(problem: Problem, *, with_trak: bool = True, with_oracle: bool = True,
                trak_proj_dim: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Every method's ``(n,)`` influence on F and its wall time in seconds."""
    scores, secs = ecif_methods(problem)
    t0 = time.perf_counter()
    scores["tracin"] = tracin(problem)
    secs["tracin"] = time.perf_counter() - t0
    if with_oracle:
        t0 = time.perf_counter()
        scores["oracle"] = oracle(problem)
        secs["oracle"] = time.perf_counter() - t0
    if with_trak:
        from .peers import trak_scores

        kw = {} if trak_proj_dim is None else {"proj_dim": trak_proj_dim}
        scores["trak"], secs["trak"], _ = trak_scores(problem, **kw)
    return scores, secs
