"""ecif_fast: influence functions for contrastive (CLIP-style) models (ECIF, arXiv 2411.11667).

The pair removal effect has two parts: the pair's own loss term (positive role) and its presence in
the softmax denominators of every other anchor in its batch (negative role). See docs/math.md §3.

The public names below are imported on first use (PEP 562), so that ``import ecif_fast`` is cheap and
the command line can install its signal handling before torch loads.
"""
from __future__ import annotations

from .lazy import lazy_exports

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "ECIF": ".engine",
    "LinearHeads": ".models.linear_heads",
    "ContrastiveModel": ".models.protocol",
    "InfluenceResult": ".results",
    "BatchPlan": ".core.batches",
    "resolve_batches": ".core.batches",
    "contrastive_loss": ".kernels.ops",
    "train": ".training",
    "wrap": ".models.wrap",
    "ECIFInputError": ".errors",
    "NotPositiveDefiniteError": ".errors",
    "BackendUnavailableError": ".errors",
    "CaptionedImages": ".data",
}
_SUBMODULES = ("data",)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, _SUBMODULES)


def backends() -> dict:
    """Which kernel backends loaded here: ``{name: True | "reason it is unavailable"}``."""
    from .kernels.registry import available_backends

    return available_backends()


__all__ = ["ECIF", "LinearHeads", "ContrastiveModel", "InfluenceResult", "BatchPlan", "contrastive_loss",
           "resolve_batches", "train", "wrap", "backends", "ECIFInputError", "NotPositiveDefiniteError",
           "BackendUnavailableError", "data", "CaptionedImages"]
