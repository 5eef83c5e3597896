"""Peer influence libraries run on an evaluation :class:`Problem`, in our convention (docs/math.md §3).

Every adapter returns ``(scores, seconds, details)``: ``scores`` ``(n,)`` float64, the predicted change of F (the
validation pairs' contrastive loss as one batch) when training pair k is removed (> 0: the pair is valuable);
``seconds`` the wall time of the peer's own computation; ``details`` a dict (settings and, with ``compare=True``,
the agreement with ECIF on the same problem, computed outside the timed part).

- :func:`dattri_positive_only`: dattri's ``IFAttributorExplicit`` (classical influence functions, dense Hessian):
  ``∇Fᵀ H⁻¹ ∇ℓ_k`` with ℓ_k pair k's own term in its fixed batch and ``H = ∇²Σ_k ℓ_k + δI`` = ECIF's ``positive``;
- :func:`trak_scores`: TRAK's CLIP task (traker), one checkpoint, summed over the validation pairs;
- :func:`kronfluence_scores`: kronfluence EKFAC (and its diagonal / identity strategies) on the batch loss.

The model may be anything with ``encode_image``, ``encode_text`` and ``logit_scale`` (LinearHeads, a wrapped CLIP
with LoRA); the differentiated parameters are ``problem.params`` (:func:`ecif_fast.models.params.select_params`).
"""
from __future__ import annotations

import copy
import logging
import math
import tempfile
import time
import warnings
from importlib.metadata import version

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import ecif_fast as ef
from ecif_fast.core.loss import batch_loss, contrastive_loss
from ecif_fast.models.params import select_params

from .problems import Problem
from .stats import pearson, spearman


class CLIPCall(nn.Module):
    """``net(image, text) -> (u, v, t)`` with ``t = exp(logit_scale)``: the open_clip call TRAK's CLIP task is written
    for; the wrapped model's parameters are named ``m.<name>``."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, image, text):
        u, v, s = self.m.encode_image(image), self.m.encode_text(text), self.m.logit_scale
        return u, v, (s if torch.is_tensor(s) else torch.tensor(s, dtype=u.dtype)).exp()


def _need(pip: str, what: str):
    return ImportError(f"{what} needs the peer library `{pip}`: pip install {pip} "
                       "(or every peer at its tested release: pip install \"ecif-fast[eval]\")")


def _selected(problem: Problem):
    """A :class:`CLIPCall` over a copy of the model in which exactly the selected parameters require grad, and
    their :class:`ParamSpace` (names relative to the model)."""
    m = copy.deepcopy(problem.model).eval()
    space = select_params(m, problem.params)
    for n, p in m.named_parameters():
        p.requires_grad_(n in space.names)
    return CLIPCall(m), space


def _validation_loss(call, Xv, Yv) -> torch.Tensor:
    """F: the docs/math.md §2 loss of the validation pairs as one batch; ``call(x, y) -> (u, v, t)``."""
    u, v, t = call(Xv, Yv)
    return batch_loss(t * (u @ v.T))


def _ecif(problem: Problem):
    """ECIF's influence on F (exact negative term): the reference of ``compare=True``."""
    return problem.ecif().influence(problem.Xv, problem.Yv)


def _agreement(scores: torch.Tensor, ref) -> dict:
    """Pearson / Spearman of ``scores`` with ECIF's total and positive part."""
    return {"pearson_total": pearson(scores, ref.total), "spearman_total": spearman(scores, ref.total),
            "pearson_positive": pearson(scores, ref.positive), "spearman_positive": spearman(scores, ref.positive)}


# ---------------------------------------------------------------------------------------------- dattri
def dattri_positive_only(problem: Problem, *, compare: bool = True):
    """Classical influence functions by dattri's ``IFAttributorExplicit``: ``(n,)`` ``∇Fᵀ H⁻¹ ∇ℓ_k``.

    dattri's "data" is the pair index k: its per-sample loss is ℓ_k (docs/math.md §2, row + column term) inside k's fixed
    batch (padded to the largest batch, padding masked out), and its full-data loss (the one it takes the Hessian
    of) is ``Σ_k ℓ_k`` over all batches, a sum as in R; ``regularization=δ`` makes ``H = ∇²R``. dattri's score
    ``∇ℓ_kᵀ H⁻¹ ∇F`` is already "the change of F when k is removed" (``θ̂_{−k} − θ̂ ≈ H⁻¹∇ℓ_k``): no sign flip.
    details: ``max_rel_diff`` against ECIF's ``positive`` (max |diff| / max |ECIF|) with ``compare=True``.
    """
    try:
        from dattri.algorithm.influence_function import IFAttributorExplicit
        from dattri.task import AttributionTask
    except ImportError as e:
        raise _need("dattri", "dattri_positive_only") from e

    net, space = _selected(problem)
    X, Y, n = problem.X, problem.Y, problem.n
    plan = ef.resolve_batches(problem.batch_ids, n)
    groups = plan.groups()
    width = max(len(g) for g in groups)
    members = torch.zeros(n, width, dtype=torch.long)  # k's batch, padded with pair 0 (masked out)
    valid = torch.zeros(n, width, dtype=torch.bool)
    pos = torch.zeros(n, dtype=torch.long)  # k's place in its batch
    for g in groups:
        members[g, :len(g)] = g
        valid[g, :len(g)] = True
        pos[g] = torch.arange(len(g))

    def loss(params, data):
        k = data[0].reshape(-1)
        if k.numel() == 1:  # dattri's per-sample gradient (vmapped over k, shape (1,)): ℓ_k from k's batch only
            rows = members[k].reshape(-1)
            u, v, t = torch.func.functional_call(net, params, (X[rows], Y[rows]))
            S = t * (u @ v.T)
            mask = torch.where(valid[k].reshape(-1), 0.0, -math.inf).to(S.dtype)
            e = (torch.arange(width) == pos[k]).to(S.dtype)  # one-hot of k's place in its batch
            return torch.logsumexp(e @ S + mask, 0) + torch.logsumexp(S @ e + mask, 0) - 2 * (e @ S @ e)
        if k.numel() != n:  # dattri's full-data loss, the one it takes the Hessian of: Σ_k ℓ_k over all batches
            raise ValueError("the full-data loss must hold every training pair")
        u, v, t = torch.func.functional_call(net, params, (X, Y))
        return contrastive_loss(u, v, t, plan)

    def target(params, data):
        return _validation_loss(lambda x, y: torch.func.functional_call(net, params, (x, y)),
                                problem.Xv, problem.Yv)

    t0 = time.perf_counter()
    task = AttributionTask(loss_func=loss, model=net, checkpoints=net.state_dict(), target_func=target)
    attributor = IFAttributorExplicit(task=task, regularization=problem.damping)
    idx = DataLoader(TensorDataset(torch.arange(n)), batch_size=n, shuffle=False)
    attributor.cache(idx)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # dattri accumulates its score matrix in the default dtype
    try:
        raw = attributor.attribute(idx, DataLoader(TensorDataset(torch.zeros(1)), batch_size=1))
    finally:
        torch.set_default_dtype(default)
    seconds = time.perf_counter() - t0
    scores = raw[:, 0].detach().double()
    details = {"version": version("dattri"), "P": space.size}
    if compare:
        ref = _ecif(problem)
        pos = ref.positive.double()
        details["max_rel_diff"] = float((scores - pos).abs().max() / pos.abs().max())
        details.update(_agreement(scores, ref))
    return scores, seconds, details


# ---------------------------------------------------------------------------------------------- TRAK
def _call(name, fn, *args, **kwargs):
    return fn(*args, **kwargs)


def trak_clip(model: nn.Module, names, X, Y, Xv, Yv, *, batch: int, proj_dim: int, seed: int,
              projector_seed: int = 0, lambda_reg: float = 0.0, run=_call):
    """TRAK's CLIP task (traker 0.3.2, ``CLIPModelOutput``, one checkpoint) on CPU: ``(scores (n, n_val), details)``.

    ``names``: the parameters of ``model`` to differentiate (the others are held fixed, whatever their
    ``requires_grad``); ``batch``: pairs per featurize / score call and TRAK's simulated batch size (capped at
    n − 1); ``seed`` seeds TRAK's sampling of simulated batches (``torch.multinomial``); ``lambda_reg``: TRAK's
    ridge on XᵀX (0: TRAK's default, then ``proj_dim`` must stay well below n); ``run(stage, fn, *args)``
    calls ``fn`` (a benchmark may time each stage through it). TRAK's score of (k, j) is how much training on k
    raises validation pair j's correct-match margin. Four traker 0.3.2 workarounds are marked below.
    """
    try:
        from trak import TRAKer
        from trak.gradient_computers import FunctionalGradientComputer
        from trak.modelout_functions import CLIPModelOutput
    except ImportError as e:
        raise _need("traker", "TRAK") from e

    class SelectedGradientComputer(FunctionalGradientComputer):
        """(1) traker's FunctionalGradientComputer differentiates with respect to *every* named parameter and only
        then drops those outside ``grad_wrt`` (151 M per-sample gradients per pair for a ViT-B/32 CLIP); this one
        passes the other parameters as buffers, so only the ``grad_wrt`` weights are differentiated."""

        def __init__(self, model, task, grad_dim, dtype, device, grad_wrt=None):
            self.grad_wrt = grad_wrt
            super().__init__(model, task, grad_dim, dtype, device, grad_wrt)

        def load_model_params(self, model):
            wrt = set(self.grad_wrt)
            named = dict(model.named_parameters())
            self.func_weights = {n: p for n, p in named.items() if n in wrt}
            self.func_buffers = {**dict(model.named_buffers()),
                                 **{n: p.detach() for n, p in named.items() if n not in wrt}}

    class CLIPOutput(CLIPModelOutput):
        """(2) traker 0.3.2's CLIPModelOutput returns the out-to-loss weights as ``(B,)`` where its saver stores
        ``(B, 1)`` (its other tasks unsqueeze), so featurize fails; this returns ``(B, 1)``."""

        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            return super().get_out_to_loss_grad(model, weights, buffers, batch).reshape(-1, 1)

    net = CLIPCall(model).eval()
    wrt = ["m." + n for n in names]
    n, nv = X.shape[0], Xv.shape[0]
    task = CLIPOutput(simulated_batch_size=min(batch, n - 1))  # TRAK never samples pair 0 (see trak_scores)

    def pool():  # (3) CLIPModelOutput.get_embeddings, on CPU (traker's version allocates with .cuda())
        with torch.no_grad():
            outs = [net(X[a:a + batch], Y[a:a + batch]) for a in range(0, n, batch)]
        CLIPModelOutput.image_embeddings = torch.cat([o[0] for o in outs])
        CLIPModelOutput.text_embeddings = torch.cat([o[1] for o in outs])
        CLIPModelOutput.num_computed_embeddings = n

    try:
        with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            traker = TRAKer(model=net, task=task, train_set_size=n, save_dir=tmp, device="cpu",
                            gradient_computer=SelectedGradientComputer, proj_dim=proj_dim,
                            projector_seed=projector_seed, use_half_precision=False, grad_wrt=wrt,
                            lambda_reg=lambda_reg, logging_level=logging.WARNING)
            run("TRAK: embedding pool", pool)

            def featurize():
                traker.load_checkpoint(net.state_dict(), model_id=0)
                for a in range(0, n, batch):
                    traker.featurize(batch=(X[a:a + batch], Y[a:a + batch]), num_samples=min(batch, n - a))

            run("TRAK: featurize", featurize)
            run("TRAK: finalize features", traker.finalize_features)

            def score():
                pj = traker.projector  # (4) finalize_features frees a one-block projector's matrix and score
                if not getattr(pj, "proj_matrix_available", True) and pj.num_blocks == 1:  # doesn't remake it
                    pj.generate_sketch_matrix(pj.generator_states[0])
                traker.start_scoring_checkpoint(exp_name="val", checkpoint=net.state_dict(), model_id=0,
                                                num_targets=nv)
                for a in range(0, nv, batch):
                    traker.score(batch=(Xv[a:a + batch], Yv[a:a + batch]), num_samples=min(batch, nv - a))

            run("TRAK: score", score)
            scores = run("TRAK: finalize scores", traker.finalize_scores, exp_name="val")
            scores = torch.as_tensor(scores.copy()).double()
    finally:
        for attr in ("image_embeddings", "text_embeddings"):
            setattr(CLIPModelOutput, attr, None)
    return scores, {"version": version("traker"), "P": traker.num_params_for_grad, "sim_batch": task.sim_batch_size,
                    "proj_dim": proj_dim, "lambda_reg": lambda_reg}


def trak_scores(problem: Problem, proj_dim: int = 32, seed: int = 0, *, lambda_reg: float = 0.0,
                compare: bool = True):
    """TRAK (one checkpoint, the trained model) on the selected parameters: ``(n,)`` Σ over validation pairs.

    TRAK scores how much training on pair k raises the validation pairs' correct-match margins (its CLIP output
    function, no temperature), i.e. lowers their loss; removing k raises F: the same sign as ours, so the score is
    TRAK's (n, n_val) matrix summed over the targets, unscaled (TRAK's units are not F's). Simulated batch size: the
    largest training batch (n − 1 at most; traker samples it with weights ∝ the pair index, so pair 0 is never
    a simulated negative). ``proj_dim`` is capped at the parameter count; ``seed`` seeds the projection and the
    simulated batches. TRAK computes in float32 (traker stores float16 or float32 features).
    """
    net, space = _selected(problem)
    batch = int(torch.bincount(problem.batch_ids).max())
    proj_dim = min(proj_dim, space.size)
    t0 = time.perf_counter()
    raw, details = trak_clip(net.m, space.names, problem.X, problem.Y, problem.Xv, problem.Yv, batch=batch,
                             proj_dim=proj_dim, seed=seed, projector_seed=seed, lambda_reg=lambda_reg)
    seconds = time.perf_counter() - t0
    scores = raw.sum(1)
    details["finite"] = bool(torch.isfinite(raw).all())
    if compare:
        details.update(_agreement(scores, _ecif(problem)))
    return scores, seconds, details


# ---------------------------------------------------------------------------------------------- kronfluence
class _Items(Dataset):
    """One item ``(X[g], Y[g])`` per group of pairs (a fixed batch; the validation set as one), read one at a time."""

    def __init__(self, X, Y, groups):
        self.X, self.Y, self.groups = X, Y, groups

    def __len__(self):
        return len(self.groups)

    def __getitem__(self, i):
        return self.X[self.groups[i]], self.Y[self.groups[i]]


def _first(items):
    return items[0]


def kronfluence_scores(problem: Problem, strategies=("ekfac", "diagonal", "identity"), *, seed: int = 0,
                       empirical_fisher: bool = False, compare: bool = True):
    """kronfluence (EKFAC first; also ``"diagonal"``, ``"identity"``, ``"kfac"``) with F as the measurement.

    The train loss of a kronfluence "batch" is ``L_b = Σ_{k∈b} ℓ_k`` of one whole fixed batch (its dataset has one
    item per batch), so the negatives are right. kronfluence forms per-sample gradients from its hooks on the
    tracked ``nn.Linear`` modules, row by row of the batch: for LinearHeads ``g̃_k = (∂L_b/∂u_k) x_kᵀ ⊕
    (∂L_b/∂v_k) y_kᵀ`` (the same at every tracked layer in general), the part of ``∇L_b`` that flows through pair
    k's own embeddings. It splits ``∇L_b`` by embedding where ``Σ_k ∇ℓ_k`` splits it by loss term: ``g̃_k`` holds
    k's own terms ℓ_k only through u_k and v_k (not through the other pairs' embeddings in ℓ_k's denominators)
    plus the other pairs' terms through u_k and v_k (k as their negative), so it mixes both roles; it is neither
    ``∇ℓ_k`` nor ECIF's ``g_k = ∇L_b − ∇L_{b∖k}``. Its curvature is the (E)K-FAC approximation of
    ``(1/n) Σ_k g̃_k g̃_kᵀ`` for the loss with targets sampled from the model (row targets ~ p, column targets ~ q;
    seeded; ``empirical_fisher=True``: the true targets), not ECIF's Hessian. ``damping_factor = δ / n`` and the
    raw score ``/ n`` give ``∇Fᵀ (Σ_k g̃_k g̃_kᵀ + δI)⁻¹ g̃_k`` in F's units; kronfluence's score
    ``∇Fᵀ H⁻¹ g̃_k`` is already "the change of F when k is removed" (no sign flip). ``"identity"`` is
    ``∇Fᵀ g̃_k`` (no curvature, no damping, raw).

    Returns the first strategy's ``(n,)`` scores and seconds; details["strategies"] holds every strategy's scores,
    seconds and (``compare=True``) Pearson / Spearman against ECIF.
    """
    try:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task
        from kronfluence.utils.dataset import DataLoaderKwargs
    except ImportError as e:
        raise _need("kronfluence", "kronfluence_scores") from e

    net, space = _selected(problem)
    wrt = {"m." + name for name in space.names}
    tracked = [m for m, mod in net.named_modules() if isinstance(mod, nn.Linear) and f"{m}.weight" in wrt]
    outside = wrt - {f"{m}.{p}" for m in tracked for p in ("weight", "bias")}
    frozen_bias = [m for m in tracked if net.get_submodule(m).bias is not None and f"{m}.bias" not in wrt]
    if outside or frozen_bias:
        raise ValueError("kronfluence differentiates whole nn.Linear modules (weight and bias); selected parameters "
                         f"outside them: {sorted(outside)}, tracked modules with a frozen bias: {frozen_bias}")
    n = problem.n
    groups = ef.resolve_batches(problem.batch_ids, n).groups()

    class Contrastive(Task):
        def compute_train_loss(self, batch, model, sample=False):
            u, v, t = model(*batch)
            S = t * (u @ v.T)
            if not sample:
                return batch_loss(S)
            with torch.no_grad():  # true Fisher: each row / column term's target drawn from its softmax
                rows = torch.multinomial(S.softmax(1), 1).flatten()
                cols = torch.multinomial(S.softmax(0).T, 1).flatten()
            ce = nn.functional.cross_entropy
            return ce(S, rows, reduction="sum") + ce(S.T, cols, reduction="sum")

        def compute_measurement(self, batch, model):
            return _validation_loss(model, *batch)

        def get_influence_tracked_modules(self):
            return tracked

    task = Contrastive()
    net = prepare_model(net, task)
    train = _Items(problem.X, problem.Y, groups)
    query = _Items(problem.Xv, problem.Yv, [torch.arange(problem.Xv.shape[0])])
    loader = DataLoaderKwargs(collate_fn=_first)
    f64 = torch.float64
    order = torch.cat(groups)
    out = {}
    ref = _ecif(problem) if compare else None
    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # kronfluence 1.0.1 builds torch.cuda.amp.GradScaler
        analyzer = Analyzer(analysis_name="peer", model=net, task=task, cpu=True, disable_tqdm=True,
                            output_dir=tmp, log_level=logging.WARNING)
        for strategy in strategies:
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            analyzer.fit_all_factors(
                factors_name=strategy, dataset=train, per_device_batch_size=1, dataloader_kwargs=loader,
                overwrite_output_dir=True, factor_args=FactorArguments(
                    strategy=strategy, use_empirical_fisher=empirical_fisher, activation_covariance_dtype=f64,
                    gradient_covariance_dtype=f64, eigendecomposition_dtype=f64, per_sample_gradient_dtype=f64,
                    lambda_dtype=f64))
            analyzer.compute_pairwise_scores(
                scores_name=strategy, factors_name=strategy, query_dataset=query, train_dataset=train,
                per_device_query_batch_size=1, per_device_train_batch_size=1, dataloader_kwargs=loader,
                overwrite_output_dir=True, score_args=ScoreArguments(
                    damping_factor=problem.damping / n, aggregate_query_gradients=True,
                    per_sample_gradient_dtype=f64, precondition_dtype=f64, score_dtype=f64))
            raw = analyzer.load_pairwise_scores(strategy)["all_modules"]
            seconds = time.perf_counter() - t0
            scores = torch.empty(n, dtype=f64)
            scores[order] = raw.reshape(-1).double() / (1 if strategy == "identity" else n)
            out[strategy] = {"scores": scores, "seconds": seconds}
            if compare:
                out[strategy].update(_agreement(scores, ref))
    main = out[strategies[0]]
    return main["scores"], main["seconds"], {"version": version("kronfluence"), "tracked_modules": tracked,
                                             "strategies": out}
