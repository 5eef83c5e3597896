"""The open_clip family: ``open_clip.model.CLIP`` and ``CustomTextCLIP``, also inside a ``peft`` wrapper.

Adapter (:class:`OpenCLIP`). ``encode_image(images)`` / ``encode_text(tokens)`` are open_clip's own features
with its own normalisation (``encode_*(..., normalize=True)``, what open_clip trains with); ``logit_scale`` is
the model's parameter (named ``clip.logit_scale``). Models with a ``logit_bias`` (SigLIP) are refused: their
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

Presets. ``CLIP``: ``visual`` (blocks in ``transformer.resblocks``, then ``attn_pool`` / ``ln_post``, ``proj``) and
the text tower inline (``transformer.resblocks``, ``ln_final``, ``text_projection``: a parameter, or a module for
``proj_type="linear"``); ``CustomTextCLIP`` keeps the text tower in ``.text``.

Preprocessing (offline, for any open_clip model). ``open_clip.image_transform`` (evaluation mode) built from the
model's own preprocessing config (``open_clip.get_model_preprocess_cfg``: ``visual.preprocess_cfg``, set by
``create_model``, or the legacy ``image_size`` / ``image_mean`` / ``image_std``), and
``open_clip.tokenizer.SimpleTokenizer`` with the model's ``context_length`` (its BPE vocabulary ships inside the
package). It pads every caption with 0, or truncates it keeping the end-of-text token, to ``context_length``.
A model with a Hugging Face text tower, or a text vocabulary smaller than SimpleTokenizer's, needs its own
``tokenizer=``.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
from torch import nn

from ...errors import ECIFInputError
from ..peft import unwrap_peft
from .base import Adapter, Family, TextBatcher, Tower, math_attention, owns

_CLASSES = ("CLIP", "CustomTextCLIP")


def is_open_clip(model: nn.Module) -> bool:
    """True for an ``open_clip`` ``CLIP`` or ``CustomTextCLIP``, also when wrapped by ``peft``."""
    inner = unwrap_peft(model)
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
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with math_attention():
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


class OpenCLIP(Adapter):
    """Adapter of an open_clip CLIP model (see the module docstring).

    Args:
        clip: ``open_clip.model.CLIP`` / ``CustomTextCLIP``, or a ``peft`` model around one. Its parameters
            keep their ``requires_grad``: ECIF's default parameter selection is what the model trains (e.g.
            the LoRA weights of a ``peft`` model); pass ``params=`` to ECIF to choose others.
    """

    def __init__(self, clip: nn.Module):
        if not is_open_clip(clip):
            raise TypeError(f"OpenCLIP wraps an open_clip CLIP or CustomTextCLIP, got {type(clip).__name__}")
        inner = unwrap_peft(clip)
        if getattr(inner, "logit_bias", None) is not None:
            raise ECIFInputError(
                f"this open_clip {type(inner).__name__} has a logit_bias (a SigLIP model, trained with the "
                "sigmoid loss); ECIF's loss is the softmax contrastive (InfoNCE) loss of CLIP, so its influence "
                "would not describe this model")
        _check_attention_lora(inner)
        super().__init__(clip)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``images (n, 3, H, W) -> (n, embed_dim)`` unit-norm image embeddings."""
        with _exact_attention():
            return self.clip.encode_image(images, normalize=True)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens (n, context_length) -> (n, embed_dim)`` unit-norm text embeddings (open_clip token ids)."""
        with _exact_attention():
            return self.clip.encode_text(tokens, normalize=True)


# ---------------------------------------------------------------------------------------------- preprocessing
def _default_transform(clip: nn.Module):
    """``open_clip.image_transform`` (evaluation mode) from the model's own preprocessing config."""
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    cfg = PreprocessCfg(**merge_preprocess_dict(PreprocessCfg(), dict(open_clip.get_model_preprocess_cfg(clip))))
    return open_clip.image_transform(cfg.size, is_train=False, mean=cfg.mean, std=cfg.std,
                                     resize_mode=cfg.resize_mode, interpolation=cfg.interpolation,
                                     fill_color=cfg.fill_color)


def _default_tokenizer(clip: nn.Module):
    """``SimpleTokenizer`` with the model's context length; refused for a Hugging Face text tower or a text
    vocabulary smaller than SimpleTokenizer's."""
    import open_clip

    text = getattr(clip, "text", None)
    if text is not None and type(text).__name__ == "HFTextEncoder":
        raise ECIFInputError("this open_clip model has a Hugging Face text tower: pass its tokenizer= "
                             "(open_clip.get_tokenizer(model_name))")
    tok_cfg = open_clip.get_model_tokenize_cfg(clip)
    context = tok_cfg.get("context_length") or getattr(clip, "context_length", None)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context)
    vocab = tok_cfg.get("vocab_size")
    if vocab is not None and vocab < tokenizer.vocab_size:
        raise ECIFInputError(f"this open_clip model's text vocabulary has {vocab} tokens but open_clip's "
                             f"SimpleTokenizer gives ids up to {tokenizer.vocab_size - 1}; pass the model's own "
                             "tokenizer= (open_clip.get_tokenizer(model_name))")
    return tokenizer


class OpenCLIPFamily(Family):
    name = "open_clip"
    label = "open_clip CLIP"
    library = "open_clip"

    def matches(self, model: nn.Module) -> bool:
        return is_open_clip(model)

    def wrap(self, model: nn.Module) -> nn.Module:
        return OpenCLIP(model)

    def towers(self, core: nn.Module) -> list[Tower] | None:
        if not owns(core, "visual"):
            return None
        visual = core.visual
        text = core.text if owns(core, "text") else core  # CustomTextCLIP / CLIP
        if not (owns(visual, "transformer", "proj") and owns(visual.transformer, "resblocks")
                and owns(text, "transformer", "ln_final", "text_projection") and owns(text.transformer, "resblocks")):
            return None
        vpost = [getattr(visual, a) for a in ("attn_pool", "attn_pool_contrastive", "ln_post") if owns(visual, a)]
        return [Tower("vision", visual.transformer.resblocks, vpost, visual.proj),
                Tower("text", text.transformer.resblocks, [text.ln_final], text.text_projection)]

    def fill_preprocessing(self, clip: nn.Module, image_transform, tokenizer) -> tuple:
        return (_default_transform(clip) if image_transform is None else image_transform,
                _default_tokenizer(clip) if tokenizer is None else tokenizer)

    def text_batcher(self, tokenizer, clip: nn.Module) -> TextBatcher | None:
        if type(tokenizer).__module__.startswith("open_clip") and type(tokenizer).__name__ == "SimpleTokenizer":
            return tokenizer, 0  # pads to the context length with 0 itself
        return None


OPEN_CLIP = OpenCLIPFamily()
