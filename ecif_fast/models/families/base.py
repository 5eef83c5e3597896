"""What a model family provides (:class:`Family`), and the pieces the families share.

A family is one CLIP implementation (Hugging Face ``transformers``, ``open_clip``, ...). Its module holds
everything ecif_fast knows about it: how to recognise its models, the adapter that makes one a
:class:`~ecif_fast.models.protocol.ContrastiveModel`, where its towers and projections sit in the module tree
(the parameter presets), its default preprocessing for :mod:`ecif_fast.data`, and its quirks. The registry
(:mod:`ecif_fast.models.families`) lists one :class:`Family` instance per module.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Union

from torch import nn

#: a batch function ``list[str] -> ids`` and the id it pads with (None: unknown)
TextBatcher = tuple[Callable, Union[int, None]]


class Tower(NamedTuple):
    """One tower of a CLIP module, as the parameter presets see it."""

    name: str                                  # "vision" or "text"
    blocks: nn.ModuleList                      # its transformer blocks, in order
    post: list                                 # modules after the blocks (final norms, pooling); None entries skipped
    projection: Union[nn.Module, nn.Parameter]


class Family:
    """One CLIP implementation. Subclass it, override what applies, and add an instance to ``FAMILIES``.

    Attributes:
        name: short identifier (``"hf_clip"``).
        label: how messages name the family's CLIP (``"Hugging Face CLIPModel"``).
        library: the top-level package of the family's classes (``"transformers"``): any model class from it
            gets the family's preprocessing, also one the adapter does not take.
        preprocessing_hint: what to pass when :func:`~ecif_fast.data.pair_collate` has no image transform or
            tokenizer for one of the family's models (None: a generic hint).
    """

    name: str = ""
    label: str = ""
    library: str = ""
    preprocessing_hint: str | None = None

    def matches(self, model: nn.Module) -> bool:
        """True for one of the family's CLIP models, raw or inside ``peft``."""
        raise NotImplementedError

    def wrap(self, model: nn.Module) -> nn.Module:
        """The adapter: ``model`` (raw or inside ``peft``) as a ``ContrastiveModel``."""
        raise NotImplementedError

    def towers(self, module: nn.Module) -> list[Tower] | None:
        """``[vision, text]`` towers when ``module`` itself is one of the family's CLIP modules, else None.

        Recognised by the children ``module`` owns (see :func:`owns`), so it also works on a ``peft`` model's
        inner module and on any module built the same way.
        """
        return None

    def fill_preprocessing(self, clip: nn.Module, image_transform, tokenizer) -> tuple:
        """``(image_transform, tokenizer)`` with the family's defaults where they are None (offline)."""
        return image_transform, tokenizer

    def image_batcher(self, transform) -> Callable | None:
        """A batch function ``list[PIL image] -> (B, 3, H, W)`` when ``transform`` is one of this library's
        image processors (whatever the model), else None (a per-image callable)."""
        return None

    def text_batcher(self, tokenizer, clip: nn.Module) -> TextBatcher | None:
        """``(batch function, pad id)`` when ``tokenizer`` is one of this library's tokenizers (whatever the
        model ``clip``), else None (a callable that pads itself)."""
        return None


class Adapter(nn.Module):
    """Base of the families' adapters: the CLIP model (raw or inside ``peft``) in ``.clip`` and its
    ``logit_scale`` parameter (so named ``clip.logit_scale``). Its parameters keep their ``requires_grad``:
    ECIF's default selection is what the model trains (e.g. the LoRA weights of a ``peft`` model)."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale


def owns(module: nn.Module, *children: str) -> bool:
    """``module`` holds these as direct children or parameters (not through ``__getattr__`` forwarding, which a
    peft wrapper does: only the real owner of the towers matches)."""
    own = set(module._modules) | set(module._parameters)
    return all(c in own and getattr(module, c) is not None for c in children)


def math_attention():
    """PyTorch's SDPA *math* kernel: forward-mode AD and double backward on every device, exact in float64
    (the fused CPU kernels have neither)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)

