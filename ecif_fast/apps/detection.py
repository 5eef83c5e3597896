"""Misalignment detection: rank training pairs by how likely their caption does not fit the image.

Scores are "higher = more suspicious". ECIF scorings (docs/math.md §3):

- ``"cleaned"`` (the default): each pair's loss after the most suspicious pairs are removed by the closed-form
  update ``θ̂ + H⁻¹ g(D*)`` (docs/math.md §3.2): ``D*`` the :data:`CLEAN_FRACTION` of pairs with the highest
  loss held out (``ECIF.held_out_fit``), then re-ranked by their loss at the cleaned parameters, for
  :data:`CLEAN_ROUNDS` rounds. A misaligned pair pulls the fit towards itself and the other misaligned pairs
  of its kind; with them removed its loss no longer hides behind that pull. Needs no validation data;
- ``"validation"``: ``−I_F(k)`` with ``F`` the loss on trusted validation pairs (removing a misaligned
  pair lowers the validation loss, so its influence is negative);
- ``"self"``: self-influence ``g_kᵀH⁻¹g_k`` (no validation data needed);
- ``"combined"``: the mean of the two scores' percentile ranks.

Baselines computed alongside: ``clip_score`` (``−cos(u_k, v_k)``), ``loss`` (the pair's training loss
``ℓ_k`` in its batch) and ``positive_only`` (``−`` the positive-role part: classical influence).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..options import SCORING_METHODS, SCORINGS
from ..engine import ECIF
from ..errors import ECIFInputError
from ..core.loss import per_pair_loss
from ..solvers.cg import cg_summary
from .metrics import detection_metrics
from .pairs import PairInfo, score_table



@dataclass
class Detection:
    """Result of :func:`detect_misaligned`.

    Attributes:
        table: pandas DataFrame, one row per pair in pair order: metadata, ``score`` (the primary scoring),
            ``rank`` (1 = most suspicious), one column per computed score, the influence parts.
        scores: ``method -> (n,)`` numpy scores, higher = more suspicious (ECIF scorings and baselines).
        metrics: ``method -> {"auroc", "average_precision", "precision_at_k", "k"}`` when labels were given.
    """

    table: object
    scores: dict[str, np.ndarray]
    metrics: dict[str, dict[str, float]] | None

    def top(self, k: int):
        """The ``k`` most suspicious rows of the table."""
        return self.table.sort_values("rank").head(k)


def _percentile_rank(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    r = np.empty(x.size)
    r[order] = np.arange(x.size)
    return r / max(x.size - 1, 1)


#: ``"cleaned"`` scoring: the share of pairs removed in each round, and the rounds (docs/math.md §3.2)
CLEAN_FRACTION = 0.2
CLEAN_ROUNDS = 2


def _batch_losses(ecif: ECIF, U: torch.Tensor, V: torch.Tensor, log_scale: torch.Tensor) -> np.ndarray:
    """``(n,)`` each pair's loss ``ℓ_k`` in its training batch, from embeddings ``U, V (n, d)``, in float64."""
    U, V = U.double(), V.double()
    t = log_scale.detach().double().exp()
    loss = torch.empty(ecif.n, dtype=torch.float64)
    for g in ecif.plan.groups():
        loss[g] = per_pair_loss(t * (U[g] @ V[g].T))
    return loss.numpy()


def cleaned_scores(ecif: ECIF, first: np.ndarray | None = None, *, fraction: float = CLEAN_FRACTION,
                   rounds: int = CLEAN_ROUNDS) -> np.ndarray:
    """``(n,)`` each pair's loss in its batch at ``θ̂ + H⁻¹ g(D*)``, ``D*`` the ``fraction`` of pairs ranked most
    suspicious by ``first`` (default: the loss held out, ``ECIF.held_out_fit``), re-ranked ``rounds`` times by
    the last scores (docs/math.md §3.2). Higher = more suspicious."""
    if not 0 < fraction < 1 or not isinstance(rounds, int) or rounds < 1:
        raise ECIFInputError(f"fraction must be in (0, 1) and rounds a positive int, got {fraction!r}, {rounds!r}")
    scores = ecif.held_out_fit()["loss_held_out"].double().numpy() if first is None else np.asarray(first)
    k = min(max(1, round(fraction * ecif.n)), ecif.n - 1)
    for _ in range(rounds):
        flagged = torch.from_numpy(np.argsort(-scores, kind="stable")[:k].copy())
        scores = _batch_losses(ecif, *ecif.embeddings_after_removal(flagged))
    return scores


def baseline_scores(ecif: ECIF) -> dict[str, np.ndarray]:
    """``clip_score`` (−pair cosine) and ``loss`` (per-pair training loss) at θ̂, higher = more suspicious."""
    U, V = ecif.U.double(), ecif.V.double()
    cos = (U * V).sum(1) / (U.norm(dim=1) * V.norm(dim=1)).clamp_min(1e-30)
    return {"clip_score": (-cos).numpy(), "loss": _batch_losses(ecif, U, V, ecif.log_scale)}


def detect_misaligned(ecif: ECIF, val_images=None, val_texts=None, *, scoring=None, labels=None,
                      k: int | None = None, info: PairInfo | None = None) -> Detection:
    """Rank the training pairs of a fitted ECIF by how likely they are misaligned.

    Args:
        ecif: a fitted :class:`~ecif_fast.ECIF`.
        val_images, val_texts: ``(m, ...)`` trusted validation pairs (needed by ``"validation"`` and
            ``"combined"``).
        scoring: ``"cleaned"``, ``"validation"``, ``"self"``, ``"combined"``, or a list of them (the first is
            the primary ``score``; every one gets a ``score_<method>`` column and metrics). Default
            ``"cleaned"``, with or without validation pairs (as ``ecif-fast detect``; docs/math.md §3.2); given
            validation pairs it also computes the ``"validation"`` score as a second column.
        labels: optional ``(n,)`` bool, True = known misaligned: adds AUROC, average precision and
            precision@k for every score.
        k: the k of precision@k (default: the number of misaligned pairs).
        info: metadata carried into the table.
    """
    with cg_summary(ecif, "detect_misaligned"):   # one warning for all of its solves
        return _detect(ecif, val_images, val_texts, scoring, labels, k, info)


def _detect(ecif, val_images, val_texts, scoring, labels, k, info) -> Detection:
    if scoring is None:
        scoring = ["cleaned", "validation"] if val_images is not None and val_texts is not None else "cleaned"
    wanted = [scoring] if isinstance(scoring, str) else list(scoring)
    if not wanted or any(s not in SCORINGS for s in wanted):
        raise ECIFInputError(f"scoring must be one of {list(SCORINGS)} or a list of them, got {scoring!r}")
    need_val = any(s in ("validation", "combined") for s in wanted)
    if need_val and (val_images is None or val_texts is None):
        raise ECIFInputError(f"scoring {scoring!r} needs trusted validation pairs: pass val_images and "
                             "val_texts, or use scoring='cleaned' (the default) or 'self'")
    scores: dict[str, np.ndarray] = {}
    columns: dict[str, np.ndarray] = {}
    if need_val:
        res = ecif.influence(val_images, val_texts)
        columns.update(total=res.total, positive=res.positive, negative=res.negative)
        val_score = (-res.total).double().numpy()
        scores["positive_only"] = (-res.positive).double().numpy()
    if any(s in ("self", "combined") for s in wanted):
        self_inf = ecif.self_influence().double().numpy()
        columns["self_influence"] = self_inf
    for s in wanted:
        name = SCORING_METHODS[s]
        if s == "cleaned":
            scores[name] = cleaned_scores(ecif)
        elif s == "validation":
            scores[name] = val_score
        elif s == "self":
            scores[name] = self_inf
        else:
            scores[name] = 0.5 * (_percentile_rank(val_score) + _percentile_rank(self_inf))
    scores.update(baseline_scores(ecif))
    primary = scores[SCORING_METHODS[wanted[0]]]
    rank = np.empty(ecif.n, dtype=np.int64)
    rank[np.argsort(-primary, kind="stable")] = np.arange(1, ecif.n + 1)
    table = score_table(ecif.n, info, {"score": primary, **columns,
                                        **{f"score_{m}": v for m, v in scores.items()}})
    table.insert(table.columns.get_loc("score") + 1, "rank", rank)
    metrics = None
    if labels is not None:
        y = labels.detach().cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)
        if y.shape != (ecif.n,):
            raise ECIFInputError(f"labels must have one entry per training pair ({ecif.n}), got shape {y.shape}")
        table["misaligned"] = y.astype(bool)
        metrics = {m: detection_metrics(v, y, k) for m, v in scores.items()}
    return Detection(table, scores, metrics)
