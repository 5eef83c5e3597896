"""Train a contrastive model to the optimum of ``R(θ)`` (SPEC §2) with full-batch L-BFGS.

Influence functions describe the optimum; this helper gets a small model there (float64 recommended)
and is what the leave-one-out checks retrain with.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .kernels.batching import BatchesArg, resolve_batches
from .kernels.torch_ref.loss import contrastive_loss
from .models.params import ParamsArg, select_params
from .validation import check_pairs


@dataclass(frozen=True)
class TrainResult:
    loss: float
    grad_norm: float
    iterations: int


def objective(model: nn.Module, X, Y, plan, damping: float, theta_ref, space) -> torch.Tensor:
    """``R(θ) = Σ_b Σ_{k∈b} ℓ_k + (δ/2)||θ − θ_ref||²`` at the model's current parameters."""
    s = model.logit_scale
    t = s.exp() if torch.is_tensor(s) else torch.tensor(float(s)).exp()
    R = contrastive_loss(model.encode_image(X), model.encode_text(Y), t, plan)
    if damping:
        named = dict(model.named_parameters())
        theta = torch.cat([named[n].reshape(-1) for n in space.names])
        R = R + 0.5 * damping * ((theta - theta_ref) ** 2).sum()
    return R


def train(model: nn.Module, images, texts, *, batches: BatchesArg = None, damping: float = 0.0, theta_ref=None,
          params: ParamsArg = None, max_iter: int = 2000, tol: float = 1e-9) -> TrainResult:
    """Minimise ``R`` over the selected parameters in place.

    Args:
        images, texts: ``(n, ...)`` training pairs. batches: as in :class:`ecif_fast.ECIF`.
        damping: δ ≥ 0 of the regulariser. theta_ref: ``(P,)`` reference point (default 0).
        max_iter: L-BFGS iterations. tol: stop when the gradient's max-abs entry is below ``tol``.
    """
    X, Y = check_pairs(images, texts)
    plan = resolve_batches(batches, X.shape[0])
    space = select_params(model, params)
    named = dict(model.named_parameters())
    plist = [named[n] for n in space.names]
    flags = [p.requires_grad for p in plist]
    for p in plist:
        p.requires_grad_(True)
    ref = torch.zeros(space.size, dtype=plist[0].dtype) if theta_ref is None else torch.as_tensor(theta_ref)
    opt = torch.optim.LBFGS(plist, lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=0,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        R = objective(model, X, Y, plan, damping, ref, space)
        R.backward()
        return R

    try:
        opt.step(closure)
        R = objective(model, X, Y, plan, damping, ref, space)
        grads = torch.autograd.grad(R, plist)
    finally:
        for p, f in zip(plist, flags):
            p.requires_grad_(f)
            p.grad = None
    gnorm = float(torch.cat([g.reshape(-1) for g in grads]).abs().max())
    iters = opt.state[opt._params[0]].get("n_iter", 0)
    return TrainResult(float(R), gnorm, int(iters))
