"""The model as a function of the flat parameter vector θ: embeddings, JVPs, VJPs, test functions."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, jvp, vjp

from .params import ParamSpace
from .protocol import check_model


class _Encoders(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.m = model

    def forward(self, X, Y):
        U, V = self.m.encode_image(X), self.m.encode_text(Y)
        s = self.m.logit_scale
        s = s if torch.is_tensor(s) else torch.tensor(float(s), dtype=U.dtype, device=U.device)
        return U, V, s


class _CallFn(nn.Module):
    def __init__(self, model: nn.Module, fn: Callable):
        super().__init__()
        self.m = model
        self.fn = fn

    def forward(self):
        return self.fn(self.m)


class FunctionalModel:
    """``θ ↦ (U, V, s)`` over the selected parameters of a :class:`ContrastiveModel`.

    ``s`` is the log scale; it depends on θ only when ``logit_scale`` is a selected parameter.
    """

    def __init__(self, model: nn.Module, space: ParamSpace):
        check_model(model)
        self.model = model
        self.space = space
        self._enc = _Encoders(model)
        scale_name = None
        if isinstance(model.logit_scale, nn.Parameter):
            scale_name = next((n for n, p in model.named_parameters() if p is model.logit_scale), None)
        self.scale_trained = scale_name is not None and scale_name in space.names
        # Parameters outside the selection are constants of θ: pass them detached so no result keeps
        # an autograd graph through them (detach shares storage, so later updates are seen).
        self._frozen = {"m." + n: p.detach() for n, p in model.named_parameters()
                        if p.requires_grad and n not in space.names}

    def _params(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        return {**self._frozen, **{"m." + k: v for k, v in self.space.unflatten(theta).items()}}

    def embed(self, theta: torch.Tensor, X, Y):
        """``(U (n, d), V (n, d), s ())`` at parameters ``theta (P,)``."""
        return functional_call(self._enc, self._params(theta), (X, Y))

    def call(self, theta: torch.Tensor, fn: Callable[[nn.Module], torch.Tensor]) -> torch.Tensor:
        """Evaluate ``fn(model)`` with the selected parameters replaced by ``theta``."""
        return functional_call(_CallFn(self.model, fn), self._params(theta), ())

    def embed_jvp(self, theta, X, Y, h):
        """Embeddings and their derivative along ``h (P,)``: ``(U, V, s), (dU, dV, ds)``."""
        return jvp(lambda th: self.embed(th, X, Y), (theta,), (h,))

    def embed_vjp(self, theta, X, Y):
        """Embeddings and the function mapping cotangents ``(gU, gV, gs)`` to ``(P,)`` gradients."""
        out, fn = vjp(lambda th: self.embed(th, X, Y), theta)
        return out, (lambda gU, gV, gs: fn((gU, gV, gs))[0])
