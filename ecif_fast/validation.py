"""Input checks shared by the public entry points; every failure names the problem and the fix."""
from __future__ import annotations

import torch

from .errors import ECIFInputError


def check_tensor(x, name: str) -> torch.Tensor:
    if not torch.is_tensor(x):
        raise ECIFInputError(f"{name} must be a torch.Tensor, got {type(x).__name__}; convert with torch.as_tensor")
    if x.dim() == 0:
        raise ECIFInputError(f"{name} must have a leading pair axis (n, ...), got a 0-d tensor")
    if x.shape[0] == 0:
        raise ECIFInputError(f"empty data: {name} has 0 rows; need at least one image-text pair")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).reshape(x.shape[0], -1).any(1).sum())
        raise ECIFInputError(f"{name} contains NaN or Inf values in {bad} row(s); clean or drop those pairs first")
    if x.is_complex():
        raise ECIFInputError(f"{name} has unsupported complex dtype {x.dtype}")
    return x


def check_pairs(images, texts, what: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a set of image-text pairs: tensors, same number of rows, non-empty, finite."""
    images = check_tensor(images, f"{what}_images")
    texts = check_tensor(texts, f"{what}_texts")
    if images.shape[0] != texts.shape[0]:
        raise ECIFInputError(f"mismatched lengths: {what}_images has {images.shape[0]} rows but {what}_texts has "
                             f"{texts.shape[0]}; pass one text per image")
    return images, texts


def check_indices(indices, n: int) -> torch.Tensor:
    """Distinct pair indices in ``[0, n)`` as an int64 tensor."""
    idx = torch.as_tensor(indices)
    if idx.dtype == torch.bool:
        if idx.numel() != n:
            raise ECIFInputError(f"boolean index mask must have {n} entries, got {idx.numel()}")
        idx = idx.nonzero().flatten()
    if idx.numel() == 0:  # before the dtype check: torch.as_tensor([]) is float32
        raise ECIFInputError("indices is empty: give at least one training pair to remove")
    if idx.dtype.is_floating_point or idx.dtype.is_complex:
        raise ECIFInputError(f"indices must be integers, got dtype {idx.dtype}")
    idx = idx.reshape(-1).to(torch.int64)
    if bool((idx < 0).any()) or bool((idx >= n).any()):
        raise ECIFInputError(f"indices must lie in [0, {n}), got min {int(idx.min())}, max {int(idx.max())}")
    if idx.unique().numel() != idx.numel():
        raise ECIFInputError("indices contains duplicates; each pair can be removed once")
    return idx


NEGATIVE_TERMS = ("exact", "taylor")


def check_choice(value, name: str, choices) -> str:
    if value not in choices:
        raise ECIFInputError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value
