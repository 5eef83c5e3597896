"""The model families ecif_fast knows, and the look-ups that dispatch through them.

Adding a family: write a module here with a :class:`~.base.Family` subclass (how to recognise the model, its
adapter, its towers for the presets, its preprocessing) and add its instance to :data:`FAMILIES`.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from ..peft import unwrap_peft
from .base import Family, TextBatcher, Tower
from .hf_clip import HF_CLIP
from .open_clip import OPEN_CLIP

#: every known family, in the order they are tried
FAMILIES: tuple[Family, ...] = (HF_CLIP, OPEN_CLIP)


def family_of(model: nn.Module) -> Family | None:
    """The family whose adapter takes ``model`` (raw or inside ``peft``), or None."""
    return next((f for f in FAMILIES if f.matches(model)), None)


def library_family(model: nn.Module) -> Family | None:
    """The family whose library defines ``model``'s class (whether or not its adapter takes it), or None."""
    package = type(model).__module__.split(".")[0]
    return next((f for f in FAMILIES if f.library == package), None)


def clip_of(model: nn.Module) -> nn.Module:
    """The CLIP model inside an adapter (``.clip``) and a ``peft`` wrapper, or ``model`` itself."""
    return unwrap_peft(getattr(model, "clip", model))


def towers_of(module: nn.Module) -> list[Tower] | None:
    """The towers of ``module`` when it is a CLIP module of some family (see :meth:`Family.towers`), else None."""
    return next((t for f in FAMILIES if (t := f.towers(module)) is not None), None)


def image_batcher(transform) -> Callable | None:
    """A family library's batch function for ``transform`` (e.g. a Hugging Face image processor), or None."""
    return next((b for f in FAMILIES if (b := f.image_batcher(transform)) is not None), None)


def text_batcher(tokenizer, clip: nn.Module) -> TextBatcher | None:
    """A family library's ``(batch function, pad id)`` for ``tokenizer`` used with ``clip``, or None."""
    return next((b for f in FAMILIES if (b := f.text_batcher(tokenizer, clip)) is not None), None)


__all__ = ["FAMILIES", "Family", "Tower", "family_of", "library_family", "clip_of", "towers_of", "image_batcher",
           "text_batcher"]
