"""Damping δ: explicit, or the documented ``"auto"`` rule."""
from __future__ import annotations

import math

import torch

from ..errors import ECIFInputError
from .curvature import Curvature

#: ``"auto"`` damping is this fraction of the mean eigenvalue ``tr(C)/P`` of the undamped curvature.
AUTO_FRACTION = 1e-3


def resolve_damping(damping, curvature: Curvature, dense: torch.Tensor | None = None) -> float:
    """Return δ > 0.

    ``"auto"``: ``δ = 1e-3 · tr(C) / P`` with ``C`` the undamped curvature selected by ``curvature=``
    (exact trace when the dense matrix is available, else a 32-probe Hutchinson estimate with a fixed
    seed, so the value is deterministic). It scales with the loss like the curvature does and is small
    enough to leave the well-determined directions untouched. Use it for models trained without
    weight decay; for models trained with ``(δ/2)||θ − θ_ref||²`` pass that δ, so ``H`` is the true
    Hessian of the training objective (docs/math.md §2).
    """
    if isinstance(damping, str):
        if damping != "auto":
            raise ECIFInputError(f"damping must be a positive number or 'auto', got {damping!r}")
        tr = float(torch.diagonal(dense).sum()) if dense is not None else curvature.trace_estimate()
        value = AUTO_FRACTION * tr / curvature.size
        if not (value > 0 and math.isfinite(value)):
            raise ECIFInputError(f"'auto' damping failed: the curvature trace is {tr:.4e} (not positive); "
                                 "pass an explicit damping > 0")
        return value
    try:
        value = float(damping)
    except (TypeError, ValueError):
        raise ECIFInputError(f"damping must be a positive number or 'auto', got {damping!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise ECIFInputError(f"damping must be > 0 and finite (it makes H = C + δI invertible), got {damping!r}")
    return value
