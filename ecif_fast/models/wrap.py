"""``ecif_fast.wrap(model)``: the :class:`ContrastiveModel` view of a known CLIP implementation."""
from __future__ import annotations

from torch import nn

from ..errors import ECIFInputError
from .hf_clip import HFCLIP, is_hf_clip
from .open_clip import OpenCLIP, is_open_clip

RECIPE = ("for a custom dual encoder, subclass torch.nn.Module with encode_image(x) -> (n, d), "
          "encode_text(y) -> (n, d) and a logit_scale parameter (log of the temperature multiplier), "
          "and pass it to ECIF directly")


def wrap(model: nn.Module) -> nn.Module:
    """Return ``model`` in the form :class:`ecif_fast.ECIF` takes.

    - an ``open_clip`` ``CLIP`` / ``CustomTextCLIP`` (also inside ``peft``) gets
      :class:`~ecif_fast.models.open_clip.OpenCLIP` (checked first: open_clip models have ``encode_image``,
      ``encode_text`` and ``logit_scale`` themselves, but their features are not normalised by default);
    - an object that already has ``encode_image``, ``encode_text`` and ``logit_scale`` is returned as is;
    - a Hugging Face ``transformers.CLIPModel`` (also inside ``peft``) gets :class:`~ecif_fast.models.hf_clip.HFCLIP`.
    """
    if is_open_clip(model):
        return OpenCLIP(model)
    if all(hasattr(model, a) for a in ("encode_image", "encode_text", "logit_scale")):
        return model
    if is_hf_clip(model):
        return HFCLIP(model)
    raise ECIFInputError(f"ecif_fast.wrap does not know {type(model).__name__}; {RECIPE}")
