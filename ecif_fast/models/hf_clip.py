"""Hugging Face ``transformers.CLIPModel`` (also inside a ``peft`` wrapper) as a :class:`ContrastiveModel`.

``encode_image(pixel_values)`` / ``encode_text(input_ids)`` are CLIP's projected features, L2-normalised as
CLIP does; ``logit_scale`` is CLIP's own parameter (named ``clip.logit_scale``). The towers run under the
SDPA *math* kernel: the fused CPU attention kernels have neither forward-mode AD (the JVP pass) nor double
backward (exact Hessians), and HF's eager attention takes its softmax in float32, which caps float64
influence at about 1e-8 relative. The math kernel is exact in float64 and supports both.
"""
from __future__ import annotations

import torch
from torch import nn


def _features(out) -> torch.Tensor:
    """transformers 5 returns an output object (projected features in ``pooler_output``), 4.x a tensor."""
    return out if torch.is_tensor(out) else out.pooler_output


def _math_attention():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def is_hf_clip(model) -> bool:
    """True for a ``transformers.CLIPModel``, also when wrapped by ``peft``."""
    inner = getattr(getattr(model, "base_model", None), "model", model)
    return type(inner).__name__ == "CLIPModel" and type(inner).__module__.startswith("transformers")


class HFCLIP(nn.Module):
    """Adapter of a Hugging Face CLIP model (see the module docstring).

    Args:
        clip: ``transformers.CLIPModel`` or a ``peft`` model around one. Its parameters keep their
            ``requires_grad``: ECIF's default parameter selection is what the model trains (e.g. the LoRA
            weights of a ``peft`` model); pass ``params=`` to ECIF to choose others.
    """

    def __init__(self, clip: nn.Module):
        super().__init__()
        if not is_hf_clip(clip):
            raise TypeError(f"HFCLIP wraps a transformers.CLIPModel, got {type(clip).__name__}")
        self.clip = clip

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``pixel_values (n, 3, H, W) -> (n, projection_dim)`` unit-norm image embeddings."""
        with _math_attention():
            u = _features(self.clip.get_image_features(pixel_values=pixel_values))
        return u / u.norm(dim=-1, keepdim=True)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids (n, L) -> (n, projection_dim)`` unit-norm text embeddings (fixed-length, unpadded ids)."""
        with _math_attention():
            v = _features(self.clip.get_text_features(input_ids=input_ids))
        return v / v.norm(dim=-1, keepdim=True)
