"""Public, validated, dispatching kernel ops. Each validates its inputs once, resolves the batches,
then calls the backend chosen by :mod:`ecif_fast.kernels.registry` (``backend=`` or
``ECIF_FAST_BACKEND`` to force one)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch.autograd import forward_ad

from ..errors import ECIFInputError
from ..validation import NEGATIVE_TERMS, check_choice, check_tensor
from ..core.batches import BatchesArg, resolve_batches
from ..core.loss import contrastive_loss as twin_loss
from .infonce_function import InfoNCE
from .registry import get_op

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_embeddings(U, V, *, values: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``U, V``: floating ``(n, d)`` tensors, same shape and device, finite (not checked with ``values=False``:
    inside a ``torch.func`` transform, where a tensor's values cannot steer Python). Mixed dtypes are promoted
    to their common type (e.g. float16 + float32 -> float32)."""
    U = check_tensor(U, "U", finite=values)
    V = check_tensor(V, "V", finite=values)

    def shape_error(detail: str) -> ECIFInputError:
        return ECIFInputError(f"U and V must both be (n, d) with the same shape, got {tuple(U.shape)} and "
                              f"{tuple(V.shape)}: {detail}")

    for name, x in (("U", U), ("V", V)):
        if x.dim() != 2:
            raise shape_error(f"{name} is not a 2-D (n, d) tensor of embeddings")
        if x.dtype not in _FLOAT_DTYPES:
            raise ECIFInputError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}; "
                                 f"convert with {name}.float()")
        if x.shape[1] == 0:
            raise ECIFInputError(f"{name} has embedding dimension 0; need d >= 1")
    if U.shape[0] != V.shape[0]:
        raise shape_error(f"mismatched lengths, {U.shape[0]} rows against {V.shape[0]}; pass one text embedding "
                          "per image embedding")
    if U.shape[1] != V.shape[1]:
        raise shape_error(f"the embedding dimension d differs, {U.shape[1]} against {V.shape[1]}")
    if U.device != V.device:
        raise ECIFInputError(f"U and V must be on the same device, got {U.device} and {V.device}")
    if U.dtype != V.dtype:
        dt = torch.promote_types(U.dtype, V.dtype)
        U, V = U.to(dt), V.to(dt)
    return U, V


def _check_scale(scale, *, value: bool = True):
    """``t``: a finite real number or a 0-d / one-element floating tensor (its value is not read with
    ``value=False``). Returned unchanged (as a float for Python numbers, 0-d for tensors) so that a tensor
    scale stays differentiable."""
    if isinstance(scale, bool):
        raise ECIFInputError("scale must be a real number (the logit multiplier t), got a bool")
    if torch.is_tensor(scale):
        if scale.numel() != 1:
            raise ECIFInputError(f"scale must be a number or a one-element tensor, got shape {tuple(scale.shape)}")
        if not (scale.is_floating_point() or scale.dtype in (torch.int32, torch.int64)):
            raise ECIFInputError(f"scale must be a real number, got a tensor of dtype {scale.dtype}")
        out = scale.reshape(())
        if not value:
            return out
        number = float(scale.detach().reshape(()))
    else:
        try:
            number = float(scale)
        except (TypeError, ValueError):
            raise ECIFInputError(f"scale must be a real number (the logit multiplier t), got "
                                 f"{type(scale).__name__}") from None
        if isinstance(scale, complex):
            raise ECIFInputError("scale must be real, got a complex number")
        out = number
    if not math.isfinite(number):
        raise ECIFInputError(f"scale must be finite, got {number}")
    return out


def lse(U: torch.Tensor, V: torch.Tensor, scale, batches: BatchesArg = None, *,
        backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-batch row and column log-sum-exp of the scores ``S = t·U Vᵀ`` (docs/math.md §2).

    ``row[i] = log Σ_{j∈b(i)} exp(t<u_i, v_j>)`` and ``col[j] = log Σ_{i∈b(j)} exp(t<u_i, v_j>)``,
    where ``b(i)`` is the batch of pair ``i``.

    Args:
        U, V: ``(n, d)`` image / text embeddings (float16, bfloat16, float32 or float64; same device).
        scale: the logit multiplier ``t`` (a number or a 0-d tensor).
        batches: None (one batch, "all" negatives), an int batch size, ``(n,)`` integer batch ids,
            or a :class:`~ecif_fast.core.batches.BatchPlan`.
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


def _check_directions(U, V, dU, dV, dlog_scale):
    """Query directions ``dU, dV``: ``(Q, n, d)`` or ``(n, d)`` like ``U``; ``dlog_scale``: None, a
    number, or a ``(Q,)`` / one-element tensor. All floating inputs are promoted to one dtype."""
    dU = check_tensor(dU, "dU")
    dV = check_tensor(dV, "dV")
    for name, x in (("dU", dU), ("dV", dV)):
        if x.dtype not in _FLOAT_DTYPES:
            raise ECIFInputError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
        if x.dim() not in (2, 3) or tuple(x.shape[-2:]) != tuple(U.shape):
            raise ECIFInputError(f"{name} must have shape (Q, n, d) or (n, d) with (n, d) = {tuple(U.shape)} "
                                 f"(the shape of U), got {tuple(x.shape)}")
        if x.device != U.device:
            raise ECIFInputError(f"{name} must be on U's device {U.device}, got {x.device}")
    if dU.shape != dV.shape:
        raise ECIFInputError(f"dU and dV must have the same shape, got {tuple(dU.shape)} and {tuple(dV.shape)}")
    dt = torch.promote_types(torch.promote_types(U.dtype, dU.dtype), dV.dtype)
    U, V, dU, dV = U.to(dt), V.to(dt), dU.to(dt), dV.to(dt)
    if dlog_scale is not None:
        Q = dU.shape[0] if dU.dim() == 3 else 1
        if isinstance(dlog_scale, bool):
            raise ECIFInputError("dlog_scale must be None, a number or a (Q,) tensor, got a bool")
        if torch.is_tensor(dlog_scale):
            if not dlog_scale.is_floating_point():
                raise ECIFInputError(f"dlog_scale must be a floating tensor, got dtype {dlog_scale.dtype}")
            if dlog_scale.numel() not in (1, Q):
                raise ECIFInputError(f"dlog_scale must hold 1 or Q = {Q} values (one per query), got shape "
                                     f"{tuple(dlog_scale.shape)}")
            if not bool(torch.isfinite(dlog_scale).all()):
                raise ECIFInputError("dlog_scale contains NaN or Inf")
        else:
            try:
                v = float(dlog_scale)
            except (TypeError, ValueError):
                raise ECIFInputError(f"dlog_scale must be None, a number or a (Q,) tensor, got "
                                     f"{type(dlog_scale).__name__}") from None
            if not math.isfinite(v):
                raise ECIFInputError(f"dlog_scale must be finite, got {v}")
    return U, V, dU, dV


def ecif_reductions(U: torch.Tensor, V: torch.Tensor, scale, batches: BatchesArg, dU: torch.Tensor,
                    dV: torch.Tensor, dlog_scale=None, negative_term: str = "exact", *,
                    backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive and negative influence parts of every training pair along query directions (docs/math.md §4).

    Args:
        U, V: ``(n, d)`` embeddings at the optimum; scale: ``t``; batches: as for :func:`lse`.
        dU, dV: ``(Q, n, d)`` (or ``(n, d)``) directional derivatives ``J·h`` of the embeddings.
        dlog_scale: ``(Q,)`` / scalar derivative of ``s = log t`` along ``h``, or None (scale fixed).
        negative_term: ``"exact"`` (``w = p/(1−p)``) or ``"taylor"`` (``w = p``).
        backend: force a backend; default automatic (``ECIF_FAST_BACKEND`` if set).
    Returns:
        ``(positive, negative)``: ``(Q, n)`` (``(n,)`` for 2-D directions), float32 (float64 for float64).
    """
    U, V = _check_embeddings(U, V)
    t = _check_scale(scale)
    U, V, dU, dV = _check_directions(U, V, dU, dV, dlog_scale)
    check_choice(negative_term, "negative_term", NEGATIVE_TERMS)
    plan = resolve_batches(batches, U.shape[0])
    return get_op("ecif_reductions", U.device, backend)(U, V, t, plan, dU, dV, dlog_scale, negative_term)


def gauss_newton_product(U: torch.Tensor, V: torch.Tensor, scale, batches: BatchesArg, dU: torch.Tensor,
                         dV: torch.Tensor, dlog_scale=None, *, backend: Optional[str] = None):
    """Embedding-space Gauss–Newton product of the loss (docs/math.md §4), for matrix-free solvers.

    Args: as for :func:`ecif_reductions`.
    Returns:
        ``(gU, gV, gs)``: ``gU, gV`` shaped like ``dU``; ``gs`` ``(Q,)`` (scalar for 2-D directions),
        zeros when ``dlog_scale`` is None. float32 (float64 for float64 inputs).
    """
    U, V = _check_embeddings(U, V)
    t = _check_scale(scale)
    U, V, dU, dV = _check_directions(U, V, dU, dV, dlog_scale)
    plan = resolve_batches(batches, U.shape[0])
    return get_op("gauss_newton_product", U.device, backend)(U, V, t, plan, dU, dV, dlog_scale)


def infonce(U: torch.Tensor, V: torch.Tensor, scale, batches: BatchesArg = None, *, with_scale: bool = False,
            backend: Optional[str] = None):
    """Fused contrastive loss and its gradients (docs/math.md §2), the raw op every backend implements.

    Returns:
        ``(loss, dU, dV, dlog_scale)``: 0-d loss ``Σ_b Σ_{k∈b} ℓ_k``, ``(n, d)`` gradients with respect
        to ``U`` and ``V``, and the derivative with respect to ``s = log t`` (None unless ``with_scale``);
        float32 (float64 for float64 inputs). For a differentiable loss use :func:`infonce_loss`.
    """
    U, V = _check_embeddings(U, V)
    t = _check_scale(scale)
    plan = resolve_batches(batches, U.shape[0])
    return get_op("infonce", U.device, backend)(U, V, t, plan, bool(with_scale))


def contrastive_loss(U: torch.Tensor, V: torch.Tensor, scale, batches: BatchesArg = None, *, fused: bool = True,
                     backend: Optional[str] = None) -> torch.Tensor:
    """The contrastive loss ``Σ_b Σ_{k∈b} ℓ_k`` (docs/math.md §2: row + column terms, summed, no ½, no mean),
    differentiable with respect to ``U``, ``V`` and a tensor ``scale`` (the multiplier ``t``, not ``log t``).

    What runs:

    * by default the backend's fused streaming ``infonce`` op under its own autograd (:class:`InfoNCE`):
      forward and backward from one call, O(n·d) memory for any batch size, never the ``n × n`` scores;
      when no input needs a gradient, the streaming ``lse`` op alone (forward only);
    * the materialising twin (``core/loss.py``: plain torch, differentiable to any order, forward mode
      included) inside a ``torch.func`` transform (``grad``, ``vjp``, ``jvp``, ``vmap``, ``jacrev``,
      ``jacfwd``, ``hessian``), for forward-AD dual inputs (``torch.autograd.forward_ad``), and with
      ``fused=False``;
    * double backward through the fused op (``torch.autograd.grad(..., create_graph=True)`` and
      differentiating the result) works: that backward recomputes the twin's gradient from the saved
      inputs, at the twin's cost (see :mod:`ecif_fast.kernels.infonce_function`).

    Args:
        U, V: ``(n, d)`` embeddings (float16, bfloat16, float32 or float64). scale: ``t``, a number or a
            one-element tensor.
        batches: None ("all" negatives), an int batch size, ``(n,)`` ids or a BatchPlan.
        fused: False for the twin everywhere (e.g. many second derivatives at small n).
        backend: force a backend for the fused op; default automatic (``ECIF_FAST_BACKEND`` if set).
    Returns:
        0-d loss, float32 (float64 for float64 inputs).
    """
    transformed = _in_functorch_transform()
    U, V = _check_embeddings(U, V, values=not transformed)
    t = _check_scale(scale, value=not transformed)
    plan = resolve_batches(batches, U.shape[0])
    if not fused or transformed or _has_tangent(U, V, t):
        return twin_loss(U, V, t, plan)
    if not (torch.is_grad_enabled() and any(torch.is_tensor(x) and x.requires_grad for x in (U, V, t))):
        row, col = get_op("lse", U.device, backend)(U, V, t, plan)
        dt = row.dtype
        own = float(t) * (U.to(dt) * V.to(dt)).sum(1)  # S_kk
        return ((row - own) + (col - own)).sum()
    return InfoNCE.apply(U, V, t, plan, get_op("infonce", U.device, backend))


#: The same function under the name of its fused op.
infonce_loss = contrastive_loss


def _in_functorch_transform() -> bool:
    """True inside a ``torch.func`` transform, where only plain torch ops (the twin) are differentiated."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def _has_tangent(*xs) -> bool:
    """True when an input is a forward-AD dual tensor (``torch.autograd.forward_ad.make_dual``)."""
    return any(torch.is_tensor(x) and forward_ad.unpack_dual(x).tangent is not None for x in xs)
