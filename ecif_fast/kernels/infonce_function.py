"""``InfoNCE``: the fused contrastive loss as a ``torch.autograd.Function`` over any backend's raw op.

The forward runs the backend's fused ``infonce`` op once (loss and all gradients, docs/math.md §4) and keeps
the gradients; the backward only scales them by the incoming gradient. Memory: O(n·d) saved tensors,
never an n x n score matrix. Not twice differentiable.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.autograd.function import once_differentiable

from ..core.batches import BatchPlan


class InfoNCE(torch.autograd.Function):
    """``InfoNCE.apply(U, V, scale, plan, op)`` -> 0-d loss ``Σ_b Σ_{k∈b} ℓ_k`` (docs/math.md §2).

    ``op`` is a raw ``infonce(U, V, scale, plan, with_scale)`` callable (a backend's op). ``scale`` is
    the multiplier ``t``: a number, or a 0-d tensor that receives ``∂loss/∂t = dlog_scale / t``.
    """

    @staticmethod
    def forward(ctx, U: torch.Tensor, V: torch.Tensor, scale, plan: BatchPlan, op: Callable):
        want_scale = torch.is_tensor(scale) and ctx.needs_input_grad[2]
        loss, dU, dV, ds = op(U, V, scale, plan, want_scale)
        if want_scale:
            t = scale.detach().to(ds.dtype)
            ctx.save_for_backward(dU, dV, ds / t)
        else:
            ctx.save_for_backward(dU, dV)
        ctx.want_scale = want_scale
        ctx.in_dtypes = (U.dtype, V.dtype, scale.dtype if torch.is_tensor(scale) else None)
        ctx.scale_shape = scale.shape if torch.is_tensor(scale) else None
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        saved = ctx.saved_tensors
        du_dt, dv_dt, s_dt = ctx.in_dtypes
        g = grad_out.reshape(())
        gU = gV = gt = None
        if ctx.needs_input_grad[0]:
            gU = (g.to(saved[0].dtype) * saved[0]).to(du_dt)
        if ctx.needs_input_grad[1]:
            gV = (g.to(saved[1].dtype) * saved[1]).to(dv_dt)
        if ctx.want_scale:
            gt = (g.to(saved[2].dtype) * saved[2]).to(s_dt).reshape(ctx.scale_shape)
        return gU, gV, gt, None, None
