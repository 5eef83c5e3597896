"""The ECIF engine: one solve per test function, one JVP pass, softmax-weighted reductions (docs/math.md §3–§4)."""
from __future__ import annotations

import copy
from typing import Callable, Sequence, Union

import torch
from torch import nn
from torch.func import jacrev, jvp
from tqdm.auto import tqdm

from .errors import ECIFInputError
from .core.batches import BatchesArg, BatchPlan, pack_batches, resolve_batches
from .core.loss import batch_loss, per_pair_loss
from .core.pair_terms import pair_embedding_gradients, pair_fit_gradients, removal_objective
from .core.heads_curvature import has_closed_form
from .core.pair_norms import heads_pair_sq_norms, structured_norms_blocks
from .kernels import ops
from .models.functional import ChunkedVJP, FunctionalModel, chunked_jvp, row_slices
from .models.params import ParamsArg, select_params
from .engine_inputs import (cg_tol_arg, default_chunks, encodes, hessian_batches_arg, pick_solver,
                            solver_arg)
from .pair_source import LoaderPairs, TensorPairs, is_loader
from .results import InfluenceResult
from .solvers import CURVATURES, Curvature, resolve_damping
from .solvers.cg import cg_summary_per_call
from .solvers.exact import ExactSolver
from .solvers.registry import SolverOptions, solver_class
from .validation import (NEGATIVE_TERMS, cast_inputs, check_batch_sizes, check_choice, check_embeddings, check_indices,
                         check_int, check_like_training, check_logit_scale, check_pairs, check_params, check_tolerance,
                         declares_normalized)

TestFn = Union[Callable[[nn.Module], torch.Tensor], Sequence[Callable[[nn.Module], torch.Tensor]]]


class ECIF:
    """Extended Influence Function for a contrastive (CLIP-style) model.

    Args:
        model: a :class:`~ecif_fast.ContrastiveModel` at (or near) the optimum θ̂ of
            ``R(θ) = Σ_b Σ_{k∈b} ℓ_k + (δ/2)||θ − θ_ref||²``.
        damping: δ > 0, or ``"auto"`` (the default; see :func:`ecif_fast.solvers.resolve_damping`: at least
            ``1e-3·tr(C)/P`` and ``sqrt(eps)·|λ|_max``, so the solve converges in the model's dtype). For a
            model trained with weight decay, pass that δ.
        batches: the fixed training batches: ``None`` ("all" negatives), an int batch size, or ``(n,)`` ids.
        negative_term: ``"exact"`` (``−log(1−P)``, default) or ``"taylor"`` (``P``, the paper's form).
        solver: a registered solver name (:func:`ecif_fast.solvers.solver_names`): ``"exact"`` (dense Cholesky),
            ``"cg"`` (matrix-free, preconditioned by a rank-``rank`` spectral factor) or ``"lowrank"`` (that factor
            alone). Default None: ``"exact"`` up to 4096 trained parameters, else ``"cg"``
            (:func:`ecif_fast.solvers.default_solver`). ``hessian=`` is its deprecated alias.
        curvature: ``"gauss-newton"`` (positive semi-definite, the default) or ``"hessian"`` (exact second
            derivatives: the influence of the exact optimum; may be indefinite away from it).
        params: which parameters are trained (see :func:`ecif_fast.models.params.select_params`).
        rank: eigenpairs kept by the spectral factor (the ``lowrank`` solver, CG's preconditioner and the
            factorised self-influence; an int >= 1; see :class:`~ecif_fast.solvers.LowRankSolver`).
        precondition: CG only: precondition with the spectral factor (default True; the answer is the same to
            ``cg_tol``, the iterations are fewer).
        cg_tol: relative residual in (0, 1) at which CG stops (default None: 1e-10 in float64, 1e-4 in float32);
            cg_maxiter: an int >= 1 (default ``max(100, 2P)``). A public call whose CG solves did not all converge
            warns once (RuntimeWarning) with the count and the worst residual.
        hessian_batches: optional list of batch numbers (ints in ``[0, num_batches)``) to subsample the curvature.
        chunk_size: pairs per encoder call (embedding, JVP pass, curvature products: whole batches are kept
            together there). tangent_chunk: tangent / cotangent vectors pushed through the encoders per call
            (the JVP pass over several test functions, curvature products over several columns, per-pair
            gradients). Peak memory is about ``chunk_size × tangent_chunk`` pairs' activations. Both default to
            ``None``: 4096 and 256 for a small model (under 2 million parameters, e.g. ``LinearHeads``), 64 and
            8 otherwise (a transformer CLIP; see :func:`default_chunks`).
        progress: show progress bars.
        backend: kernel backend for the embedding-space ops (``"torch"``, ``"cpp"``, ``"triton"``);
            default automatic (``ECIF_FAST_BACKEND`` if set), see :mod:`ecif_fast.kernels.registry`.
        seed: an int, for the randomized low-rank eigensolver.

    Refused with :class:`~ecif_fast.ECIFInputError`: parameters on the ``meta`` device, float16 / bfloat16
    parameters (use ``model.float()`` or ``model.double()``), selected parameters with NaN / Inf, a logit
    scale that is not finite or whose ``exp`` overflows; at :meth:`fit` also non-finite embeddings, embedding
    rows that lost their unit norm in a normalising model (norm overflow / underflow: rescale the features),
    logits ``t·<u, v>`` beyond the dtype's precision, and training batches none of which holds 2 pairs.
    Floating inputs (training and test) are cast to the dtype of the selected parameters; integer inputs
    (token ids) are passed as they are.

    A pair alone in its batch has no negatives: its loss is constant, so its influence is exactly 0;
    :meth:`fit` warns (UserWarning) when some pairs are alone in their batch.
    """

    def __init__(self, model: nn.Module, *, damping="auto", batches: BatchesArg = None,
                 negative_term: str = "exact", solver: str | None = None, curvature: str = "gauss-newton",
                 params: ParamsArg = None, rank: int = 64, precondition: bool = True, cg_tol: float | None = None,
                 cg_maxiter: int | None = None, hessian_batches=None,
                 chunk_size: int | None = None, tangent_chunk: int | None = None, progress: bool = False,
                 seed: int = 0, backend: str | None = None, hessian: str | None = None):
        self.negative_term = check_choice(negative_term, "negative_term", NEGATIVE_TERMS)
        self.solver_name = solver_arg(solver, hessian)
        self.curvature_kind = check_choice(curvature, "curvature", CURVATURES)
        if isinstance(damping, str) and damping != "auto":
            raise ECIFInputError(f"damping must be a positive number or 'auto', got {damping!r}")
        if not isinstance(damping, str):
            resolve_damping(damping, None)  # validate early
        auto_pairs, auto_tangents = default_chunks(model)
        chunk_size = auto_pairs if chunk_size is None else chunk_size
        tangent_chunk = auto_tangents if tangent_chunk is None else tangent_chunk
        for name, value in (("chunk_size", chunk_size), ("tangent_chunk", tangent_chunk)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ECIFInputError(f"{name} must be an int >= 1 (or None for automatic), got {value!r}")
        self.rank = check_int(rank, "rank", minimum=1)
        self.cg_tol = None if cg_tol is None else check_tolerance(cg_tol, "cg_tol")
        if not isinstance(precondition, bool):
            raise ECIFInputError(f"precondition must be True or False, got {precondition!r}")
        self.precondition = precondition
        self.cg_maxiter = check_int(cg_maxiter, "cg_maxiter", minimum=1, allow_none=True)
        self.seed = check_int(seed, "seed")
        self.hessian_batches = hessian_batches_arg(hessian_batches)
        self.model = model
        self.space = select_params(model, params)
        self.solver_name = pick_solver(self.solver_name, self.space.size,
                                       has_closed_form(model, self.space.names, self.curvature_kind))
        self.fm = FunctionalModel(model, self.space)
        self.dtype = check_params(dict(model.named_parameters()), self.space.names)
        scale = model.logit_scale
        check_logit_scale(scale.detach() if torch.is_tensor(scale) else scale,
                          scale.dtype if torch.is_tensor(scale) else self.dtype)
        self.damping_arg = damping
        self.batches_arg = batches
        self.chunk_size, self.tangent_chunk = chunk_size, tangent_chunk
        self.progress = progress
        if backend is not None and not isinstance(backend, str):
            raise ECIFInputError(f"backend must be a string such as 'torch', 'cpp' or 'triton', or None; "
                                 f"got {type(backend).__name__}")
        self.backend = backend
        self._self_influence: dict[str, torch.Tensor] = {}  # all pairs, by method
        self._fitted = False

    # ------------------------------------------------------------------ fit
    def fit(self, train_images, train_texts=None) -> "ECIF":
        """Store the training pairs' embeddings at θ̂ (and the pairs themselves when given as tensors), and
        factorise the damped curvature.

        Args:
            train_images: ``(n, ...)`` image inputs, or a DataLoader (any re-iterable) yielding ``(images,
                texts)`` batches ``(b, ...)``, ``(b, ...)`` in a fixed order (``shuffle=False``).
            train_texts: ``(n, ...)`` text inputs (None with a DataLoader). Floating inputs are cast to the
                parameters' dtype.

        From a DataLoader the inputs are never held: ``fit`` keeps the embeddings ``U, V (n, d)`` and the log
        scale, and every later pass through the encoders (the JVP pass of :meth:`influence`, curvature
        products, per-pair gradients, group influence) reads the loader again, batch by batch
        (:class:`ecif_fast.pair_source.LoaderPairs`); memory holds about one batch of inputs (or ``chunk_size``
        pairs, whichever is more). A loader whose later passes differ from the first (shuffled, random
        augmentation, another length) raises :class:`~ecif_fast.ECIFInputError`.

        Raises :class:`~ecif_fast.ECIFInputError` for unusable data or model state (see the class docstring).
        """
        streamed = is_loader(train_images, train_texts)
        if not streamed:
            X, Y = check_pairs(train_images, train_texts, what="train")
        self._fitted = False  # until this fit has succeeded
        self.dtype = check_params(dict(self.model.named_parameters()), self.space.names)
        if streamed:
            source = LoaderPairs(train_images, self.dtype, chunk_size=self.chunk_size, progress=self.progress)
            self.source = source
            self.theta = self.space.flat(self.model)
            # the first pass over the loader: the embeddings, and the layout later passes are checked against
            U, V, s = self._embed_checked(self.theta, *source.everything("embed"), "train")
            plan = resolve_batches(self.batches_arg, source.n)
            check_batch_sizes(plan.sizes, "batches")
            self.n = source.n
            self.plan: BatchPlan = plan
        else:
            X, Y = cast_inputs(X, self.dtype), cast_inputs(Y, self.dtype)
            plan = resolve_batches(self.batches_arg, X.shape[0])
            check_batch_sizes(plan.sizes, "batches")
            self.source = source = TensorPairs(X, Y)
            self.n = X.shape[0]
            self.plan: BatchPlan = plan
            self.theta = self.space.flat(self.model)
            U, V, s = self._embed_checked(self.theta, X, Y, "train", self._chunks("embed"))
        self.U, self.V, self.log_scale = U, V, s.detach()
        self.curvature = Curvature(self.fm, self.theta, source, None, self.plan, self.curvature_kind,
                                   self.hessian_batches, backend=self.backend, chunk_pairs=self.chunk_size,
                                   tangent_chunk=self.tangent_chunk)
        solver_type = solver_class(self.solver_name)
        # a solver that forms the dense curvature shares it with damping="auto" (its exact trace)
        dense = self.curvature.dense() if solver_type.needs_dense else None
        self.damping = resolve_damping(self.damping_arg, self.curvature, dense)
        options = SolverOptions(rank=self.rank, seed=self.seed, cg_tol=cg_tol_arg(self.cg_tol, self.theta.dtype),
                                cg_maxiter=self.cg_maxiter, precondition=self.precondition)
        self.solver = solver_type.from_engine(self.curvature, self.damping, dense, options)
        self._self_influence = {}  # all pairs, by method, computed on first use (detection, trace-back, RelatIF)
        self._factor = None          # the spectral factor of self-influence, built on first use
        self._fitted = True
        return self

    def _require_fit(self):
        if not self._fitted:
            raise RuntimeError("call .fit(train_images, train_texts) before computing influences")

    @property
    def X(self) -> torch.Tensor:
        """``(n, ...)`` the training images as :meth:`fit` uses them (cast to the parameters' dtype). Fitted
        from a DataLoader they are not held: this gathers them all by one pass over the loader (the whole
        dataset in memory; nothing in ecif_fast uses it, the passes read ``self.source`` chunk by chunk)."""
        return self.source.tensors()[0]

    @property
    def Y(self) -> torch.Tensor:
        """``(n, ...)`` the training texts, as :attr:`X` (token ids padded to one length)."""
        return self.source.tensors()[1]

    def _chunks(self, desc: str):
        rows = row_slices(self.n, self.chunk_size)
        return tqdm(rows, desc=desc, disable=not self.progress or len(rows) < 2, leave=False)

    def _embed_checked(self, theta, X, Y, what: str, rows=None):
        """``(U, V, s)`` of the ``what`` pairs ``X, Y (m, ...)`` (or a :class:`ecif_fast.pair_source.Rows` and
        None: read from a DataLoader), without gradients; an encoder failure or unusable embeddings become an
        :class:`ECIFInputError` naming the input."""
        names = (f"{what}_images", f"{what}_texts")
        if not torch.is_tensor(X):
            U, V, s = self._embed_streamed(theta, X, names)
        else:
            try:
                with torch.no_grad():
                    U, V, s = self._embed(theta, X, Y, rows)
            except ECIFInputError:
                raise
            except (RuntimeError, ValueError, TypeError, IndexError) as err:
                raise self._encoder_failure(err, X, Y, names) from err
        check_embeddings(U, V, s, names, declares_normalized(self.model))
        return U, V, s

    def _embed_streamed(self, theta, rows, names):
        """``(U, V, s)`` of pairs read from a DataLoader (``rows.pieces``, ``chunk_size`` at a time); an encoder
        failure names the piece's inputs."""
        parts = []
        with torch.no_grad():
            for _, Xr, Yr in rows.pieces(self.chunk_size):
                try:
                    parts.append(self.fm.embed(theta, Xr, Yr))
                except ECIFInputError:
                    raise
                except (RuntimeError, ValueError, TypeError, IndexError) as err:
                    raise self._encoder_failure(err, Xr, Yr, names) from err
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), parts[0][2]

    def _encoder_failure(self, err, X, Y, names) -> ECIFInputError:
        """Which encoder cannot take its input (probed on two rows), as an error naming the argument."""
        culprit = [n for n, f, x in zip(names, (self.model.encode_image, self.model.encode_text), (X, Y))
                   if not encodes(f, x[:2])] or list(names)
        shapes = ", ".join(f"{n} {tuple(x.shape)} {x.dtype}" for n, x in zip(names, (X, Y)))
        train = f"; the training inputs were {self.source.describe()}" if names[0].startswith("test") else ""
        return ECIFInputError(f"the model failed to encode {' and '.join(culprit)} ({shapes}{train}): "
                              f"{type(err).__name__}: {err}; prepare these inputs exactly as the model expects "
                              "(same feature extractor, preprocessing and tokenizer as the training pairs)")

    def _embed(self, theta, X, Y, rows=None):
        """``(U, V, s)`` of the pairs ``X, Y``, ``chunk_size`` pairs per encoder call."""
        rows = row_slices(X.shape[0], self.chunk_size) if rows is None else rows
        parts = [self.fm.embed(theta, X[r], Y[r]) for r in rows]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), parts[0][2]

    # ------------------------------------------------------------------ test functions
    def _test_gradients(self, test_images, test_texts, fn: TestFn | None, per_test: bool) -> torch.Tensor:
        """``(Q, P)`` gradients ``∇F`` of the test function(s) at θ̂."""
        theta = self.theta
        if fn is not None:
            if test_images is not None or test_texts is not None:
                raise ECIFInputError("pass either test pairs or fn=, not both")
            fns = [fn] if callable(fn) else list(fn)
            if not fns or not all(callable(f) for f in fns):
                raise ECIFInputError("fn must be a callable fn(model) -> scalar tensor, or a list of them")

            def value(th, f):
                out = self.fm.call(th, f)
                if not torch.is_tensor(out) or out.numel() != 1:
                    raise ECIFInputError("fn(model) must return a scalar tensor")
                return out.reshape(())

            return torch.stack([torch.func.grad(value)(theta, f) for f in fns])
        if test_images is None or test_texts is None:
            raise ECIFInputError("give test_images and test_texts (the test pairs), or fn=callable")
        Xt, Yt = check_pairs(test_images, test_texts, what="test")
        if Xt.shape[0] < 2:
            raise ECIFInputError(
                "test_images and test_texts hold 1 pair: the contrastive loss of a single pair is constant (the "
                "pair is its own only candidate), so ∇F = 0 and every influence would be 0; pass at least 2 test "
                "pairs, or fn= with a loss that is not constant (e.g. ecif_fast.apps.zero_shot_losses)")
        like_X, like_Y = self.source.like()   # the training inputs (or their shapes, from a DataLoader)
        check_like_training(Xt, like_X, "test_images")
        check_like_training(Yt, like_Y, "test_texts")
        Xt, Yt = cast_inputs(Xt, self.dtype), cast_inputs(Yt, self.dtype)
        # The test pairs interact only through their embeddings: cotangents in embedding space first, then
        # one VJP per chunk of test pairs (memory: one chunk of activations, however many test pairs).
        Ut, Vt, st = self._embed_checked(theta, Xt, Yt, "test")

        def test_losses(U, V, s):
            S = s.exp() * (U @ V.T)
            return per_pair_loss(S) if per_test else batch_loss(S).reshape(1)

        gU, gV, gs = jacrev(test_losses, argnums=(0, 1, 2))(Ut, Vt, st)
        pull = ChunkedVJP(self.fm, theta, Xt, Yt, self.chunk_size)
        return torch.cat([pull(gU[q], gV[q], gs[q]) for q in row_slices(gU.shape[0], self.tangent_chunk)])

    # ------------------------------------------------------------------ embedding-space path
    def _directions(self, H: torch.Tensor):
        """``(dU, dV, ds)`` = ``J·h`` for the columns of ``H (P, Q)``: ``(Q, n, d)``, ``(Q, n, d)``, ``(Q,)``."""
        rows = None if self.source.streamed else self._chunks("JVP pass")   # streamed: the loader's own bar
        return self._tangents(*self.source.everything("JVP pass"), H, rows)

    def _tangents(self, X, Y, H: torch.Tensor, rows=None):
        """``J·h`` on the pairs ``X, Y`` for the columns of ``H (P, Q)`` (see :func:`chunked_jvp`); ``ds`` is
        None when the scale is not trained."""
        _, (dU, dV, ds) = chunked_jvp(self.fm, self.theta, X, Y, H.T.contiguous(), self.chunk_size,
                                      self.tangent_chunk, rows)
        return dU, dV, (ds if self.fm.scale_trained else None)

    def _check_finite(self, *tensors):
        for x in tensors:
            if not bool(torch.isfinite(x).all()):
                raise FloatingPointError(
                    "non-finite influence values: a softmax probability is so close to 1 that the exact "
                    "weight p/(1-p) overflows in this dtype; use float64 (model.double()) or "
                    "negative_term='taylor'")

    @cg_summary_per_call
    def influence(self, test_images=None, test_texts=None, *, fn: TestFn | None = None,
                  per_test: bool = False) -> InfluenceResult:
        """Influence of every training pair on the test function(s).

        ``F`` is the contrastive loss of the test pairs ``test_images (m, ...)``, ``test_texts (m, ...)`` as
        one batch (``per_test=True``: one ``F`` per test pair, its own loss term against the whole test set as
        negatives), or ``fn(model)`` (a scalar; a list of callables gives one row each).

        Test pairs: ``m >= 2`` (the loss of a single pair is constant); floating inputs must have the training
        inputs' trailing shape, integer token ids the same number of dims (the length may differ); floating
        inputs are cast to the parameters' dtype. Otherwise :class:`~ecif_fast.ECIFInputError`.

        Returns:
            :class:`InfluenceResult` with ``(n_train,)`` tensors (``(Q, n_train)`` for several F):
            predicted change of F when the pair is removed.
        """
        self._require_fit()
        Hq = self._solved_test_gradients(test_images, test_texts, fn, per_test)
        dU, dV, ds = self._directions(Hq)
        pos, neg = ops.ecif_reductions(self.U, self.V, self.log_scale.exp(), self.plan, dU, dV, ds,
                                       self.negative_term, backend=self.backend)
        return self._result(pos, neg, Hq, fn, per_test)

    def _solved_test_gradients(self, test_images, test_texts, fn, per_test) -> torch.Tensor:
        """``(P, Q)`` the solves ``h = H⁻¹∇F`` of the test function(s)."""
        G = self._test_gradients(test_images, test_texts, fn, per_test)
        return self.solver.solve(G.T.contiguous())

    def _result(self, pos, neg, Hq, fn, per_test) -> InfluenceResult:
        """Checked :class:`InfluenceResult`; the query axis is dropped for a single summed F."""
        self._check_finite(pos, neg)
        if Hq.shape[1] == 1 and not per_test and (fn is None or callable(fn)):
            pos, neg = pos[0], neg[0]
        return InfluenceResult(pos + neg, pos, neg)

    # ------------------------------------------------------------------ per-pair gradients
    def pair_gradients(self, indices=None) -> torch.Tensor:
        """``(K, P)`` parameter gradients ``g_k = ∇ℓ̃_k`` (positive + negative role) of the given pairs.

        Per-sample gradients are formed here only for the quantities that need them (self-influence,
        relative influence); batch by batch, from closed-form embedding gradients and one batched VJP.
        """
        uniq, inverse = self._unique_pairs(indices)
        out = torch.empty(uniq.numel(), self.space.size, dtype=self.theta.dtype)
        for rows, G in self._gradient_blocks(uniq):
            out[rows] = G
        return out[inverse]

    @cg_summary_per_call
    def held_out_fit(self, indices=None) -> dict[str, torch.Tensor]:
        """Each pair's own fit at ``θ̂`` and as predicted with the pair left out of training (docs/math.md §3.1).

        Removing pair ``k`` moves the optimum by ``Δθ_k = H⁻¹ g_k`` (``g_k = ∇ℓ̃_k``, both roles), so its own
        cosine and loss at ``θ̂_{−k}`` are, to first order, ``c_k + ∇c_kᵀ H⁻¹ g_k`` and
        ``ℓ_k + ∇ℓ_kᵀ H⁻¹ g_k``: the pair's fit with its memorisation by the model taken out. One solve per block
        of ``tangent_chunk`` pairs (a triangular solve for ``solver="exact"``).

        Returns ``{"cos", "loss", "cos_held_out", "loss_held_out"}``, each ``(K,)`` in the parameters' dtype
        (all pairs by default). The loss is that of the pair in its training batch.
        """
        uniq, inverse = self._unique_pairs(indices)
        out = {k: torch.empty(uniq.numel(), dtype=self.theta.dtype)
               for k in ("cos", "loss", "cos_held_out", "loss_held_out")}
        exact = isinstance(self.solver, ExactSolver)
        for rows, G, pull, (cos, loss, c_cot, l_cot) in tqdm(
                self._gradient_blocks(uniq, with_fit=True), desc="held-out fit", disable=not self.progress,
                leave=False, total=-(-uniq.numel() // self.tangent_chunk)):
            Gc, Gl = pull(*c_cot), pull(*l_cot)
            if exact:
                tri = self.solver.triangular
                Z = tri(G)
                dc, dl = (tri(Gc) * Z).sum(0), (tri(Gl) * Z).sum(0)
            else:
                Z = self.solver.solve(G.T.contiguous())
                dc, dl = (Gc.T * Z).sum(0), (Gl.T * Z).sum(0)
            out["cos"][rows], out["loss"][rows] = cos.to(self.theta.dtype), loss.to(self.theta.dtype)
            out["cos_held_out"][rows] = (cos + dc).to(self.theta.dtype)
            out["loss_held_out"][rows] = (loss + dl).to(self.theta.dtype)
        return {k: v[inverse] for k, v in out.items()}

    def _removed(self, indices) -> torch.Tensor:
        """``indices`` checked as a set of pairs to remove (not all of them)."""
        removed = check_indices(indices, self.n)
        if removed.numel() == self.n:
            raise ECIFInputError(f"indices removes all {self.n} training pairs: at least one pair must remain "
                                 "(the removal update is taken from the remaining pairs' objective)")
        return removed

    def _unique_pairs(self, indices):
        self._require_fit()
        idx = torch.arange(self.n) if indices is None else check_indices(indices, self.n)
        return torch.unique(idx, return_inverse=True)

    def _gradient_blocks(self, uniq: torch.Tensor, with_fit: bool = False):
        """Yield ``(rows, G)``: the gradients ``G (k, P)`` of ``uniq[rows]``, ``tangent_chunk`` pairs at a time,
        one batch's activations alive at once (``uniq`` sorted and unique). Fitted from a DataLoader, the
        batches holding a wanted pair are read in one ordered pass (:meth:`ecif_fast.pair_source.LoaderPairs.serve`;
        a batch too big to gather is read again for every block of ``tangent_chunk`` pairs)."""
        row_of = torch.full((self.n,), -1, dtype=torch.int64)
        row_of[uniq] = torch.arange(uniq.numel())
        t = self.log_scale.exp()
        exact = self.negative_term == "exact"
        groups = [g for g in self.plan.groups() if bool((row_of[g] >= 0).any())]
        for group, (X, Y) in zip(groups, self.source.serve(groups)):
            local = (row_of[group] >= 0).nonzero().flatten()
            pull = ChunkedVJP(self.fm, self.theta, X, Y, self.chunk_size)
            for ks in local.split(self.tangent_chunk):
                gU, gV, gs = pair_embedding_gradients(self.U[group], self.V[group], t, exact, True, ks)
                if with_fit:  # also the VJP and the pairs' own fits with their cotangents (held_out_fit)
                    yield row_of[group[ks]], pull(gU, gV, gs), pull, pair_fit_gradients(self.U[group],
                                                                                       self.V[group], t, ks)
                else:
                    yield row_of[group[ks]], pull(gU, gV, gs)

    @cg_summary_per_call
    def self_influence(self, indices=None, *, method: str = "auto") -> torch.Tensor:
        """``(K,)`` self-influence ``g_kᵀ H⁻¹ g_k`` (all pairs by default): an outlier / misalignment score.

        ``method``:

        - ``"solve"``: ``H⁻¹ g_k`` by the solver, ``tangent_chunk`` pairs per solve (exact to the solver's
          accuracy; with CG, one iterative solve per block of pairs).
        - ``"factor"``: no solve per pair. One spectral factor of the damped curvature (the top ``rank``
          eigenpairs ``λ_j, v_j`` of ``C``, built once per fit: the solver's own for ``solver="lowrank"`` or CG's
          preconditioner) gives ``Σ_j (v_jᵀg_k)²/(λ_j + δ) + ||g_k − Σ_j (v_jᵀg_k) v_j||²/δ``: exact in the kept
          eigendirections, and the rest of ``g_k`` weighted by ``1/δ`` instead of ``1/(λ + δ)`` — too large by
          ``λ/δ`` in a dropped direction of eigenvalue ``λ`` (the factor's ``dropped_error`` is the RMS of that
          over the dropped spectrum, ``captured`` the share of ``||C + δI||_F²`` it reproduces; see
          :meth:`factor_summary`). Raise ``rank`` to tighten it. For :class:`~ecif_fast.LinearHeads` no per-pair
          parameter gradient is formed: the projections ``v_jᵀg_k`` of all pairs are one JVP pass with the ``rank``
          eigenvectors as tangents plus the embedding-space reductions, and ``||g_k||²`` is exact from ``B × B``
          Grams per batch (docs/math.md §4.1; the remainder ``||g_k||² − Σ_j (v_jᵀg_k)²`` then has an absolute
          error of about ``eps·||g_k||²``, see :meth:`_factor_self_influence`); other models stream ``g_k``.
        - ``"auto"`` (default): ``"solve"`` for ``solver="exact"`` (a direct solve per block is cheap), else
          ``"factor"``.

        Per-pair gradients are streamed (``tangent_chunk`` at a time), never held for all pairs. The all-pairs
        vector is computed once per :meth:`fit` and method, and reused.
        """
        method = self._self_influence_method(method)
        if indices is None:
            if method not in self._self_influence:
                self._self_influence[method] = self._self_influence_of(None, method)
            return self._self_influence[method].clone()
        return self._self_influence_of(indices, method)

    def _self_influence_method(self, method: str) -> str:
        method = check_choice(method, "method", ("auto", "factor", "solve"))
        if method == "auto":
            method = "solve" if self.solver_name == "exact" else "factor"
        return method

    @property
    def factor(self):
        """The spectral factor of ``C + δI`` (a :class:`~ecif_fast.solvers.LowRankSolver` of rank ``rank``) that
        factorised self-influence uses: the solver itself for ``solver="lowrank"``, CG's preconditioner, else
        built on first use (``(4 + 1)·(rank + 10)`` curvature products, deterministic under ``seed``)."""
        self._require_fit()
        if self._factor is None:
            from .solvers.lowrank import LowRankSolver

            own = self.solver if isinstance(self.solver, LowRankSolver) else getattr(self.solver, "preconditioner",
                                                                                      None)
            self._factor = own if isinstance(own, LowRankSolver) else LowRankSolver(
                self.curvature, self.damping, self.rank, self.seed, warn=False, remainder="mean")
        return self._factor

    def factor_summary(self) -> dict:
        """What the spectral factor keeps: ``{"rank", "captured", "dropped_error"}`` (see :attr:`factor`)."""
        return self.factor.summary()

    def _self_influence_of(self, indices, method: str) -> torch.Tensor:
        uniq, inverse = self._unique_pairs(indices)
        if method == "factor" and structured_norms_blocks(self.model, self.space.names) is not None:
            return self._factor_self_influence(uniq)[inverse]
        out = torch.empty(uniq.numel(), dtype=self.theta.dtype)
        blocks = self._gradient_blocks(uniq)
        if method == "factor":
            quadratic = self.factor.quadratic
        elif hasattr(self.solver, "quadratic"):
            quadratic = self.solver.quadratic
        else:
            def quadratic(G):
                return (G * self.solver.solve(G.T.contiguous()).T).sum(1)
        for rows, G in tqdm(blocks, desc="self-influence", disable=not self.progress, leave=False,
                            total=-(-uniq.numel() // self.tangent_chunk)):
            out[rows] = quadratic(G).to(out.dtype)
        return out[inverse]

    def _factor_self_influence(self, uniq: torch.Tensor) -> torch.Tensor:
        """Factorised self-influence of the pairs ``uniq`` (sorted, unique) without per-pair parameter gradients,
        for models whose gradient norms have a closed form (:func:`~ecif_fast.core.pair_norms.structured_norms_blocks`:
        plain :class:`~ecif_fast.LinearHeads`)::

            s_k = Σ_j a_kj²/(λ_j + δ) + max(||g_k||² − Σ_j a_kj², 0)/(λ̄ + δ),   a_kj = v_jᵀ g_k

        The projections ``a_kj`` are one influence query with the factor's ``r`` eigenvectors as directions (JVP
        pass + :func:`ops.ecif_reductions`, docs/math.md §4), streamed over chunks of whole batches of about
        ``chunk_size`` pairs (``r × chunk × d`` tangents alive); the norms ``||g_k||²`` are exact from ``B × B``
        Grams per batch (docs/math.md §4.1), in float64. The remainder is a difference of two sums, clamped at 0:
        its absolute error is about ``eps·||g_k||²`` with ``eps`` the precision of the projections (the model's
        dtype; the kernels accumulate float32 for float32 inputs), so it is relative to ``||g_k||²``, not to the
        remainder itself, when the factor holds nearly all of ``g_k`` (the G-based path of
        :meth:`LowRankSolver.quadratic` forms the remainder vector and has no such cancellation).
        """
        factor = self.factor
        blocks = structured_norms_blocks(self.model, self.space.names)
        named = {**{n: p.detach() for n, p in self.model.named_parameters()}, **self.space.unflatten(self.theta)}
        t = self.log_scale.exp()
        exact = self.negative_term == "exact"
        lam = factor.lam.double() + factor.damping
        rest = factor.rest + factor.damping
        wanted = torch.zeros(self.n, dtype=torch.bool)
        wanted[uniq] = True
        # whole batches, about chunk_size pairs per JVP pass and reduction call; only the chunks holding a wanted
        # pair, computed whole: the same numbers whichever pairs are asked for
        chunks = [(idx, plan) for idx, plan in pack_batches(self.plan.groups(), self.chunk_size)
                  if bool(wanted[idx].any())]
        value = torch.zeros(self.n, dtype=torch.float64)
        for idx, plan in tqdm(chunks, desc="self-influence", disable=not self.progress or len(chunks) < 2,
                              leave=False):
            batches = [idx[local] for local in plan.groups()]
            served = list(self.source.serve(batches, whole=True))
            X, Y = torch.cat([s[0] for s in served]), torch.cat([s[1] for s in served])
            dU, dV, ds = self._tangents(X, Y, factor.vecs.to(self.theta.dtype))
            pos, neg = ops.ecif_reductions(self.U[idx], self.V[idx], t, plan, dU, dV, ds, self.negative_term,
                                           backend=self.backend)
            del dU, dV
            A = (pos + neg).T.double()  # (m, r): a_kj = v_jᵀ g_k
            for local, g, (Xb, Yb) in zip(plan.groups(), batches, served):
                Xb, Yb = self.model.proj_input(Xb, "image"), self.model.proj_input(Yb, "text")
                norms = heads_pair_sq_norms(Xb, Yb, named["image_proj.weight"], named["text_proj.weight"],
                                            self.log_scale, normalize=blocks["normalize"], exact=exact,
                                            image=blocks["image"], text=blocks["text"], scale=blocks["scale"],
                                            norm_eps=blocks["norm_eps"])
                a = A[local]
                value[g] = (a * a / lam).sum(1) + (norms - (a * a).sum(1)).clamp_min(0) / rest
        self._check_finite(value)
        return value[uniq].to(self.theta.dtype)

    @cg_summary_per_call
    def relative_influence(self, test_images=None, test_texts=None, *, fn: TestFn | None = None,
                           per_test: bool = False) -> torch.Tensor:
        """RelatIF-style trace-back score ``∇Fᵀ H⁻¹ g_k / sqrt(g_kᵀ H⁻¹ g_k)`` (docs/math.md §3), shape as ``influence``."""
        return self.relative(self.influence(test_images, test_texts, fn=fn, per_test=per_test).total)

    def relative(self, total: torch.Tensor) -> torch.Tensor:
        """RelatIF normalisation of influences ``total (..., n_train)``: ``total / sqrt(g_kᵀ H⁻¹ g_k)``."""
        return total / self.self_influence().clamp_min(torch.finfo(total.dtype).tiny).sqrt()

    # ------------------------------------------------------------------ groups and removal
    def _group_objective(self, removed: torch.Tensor):
        """Batches touched by ``removed`` and a function ``(U_b…, V_b…, s) -> (positive, negative)``."""
        mask = torch.zeros(self.n, dtype=torch.bool)
        mask[removed] = True
        groups = [g for g in self.plan.groups() if bool(mask[g].any())]
        exact = self.negative_term == "exact"

        def objective(Us, Vs, s):
            pos = neg = 0.0
            for g, U, V in zip(groups, Us, Vs):
                p, q = removal_objective(s.exp() * (U @ V.T), mask[g], exact)
                pos, neg = pos + p, neg + q
            return pos, neg

        return groups, objective

    @cg_summary_per_call
    def group_influence(self, indices, test_images=None, test_texts=None, *, fn: TestFn | None = None,
                        per_test: bool = False) -> InfluenceResult:
        """Influence of removing the whole set ``indices`` at once (exact group formula, docs/math.md §3).

        ``indices``: ints in ``[0, n)`` or an ``(n,)`` boolean mask, distinct, not every pair; test pairs as in
        :meth:`influence`. Returns an :class:`InfluenceResult` of 0-d tensors (``(Q,)`` for several test
        functions).
        """
        self._require_fit()
        removed = self._removed(indices)
        Hq = self._solved_test_gradients(test_images, test_texts, fn, per_test)
        groups, objective = self._group_objective(removed)
        Us = [self.U[g] for g in groups]
        Vs = [self.V[g] for g in groups]
        pos, neg = [], []
        tangents = [self._tangents(X, Y, Hq) for X, Y in self.source.serve(groups)]  # per batch: (Q, B, d) ...
        for q in range(Hq.shape[1]):
            dUs = [t[0][q] for t in tangents]
            dVs = [t[1][q] for t in tangents]
            ds = tangents[0][2][q] if self.fm.scale_trained else torch.zeros_like(self.log_scale)
            _, (p, n_) = jvp(objective, (Us, Vs, self.log_scale), (dUs, dVs, ds.reshape(self.log_scale.shape)))
            pos.append(torch.as_tensor(p))
            neg.append(torch.as_tensor(n_))
        return self._result(torch.stack(pos), torch.stack(neg), Hq, fn, per_test)

    def group_gradient(self, indices) -> torch.Tensor:
        """``(P,)`` parameter-space ``g(D*) = g⁺(D*) + g⁻(D*)`` (docs/math.md §3) for the set ``indices``."""
        self._require_fit()
        removed = self._removed(indices)
        groups, objective = self._group_objective(removed)

        def total(Us, Vs, s):
            p, q = objective(Us, Vs, s)
            return p + q

        # embedding-space gradient from the stored embeddings, then one chunked VJP per touched batch
        gUs, gVs, gs = torch.func.grad(total, argnums=(0, 1, 2))(
            [self.U[g] for g in groups], [self.V[g] for g in groups], self.log_scale)
        out = torch.zeros(self.space.size, dtype=self.theta.dtype)
        for i, (gU, gV, (X, Y)) in enumerate(zip(gUs, gVs, self.source.serve(groups))):
            pull = ChunkedVJP(self.fm, self.theta, X, Y, self.chunk_size)
            out += pull(gU[None], gV[None], gs.reshape(1) if i == 0 else None)[0]
        return out

    @cg_summary_per_call
    def removal_update(self, indices) -> dict[str, torch.Tensor]:
        """Parameters after removing ``indices`` by one Newton step ``θ̂ + H⁻¹ g(D*)`` (docs/math.md §3).

        ``indices``: ints in ``[0, n)`` (list, tuple, set, tensor or array) or an ``(n,)`` boolean mask; distinct,
        and at least one pair must remain.

        Returns a full ``state_dict`` of the model (a copy) with the selected parameters updated.
        """
        theta_new = self._theta_after_removal(indices)
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        for name, val in self.space.unflatten(theta_new).items():
            state[name] = val.detach().clone()
        return state

    @cg_summary_per_call
    def embeddings_after_removal(self, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U, V, s)``: every training pair's embeddings ``(n, d)`` and the log scale at the removal update
        ``θ̂ + H⁻¹ g(D*)`` of :meth:`removal_update` (removed pairs included: their fit with them left out).
        From a DataLoader the inputs are read once more, chunk by chunk."""
        return self._embed_checked(self._theta_after_removal(indices), *self.source.everything("re-embed"), "train")

    def _theta_after_removal(self, indices) -> torch.Tensor:
        """``(P,)`` the one-Newton-step parameters without ``indices``: ``θ̂ + H⁻¹ g(D*)`` (docs/math.md §3)."""
        self._require_fit()
        return self.theta + self.solver.solve(self.group_gradient(indices))

    @cg_summary_per_call
    def cleaned_model(self, indices) -> nn.Module:
        """A deep copy of the model with :meth:`removal_update` loaded (the original is untouched)."""
        state = self.removal_update(indices)
        clone = copy.deepcopy(self.model)
        clone.load_state_dict(state)
        return clone

    # ------------------------------------------------------------------ saving (ecif_fast/state.py)
    def save(self, path, *, include_inputs: bool = True, overwrite: bool = True):
        """Save this fitted ECIF to the folder ``path`` (safetensors + JSON, no pickle; atomic), to be loaded by
        :meth:`load` without refitting. ``include_inputs=False`` leaves the training inputs out (then pass them
        to :meth:`load`). Returns the folder's absolute path. See :func:`ecif_fast.state.save_state`."""
        from .state import save_state

        return save_state(self, path, include_inputs=include_inputs, overwrite=overwrite)

    @classmethod
    def load(cls, path, model: nn.Module, train_images=None, train_texts=None, *, progress: bool = False,
             check: bool = True) -> "ECIF":
        """The ECIF saved at ``path`` by :meth:`save`, on ``model`` (the model it was fitted with, checked by
        fingerprint), without refitting; queries give bit-identical results. See
        :func:`ecif_fast.state.load_state`."""
        from .state import load_state

        return load_state(path, model, train_images, train_texts, progress=progress, check=check, cls=cls)
