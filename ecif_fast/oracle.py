"""Brute-force oracle (VIF-style): ``g_k = ∇R − ∇R_{−k}`` by autograd, one pair at a time.

Slow on purpose and independent of the embedding-space formulas: it only re-evaluates the
contrastive loss on the data with pairs deleted. Used by the tests and the benchmarks.
"""
from __future__ import annotations

import torch
from torch import nn

from .core.batches import BatchesArg, BatchPlan, resolve_batches
from .core.loss import contrastive_loss
from .models.functional import FunctionalModel
from .models.params import ParamsArg, select_params


def _loss_on(fm: FunctionalModel, theta, X, Y, plan: BatchPlan) -> torch.Tensor:
    U, V, s = fm.embed(theta, X, Y)
    return contrastive_loss(U, V, s.exp(), plan)


def brute_force_pair_gradients(model: nn.Module, X, Y, *, batches: BatchesArg = None, params: ParamsArg = None,
                               negative_term: str = "exact"):
    """``(G_total (n, P), G_positive (n, P))`` by autograd.

    exact: ``g_k = ∇[L(data) − L(data without k, same batches)]``; taylor:
    ``g_k = ∇[ℓ_k + Σ_{i≠k∈b} (p_ik + q_ki)]``; positive: ``∇ℓ_k``.
    """
    space = select_params(model, params)
    fm = FunctionalModel(model, space)
    n = X.shape[0]
    plan = resolve_batches(batches, n)
    ids = plan.batch_ids()
    theta = space.flat(model).requires_grad_(True)
    full = torch.autograd.grad(_loss_on(fm, theta, X, Y, plan), theta)[0]
    G = torch.empty(n, theta.numel(), dtype=theta.dtype)
    Gp = torch.empty_like(G)
    for k in range(n):
        members = (ids == ids[k]).nonzero().flatten()
        U, V, s = fm.embed(theta, X[members], Y[members])
        S = s.exp() * (U @ V.T)
        kk = int((members == k).nonzero())
        P, Qc = torch.softmax(S, 1), torch.softmax(S, 0)
        ell_k = torch.logsumexp(S[kk], 0) + torch.logsumexp(S[:, kk], 0) - 2 * S[kk, kk]
        Gp[k] = torch.autograd.grad(ell_k, theta, retain_graph=True)[0]
        if negative_term == "exact":
            keep = torch.ones(n, dtype=torch.bool)
            keep[k] = False
            rest = resolve_batches(ids[keep], n - 1)
            G[k] = full - torch.autograd.grad(_loss_on(fm, theta, X[keep], Y[keep], rest), theta)[0]
        else:
            others = torch.arange(len(members)) != kk
            taylor = ell_k + P[others, kk].sum() + Qc[kk, others].sum()
            G[k] = torch.autograd.grad(taylor, theta)[0]
    return G.detach(), Gp.detach()


def dense_hessian(model: nn.Module, X, Y, *, batches: BatchesArg = None, params: ParamsArg = None,
                  damping: float = 0.0) -> torch.Tensor:
    """``(P, P)`` Hessian of ``R`` (data term + ``damping·I``) by ``torch.autograd.functional.hessian``."""
    space = select_params(model, params)
    fm = FunctionalModel(model, space)
    plan = resolve_batches(batches, X.shape[0])
    theta = space.flat(model)
    H = torch.autograd.functional.hessian(lambda th: _loss_on(fm, th, X, Y, plan), theta)
    return H + damping * torch.eye(theta.numel(), dtype=theta.dtype)


def brute_force_influence(model: nn.Module, X, Y, test_grad: torch.Tensor, *, batches: BatchesArg = None,
                          params: ParamsArg = None, damping: float, negative_term: str = "exact"):
    """``(total (n,), positive (n,))`` = ``G H⁻¹ ∇F`` with autograd gradients and the dense Hessian."""
    G, Gp = brute_force_pair_gradients(model, X, Y, batches=batches, params=params, negative_term=negative_term)
    H = dense_hessian(model, X, Y, batches=batches, params=params, damping=damping)
    h = torch.linalg.solve(H, test_grad)
    return G @ h, Gp @ h
