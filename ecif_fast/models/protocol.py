"""What ECIF needs from a model: two encoders and a logit scale (docs/math.md §2)."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class ContrastiveModel(Protocol):
    """A dual encoder trained with the symmetric contrastive loss.

    Any ``torch.nn.Module`` with these members is accepted by :class:`ecif_fast.ECIF`:

    - ``encode_image(x) -> (n, d)`` image embeddings ``u_i = f_θ(x_i)`` (normalised or not: the model
      decides, ECIF differentiates through whatever it does);
    - ``encode_text(y) -> (n, d)`` text embeddings ``v_i = g_θ(y_i)``;
    - ``logit_scale``: ``s = log t`` as a float, 0-d tensor or ``nn.Parameter`` (trained if selected).
    """

    logit_scale: torch.Tensor | float

    def encode_image(self, x: torch.Tensor) -> torch.Tensor: ...

    def encode_text(self, y: torch.Tensor) -> torch.Tensor: ...


def check_model(model) -> None:
    """Raise a clear ``TypeError`` when ``model`` lacks part of the protocol."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    missing = [a for a in ("encode_image", "encode_text", "logit_scale") if not hasattr(model, a)]
    if missing:
        raise TypeError(
            f"model {type(model).__name__} lacks {', '.join(missing)}: ECIF needs encode_image(x), "
            "encode_text(y) and logit_scale (log of the temperature multiplier); see ContrastiveModel")
