"""``InfoNCE``: the fused contrastive loss as a ``torch.autograd.Function`` over any backend's raw op.

The forward runs the backend's fused ``infonce`` op once (loss and all gradients, docs/math.md §4) and keeps
the gradients; the backward only scales them by the incoming gradient. Memory: O(n·d) saved tensors,
never an n × n score matrix.

Second derivatives: a backward run with ``create_graph=True`` (double backward, Hessian-vector products by
autograd) rebuilds the loss from the saved inputs with the materialising twin (``core/loss.py``) and returns
its gradient with a graph, so it can be differentiated again. That costs what the twin costs (the ``B × B``
scores of every batch); code that needs second derivatives throughout (Newton training, exact Hessians)
calls the twin directly.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..core.batches import BatchPlan
from ..core.loss import contrastive_loss as twin_loss


class InfoNCE(torch.autograd.Function):
    """``InfoNCE.apply(U, V, scale, plan, op)`` -> 0-d loss ``Σ_b Σ_{k∈b} ℓ_k`` (docs/math.md §2).

    ``op`` is a raw ``infonce(U, V, scale, plan, with_scale)`` callable (a backend's op). ``scale`` is
    the multiplier ``t``: a number, or a 0-d tensor that receives ``∂loss/∂t = dlog_scale / t``.
    """

    @staticmethod
    def forward(ctx, U: torch.Tensor, V: torch.Tensor, scale, plan: BatchPlan, op: Callable):
        scale_is_tensor = torch.is_tensor(scale)
        want_scale = scale_is_tensor and ctx.needs_input_grad[2]
        loss, dU, dV, ds = op(U, V, scale, plan, want_scale)
        dt = ds / scale.detach().to(ds.dtype) if want_scale else None
        # the inputs are kept (no copy) for a differentiable backward, see the module docstring
        ctx.save_for_backward(U, V, scale if scale_is_tensor else None, dU, dV, dt)
        ctx.plan = plan
        ctx.scale_number = None if scale_is_tensor else scale
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        U, V, t, dU, dV, dt = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            return _twin_backward(ctx, grad_out, U, V, t)
        g = grad_out.reshape(())
        gU = gV = gt = None
        if ctx.needs_input_grad[0]:
            gU = (g.to(dU.dtype) * dU).to(U.dtype)
        if ctx.needs_input_grad[1]:
            gV = (g.to(dV.dtype) * dV).to(V.dtype)
        if dt is not None:
            gt = (g.to(dt.dtype) * dt).to(t.dtype).reshape(t.shape)
        return gU, gV, gt, None, None


def _twin_backward(ctx, grad_out, U, V, t):
    """The gradients as differentiable functions of ``U, V, t`` and ``grad_out``, by autograd of the twin."""
    need = ctx.needs_input_grad[:3]
    inputs = [x for x, wanted in zip((U, V, t), need) if wanted]
    with torch.enable_grad():
        loss = twin_loss(U, V, t if t is not None else ctx.scale_number, ctx.plan)
    grads = iter(torch.autograd.grad(loss, inputs, grad_out, create_graph=True))
    return tuple(next(grads) if wanted else None for wanted in need) + (None, None)
