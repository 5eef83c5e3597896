"""Train a contrastive model to the optimum of ``R(θ)`` (docs/math.md §2).

Influence functions describe the optimum; this helper gets a model there (float64 recommended) and
is what the leave-one-out checks retrain with. ``method="newton"`` (damped Newton with a
Levenberg–Marquardt shift and Armijo backtracking on the dense Hessian) converges to machine
precision in a few steps for up to a few thousand parameters, but builds its Hessian from ``P`` forward-over-reverse
columns (28 s per step for 512 parameters on 1,200 pairs in batches of 256). ``"newton-cg"``
(``ecif_fast/trust_region.py``, a preconditioned trust-region Newton method on Hessian-vector products, for
LinearHeads preconditioned by their closed-form Gauss–Newton matrix) is what ``"auto"`` chooses for
:class:`~ecif_fast.LinearHeads` with a fixed logit scale beyond small problems; ``"lbfgs"`` needs first
derivatives only.

Newton differentiates ``R`` twice (``torch.func``), so it uses the materialising twin of the loss
(``core/loss.py``). L-BFGS needs first derivatives only and uses the fused streaming op
(``kernels.ops.contrastive_loss``) once a batch holds :data:`FUSED_MIN_BATCH` pairs. Measured with LinearHeads
on 4096 pairs, 30 iterations, float32, 2 shared cores: "all" negatives 29.6 s → 5.1 s and +499 → +180 MiB peak,
batches of 512 / 256 / 128 1.6–2.2× faster; batches of 64 only ~1.15× (float64 too), so there the twin is kept
(and results trained with it stay bitwise the same).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from .core.batches import BatchesArg, resolve_batches
from .core.heads_curvature import closed_form_blocks, heads_gauss_newton
from .core.loss import contrastive_loss
from .kernels import ops
from .models.functional import FunctionalModel
from .models.params import ParamsArg, select_params
from .errors import ECIFInputError
from .models.linear_heads import LinearHeads
from . import trust_region
from .options import TRAINING_METHODS
from .validation import (cast_inputs, check_batch_sizes, check_embeddings, check_pairs, check_params,
                         declares_normalized)


#: L-BFGS evaluates R with the fused loss when the largest batch holds at least this many pairs (see above).
FUSED_MIN_BATCH = 128
#: ``method="auto"`` trains with Newton up to this many parameters (L-BFGS above, Newton-CG for LinearHeads) ...
AUTO_NEWTON_MAX_P = 3000
#: ... and LinearHeads only while their dense Hessian takes at most this many forward-over-reverse passes
#: (blocks of columns, :data:`HESSIAN_BLOCK_MEMORY`); Newton-CG beyond (512 parameters on 1,200 pairs in batches of
#: 256 take 64 passes, 28 s per Newton step).
AUTO_NEWTON_MAX_PASSES = 4
#: Bytes that Newton's dense ``P × P`` matrices (the Hessian, its eigenvalue and solve workspaces) may take.
NEWTON_MEMORY_LIMIT = 2 << 30
#: Newton stops after this many steps in a row that neither lower R beyond rounding nor halve the best max|∇R|.
NEWTON_STALL = 8
#: Bytes of forward-mode tangents per block of Hessian columns (Newton builds the Hessian a block at a time).
HESSIAN_BLOCK_MEMORY = 256 << 20
#: Newton-CG preconditions LinearHeads with their dense Gauss–Newton matrix (trust_region.DensePreconditioner)
#: up to this many parameters and this much work ``n·P²`` per factorisation; the block-diagonal one above.
DENSE_PRECONDITIONER_MAX_P = 4096
DENSE_PRECONDITIONER_WORK = 4e10


def newton_bytes(P: int, dtype: torch.dtype) -> int:
    """Bytes of Newton's dense ``P × P`` matrices (three of them) in ``dtype``."""
    return 3 * P * P * torch.finfo(dtype).bits // 8


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
    """``(R, θ, space, scale, plan, column_bytes, ref, moments)``: the function ``θ ↦ R(θ)`` on these pairs
    (``R(θ, fused=True)``: with the fused loss, differentiable once by autograd; else the twin, for ``torch.func``
    and second derivatives), the model's current θ, ``θ ↦ exp(logit_scale)`` (for error messages), the batches, an
    estimate of the bytes one Hessian column's forward-mode tangents take, ``θ_ref`` and ``θ ↦`` the Linear
    layers' input moments (Newton-CG's preconditioner).

    Checks the inputs, the batches, the parameters and the embeddings at the current θ (one forward pass).
    """
    X, Y = check_pairs(images, texts)
    plan = resolve_batches(batches, X.shape[0])
    check_batch_sizes(plan.sizes, "batches", stacklevel=5)
    space = select_params(model, params)
    dtype = check_params(dict(model.named_parameters()), space.names)
    X, Y = cast_inputs(X, dtype), cast_inputs(Y, dtype)
    fm = FunctionalModel(model, space)
    theta = space.flat(model)
    ref = _reference(space, theta_ref, theta.dtype)
    with torch.no_grad():
        check_embeddings(*fm.embed(theta, X, Y), normalized=declares_normalized(model))

    def scale(th) -> float:
        with torch.no_grad():
            return math.exp(float(fm.embed(th, X[:1], Y[:1])[2]))

    # bytes of one Hessian column's tangents: a few copies of every batch's B × B scores and of the embeddings
    with torch.no_grad():
        d = fm.embed(theta, X[:1], Y[:1])[0].shape[-1]
    column_bytes = 12 * (float((plan.sizes.double() ** 2).sum()) + X.shape[0] * d) * theta.element_size()

    def R(th, fused: bool = False):
        U, V, s = fm.embed(th, X, Y)
        loss = (ops.contrastive_loss if fused else contrastive_loss)(U, V, s.exp(), plan)
        return loss + 0.5 * damping * ((th - ref) ** 2).sum()

    def moments(th):
        """Input moments of the selected Linear layers at ``th`` (Newton-CG's preconditioner); for LinearHeads
        with rows weighted by each pair's own curvature (trust_region.pair_curvature)."""
        if not isinstance(model, LinearHeads):
            return trust_region.linear_inputs(model, space, lambda: fm.embed(th, X, Y), declares_normalized(model))
        with torch.no_grad():
            U, V, s = fm.embed(th, X, Y)
            curv = trust_region.pair_curvature(U, V, math.exp(float(s)), plan)
        found = {}
        for side, inputs, c in (("image", X, curv[0]), ("text", Y, curv[1])):
            name = f"{side}_proj.weight"
            if name not in space.names:
                continue
            W = space.unflatten(th)[name].detach()
            x = model.proj_input(inputs, side).to(W.dtype)
            w = c.clamp_min(0)
            if model.normalize:
                w = w / ((x @ W.T).pow(2).sum(1) + model.norm_eps ** 2).clamp_min(1e-300)
            found[name] = (x * w[:, None]).T @ x
        return found

    return R, theta, space, scale, plan, column_bytes, ref, moments, _dense_gauss_newton(model, space, X, Y, plan)


def _dense_gauss_newton(model, space, X, Y, plan):
    """``θ ↦`` the ``(P, P)`` Gauss–Newton matrix of the loss in θ's order, in closed form
    (``core/heads_curvature.py``), where that applies (:func:`~ecif_fast.core.heads_curvature.closed_form_blocks`)
    with a fixed logit scale and the weights in the order image then text, and is cheap enough
    (:data:`DENSE_PRECONDITIONER_MAX_P`, :data:`DENSE_PRECONDITIONER_WORK`); else None."""
    blocks = closed_form_blocks(model, space.names, "gauss-newton")
    if blocks is None or blocks["scale"]:
        return None
    if list(space.names) != [n for n in ("image_proj.weight", "text_proj.weight") if n in space.names]:
        return None
    if space.size > DENSE_PRECONDITIONER_MAX_P or X.shape[0] * space.size ** 2 > DENSE_PRECONDITIONER_WORK:
        return None
    groups = list(plan.groups())

    @functools.cache
    def inputs(dtype):   # what the projections multiply, once per dtype (Newton-CG keeps θ's)
        return model.proj_input(X, "image").to(dtype), model.proj_input(Y, "text").to(dtype)

    def dense(th: torch.Tensor) -> torch.Tensor:
        W = space.unflatten(th)
        W_img = W.get("image_proj.weight", model.image_proj.weight.detach()).to(th.dtype)
        W_txt = W.get("text_proj.weight", model.text_proj.weight.detach()).to(th.dtype)
        return heads_gauss_newton(*inputs(th.dtype), W_img, W_txt, model.logit_scale.detach(), groups,
                                  normalize=blocks["normalize"], image=blocks["image"], text=blocks["text"],
                                  norm_eps=blocks["norm_eps"])
    return dense


def _diverged(step: str, what: str, t: float, dtype) -> ECIFInputError:
    return ECIFInputError(
        f"training failed at {step}: {what}. The loss overflows or has lost its precision in "
        f"{str(dtype).replace('torch.', '')}: the logit scale t = exp(logit_scale) = {t:.3g} or the features are "
        "too large; lower logit_scale (CLIP uses log(1/0.07) = 2.66), rescale or standardise the features, or raise "
        "damping")


def _dense_hessian(grad_R, theta: torch.Tensor, block: int) -> torch.Tensor:
    """``(P, P)`` Hessian of R at ``theta`` by forward-over-reverse, ``block`` columns per ``jacfwd`` call (the
    tangents of all ``P`` columns at once would hold ``P`` copies of the activations)."""
    P = theta.numel()
    if block >= P:
        return torch.func.jacfwd(grad_R)(theta)  # not torch.func.hessian: see Curvature.dense (layer_norm)
    cols = []
    for a in range(0, P, block):
        b = min(a + block, P)
        cols.append(torch.func.jacfwd(lambda part: grad_R(torch.cat([theta[:a], part, theta[b:]])))(theta[a:b]))
    return torch.cat(cols, dim=1)


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
        method: ``"newton"``, ``"newton-cg"``, ``"lbfgs"`` or ``"auto"`` (Newton when
            ``P <= AUTO_NEWTON_MAX_P`` and, for :class:`~ecif_fast.LinearHeads` with a fixed logit scale, its
            Hessian takes at most :data:`AUTO_NEWTON_MAX_PASSES` passes; otherwise Newton-CG for those heads and
            L-BFGS for other models). Newton forms
            the dense ``P × P`` Hessian (a block of columns at a time) and refuses, before any work, a problem
            whose matrices would pass :data:`NEWTON_MEMORY_LIMIT` (:func:`newton_bytes`). Newton-CG uses
            Hessian-vector products only (``ecif_fast/trust_region.py``, docs/math.md §2.2).
        max_iter: iterations (Newton or Newton-CG steps, L-BFGS iterations). tol: stop when ``max|∇R| < tol``;
            Newton-CG also stops when no decrease is left that the dtype can resolve.

    Raises :class:`~ecif_fast.ECIFInputError` before training for the inputs :class:`~ecif_fast.ECIF` refuses
    (non-finite or meta data, half-precision or non-finite parameters, an overflowing logit scale, unusable
    embeddings, no batch of 2 pairs; pairs alone in their batch warn: their loss is constant), and during
    training when the loss, gradient or Hessian stops being finite. Floating inputs are cast to the
    parameters' dtype.
    """
    if method not in TRAINING_METHODS:
        raise ValueError(f"method must be one of {list(TRAINING_METHODS)}, got {method!r}")
    R, theta, space, scale, plan, column_bytes, ref, moments, dense_gn = _objective(model, images, texts, batches,
                                                                                    damping, theta_ref, params)
    grad_R = torch.func.grad(R)
    value, gradient = R, grad_R  # R and ∇R as the result reports them
    it = 0
    if method == "auto":
        heads = isinstance(model, LinearHeads) and "logit_scale" not in space.names
        passes = math.ceil(space.size / max(1, int(HESSIAN_BLOCK_MEMORY // column_bytes)))
        newton = space.size <= AUTO_NEWTON_MAX_P and (not heads or passes <= AUTO_NEWTON_MAX_PASSES)
        method = "newton" if newton else "newton-cg" if heads else "lbfgs"
    if method == "newton" and newton_bytes(space.size, theta.dtype) > NEWTON_MEMORY_LIMIT:
        raise ECIFInputError(
            f"method='newton' forms the dense Hessian of all P = {space.size} trained parameters: "
            f"{newton_bytes(space.size, theta.dtype) / 2 ** 30:.1f} GiB of {str(theta.dtype).replace('torch.', '')} "
            f"matrices, above NEWTON_MEMORY_LIMIT ({NEWTON_MEMORY_LIMIT / 2 ** 30:.0f} GiB); use method='lbfgs', "
            "or fewer parameters (a smaller embedding, or params= a subset)")
    if method == "lbfgs":
        if int(plan.sizes.max()) >= FUSED_MIN_BATCH:
            value = functools.partial(R, fused=True)

            def gradient(th):
                th = th.detach().requires_grad_(True)
                return torch.autograd.grad(value(th), th)[0]

        th = theta.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([th], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=0, history_size=50, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            out = value(th)
            out.backward()
            return out

        opt.step(closure)
        theta = th.detach()
        it = int(opt.state[th].get("n_iter", 0))
        if not (bool(torch.isfinite(theta).all()) and math.isfinite(float(value(theta)))):
            raise _diverged(f"L-BFGS iteration {it}", "the parameters or the loss are NaN or Inf",
                            scale(theta.nan_to_num()), theta.dtype)
    elif method == "newton-cg":
        def check(step, f, g):
            if not (math.isfinite(f) and bool(torch.isfinite(g).all())):
                raise _diverged(step, "the loss or its gradient is NaN or Inf", scale(theta), theta.dtype)

        theta, it = trust_region.newton_cg(R, grad_R, theta, model=model, space=space, moments=moments,
                                           delta=damping, ref=ref, max_iter=max_iter, tol=tol, check=check,
                                           dense_curvature=dense_gn)
    else:
        block = max(1, int(HESSIAN_BLOCK_MEMORY // column_bytes))
        best, stalled = math.inf, 0
        for _ in range(max_iter):
            g = grad_R(theta)
            f0 = float(R(theta))
            if not (math.isfinite(f0) and bool(torch.isfinite(g).all())):
                raise _diverged(f"Newton step {it + 1}", "the loss or its gradient is NaN or Inf", scale(theta),
                                theta.dtype)
            if float(g.abs().max()) < tol:
                break
            it += 1
            H = _dense_hessian(grad_R, theta, block)
            H = 0.5 * (H + H.T)
            if not bool(torch.isfinite(H).all()):
                raise _diverged(f"Newton step {it}", "the Hessian is NaN or Inf", scale(theta), theta.dtype)
            try:
                lam = torch.linalg.eigvalsh(H)
                # Levenberg–Marquardt shift where H is not positive definite (far from the optimum).
                top = float(lam.abs().max())
                shift = 0.0 if float(lam[0]) > 1e-12 * top else 2 * abs(float(lam[0])) + 1e-6 * top
                H.diagonal().add_(shift)
                step = -torch.linalg.solve(H, g)
            except torch.linalg.LinAlgError as err:
                raise _diverged(f"Newton step {it}", f"the Newton system could not be solved ({err})", scale(theta),
                                theta.dtype) from None
            lr, slope = 1.0, float(g @ step)
            # Armijo test with slack for rounding: near the optimum the decrease is below float resolution.
            slack = 64 * torch.finfo(theta.dtype).eps * abs(f0)
            while lr > 1e-12:
                f1 = float(R(theta + lr * step))
                if f1 == f1 and f1 <= f0 + 1e-4 * lr * slope + slack:
                    break
                lr *= 0.5
            else:
                break   # no step length lowers R any more: the optimum to this dtype's precision
            theta = theta + lr * step
            # at the dtype's precision floor R no longer falls and max|∇R| only fluctuates (Armijo's rounding slack
            # accepts any step): stop after NEWTON_STALL such steps in a row
            gmax = float(g.abs().max())
            stalled = stalled + 1 if (gmax > 0.5 * best and f1 > f0 - slack) else 0
            best = min(best, gmax)
            if stalled >= NEWTON_STALL:
                break
    space.load_into(model, theta)
    return TrainResult(float(value(theta)), float(gradient(theta).abs().max()), it)
