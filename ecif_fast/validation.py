"""Input checks shared by the public entry points; every failure names the problem and the fix."""
from __future__ import annotations

import math
import numbers
import warnings

import torch

from .errors import ECIFInputError
from .options import NEGATIVE_TERMS  # noqa: F401  (callers check negative_term against it)

#: Dtypes ECIF computes in. Half precision (float16 / bfloat16) is refused: second derivatives, forward-mode
#: JVPs and the dense solves have neither the range nor the precision (nor CPU kernels) there.
COMPUTE_DTYPES = (torch.float32, torch.float64)


def check_tensor(x, name: str, *, finite: bool = True) -> torch.Tensor:
    """``x``: a real tensor on a real device with a non-empty leading pair axis, and (``finite``) no NaN or Inf."""
    if not torch.is_tensor(x):
        raise ECIFInputError(f"{name} must be a torch.Tensor, got {type(x).__name__}; convert with torch.as_tensor")
    if x.is_meta:
        raise ECIFInputError(f"{name} is on the 'meta' device (a shape without values); pass the real data, "
                             "e.g. load it or move it with .to('cpu')")
    if x.dim() == 0:
        raise ECIFInputError(f"{name} must have a leading pair axis (n, ...), got a 0-d tensor")
    if x.shape[0] == 0:
        raise ECIFInputError(f"empty data: {name} has 0 rows; need at least one image-text pair")
    # a finite sum means finite entries (NaN and Inf propagate); only a sum that overflowed needs the entrywise test
    if (finite and x.is_floating_point() and not bool(torch.isfinite(x.sum()))
            and not bool(torch.isfinite(x).all())):
        bad = int((~torch.isfinite(x)).reshape(x.shape[0], -1).any(1).sum())
        raise ECIFInputError(f"{name} contains NaN or Inf values in {bad} row(s); clean or drop those pairs first")
    if x.is_complex():
        raise ECIFInputError(f"{name} has unsupported complex dtype {x.dtype}")
    return x


def check_pairs(images, texts, what: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a set of image-text pairs: tensors, same number of rows, non-empty, finite, not on 'meta'."""
    images = check_tensor(images, f"{what}_images")
    texts = check_tensor(texts, f"{what}_texts")
    if images.shape[0] != texts.shape[0]:
        raise ECIFInputError(f"mismatched lengths: {what}_images has {images.shape[0]} rows but {what}_texts has "
                             f"{texts.shape[0]}; pass one text per image")
    return images, texts


def cast_inputs(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floating inputs in the dtype of the trained parameters (as ``LinearHeads`` casts its features);
    integer inputs (token ids) unchanged."""
    return x.to(dtype) if x.is_floating_point() and x.dtype != dtype else x


def check_like_training(x: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    """Test inputs ``x (m, ...)`` must fit the encoder like the training inputs ``ref (n, ...)``: floating
    features the same trailing shape, integer token ids the same number of dims (the sequence length may
    differ: padding)."""
    if x.is_floating_point() != ref.is_floating_point():
        raise ECIFInputError(f"{name} has dtype {x.dtype} but the training inputs have dtype {ref.dtype} (one is "
                             "floating features, the other integer token ids); encode the test data like the "
                             "training data")
    if x.is_floating_point() and x.shape[1:] != ref.shape[1:]:
        raise ECIFInputError(f"{name} has shape {tuple(x.shape)} but the training inputs have shape "
                             f"{tuple(ref.shape)}: every row after the first axis must match "
                             f"{tuple(ref.shape[1:])}; use the same feature extractor / preprocessing as in training")
    if not x.is_floating_point() and x.dim() != ref.dim():
        raise ECIFInputError(f"{name} has shape {tuple(x.shape)} ({x.dim()} dims) but the training inputs have "
                             f"shape {tuple(ref.shape)} ({ref.dim()} dims); tokenise the test data like the "
                             "training data")


def check_indices(indices, n: int, name: str = "indices") -> torch.Tensor:
    """Distinct pair indices in ``[0, n)`` as an int64 tensor.

    Accepts a list / tuple / set of ints, an integer tensor or array, or an ``(n,)`` boolean mask.
    """
    if indices is None or isinstance(indices, (str, bytes)):
        raise ECIFInputError(f"{name} must be training-pair positions (ints in [0, {n})) or an ({n},) boolean mask, "
                             f"got {indices!r}; e.g. {name}=[3] or {name}=torch.tensor([3, 7])")
    if isinstance(indices, (set, frozenset)):
        indices = sorted(indices)
    try:
        idx = torch.as_tensor(indices)
    except (TypeError, ValueError, RuntimeError):
        raise ECIFInputError(f"{name} must be integers in [0, {n}) (a list, tensor or array) or an ({n},) boolean "
                             f"mask, got {type(indices).__name__} {_short(indices)}") from None
    if idx.dtype == torch.bool:
        if idx.numel() != n:
            raise ECIFInputError(f"boolean index mask must have {n} entries, got {idx.numel()}")
        idx = idx.nonzero().flatten()
    if idx.numel() == 0:  # before the dtype check: torch.as_tensor([]) is float32
        raise ECIFInputError(f"{name} is empty: give at least one training pair to remove")
    if idx.dtype.is_floating_point or idx.dtype.is_complex:
        raise ECIFInputError(f"{name} must be integers, got dtype {idx.dtype}")
    idx = idx.reshape(-1).to(torch.int64)
    if bool((idx < 0).any()) or bool((idx >= n).any()):
        raise ECIFInputError(f"{name} must lie in [0, {n}), got min {int(idx.min())}, max {int(idx.max())}")
    if idx.unique().numel() != idx.numel():
        raise ECIFInputError(f"{name} contains duplicates; each pair can be removed once")
    return idx


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_batch_sizes(sizes: torch.Tensor, name: str = "batches", stacklevel: int = 3) -> None:
    """Refuse a partition in which no batch has two pairs; warn (once) about pairs alone in their batch.

    A pair alone in its batch has no negatives: its loss ``ℓ = (S−S) + (S−S)`` is constant, so it neither
    moves training nor has any influence (its ``g_k`` is exactly 0).
    """
    single = int((sizes == 1).sum())
    if single == int(sizes.numel()):
        raise ECIFInputError(
            f"no batch has 2 or more pairs ({name} gives {sizes.numel()} batch(es) of 1 pair): a lone pair has no "
            "negatives, its contrastive loss is constant, so nothing is learned and every influence is 0; use "
            "batches of at least 2 pairs (a larger batch size, batches=None, or batch ids shared by several pairs) "
            "and at least 2 training pairs")
    if single:
        warnings.warn(
            f"{single} training pair(s) sit alone in a batch of 1 ({name}): with no negatives their loss is constant, "
            "so they do not affect training and their influence and self-influence are exactly 0; merge them into "
            "another batch (e.g. a batch size that divides n) if they should count", UserWarning, stacklevel=stacklevel)


def check_params(named: dict[str, torch.Tensor], selected) -> torch.dtype:
    """The model's parameters must hold values, the selected ones finite, none in half precision.

    Args:
        named: ``{name: parameter}`` of the model. selected: names of the trained parameters.
    Returns the dtype of the selected parameters.
    """
    meta = [k for k, p in named.items() if p.is_meta]
    if meta:
        raise ECIFInputError(f"model parameter(s) {meta[:3]}{' ...' if len(meta) > 3 else ''} are on the 'meta' "
                             "device (no values): load the weights first, e.g. model.to_empty(device='cpu') then "
                             "model.load_state_dict(...)")
    half = sorted({str(p.dtype) for p in named.values() if p.is_floating_point() and p.dtype not in COMPUTE_DTYPES})
    if half:
        raise ECIFInputError(f"the model has {'/'.join(half)} parameters: ECIF needs float32 or float64 (half "
                             "precision has neither the range nor the precision for second derivatives and "
                             "solves); cast the model with model.float() or, for exact influences, model.double()")
    for k in selected:
        p = named[k]
        if not bool(torch.isfinite(p.detach()).all()):
            bad = int((~torch.isfinite(p.detach())).sum())
            raise ECIFInputError(f"model parameter {k!r} has {bad} NaN or Inf entr{'y' if bad == 1 else 'ies'}: "
                                 "influences are defined at a finite optimum; reload or retrain the model")
    return named[selected[0]].dtype


def check_logit_scale(s, dtype: torch.dtype, name: str = "logit_scale") -> float:
    """``s = log t`` must be finite and ``t = exp(s)`` must fit ``dtype``. Returns ``s`` as a float."""
    try:
        value = float(s)
    except (TypeError, ValueError, RuntimeError):
        raise ECIFInputError(f"{name} must be a number (the log of the temperature multiplier), got {s!r}") from None
    limit = math.log(torch.finfo(dtype).max)
    if not math.isfinite(value) or value > limit:
        raise ECIFInputError(
            f"{name} = {value!r} is the log of the temperature multiplier t = exp({name}); it must be finite and "
            f"at most {limit:.1f} so that t fits {str(dtype).replace('torch.', '')}; CLIP uses log(1/0.07) = 2.66 "
            "(t = 14.3), capped at log(100) = 4.61")
    return value


def check_embeddings(U: torch.Tensor, V: torch.Tensor, s: torch.Tensor,
                     names: tuple[str, str] = ("train_images", "train_texts"), normalized: bool | None = None) -> None:
    """The model's embeddings ``U, V (n, d)`` of the inputs called ``names`` and its log scale ``s`` are usable.

    Refused: non-finite embeddings (the encoder overflowed); in an L2-normalising model, rows whose norm is
    not 1 (the norm overflowed to inf or underflowed below the normaliser's epsilon: the row carries no
    direction). ``normalized``: whether the model normalises (``LinearHeads.normalize``); None infers it:
    rows exactly zero while every other row has unit norm, or every row zero. Also refused: an overflowing
    scale, and logits ``t·<u_i, v_j>`` so large that their rounding error exceeds 1 (the loss then has no
    precision left).
    """
    check_logit_scale(s.detach(), s.dtype)
    sizes = []
    for E, name in zip((U, V), names):
        E = E.detach()
        bad = ~torch.isfinite(E).all(1)
        if bool(bad.any()):
            raise ECIFInputError(
                f"the model's embeddings of {name} are NaN or Inf in {int(bad.sum())} of {E.shape[0]} rows (first: row "
                f"{int(bad.nonzero()[0])}): the encoder overflowed; rescale or standardise the input features (e.g. "
                "zero mean, unit variance per column) and check the model's parameters")
        norms = torch.linalg.vector_norm(E, dim=1)
        off = (norms - 1).abs() > 1e-3  # rows that are not unit-norm
        if normalized is None:  # unknown: zero rows count only if all other rows are unit-norm (or none is left)
            zero = norms == 0
            off = zero if bool(zero.all()) or not bool((off & ~zero).any()) else zero & False
        if normalized is not False and bool(off.any()):
            first = int(off.nonzero()[0])
            raise ECIFInputError(
                f"the model's embeddings of {name} have norm {float(norms[first]):.3g} instead of 1 in "
                f"{int(off.sum())} of {E.shape[0]} rows (first: row {first}) although it L2-normalises them: the norm overflowed or "
                "underflowed (features too large or too small) or the input row is zero; rescale or standardise the "
                "features (e.g. zero mean, unit variance per column) or drop those pairs")
        sizes.append(float(norms.max()))
    # |S_ij| <= t·max‖u‖·max‖v‖, a cheap bound on the largest logit
    bound = math.exp(float(s)) * sizes[0] * sizes[1]
    if not bound * torch.finfo(U.dtype).eps <= 1.0:
        raise ECIFInputError(
            f"the logits t·<u, v> of {names[0]} and {names[1]} reach {bound:.3g} "
            f"(t = exp(logit_scale) = {math.exp(float(s)):.3g}, "
            f"largest embedding norms {sizes[0]:.3g} and {sizes[1]:.3g}): their rounding error in "
            f"{str(U.dtype).replace('torch.', '')} exceeds 1, so the loss and its derivatives have no precision; "
            "lower the logit scale or rescale the features (or use float64)")


def declares_normalized(model) -> bool | None:
    """Whether ``model`` declares unit-norm embeddings: ``model.normalize`` when it is a bool (``LinearHeads``;
    False under a soft normalisation, ``norm_eps > 0``, whose rows are shorter than 1), else None (unknown:
    inferred from the rows)."""
    flag = getattr(model, "normalize", None)
    if not isinstance(flag, bool):
        return None
    return flag and not getattr(model, "norm_eps", 0) > 0


def check_int(value, name: str, *, minimum: int | None = None, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    none = " or None" if allow_none else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        need = f"an int >= {minimum}" if minimum is not None else "an int"
        raise ECIFInputError(f"{name} must be {need}{none}, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ECIFInputError(f"{name} must be >= {minimum}{none}, got {value!r}")
    return int(value)


def check_tolerance(value, name: str) -> float:
    """A relative tolerance in ``(0, 1)``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < float(value) < 1:
        raise ECIFInputError(f"{name} must be a number in (0, 1) (relative residual ||r|| / ||b|| to stop at, e.g. "
                             f"1e-10), got {value!r}")
    return float(value)




def check_choice(value, name: str, choices) -> str:
    if value not in choices:
        raise ECIFInputError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value
