"""What a user knows about each training pair (ids, captions, image paths, classes), and score tables."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..errors import ECIFInputError


@dataclass(frozen=True)
class PairInfo:
    """Optional per-pair metadata carried into result tables. Every given field has one entry per pair.

    Attributes:
        pair_ids: user ids of the pairs (default ``0..n-1``).
        captions: caption text of each pair. image_paths: path of each image.
        extra: further columns, ``name -> (n,)`` sequence (e.g. a class label, a known misalignment flag).
    """

    pair_ids: Sequence[Any] | None = None
    captions: Sequence[str] | None = None
    image_paths: Sequence[str] | None = None
    extra: Mapping[str, Sequence[Any]] = field(default_factory=dict)

    def columns(self, n: int) -> dict[str, np.ndarray]:
        """The known columns as arrays of length ``n``; ``pair_id`` always first."""
        cols = {"pair_id": np.arange(n) if self.pair_ids is None else _column(self.pair_ids, "pair_ids", n)}
        if self.captions is not None:
            cols["caption"] = _column(self.captions, "captions", n)
        if self.image_paths is not None:
            cols["image_path"] = _column(self.image_paths, "image_paths", n)
        for name, values in self.extra.items():
            if name in cols:
                raise ECIFInputError(f"PairInfo.extra column {name!r} clashes with a built-in column; rename it")
            cols[name] = _column(values, name, n)
        return cols


def _column(values, name: str, n: int) -> np.ndarray:
    arr = values.detach().cpu().numpy() if torch.is_tensor(values) else np.asarray(values)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ECIFInputError(f"{name} must have one entry per training pair ({n}), got shape {arr.shape}")
    return arr


def score_table(n: int, info: PairInfo | None, scores: Mapping[str, torch.Tensor | np.ndarray]):
    """A pandas DataFrame: metadata columns then score columns, one row per pair, in pair order."""
    import pandas as pd

    cols = (info or PairInfo()).columns(n)
    for name, s in scores.items():
        arr = s.detach().cpu().double().numpy() if torch.is_tensor(s) else np.asarray(s, dtype=np.float64)
        if arr.shape != (n,):
            raise ValueError(f"score column {name!r} must have shape ({n},), got {arr.shape}")
        cols[name] = arr
    return pd.DataFrame(cols)
