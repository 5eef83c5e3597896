"""Train a contrastive model to the optimum of ``R(θ)`` (SPEC §2).

Influence functions describe the optimum; this helper gets a model there (float64 recommended) and
is what the leave-one-out checks retrain with. ``method="newton"`` (damped Newton with a
Levenberg–Marquardt shift and Armijo backtracking on the dense Hessian) converges to machine
precision in a few steps for up to a few thousand parameters; ``"lbfgs"`` scales further.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .kernels.batching import BatchesArg, resolve_batches
from .kernels.torch_ref.loss import contrastive_loss
from .models.functional import FunctionalModel
from .models.params import ParamsArg, select_params
from .validation import check_pairs


@dataclass(frozen=True)
class TrainResult:
    loss: float
    grad_norm: float  # max-abs entry of ∇R at the end
    iterations: int


def _reference(space, theta_ref, dtype) -> torch.Tensor:
    if theta_ref is None:
        return torch.zeros(space.size, dtype=dtype)
    ref = torch.as_tensor(theta_ref, dtype=dtype).reshape(-1)
    if ref.numel() != space.size:
        raise ValueError(f"theta_ref must have {space.size} entries (the selected parameters), got {ref.numel()}")
    return ref


def _objective(model, images, texts, batches, damping, theta_ref, params):
    """``(R, θ, space)``: the function ``θ ↦ R(θ)`` of SPEC §2 on these pairs and the model's current θ."""
    X, Y = check_pairs(images, texts)
    plan = resolve_batches(batches, X.shape[0])
    space = select_params(model, params)
    fm = FunctionalModel(model, space)
    theta = space.flat(model)
    ref = _reference(space, theta_ref, theta.dtype)

    def R(th):
        U, V, s = fm.embed(th, X, Y)
        return contrastive_loss(U, V, s.exp(), plan) + 0.5 * damping * ((th - ref) ** 2).sum()

    return R, theta, space


def objective(model: nn.Module, images, texts, *, batches: BatchesArg = None, damping: float = 0.0, theta_ref=None,
              params: ParamsArg = None) -> TrainResult:
    """``R(θ)`` at the model's current parameters and ``max|∇R|`` (how far from the optimum), no training."""
    R, theta, *_ = _objective(model, images, texts, batches, damping, theta_ref, params)
    return TrainResult(float(R(theta)), float(torch.func.grad(R)(theta).abs().max()), 0)


def train(model: nn.Module, images, texts, *, batches: BatchesArg = None, damping: float = 0.0, theta_ref=None,
          params: ParamsArg = None, method: str = "auto", max_iter: int = 200, tol: float = 1e-10) -> TrainResult:
    """Minimise ``R(θ) = Σ_b Σ_{k∈b} ℓ_k + (δ/2)||θ − θ_ref||²`` over the selected parameters, in place.

    Args:
        images, texts: ``(n, ...)`` training pairs. batches: as in :class:`ecif_fast.ECIF`.
        damping: δ ≥ 0. theta_ref: ``(P,)`` reference point (default 0).
        method: ``"newton"``, ``"lbfgs"`` or ``"auto"`` (Newton when ``P <= 3000``).
        max_iter: iterations (Newton steps or L-BFGS iterations). tol: stop when ``max|∇R| < tol``.
    """
    if method not in ("newton", "lbfgs", "auto"):
        raise ValueError(f"method must be 'newton', 'lbfgs' or 'auto', got {method!r}")
    R, theta, space = _objective(model, images, texts, batches, damping, theta_ref, params)
    grad_R = torch.func.grad(R)
    it = 0
    if method == "auto":
        method = "newton" if space.size <= 3000 else "lbfgs"
    if method == "lbfgs":
        th = theta.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([th], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=0, history_size=50, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            value = R(th)
            value.backward()
            return value

        opt.step(closure)
        theta = th.detach()
        it = int(opt.state[th].get("n_iter", 0))
    else:
        eye = torch.eye(space.size, dtype=theta.dtype)
        hess_R = torch.func.jacfwd(grad_R)  # not torch.func.hessian: see Curvature.dense (layer_norm)
        for _ in range(max_iter):
            g = grad_R(theta)
            if float(g.abs().max()) < tol:
                break
            it += 1
            H = hess_R(theta)
            H = 0.5 * (H + H.T)
            lam = torch.linalg.eigvalsh(H)
            # Levenberg–Marquardt shift where H is not positive definite (far from the optimum).
            top = float(lam.abs().max())
            shift = 0.0 if float(lam[0]) > 1e-12 * top else 2 * abs(float(lam[0])) + 1e-6 * top
            step = -torch.linalg.solve(H + shift * eye, g)
            f0, lr, slope = float(R(theta)), 1.0, float(g @ step)
            # Armijo test with slack for rounding: near the optimum the decrease is below float resolution.
            slack = 64 * torch.finfo(theta.dtype).eps * abs(f0)
            while lr > 1e-12:
                f1 = float(R(theta + lr * step))
                if f1 == f1 and f1 <= f0 + 1e-4 * lr * slope + slack:
                    break
                lr *= 0.5
            theta = theta + lr * step
    space.load_into(model, theta)
    return TrainResult(float(R(theta)), float(grad_R(theta).abs().max()), it)
