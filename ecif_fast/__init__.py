"""ecif_fast: influence functions for contrastive (CLIP-style) models (ECIF, arXiv 2411.11667).

The pair removal effect has two parts: the pair's own loss term (positive role) and its presence in
the softmax denominators of every other anchor in its batch (negative role). See docs/math.md §3.

The public names below are imported on first use (PEP 562), so that ``import ecif_fast`` is cheap and
the command line can install its signal handling before torch loads.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "ECIF": ".engine",
    "LinearHeads": ".models.linear_heads",
    "ContrastiveModel": ".models.protocol",
    "InfluenceResult": ".results",
    "BatchPlan": ".core.batches",
    "resolve_batches": ".core.batches",
    "train": ".training",
    "wrap": ".models.wrap",
    "ECIFInputError": ".errors",
    "NotPositiveDefiniteError": ".errors",
    "BackendUnavailableError": ".errors",
    "CaptionedImages": ".data",
}
_SUBMODULES = ("data",)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


def contrastive_loss(U, V, scale, batches=None):
    """docs/math.md §2 contrastive loss ``Σ_b Σ_{k∈b} ℓ_k`` (row + column terms, summed, no ½).

    Args:
        U, V: ``(n, d)`` image and text embeddings. scale: the multiplier ``t = exp(logit_scale)``.
        batches: ``(n,)`` int batch ids, an int batch size (consecutive chunks), or None (one batch).
    Returns:
        0-d tensor, differentiable with respect to ``U``, ``V`` and a tensor ``scale``.
    """
    from .errors import ECIFInputError as _E
    from .core.batches import resolve_batches as _resolve
    from .core.loss import contrastive_loss as _loss
    from .validation import check_tensor

    U = check_tensor(U, "U")
    V = check_tensor(V, "V")
    if U.dim() != 2 or V.dim() != 2 or U.shape != V.shape:
        raise _E(f"U and V must both be (n, d) with the same shape, got {tuple(U.shape)} and {tuple(V.shape)}")
    return _loss(U, V, scale, _resolve(batches, U.shape[0]))


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
