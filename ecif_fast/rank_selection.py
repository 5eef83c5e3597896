"""Choosing how many whitened directions LinearHeads keep, by the pairs' loss with each pair left out
(docs/math.md §2.4).

Fewer whitened directions per side underfit; more let the heads memorise single captions, misaligned ones
included. :func:`choose_rank` trains :meth:`LinearHeads.from_features` heads at a ladder of ranks and keeps the
one whose approximate leave-one-out loss (``ECIF.held_out_fit``: each pair's loss with its own memorisation
taken out, docs/math.md §3.1) is lowest on average. No labels are used.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .core.batches import BatchesArg
from .engine import ECIF
from .errors import ECIFInputError
from .models.linear_heads import LinearHeads
from .options import DEFAULT_SOFT_NORM
from .training import TrainResult, train

#: the smallest rank tried
LADDER_START = 8
#: the held-out loss is averaged over at most this many pairs (a seeded random subset beyond)
HELD_OUT_PAIRS = 2048


@dataclass
class RankChoice:
    """Result of :func:`choose_rank`.

    Attributes:
        rank: the chosen rank (whitened directions per side at most). model: heads trained at that rank, in
            place of the caller's (the others are discarded). result: their :class:`~ecif_fast.training.TrainResult`.
        theta_ref: ``(P,)`` the chosen heads' start, the weight decay's reference.
        tried: one dict per rank tried, in order: ``rank``, ``parameters``, ``held_out_loss`` (mean over the
            scored pairs), ``loss``, ``grad_norm``, ``seconds``.
    """

    rank: int
    model: LinearHeads
    result: TrainResult
    theta_ref: torch.Tensor
    tried: list = field(default_factory=list)


def rank_ladder(span: int, start: int = LADDER_START) -> list[int]:
    """The powers of two and their halfway points ``3·2^k`` from ``start`` (8, 12, 16, 24, 32, 48, …) below
    ``span``, then ``span`` itself."""
    out, k = [], 1
    while True:
        for r in (2 ** k, 3 * 2 ** (k - 1)):
            if r >= span:
                return out + [span]
            if r >= start:
                out.append(r)
        k += 1


def choose_rank(images: torch.Tensor, texts: torch.Tensor, *, batches: BatchesArg, damping: float,
                embed_dim: int | None = None, max_embed: int = 64, ranks: list[int] | None = None,
                normalize: bool = True, logit_scale: float = math.log(1 / 0.07), train_scale: bool = False,
                soft_norm: float = DEFAULT_SOFT_NORM, method: str = "auto", max_iter: int = 200,
                tol: float = 1e-10, seed: int = 0, on_rank=None) -> RankChoice:
    """Train whitened heads at a ladder of ranks; keep the one of least mean approximate leave-one-out loss.

    Each rank ``r`` gets ``LinearHeads.from_features(images, texts, embed, max_rank=r)`` with
    ``embed = embed_dim or min(max_embed, r)``, trained by :func:`~ecif_fast.train` with weight decay ``damping``
    towards its start; then ``ECIF(model, damping, batches).held_out_fit()`` on at most :data:`HELD_OUT_PAIRS`
    pairs (the same seeded subset for every rank) gives each pair's loss with the pair left out, to first order.
    The ladder (:func:`rank_ladder` up to the larger side's span, where both sides keep all their directions,
    unless ``ranks`` is given) stops at the first rank whose mean is above the best so far (the curve falls while
    the heads underfit and rises once they memorise), and before a rank whose heads would have more parameters
    than there are pairs (where a pair's leverage approaches one and the first-order correction stops being a
    guide; the first rank is always tried).

    Args:
        images ``(n, Di)``, texts ``(n, Dt)``: the training pairs' features (float64 recommended).
        batches, damping: as in :func:`~ecif_fast.train`. on_rank: called with each ``tried`` entry as it is done.
        The remaining arguments as in :meth:`LinearHeads.from_features` and :func:`~ecif_fast.train`.
    Returns:
        :class:`RankChoice`.
    """
    X, Y = torch.as_tensor(images), torch.as_tensor(texts)
    if ranks is None:
        probe = LinearHeads.from_features(X, Y, 1, normalize=normalize, soft_norm=0.0)
        ranks = rank_ladder(max(probe.image_rank, probe.text_rank))
    if not ranks or any(not isinstance(r, int) or isinstance(r, bool) or r < 1 for r in ranks):
        raise ValueError(f"ranks must be a non-empty list of positive ints, got {ranks!r}")
    n = X.shape[0]
    scored = None
    if n > HELD_OUT_PAIRS:
        g = torch.Generator().manual_seed(seed)
        scored = torch.randperm(n, generator=g)[:HELD_OUT_PAIRS].sort().values
    best: RankChoice | None = None
    best_loss = math.inf
    tried: list[dict] = []
    for r in ranks:
        t0 = time.perf_counter()
        model = LinearHeads.from_features(X, Y, embed_dim or min(max_embed, r), normalize=normalize,
                                          logit_scale=logit_scale, train_scale=train_scale, max_rank=r,
                                          soft_norm=soft_norm)
        ref = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad]).clone()
        if tried and ref.numel() > n:
            break   # more parameters than pairs: the first-order held-out loss is no longer a guide
        res = train(model, X, Y, batches=batches, damping=damping, theta_ref=ref, method=method,
                    max_iter=max_iter, tol=tol)
        held = ECIF(model, damping=damping, batches=batches).fit(X, Y).held_out_fit(scored)
        entry = {"rank": r, "parameters": int(ref.numel()), "held_out_loss": float(held["loss_held_out"].mean()),
                 "loss": res.loss, "grad_norm": res.grad_norm, "seconds": time.perf_counter() - t0}
        tried.append(entry)
        if on_rank is not None:
            on_rank(entry)
        if not entry["held_out_loss"] < best_loss:
            break
        best, best_loss = RankChoice(r, model, res, ref), entry["held_out_loss"]
    if best is None:
        raise ECIFInputError(f"the held-out loss at rank {ranks[0]} is not finite ({tried[0]['held_out_loss']}): "
                             "training did not reach a usable optimum; check the features or raise the damping")
    best.tried = tried
    return best
