"""Misprediction trace-back: which training pairs are responsible for a test prediction (docs/math.md §1, §3).

For each test function ``F_j`` (the loss of a test pair, or the zero-shot loss of a test image at its
true class) the score of training pair ``k`` is the RelatIF-style relative influence
``I_j(k) / sqrt(g_kᵀH⁻¹g_k)``. Removing a pair with a negative score lowers ``F_j``: such pairs pushed the
model towards the wrong answer, so the most negative scores are the most responsible pairs.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..engine import ECIF
from ..errors import ECIFInputError
from ..validation import check_tensor
from .pairs import PairInfo


def zero_shot_logits(model: nn.Module, images: torch.Tensor, class_texts: torch.Tensor) -> torch.Tensor:
    """``(m, C)`` zero-shot logits ``t·<u_j, v_c>`` of ``images (m, ...)`` against class prompts ``(C, ...)``."""
    return model.logit_scale.exp() * (model.encode_image(images) @ model.encode_text(class_texts).T)


def zero_shot_losses(images, labels, class_texts) -> list[Callable[[nn.Module], torch.Tensor]]:
    """One test function per image: the zero-shot cross-entropy at its class ``labels[j]``.

    Args:
        images: ``(m, ...)`` test images. labels: ``(m,)`` class index of each. class_texts: ``(C, ...)``
            one text input (prompt features) per class.
    Returns:
        ``m`` callables ``fn(model) -> scalar`` for :meth:`ECIF.influence` (``fn=``).
    """
    images = check_tensor(images, "test_images")
    class_texts = check_tensor(class_texts, "class_texts")
    labels = torch.as_tensor(labels).reshape(-1).to(torch.int64)
    if labels.numel() != images.shape[0]:
        raise ECIFInputError(f"labels must have one entry per test image ({images.shape[0]}), got {labels.numel()}")
    if bool((labels < 0).any()) or bool((labels >= class_texts.shape[0]).any()):
        raise ECIFInputError(f"labels must lie in [0, {class_texts.shape[0]}) (one class prompt each)")

    def make(j: int):
        def fn(model):
            logits = zero_shot_logits(model, images[j:j + 1], class_texts)
            return torch.nn.functional.cross_entropy(logits, labels[j:j + 1], reduction="sum")
        return fn

    return [make(j) for j in range(images.shape[0])]


def trace_back(ecif: ECIF, test_images=None, test_texts=None, *, fn: Sequence[Callable] | None = None,
               k: int = 10, info: PairInfo | None = None, test_ids: Sequence | None = None):
    """Top-``k`` responsible training pairs for each test function.

    Args:
        ecif: a fitted :class:`~ecif_fast.ECIF`.
        test_images, test_texts: ``(m, ...)`` test pairs; ``F_j`` is pair ``j``'s loss with the other test
            pairs as negatives. Or ``fn``: a list of ``m`` test functions (e.g. :func:`zero_shot_losses`).
        k: pairs kept per test function. info: training-pair metadata. test_ids: ``m`` ids for the rows.
    Returns:
        pandas DataFrame with ``m·k`` rows: ``test_id``, ``rank`` (1 = most responsible), the training
        pair's metadata, ``relative_influence``, ``influence`` (predicted change of ``F_j`` on removal),
        ``positive``, ``negative``.
    """
    import pandas as pd

    if fn is not None and callable(fn):
        fn = [fn]
    res = ecif.influence(test_images, test_texts, fn=fn, per_test=fn is None)
    total = res.total.reshape(-1, ecif.n)
    pos, neg = res.positive.reshape(total.shape), res.negative.reshape(total.shape)
    if not 1 <= k:
        raise ECIFInputError(f"k must be >= 1, got {k}")
    k = min(k, ecif.n)
    rel = ecif.relative(total)
    m = total.shape[0]
    ids = np.arange(m) if test_ids is None else np.asarray(test_ids)
    if ids.shape != (m,):
        raise ECIFInputError(f"test_ids must have {m} entries (one per test function), got shape {ids.shape}")
    meta = (info or PairInfo()).columns(ecif.n)
    rows = []
    for j in range(m):
        top = torch.argsort(rel[j], stable=True)[:k].numpy()
        block = {"test_id": np.repeat(ids[j:j + 1], k), "rank": np.arange(1, k + 1), "train_index": top}
        block.update({name: col[top] for name, col in meta.items()})
        for name, vals in (("relative_influence", rel), ("influence", total), ("positive", pos), ("negative", neg)):
            block[name] = vals[j, top].double().numpy()
        rows.append(pd.DataFrame(block))
    return pd.concat(rows, ignore_index=True)
