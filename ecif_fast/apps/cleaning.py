"""Cleaning: the model without some training pairs, by the closed-form ECIF update or by retraining."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..engine import ECIF
from ..training import train
from ..validation import check_indices


@dataclass
class Cleaning:
    """Result of :func:`clean`.

    Attributes:
        model: copy of the model with the ECIF removal update ``θ̂ + H⁻¹g(D*)`` (docs/math.md §3).
        retrained: copy retrained without the pairs (warm start from θ̂), or None.
        removed: ``(K,)`` indices of the removed pairs.
        timings_s: ``{"ecif_update": s, "retrain": s}``.
        table: pandas DataFrame, one row per setting (``no removal``, ``ECIF update``, ``retrain``) with the
            evaluation metrics and the time each setting took.
    """

    model: nn.Module
    retrained: nn.Module | None
    removed: torch.Tensor
    timings_s: dict[str, float] = field(default_factory=dict)
    table: object = None


def clean(ecif: ECIF, remove, *, retrain: bool = False, train_kwargs: dict | None = None,
          evaluate: Callable[[nn.Module], dict] | None = None) -> Cleaning:
    """Remove training pairs from a fitted model without retraining (and optionally by retraining).

    Args:
        ecif: a fitted :class:`~ecif_fast.ECIF` (its damping and batches are those of training).
        remove: indices (or an ``(n,)`` bool mask) of the pairs to remove.
        retrain: also retrain on the remaining pairs with the same batches and damping, starting from θ̂
            (:func:`ecif_fast.train` takes tensors: for an ECIF fitted from a DataLoader the remaining pairs'
            inputs are gathered in memory by one pass over it).
        train_kwargs: extra arguments of :func:`ecif_fast.train` (e.g. ``theta_ref``, ``method``, ``max_iter``).
        evaluate: ``evaluate(model) -> {metric: float}`` (e.g. zero-shot accuracy) for the table.
    """
    import pandas as pd

    removed = check_indices(remove, ecif.n)
    t0 = time.perf_counter()
    model = ecif.cleaned_model(removed)
    timings = {"ecif_update": time.perf_counter() - t0}
    retrained = None
    if retrain:
        keep = torch.ones(ecif.n, dtype=torch.bool)
        keep[removed] = False
        retrained = copy.deepcopy(ecif.model)
        kwargs = {"method": "auto", **(train_kwargs or {})}
        t0 = time.perf_counter()
        X, Y = ecif.source.take(keep.nonzero().flatten())
        train(retrained, X, Y, batches=ecif.plan.batch_ids()[keep], damping=ecif.damping,
              params=list(ecif.space.names), **kwargs)
        timings["retrain"] = time.perf_counter() - t0
    rows = [("no removal", ecif.model, 0.0), ("ECIF update", model, timings["ecif_update"])]
    if retrained is not None:
        rows.append(("retrain", retrained, timings["retrain"]))
    records = []
    for name, m, secs in rows:
        with torch.no_grad():
            metrics = dict(evaluate(m)) if evaluate is not None else {}
        records.append({"setting": name, **metrics, "time_s": secs})
    return Cleaning(model, retrained, removed, timings, pd.DataFrame(records))
