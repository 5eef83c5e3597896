"""``open_clip`` CLIP models (``open_clip.model.CLIP``, ``CustomTextCLIP``; also inside ``peft``) as a
:class:`ContrastiveModel`.

``encode_image(images)`` / ``encode_text(tokens)`` are open_clip's own features with its own
normalisation (``encode_*(..., normalize=True)``, what open_clip trains with); ``logit_scale`` is the
model's parameter (named ``clip.logit_scale``). Models with a ``logit_bias`` (SigLIP) are refused: their
loss is the sigmoid loss, not the softmax contrastive loss of docs/math.md §2.

Attention. open_clip's towers use ``nn.MultiheadAttention`` (default blocks) or its own ``Attention``
(custom blocks), both ending in ``F.scaled_dot_product_attention``. Two fused CPU kernels break the
engine: in eval mode, with no parameter requiring grad (the engine's JVP pass), ``nn.MultiheadAttention``
takes its fast path ``torch._native_multi_head_attention``, which has no forward-mode AD; and the SDPA
flash kernel for CPU has neither forward-mode AD nor double backward (exact Hessians). The towers therefore
run with the MHA fast path switched off and under the SDPA *math* kernel, exact in float64, for the
duration of each ``encode_*`` call only: the previous fast-path setting (a process-wide flag,
``torch.backends.mha``) is restored afterwards, and the user's model is never modified. The flag is global,
so another thread running ``nn.MultiheadAttention`` at the same moment also misses the fast path (it gets
the same results, more slowly).

peft LoRA: target open_clip's Linear layers (``c_fc``, ``c_proj`` of the MLPs; ``out_proj`` of the custom
``Attention`` blocks). Two targets on ``nn.MultiheadAttention`` do not work and are reported at wrap time:
a LoRA on its ``out_proj`` has no effect (the module reads ``out_proj.weight`` itself and never calls
``out_proj``: a warning, the influence of those weights is zero), and peft's LoRA of the whole module
(target ``attn``) merges its weights through ``.data`` in every forward, which ``torch.func`` transforms
refuse (an error).
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import ECIFInputError

_CLASSES = ("CLIP", "CustomTextCLIP")


def _inner(model):
    """The model a ``peft`` wrapper holds (``PeftModel.base_model.model``), or ``model`` itself."""
    return getattr(getattr(model, "base_model", None), "model", model)


def is_open_clip(model) -> bool:
    """True for an ``open_clip`` ``CLIP`` or ``CustomTextCLIP``, also when wrapped by ``peft``."""
    inner = _inner(model)
    return type(inner).__name__ in _CLASSES and type(inner).__module__.startswith("open_clip")


def _check_attention_lora(inner: nn.Module) -> None:
    """Refuse peft's LoRA of ``nn.MultiheadAttention``; warn about a LoRA on its ``out_proj`` (no effect)."""
    for name, mod in inner.named_modules():
        if isinstance(getattr(mod, "base_layer", None), nn.MultiheadAttention):
            raise ECIFInputError(
                f"peft LoRA on the nn.MultiheadAttention {name!r} cannot be analysed: peft merges its weights "
                "through .data in every forward, which torch.func transforms (ECIF's JVP pass) refuse; target "
                "the MLP Linears instead (target_modules=['c_fc', 'c_proj'])")
    dead = [name for name, mod in inner.named_modules()
            if isinstance(mod, nn.MultiheadAttention) and hasattr(mod.out_proj, "lora_A")]
    if dead:
        warnings.warn(
            f"LoRA on the out_proj of nn.MultiheadAttention ({', '.join(dead)}) has no effect: the module uses "
            "out_proj.weight directly and never calls out_proj, so those LoRA weights do not change the "
            "features and their influence is zero; target 'c_fc' / 'c_proj' instead", UserWarning, stacklevel=3)


@contextmanager
def _exact_attention():
    """MHA fast path off and SDPA math kernel on, restoring the previous settings on exit."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


class OpenCLIP(nn.Module):
    """Adapter of an open_clip CLIP model (see the module docstring).

    Args:
        clip: ``open_clip.model.CLIP`` / ``CustomTextCLIP``, or a ``peft`` model around one. Its parameters
            keep their ``requires_grad``: ECIF's default parameter selection is what the model trains (e.g.
            the LoRA weights of a ``peft`` model); pass ``params=`` to ECIF to choose others.
    """

    def __init__(self, clip: nn.Module):
        super().__init__()
        if not is_open_clip(clip):
            raise TypeError(f"OpenCLIP wraps an open_clip CLIP or CustomTextCLIP, got {type(clip).__name__}")
        inner = _inner(clip)
        if getattr(inner, "logit_bias", None) is not None:
            raise ECIFInputError(
                f"this open_clip {type(inner).__name__} has a logit_bias (a SigLIP model, trained with the "
                "sigmoid loss); ECIF's loss is the softmax contrastive (InfoNCE) loss of CLIP, so its influence "
                "would not describe this model")
        _check_attention_lora(inner)
        self.clip = clip

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``images (n, 3, H, W) -> (n, embed_dim)`` unit-norm image embeddings."""
        with _exact_attention():
            return self.clip.encode_image(images, normalize=True)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens (n, context_length) -> (n, embed_dim)`` unit-norm text embeddings (open_clip token ids)."""
        with _exact_attention():
            return self.clip.encode_text(tokens, normalize=True)
