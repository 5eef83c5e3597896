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


def row_slices(total: int, size: int) -> list[slice]:
    """``[0:size], [size:2·size], …`` covering ``total`` rows."""
    return [slice(a, min(a + size, total)) for a in range(0, total, size)]


def input_pieces(X, Y, chunk_pairs: int, rows=None):
    """``(slice, X[slice], Y[slice])`` over ``row_slices(m, chunk_pairs)`` (or the given ``rows``) of the inputs
    ``X, Y (m, ...)``; ``X`` may instead be a :class:`ecif_fast.pair_source.Rows` (``Y`` None): rows read from a
    DataLoader, cut at the same ``chunk_pairs`` boundaries (``rows`` is then not used)."""
    if not torch.is_tensor(X):
        return X.pieces(chunk_pairs)
    rows = row_slices(X.shape[0], chunk_pairs) if rows is None else rows
    return ((r, X[r], Y[r]) for r in rows)


def chunked_jvp(fm: FunctionalModel, theta: torch.Tensor, X, Y, H: torch.Tensor, chunk_pairs: int,
                tangent_chunk: int, rows=None):
    """Embeddings and their derivatives along the rows of ``H (Q, P)``, ``chunk_pairs`` pairs per encoder call
    and ``tangent_chunk`` directions per vmapped JVP.

    ``X, Y``: inputs ``(m, ...)``, or a :class:`ecif_fast.pair_source.Rows` and None (pairs read from a DataLoader,
    see :func:`input_pieces`). Returns ``(U (m, d), V (m, d), s), (dU (Q, m, d), dV (Q, m, d), ds (Q, ...))``.
    ``rows``: the row slices to walk (default ``row_slices(m, chunk_pairs)``; pass a progress-bar-wrapped list to
    show progress).
    """
    embs, tans = [], []
    for _, Xr, Yr in input_pieces(X, Y, chunk_pairs, rows):
        parts = [vmap(lambda h: fm.embed_jvp(theta, Xr, Yr, h), out_dims=(None, 0))(Hc)
                 for Hc in H.split(tangent_chunk)]
        embs.append(parts[0][0])
        tans.append([torch.cat([p[1][i] for p in parts]) for i in range(3)])
    U, V, s = torch.cat([e[0] for e in embs]), torch.cat([e[1] for e in embs]), embs[0][2]
    dU, dV = torch.cat([t[0] for t in tans], 1), torch.cat([t[1] for t in tans], 1)
    return (U, V, s), (dU, dV, tans[0][2])


class ChunkedVJP:
    """``Jᵀ·(gU, gV, gs)`` on the pairs ``X, Y`` with at most ``chunk_pairs`` pairs' activations alive.

    The rows are split into chunks of ``chunk_pairs``; each call runs one forward with its graph per chunk
    and one vmapped VJP over the ``K`` cotangents, summing the chunks (the scale's cotangent is applied once).
    With a single chunk the forward is kept and reused by every call.

    Args:
        fm: the functional model. theta: ``(P,)``. X, Y: ``(m, ...)`` inputs, or a
            :class:`ecif_fast.pair_source.Rows` and None (pairs read from a DataLoader: every call reads them
            again, ``chunk_pairs`` at a time). chunk_pairs: rows per encoder call.
    """

    def __init__(self, fm: FunctionalModel, theta: torch.Tensor, X, Y, chunk_pairs: int):
        self.fm, self.theta, self.X, self.Y = fm, theta, X, Y
        self.chunk_pairs = chunk_pairs
        self.rows = row_slices(X.shape[0], chunk_pairs) if torch.is_tensor(X) else None
        self._kept = fm.embed_vjp(theta, X, Y) if self.rows is not None and len(self.rows) == 1 else None

    def __call__(self, gU: torch.Tensor, gV: torch.Tensor, gs: torch.Tensor | None) -> torch.Tensor:
        """``gU, gV (K, m, d)``, ``gs (K,)`` or None -> ``(K, P)`` parameter gradients."""
        out, K = None, gU.shape[0]
        streamed = self.rows is None   # pairs read from a DataLoader: one forward with its graph per piece read
        pieces = self.X.pieces(self.chunk_pairs) if streamed else ((r, None, None) for r in self.rows)
        for c, (r, Xr, Yr) in enumerate(pieces):
            if streamed:
                (U, V, s), pull = self.fm.embed_vjp(self.theta, Xr, Yr)
            else:
                (U, V, s), pull = self._kept or self.fm.embed_vjp(self.theta, self.X[r], self.Y[r])
            if gs is None or c > 0:
                cs = torch.zeros(K, *s.shape, dtype=s.dtype, device=s.device)
            else:
                cs = gs.to(s.dtype).reshape(K, *s.shape)
            g = vmap(pull)(gU[:, r].to(U.dtype), gV[:, r].to(V.dtype), cs)
            out = g if out is None else out + g
        return out
