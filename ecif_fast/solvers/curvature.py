"""Curvature of the data term of R at θ̂: exact Hessian or Gauss–Newton (docs/math.md §4), undamped."""
from __future__ import annotations

import torch
from torch.func import grad, jacfwd, jvp, vmap

from ..errors import ECIFInputError
from ..core.batches import BatchPlan, pack_batches
from ..core.heads_curvature import closed_form_blocks, heads_gauss_newton
from ..kernels import ops
from ..core.loss import batch_loss, contrastive_loss
from ..models.functional import ChunkedVJP, FunctionalModel, chunked_jvp, input_pieces, row_slices
from ..options import CURVATURES
from ..pair_source import TensorPairs


#: An exact Hessian product forms every batch's ``B × B`` score matrix (and its tangent) once per column:
#: columns are vmapped together only up to about this many score entries per call.
HVP_SCORE_BUDGET = 1 << 24


class Curvature:
    """``C = ∇²Σℓ`` (``"hessian"``) or ``J_Sᵀ H_S J_S`` (``"gauss-newton"``) at ``theta``, without damping.

    Products are summed batch by batch (the loss of a batch depends on that batch's pairs only), so
    memory stays bounded by one batch of activations.

    Args:
        fm: the functional model. theta: ``(P,)`` the optimum θ̂. X, Y: training inputs ``(n, ...)``, or a
            pair source (:mod:`ecif_fast.pair_source`: tensors, or a DataLoader read again for every product)
            and ``Y=None``.
        plan: the training batches. kind: ``"hessian"`` or ``"gauss-newton"``.
        subsample: optional list of batch numbers to use (Hessian subsampling); the product is rescaled
            by ``num_batches / len(subsample)``.
        backend: kernel backend for the Gauss–Newton product (None: automatic, see ``ecif_fast.kernels.registry``).
        chunk_pairs: consecutive batches are packed into chunks of about this many pairs; a product runs
            one encoder forward (and JVPs / VJPs for ``tangent_chunk`` columns at once) per chunk.

    Exact Hessian products (``"hessian"``) differentiate the loss of one chunk twice (forward-over-reverse,
    ``tangent_chunk`` columns per vmapped call, fewer when the chunk's score matrices are big: at most
    ``HVP_SCORE_BUDGET`` score entries per call); a model whose ops have no batching rule for that falls back
    to one column at a time.

    Pairs read from a DataLoader: every product is one ordered pass over the loader (for ``batches=int`` or
    ``None``); a packed chunk of batches is gathered whole when it holds at most ``max(loader batch,
    chunk_pairs)`` pairs, else streamed (Gauss–Newton: JVPs, then VJPs, each reading it again). The exact
    Hessian and the dense matrices gather each chunk (batch) whole, as with tensors.
    """

    def __init__(self, fm: FunctionalModel, theta, X, Y, plan: BatchPlan, kind: str = "hessian", subsample=None,
                 backend: str | None = None, chunk_pairs: int = 4096, tangent_chunk: int = 256):
        if kind not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {kind!r}")
        self.source = TensorPairs(X, Y) if torch.is_tensor(X) else X
        # the inputs when held; None when read from a DataLoader
        self.X, self.Y = (None, None) if self.source.streamed else (self.source.X, self.source.Y)
        self.fm, self.theta, self.kind = fm, theta, kind
        self.backend = backend
        groups = plan.groups()
        self.factor = 1.0
        if subsample is not None:
            sub = sorted(set(int(b) for b in subsample))
            if not sub or sub[0] < 0 or sub[-1] >= len(groups):
                raise ECIFInputError(f"hessian_batches must list batch numbers in [0, {len(groups)}) (the "
                                     f"training batches), got {list(subsample)}")
            self.factor = len(groups) / len(sub)
            groups = [groups[b] for b in sub]
            if all(len(g) < 2 for g in groups):
                raise ECIFInputError(f"hessian_batches {sub} selects only batches of 1 pair: their loss is constant, "
                                     "so the curvature would be 0; pick batches with at least 2 pairs")
        self.groups = groups
        self.size = theta.numel()
        self.chunks = pack_batches(groups, chunk_pairs)
        self.chunk_pairs, self.tangent_chunk = chunk_pairs, tangent_chunk
        self._vmap_hvp = True

    def _batch_loss_fn(self, X, Y):
        """``θ ↦`` the loss of one batch of pairs ``X, Y``."""
        def f(th):
            U, V, s = self.fm.embed(th, X, Y)
            return batch_loss(s.exp() * (U @ V.T))

        return f

    def _chunk_loss_fn(self, X, Y, plan: BatchPlan):
        """``θ ↦`` the summed loss of the batches packed in one chunk (inputs ``X, Y``, batches ``plan``)."""
        def f(th):
            U, V, s = self.fm.embed(th, X, Y)
            return contrastive_loss(U, V, s.exp(), plan)

        return f

    def _hessian(self, Vs: torch.Tensor) -> torch.Tensor:
        """``∇²Σℓ`` applied to the ``Q`` columns of ``Vs (P, Q)``: per chunk of batches, forward-mode over the
        gradient (``jvp(grad)``, as in :meth:`dense`), vmapped over ``tangent_chunk`` columns at a time."""
        out = torch.zeros_like(Vs)
        served = self.source.serve([idx for idx, _ in self.chunks], whole=True)
        for (idx, plan), (X, Y) in zip(self.chunks, served):
            g = grad(self._chunk_loss_fn(X, Y, plan))

            def hvp(v):
                return jvp(g, (self.theta,), (v,))[1]

            scores = int((plan.sizes ** 2).sum())
            width = max(1, min(self.tangent_chunk, HVP_SCORE_BUDGET // scores))
            for cols in row_slices(Vs.shape[1], width):
                block = Vs[:, cols]
                if self._vmap_hvp:
                    try:
                        out[:, cols] += vmap(hvp)(block.T).T
                        continue
                    except (RuntimeError, NotImplementedError):
                        self._vmap_hvp = False  # an op without a batching rule: column by column from now on
                out[:, cols] += torch.stack([hvp(block[:, q]) for q in range(block.shape[1])], dim=1)
        return out * self.factor

    def _hessian_columnwise(self, Vs: torch.Tensor) -> torch.Tensor:
        """The same product one column and one batch at a time (the reference for :meth:`_hessian`)."""
        out = torch.zeros_like(Vs)
        for X, Y in self.source.serve(self.groups, whole=True):
            g = grad(self._batch_loss_fn(X, Y))
            for q in range(Vs.shape[1]):
                out[:, q] += jvp(g, (self.theta,), (Vs[:, q],))[1]
        return out * self.factor

    def _chunk_products(self, H: torch.Tensor):
        """Per chunk of batches, the directions ``J·h`` for the rows of ``H (Q, P)`` and their
        embedding-space Gauss–Newton product. Yields ``(X, Y, s, (dU, dV, ds), (gU, gV, gs))`` with
        ``ds`` None when the scale is not trained; ``X`` is a :class:`ecif_fast.pair_source.Rows` (``Y`` None)
        for a chunk streamed from a DataLoader."""
        for (idx, plan), (X, Y) in zip(self.chunks, self.source.serve([idx for idx, _ in self.chunks])):
            # a batch bigger than a chunk: JVPs row chunk by chunk
            (U, V, s), (dU, dV, ds) = chunked_jvp(self.fm, self.theta, X, Y, H, self.chunk_pairs, self.tangent_chunk)
            ds = ds if self.fm.scale_trained else None
            g = ops.gauss_newton_product(U.detach(), V.detach(), s.detach().exp(), plan, dU, dV, ds,
                                         backend=self.backend)
            yield X, Y, s, (dU, dV, ds), g

    def _gauss_newton(self, Vs: torch.Tensor) -> torch.Tensor:
        """``J_Sᵀ H_S J_S`` applied to the ``Q`` columns of ``Vs (P, Q)``, chunk by chunk."""
        out = torch.zeros_like(Vs)
        for X, Y, s, (dU, dV, _), (gU, gV, gs) in self._chunk_products(Vs.T.contiguous()):
            pull = ChunkedVJP(self.fm, self.theta, X, Y, self.chunk_pairs)
            cot = zip(gU.split(self.tangent_chunk), gV.split(self.tangent_chunk),
                      gs.reshape(gU.shape[0], -1).split(self.tangent_chunk))
            out += torch.cat([pull(a, b, c) for a, b, c in cot]).T
        return out * self.factor

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``C v`` for ``v`` of shape ``(P,)`` or ``(P, Q)``."""
        product = self._gauss_newton if self.kind == "gauss-newton" else self._hessian
        return product(v.reshape(v.shape[0], -1)).reshape(v.shape)

    def dense(self) -> torch.Tensor:
        """``(P, P)`` matrix (symmetrised)."""
        if self.kind == "hessian":
            C = torch.zeros(self.size, self.size, dtype=self.theta.dtype)
            for X, Y in self.source.serve(self.groups, whole=True):
                # jacfwd(grad), not torch.func.hessian (= jacfwd(jacrev)): the vmapped backward of layer_norm
                # is wrong when both its input and its weight depend on θ (pytorch/functorch#534)
                C += jacfwd(grad(self._batch_loss_fn(X, Y)))(self.theta)
            C *= self.factor
        else:
            C = self._dense_heads()
            if C is None:
                C = self._dense_gauss_newton()
        C = C + C.T  # symmetrised with one temporary P × P
        return C.mul_(0.5)

    def _dense_heads(self) -> torch.Tensor | None:
        """The dense Gauss–Newton matrix of :class:`~ecif_fast.LinearHeads` in closed form
        (:func:`~ecif_fast.core.heads_curvature.heads_gauss_newton`; a trained logit scale's row and column by
        one product), or None when the model is not plain linear heads."""
        model = self.fm.model
        blocks = closed_form_blocks(model, self.fm.space.names, self.kind)
        if blocks is None:
            return None
        params = self.fm.space.unflatten(self.theta)
        W_img = params.get("image_proj.weight", model.image_proj.weight.detach())
        W_txt = params.get("text_proj.weight", model.text_proj.weight.detach())
        log_scale = params["logit_scale"] if blocks["scale"] else torch.as_tensor(model.logit_scale)
        slices = self.fm.space.slices()
        col = None
        if blocks["scale"]:  # first, so that the pass below is the last read of the inputs, batch by batch
            e = torch.zeros(self.size, 1, dtype=self.theta.dtype)
            e[slices["logit_scale"].start] = 1
            col = self._gauss_newton(e)[:, 0]
        feats, groups, pos = ([], []), [], 0
        for idx, (X, Y) in zip(self.groups, self.source.serve(self.groups, whole=True)):
            feats[0].append(model.proj_input(X, "image").to(self.theta.dtype))
            feats[1].append(model.proj_input(Y, "text").to(self.theta.dtype))
            groups.append(torch.arange(pos, pos + len(idx)))
            pos += len(idx)
        Cw = heads_gauss_newton(torch.cat(feats[0]), torch.cat(feats[1]), W_img.to(self.theta.dtype),
                                W_txt.to(self.theta.dtype), log_scale, groups, normalize=blocks["normalize"],
                                image=blocks["image"], text=blocks["text"], norm_eps=blocks["norm_eps"])
        Cw.mul_(self.factor)
        # Cw holds vec(W_img) then vec(W_txt); θ may order them otherwise, with the logit scale among them
        parts, start = [], 0
        for name in ("image_proj.weight", "text_proj.weight"):
            if name in slices:
                size = slices[name].stop - slices[name].start
                parts.append((slices[name], slice(start, start + size)))
                start += size
        if all(theirs == ours for theirs, ours in parts) and start == self.size:
            return Cw
        C = torch.zeros(self.size, self.size, dtype=self.theta.dtype)
        for a_theta, a_w in parts:
            for b_theta, b_w in parts:
                C[a_theta, b_theta] = Cw[a_w, b_w]
        del Cw
        if col is not None:
            k = slices["logit_scale"].start
            C[:, k], C[k, :] = col, col
        return C

    def _dense_gauss_newton(self) -> torch.Tensor:
        """``Σ_b (J_b)ᵀ H_emb (J_b)``: all P columns of the embedding Jacobian at once per batch (a batch streamed
        from a DataLoader: ``chunk_pairs`` pairs at a time)."""
        eye = torch.eye(self.size, dtype=self.theta.dtype)
        C = torch.zeros(self.size, self.size, dtype=self.theta.dtype)
        for idx, (X, Y) in zip(self.groups, self.source.serve(self.groups)):
            parts = []
            for _, Xr, Yr in input_pieces(X, Y, self.chunk_pairs if Y is None else len(idx)):
                parts.append((self.fm.embed(self.theta, Xr, Yr),
                              vmap(lambda h: jvp(lambda th: self.fm.embed(th, Xr, Yr), (self.theta,), (h,))[1])(eye)))
            if len(parts) == 1:
                (U, V, s), (dU, dV, ds) = parts[0]
            else:
                U, V, s = (torch.cat([p[0][0] for p in parts]), torch.cat([p[0][1] for p in parts]), parts[0][0][2])
                dU, dV, ds = (torch.cat([p[1][0] for p in parts], 1), torch.cat([p[1][1] for p in parts], 1),
                              parts[0][1][2])
            plan = BatchPlan(len(idx), torch.arange(len(idx)), torch.tensor([0, len(idx)]))
            gU, gV, gs = ops.gauss_newton_product(U.detach(), V.detach(), s.detach().exp(), plan, dU, dV,
                                                  ds if self.fm.scale_trained else None, backend=self.backend)
            C += dU.reshape(self.size, -1) @ gU.reshape(self.size, -1).T.to(C.dtype)
            C += dV.reshape(self.size, -1) @ gV.reshape(self.size, -1).T.to(C.dtype)
            if self.fm.scale_trained:
                C += torch.outer(ds, gs.to(C.dtype))
        return C * self.factor

    def trace_estimate(self, probes: int = 32, seed: int = 0) -> float:
        """Hutchinson estimate of ``tr(C)`` with Rademacher probes (deterministic under ``seed``)."""
        g = torch.Generator().manual_seed(seed)
        Z = torch.randint(0, 2, (self.size, probes), generator=g).to(self.theta.dtype) * 2 - 1
        if self.kind == "hessian":
            return float((Z * self.matvec(Z)).sum() / probes)
        # Gauss–Newton: zᵀCz = (Jz)ᵀ H_S (Jz) is a quadratic form in embedding space, so no VJP is needed
        total = 0.0
        for _, _, _, (dU, dV, ds), (gU, gV, gs) in self._chunk_products(Z.T.contiguous()):
            quad = (dU * gU.to(dU.dtype)).sum() + (dV * gV.to(dV.dtype)).sum()
            if ds is not None:
                quad = quad + (ds.reshape(-1) * gs.to(ds.dtype)).sum()
            total += float(quad)
        return total * self.factor / probes
