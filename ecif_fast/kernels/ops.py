"""Public, validated, dispatching kernel ops. Each validates its inputs once, resolves the batches,
then calls the backend chosen by :mod:`ecif_fast.kernels.registry` (``backend=`` or
``ECIF_FAST_BACKEND`` to force one)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..errors import ECIFInputError
from ..validation import check_tensor
from .batching import BatchesArg, resolve_batches
from .registry import get_op

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_embeddings(U, V) -> tuple[torch.Tensor, torch.Tensor]:
    """``U, V``: floating ``(n, d)`` tensors, same shape and device, finite. Mixed dtypes are promoted
    to their common type (e.g. float16 + float32 -> float32)."""
    U = check_tensor(U, "U")
    V = check_tensor(V, "V")
    for name, x in (("U", U), ("V", V)):
        if x.dim() != 2:
            raise ECIFInputError(f"{name} must be a 2-D (n, d) tensor of embeddings, got shape {tuple(x.shape)}")
        if x.dtype not in _FLOAT_DTYPES:
            raise ECIFInputError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}; "
                                 f"convert with {name}.float()")
        if x.shape[1] == 0:
            raise ECIFInputError(f"{name} has embedding dimension 0; need d >= 1")
    if U.shape[0] != V.shape[0]:
        raise ECIFInputError(f"mismatched lengths: U has {U.shape[0]} rows but V has {V.shape[0]}; "
                             "pass one text embedding per image embedding")
    if U.shape[1] != V.shape[1]:
        raise ECIFInputError(f"U and V must have the same embedding dimension d, got {U.shape[1]} and "
                             f"{V.shape[1]}")
    if U.device != V.device:
        raise ECIFInputError(f"U and V must be on the same device, got {U.device} and {V.device}")
    if U.dtype != V.dtype:
        dt = torch.promote_types(U.dtype, V.dtype)
        U, V = U.to(dt), V.to(dt)
    return U, V


def _check_scale(scale):
    """``t``: a finite real number or a 0-d / one-element floating tensor. Returned unchanged
    (as a float for Python numbers) so that a tensor scale stays differentiable in the torch twin."""
    if isinstance(scale, bool):
        raise ECIFInputError("scale must be a real number (the logit multiplier t), got a bool")
    if torch.is_tensor(scale):
        if scale.numel() != 1:
            raise ECIFInputError(f"scale must be a number or a one-element tensor, got shape {tuple(scale.shape)}")
        if not (scale.is_floating_point() or scale.dtype in (torch.int32, torch.int64)):
            raise ECIFInputError(f"scale must be a real number, got a tensor of dtype {scale.dtype}")
        value = float(scale.detach().reshape(()))
        out = scale.reshape(())
    else:
        try:
            value = float(scale)
        except (TypeError, ValueError):
            raise ECIFInputError(f"scale must be a real number (the logit multiplier t), got "
                                 f"{type(scale).__name__}") from None
        if isinstance(scale, complex):
            raise ECIFInputError("scale must be real, got a complex number")
        out = value
    if not math.isfinite(value):
        raise ECIFInputError(f"scale must be finite, got {value}")
    return out


def lse(U: torch.Tensor, V: torch.Tensor, scale, batches: BatchesArg = None, *,
        backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-batch row and column log-sum-exp of the scores ``S = t·U Vᵀ`` (SPEC §2).

    ``row[i] = log Σ_{j∈b(i)} exp(t<u_i, v_j>)`` and ``col[j] = log Σ_{i∈b(j)} exp(t<u_i, v_j>)``,
    where ``b(i)`` is the batch of pair ``i``.

    Args:
        U, V: ``(n, d)`` image / text embeddings (float16, bfloat16, float32 or float64; same device).
        scale: the logit multiplier ``t`` (a number or a 0-d tensor).
        batches: None (one batch, "all" negatives), an int batch size, ``(n,)`` integer batch ids,
            or a :class:`~ecif_fast.kernels.batching.BatchPlan`.
        backend: force a backend (``"torch"``, ``"cpp"``, ``"triton"``); default: automatic
            (``ECIF_FAST_BACKEND`` if set).
    Returns:
        ``(row, col)``: two ``(n,)`` tensors, float32 (float64 for float64 inputs), on U's device.
    Raises:
        ECIFInputError: bad shapes, dtypes, devices, non-finite values, bad scale or batches.
        BackendUnavailableError: a forced backend cannot serve this call.
    """
    U, V = _check_embeddings(U, V)
    t = _check_scale(scale)
    plan = resolve_batches(batches, U.shape[0])
    return get_op("lse", U.device, backend)(U, V, t, plan)
