"""The Hugging Face family: ``transformers.CLIPModel``, also inside a ``peft`` wrapper.

Adapter (:class:`HFCLIP`). ``encode_image(pixel_values)`` / ``encode_text(input_ids)`` are CLIP's projected
features, L2-normalised as CLIP does; ``logit_scale`` is CLIP's own parameter (named ``clip.logit_scale``). The
towers run under the SDPA *math* kernel: the fused CPU attention kernels have neither forward-mode AD (the JVP
pass) nor double backward (exact Hessians), and HF's eager attention takes its softmax in float32, which caps
float64 influence at about 1e-8 relative. The math kernel is exact in float64 and supports both.

Presets. The towers are ``vision_model`` / ``text_model`` (blocks in ``encoder.layers``), followed by
``post_layernorm`` / ``final_layer_norm`` and the ``visual_projection`` / ``text_projection`` modules.

Preprocessing. A Hugging Face model has none built in (it lives in the checkpoint's files): pass a
``CLIPProcessor`` or its parts. A ``transformers`` tokenizer, with any model, pads each batch on the right to its
longest caption and truncates to the model's ``max_position_embeddings``; a ``transformers`` image processor
takes the whole batch at once.
"""
from __future__ import annotations

import functools
import importlib

import torch
from torch import nn

from ...errors import ECIFInputError
from ..peft import unwrap_peft
from .base import Adapter, Family, TextBatcher, Tower, math_attention, owns


def is_hf_clip(model: nn.Module) -> bool:
    """True for a ``transformers.CLIPModel``, also when wrapped by ``peft``."""
    inner = unwrap_peft(model)
    return type(inner).__name__ == "CLIPModel" and type(inner).__module__.startswith("transformers")


def _features(out) -> torch.Tensor:
    """transformers 5 returns an output object (projected features in ``pooler_output``), 4.x a tensor."""
    return out if torch.is_tensor(out) else out.pooler_output


class HFCLIP(Adapter):
    """Adapter of a Hugging Face CLIP model (see the module docstring).

    Args:
        clip: ``transformers.CLIPModel`` or a ``peft`` model around one. Its parameters keep their
            ``requires_grad``: ECIF's default parameter selection is what the model trains (e.g. the LoRA
            weights of a ``peft`` model); pass ``params=`` to ECIF to choose others.
    """

    def __init__(self, clip: nn.Module):
        if not is_hf_clip(clip):
            raise TypeError(f"HFCLIP wraps a transformers.CLIPModel, got {type(clip).__name__}")
        super().__init__(clip)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``pixel_values (n, 3, H, W) -> (n, projection_dim)`` unit-norm image embeddings."""
        with math_attention():
            u = _features(self.clip.get_image_features(pixel_values=pixel_values))
        return u / u.norm(dim=-1, keepdim=True)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids (n, L) -> (n, projection_dim)`` unit-norm text embeddings (fixed-length, unpadded ids)."""
        with math_attention():
            v = _features(self.clip.get_text_features(input_ids=input_ids))
        return v / v.norm(dim=-1, keepdim=True)


# ---------------------------------------------------------------------------------------------- preprocessing
def _is_transformers(obj, module: str, name: str) -> bool:
    """``isinstance(obj, <module>.<name>)``, False when ``transformers`` is not installed."""
    try:
        cls = getattr(importlib.import_module(module), name)
    except ImportError:
        return False
    return isinstance(obj, cls)


def _process_images(processor, images: list) -> torch.Tensor:
    return processor(images=images, return_tensors="pt")["pixel_values"]


def _tokenize(tokenizer, max_length: int | None, captions: list[str]):
    return tokenizer(captions, padding="longest", truncation=max_length is not None, max_length=max_length,
                     return_tensors="pt")


class HFCLIPFamily(Family):
    name = "hf_clip"
    label = "Hugging Face CLIPModel"
    library = "transformers"
    preprocessing_hint = ("a Hugging Face CLIP model has no built-in preprocessing: pass processor="
                          "CLIPProcessor.from_pretrained(<the checkpoint's name or folder>), or image_transform= "
                          "(CLIPImageProcessor or a PIL → (3, H, W) callable) and tokenizer= (CLIPTokenizer or a "
                          "list[str] → (B, L) callable)")

    def matches(self, model: nn.Module) -> bool:
        return is_hf_clip(model)

    def wrap(self, model: nn.Module) -> nn.Module:
        return HFCLIP(model)

    def towers(self, core: nn.Module) -> list[Tower] | None:
        if not owns(core, "vision_model", "text_model", "visual_projection", "text_projection"):
            return None
        vis, txt = core.vision_model, core.text_model
        if not (owns(vis, "encoder") and owns(vis.encoder, "layers")
                and owns(txt, "encoder") and owns(txt.encoder, "layers")):
            return None
        return [Tower("vision", vis.encoder.layers, [getattr(vis, "post_layernorm", None)], core.visual_projection),
                Tower("text", txt.encoder.layers, [getattr(txt, "final_layer_norm", None)], core.text_projection)]

    def image_batcher(self, transform):
        if _is_transformers(transform, "transformers.image_processing_base", "ImageProcessingMixin"):
            return functools.partial(_process_images, transform)
        return None

    def text_batcher(self, tokenizer, clip: nn.Module) -> TextBatcher | None:
        if not _is_transformers(tokenizer, "transformers", "PreTrainedTokenizerBase"):
            return None
        if tokenizer.pad_token_id is None:
            raise ECIFInputError("the tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token "
                                 "(CLIP pads with its end-of-text token)")
        if getattr(tokenizer, "padding_side", "right") != "right":
            raise ECIFInputError("the tokenizer pads on the left; CLIP's causal text tower needs right padding: "
                                 "set tokenizer.padding_side = 'right'")
        text_cfg = getattr(getattr(clip, "config", None), "text_config", None)
        max_length = getattr(text_cfg, "max_position_embeddings", None)
        return functools.partial(_tokenize, tokenizer, max_length), int(tokenizer.pad_token_id)


HF_CLIP = HFCLIPFamily()
