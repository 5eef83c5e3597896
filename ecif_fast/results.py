"""Result containers."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class InfluenceResult:
    """Predicted change of the test function(s) F when training pairs are removed (docs/math.md §3 sign).

    ``total = positive + negative``; shapes ``(n_train,)`` for one F, ``(Q, n_train)`` for ``Q`` test
    functions (group influence: ``()`` or ``(Q,)``). For F = validation loss, ``total > 0`` means
    removing the pair raises the loss (the pair is valuable), ``total < 0`` that it is harmful.
    """

    total: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {"total": self.total, "positive": self.positive, "negative": self.negative}
