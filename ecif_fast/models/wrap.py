"""``ecif_fast.wrap(model)``: the :class:`ContrastiveModel` view of a known CLIP implementation."""
from __future__ import annotations

from torch import nn

from ..errors import ECIFInputError
from .families import family_of

RECIPE = ("for a custom dual encoder, subclass torch.nn.Module with encode_image(x) -> (n, d), "
          "encode_text(y) -> (n, d) and a logit_scale parameter (log of the temperature multiplier), "
          "and pass it to ECIF directly")


def wrap(model: nn.Module) -> nn.Module:
    """Return ``model`` in the form :class:`ecif_fast.ECIF` takes.

    - a model of a known family (:data:`~ecif_fast.models.families.FAMILIES`: a Hugging Face
      ``transformers.CLIPModel``, an ``open_clip`` ``CLIP`` / ``CustomTextCLIP``; also inside ``peft``) gets
      its family's adapter (:class:`~ecif_fast.models.families.hf_clip.HFCLIP`,
      :class:`~ecif_fast.models.families.open_clip.OpenCLIP`), even when it has ``encode_image`` itself
      (open_clip's features are not normalised by default);
    - any other object with ``encode_image``, ``encode_text`` and ``logit_scale`` is returned as is.
    """
    family = family_of(model)
    if family is not None:
        return family.wrap(model)
    if all(hasattr(model, a) for a in ("encode_image", "encode_text", "logit_scale")):
        return model
    raise ECIFInputError(f"ecif_fast.wrap does not know {type(model).__name__}; {RECIPE}")
