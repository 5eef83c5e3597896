"""Seeing through a ``peft`` wrapper."""
from __future__ import annotations

from torch import nn


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The model a ``peft`` wrapper holds (``PeftModel.base_model.model``), or ``model`` itself.

    Duck-typed, so ``peft`` need not be installed; a model without that attribute chain is returned as is.
    """
    return getattr(getattr(model, "base_model", None), "model", model)
