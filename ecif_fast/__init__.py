"""ecif_fast: influence functions for contrastive (CLIP-style) models (ECIF, arXiv 2411.11667).

The pair removal effect has two parts: the pair's own loss term (positive role) and its presence in
the softmax denominators of every other anchor in its batch (negative role). See SPEC §3.
"""
from __future__ import annotations

import torch as _torch

from . import data
from .data import CaptionedImages
from .engine import ECIF
from .errors import BackendUnavailableError, ECIFInputError, NotPositiveDefiniteError
from .kernels.batching import BatchPlan, resolve_batches
from .models.linear_heads import LinearHeads
from .models.protocol import ContrastiveModel
from .models.wrap import wrap
from .results import InfluenceResult
from .training import train

__version__ = "0.1.0"


def contrastive_loss(U: _torch.Tensor, V: _torch.Tensor, scale, batches=None) -> _torch.Tensor:
    """SPEC §2 contrastive loss ``Σ_b Σ_{k∈b} ℓ_k`` (row + column terms, summed, no ½).

    Args:
        U, V: ``(n, d)`` image and text embeddings. scale: the multiplier ``t = exp(logit_scale)``.
        batches: ``(n,)`` int batch ids, an int batch size (consecutive chunks), or None (one batch).
    Returns:
        0-d tensor, differentiable with respect to ``U``, ``V`` and a tensor ``scale``.
    """
    from .kernels.torch_ref.loss import contrastive_loss as _loss
    from .validation import check_tensor
    from .errors import ECIFInputError as _E

    U = check_tensor(U, "U")
    V = check_tensor(V, "V")
    if U.dim() != 2 or V.dim() != 2 or U.shape != V.shape:
        raise _E(f"U and V must both be (n, d) with the same shape, got {tuple(U.shape)} and {tuple(V.shape)}")
    return _loss(U, V, scale, resolve_batches(batches, U.shape[0]))


def backends() -> dict:
    """Which kernel backends loaded here: ``{name: True | "reason it is unavailable"}``."""
    try:
        from .kernels.registry import available_backends
    except ImportError:  # registry not built yet
        return {"torch": True}
    return available_backends()


__all__ = ["ECIF", "LinearHeads", "ContrastiveModel", "InfluenceResult", "BatchPlan", "contrastive_loss",
           "resolve_batches", "train", "wrap", "backends", "ECIFInputError", "NotPositiveDefiniteError",
           "BackendUnavailableError", "data", "CaptionedImages"]
