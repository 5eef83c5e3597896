"""Damping δ: explicit, or the documented ``"auto"`` rule (docs/math.md §4)."""
from __future__ import annotations

import math

import torch

from ..errors import ECIFInputError
from .curvature import Curvature

#: ``"auto"`` damping is at least this fraction of the mean eigenvalue ``tr(C)/P`` of the undamped curvature ...
AUTO_FRACTION = 1e-3
#: ... and at least ``sqrt(eps)`` of the dtype times the largest eigenvalue magnitude, so that the condition
#: number of ``C + δI`` stays below ``1/sqrt(eps)`` (1.5e-8 in float64, 3.5e-4 in float32): a solve in that
#: dtype then keeps about half its digits, and CG converges.
POWER_ITERATIONS = 12


def relative_floor(dtype: torch.dtype) -> float:
    """``sqrt(eps)`` of ``dtype``: the smallest ``δ / |λ|_max`` the ``"auto"`` rule gives."""
    return math.sqrt(torch.finfo(dtype).eps)


def largest_eigenvalue(curvature: Curvature, dense: torch.Tensor | None = None, *, probes: int = 4,
                       iters: int = POWER_ITERATIONS, seed: int = 0) -> float:
    """Estimate of ``|λ|_max`` of the undamped curvature: block power iteration (``probes`` vectors, ``iters``
    products; the Rayleigh–Ritz value of the block, a lower bound that converges from below), deterministic
    under ``seed``. Exact eigenvalues are not needed: the floor only has to fix the order of magnitude."""
    matvec = (lambda v: dense @ v) if dense is not None else curvature.matvec
    dtype = dense.dtype if dense is not None else curvature.theta.dtype
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(curvature.size, min(probes, curvature.size), generator=g, dtype=dtype))
    for _ in range(iters):
        W = matvec(Q)
        if not bool(torch.isfinite(W).all()):
            return float("nan")
        Q, _ = torch.linalg.qr(W)
    T = Q.T @ matvec(Q)
    return float(torch.linalg.eigvalsh(0.5 * (T + T.T)).abs().max())


def resolve_damping(damping, curvature: Curvature, dense: torch.Tensor | None = None) -> float:
    """Return δ > 0.

    ``"auto"``: ``δ = max(1e-3 · tr(C) / P, sqrt(eps) · |λ|_max)`` with ``C`` the undamped curvature selected by
    ``curvature=``, ``eps`` the machine epsilon of its dtype and ``|λ|_max`` its largest eigenvalue magnitude.
    The trace is exact when the dense matrix is available, else a 32-probe Hutchinson estimate; ``|λ|_max`` is a
    block power iteration (:func:`largest_eigenvalue`); both use fixed seeds, so the value is deterministic.
    The first term scales with the loss like the curvature does and leaves the well-determined directions
    untouched; the second keeps the condition number of ``C + δI`` under ``1/sqrt(eps)`` (``6.7e7`` in float64,
    ``2.9e3`` in float32), so the solvers converge in the model's dtype. Use it for models trained without
    weight decay; for models trained with ``(δ/2)||θ − θ_ref||²`` pass that δ, so ``H`` is the true Hessian
    of the training objective (docs/math.md §2).
    """
    if isinstance(damping, str):
        if damping != "auto":
            raise ECIFInputError(f"damping must be a positive number or 'auto', got {damping!r}")
        tr = float(torch.diagonal(dense).sum()) if dense is not None else curvature.trace_estimate()
        dtype = dense.dtype if dense is not None else curvature.theta.dtype
        top = largest_eigenvalue(curvature, dense)
        value = max(AUTO_FRACTION * tr / curvature.size, relative_floor(dtype) * top)
        if not (tr > 0 and value > 0 and math.isfinite(value)):
            raise ECIFInputError(f"'auto' damping failed: the curvature trace is {tr:.4e} (not positive) or its "
                                 f"largest eigenvalue {top:.4e} is not finite; pass an explicit damping > 0, or use "
                                 "curvature='gauss-newton' (positive semi-definite)")
        return value
    try:
        value = float(damping)
    except (TypeError, ValueError):
        raise ECIFInputError(f"damping must be a positive number or 'auto', got {damping!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise ECIFInputError(f"damping must be > 0 and finite (it makes H = C + δI invertible), got {damping!r}")
    return value
