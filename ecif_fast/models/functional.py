"""The model as a function of the flat parameter vector θ: embeddings, JVPs, VJPs, test functions."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, jvp, vjp, vmap

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


class ChunkedVJP:
    """``Jᵀ·(gU, gV, gs)`` on the pairs ``X, Y`` with at most ``chunk_pairs`` pairs' activations alive.

    The rows are split into chunks of ``chunk_pairs``; each call runs one forward with its graph per chunk
    and one vmapped VJP over the ``K`` cotangents, summing the chunks (the scale's cotangent is applied once).
    With a single chunk the forward is kept and reused by every call.

    Args:
        fm: the functional model. theta: ``(P,)``. X, Y: ``(m, ...)`` inputs. chunk_pairs: rows per encoder call.
    """

    def __init__(self, fm: FunctionalModel, theta: torch.Tensor, X, Y, chunk_pairs: int):
        self.fm, self.theta, self.X, self.Y = fm, theta, X, Y
        m = X.shape[0]
        self.rows = [slice(a, min(a + chunk_pairs, m)) for a in range(0, m, chunk_pairs)]
        self._kept = fm.embed_vjp(theta, X, Y) if len(self.rows) == 1 else None

    def __call__(self, gU: torch.Tensor, gV: torch.Tensor, gs: torch.Tensor | None) -> torch.Tensor:
        """``gU, gV (K, m, d)``, ``gs (K,)`` or None -> ``(K, P)`` parameter gradients."""
        out = None
        for c, r in enumerate(self.rows):
            (U, V, s), pull = self._kept or self.fm.embed_vjp(self.theta, self.X[r], self.Y[r])
            K = gU.shape[0]
            if gs is None or c > 0:
                cs = torch.zeros(K, *s.shape, dtype=s.dtype, device=s.device)
            else:
                cs = gs.to(s.dtype).reshape(K, *s.shape)
            g = vmap(pull)(gU[:, r].to(U.dtype), gV[:, r].to(V.dtype), cs)
            out = g if out is None else out + g
        return out
