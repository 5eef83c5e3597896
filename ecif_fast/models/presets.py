"""Named parameter selections for CLIP models: ``params="heads"``, ``"last:K"``, ``"lora"``, ``"all"``, ``"trainable"``.

A preset is resolved against the model's module tree, so it works on an adapter that holds the CLIP model
in ``.clip`` (:class:`~ecif_fast.models.hf_clip.HFCLIP`, the open_clip adapter), on the raw CLIP model, and
through a ``peft`` wrapper (whose names carry ``base_model.model.``). The architecture is recognised by the
children a CLIP module holds, not by full names:

- Hugging Face ``CLIPModel``: ``vision_model`` / ``text_model`` towers (``encoder.layers``), ``post_layernorm``,
  ``final_layer_norm``, ``visual_projection``, ``text_projection``;
- open_clip ``CLIP``: ``visual`` (``transformer.resblocks``, ``ln_post``, ``proj``), ``transformer.resblocks``,
  ``ln_final``, ``text_projection`` (a parameter, or a module for ``proj_type="linear"``); ``CustomTextCLIP``
  (a ``text`` tower holding its own ``transformer``, ``ln_final``, ``text_projection``) too.

Precedence (see :func:`~ecif_fast.models.params.select_params`): a string that names a parameter or module of
the model (exactly, or as a dotted prefix) selects by name, as before presets existed; only a string that
matches no name is read as a preset. :func:`preset` / :func:`last_blocks` return a :class:`Preset` object,
which is always a preset, whatever the model's names.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ..errors import ECIFInputError

PRESETS = ("heads", "last:K", "lora", "all", "trainable")
_LAST = re.compile(r"last:(.*)")
_HINT = "pass parameter names (params=['clip.visual_projection', ...]) or a predicate (name, param) -> bool instead"


@dataclass(frozen=True)
class Preset:
    """A named selection, resolved against a model by :meth:`names`. Build with :func:`preset` or :func:`last_blocks`."""

    kind: str          # "heads", "last", "lora", "all", "trainable"
    k: int = 0         # blocks per tower for "last"

    def __post_init__(self):
        if self.kind not in ("heads", "last", "lora", "all", "trainable") or (self.kind == "last") != (self.k > 0):
            raise ECIFInputError(f"bad preset {self.kind!r} (k={self.k}); build presets with preset(name) or "
                                 "last_blocks(k)")

    def __str__(self) -> str:
        return f"last:{self.k}" if self.kind == "last" else self.kind

    def names(self, model: nn.Module) -> list[str]:
        """Names of the selected parameters of ``model``, in the model's order."""
        named = list(model.named_parameters())
        if self.kind == "trainable":
            chosen = [n for n, p in named if p.requires_grad]
        elif self.kind == "all":
            chosen = [n for n, p in named if p.is_floating_point()]
        elif self.kind == "lora":
            chosen = [n for n, _ in named if "lora_" in n]
            if not chosen:
                raise ECIFInputError(f'params="lora": {type(model).__name__} has no parameter with "lora_" in its '
                                     "name; wrap the model with peft first (peft.get_peft_model(clip, "
                                     "LoraConfig(...))), then ecif_fast.wrap it")
        else:
            prefixes = _tower_prefixes(model, self)
            chosen = [n for n, _ in named if any(n == q or n.startswith(q + ".") for q in prefixes)]
        return chosen


def last_blocks(k: int) -> Preset:
    """The last ``k`` transformer blocks of each tower and everything after them (the same as ``"last:k"``)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ECIFInputError(f"last_blocks(k) needs an integer k >= 1, got {k!r}")
    return Preset("last", k)


def preset(name: str) -> Preset:
    """The :class:`Preset` called ``name`` (``"heads"``, ``"last:K"``, ``"lora"``, ``"all"``, ``"trainable"``).

    Raises :class:`ECIFInputError` for any other string.
    """
    p = parse_preset(name)
    if p is None:
        raise ECIFInputError(f"unknown parameter preset {name!r}; presets: {', '.join(PRESETS)}")
    return p


def parse_preset(name: str) -> Preset | None:
    """``name`` as a :class:`Preset`, or None when it is not a preset's name (``"last:x"`` with a bad K raises)."""
    if name in ("heads", "lora", "all", "trainable"):
        return Preset(name)
    m = _LAST.fullmatch(name)
    if m is None:
        return None
    if not re.fullmatch(r"[0-9]+", m.group(1)) or int(m.group(1)) < 1:
        raise ECIFInputError(f'params="{name}": K in "last:K" must be an integer >= 1 (e.g. "last:2")')
    return Preset("last", int(m.group(1)))


# ---------------------------------------------------------------------------------------------- architectures
def _has(module: nn.Module, *children: str) -> bool:
    """``module`` holds these as direct children or parameters (not through ``__getattr__`` forwarding, which a
    peft wrapper does: only the real owner of the towers matches)."""
    own = set(module._modules) | set(module._parameters)
    return all(c in own and getattr(module, c) is not None for c in children)


def _towers(core: nn.Module):
    """``[(tower, blocks ModuleList, [final norms / pooling after the blocks], projection)]`` of a CLIP module, or
    None if ``core`` is not one."""
    if _has(core, "vision_model", "text_model", "visual_projection", "text_projection"):  # Hugging Face
        vis, txt = core.vision_model, core.text_model
        if not (_has(vis, "encoder") and _has(vis.encoder, "layers")
                and _has(txt, "encoder") and _has(txt.encoder, "layers")):
            return None
        return [("vision", vis.encoder.layers, [getattr(vis, "post_layernorm", None)], core.visual_projection),
                ("text", txt.encoder.layers, [getattr(txt, "final_layer_norm", None)], core.text_projection)]
    if _has(core, "visual"):  # open_clip: CLIP (text tower inline) or CustomTextCLIP (text tower in .text)
        visual = core.visual
        text = core.text if _has(core, "text") else core
        if not (_has(visual, "transformer", "proj") and _has(visual.transformer, "resblocks")
                and _has(text, "transformer", "ln_final", "text_projection") and _has(text.transformer, "resblocks")):
            return None
        vpost = [getattr(visual, a) for a in ("attn_pool", "attn_pool_contrastive", "ln_post") if _has(visual, a)]
        return [("vision", visual.transformer.resblocks, vpost, visual.proj),
                ("text", text.transformer.resblocks, [text.ln_final], text.text_projection)]
    return None


def _find_clip(model: nn.Module):
    return [(name, towers) for name, m in model.named_modules() if (towers := _towers(m)) is not None]


def _tower_prefixes(model: nn.Module, p: Preset) -> list[str]:
    found = _find_clip(model)
    if not found:
        raise ECIFInputError(f'params="{p}": no CLIP architecture (Hugging Face CLIPModel or open_clip CLIP) found '
                             f"in {type(model).__name__}; {_HINT}")
    if len(found) > 1:
        raise ECIFInputError(f'params="{p}": {type(model).__name__} holds {len(found)} CLIP models '
                             f"({', '.join(repr(n) for n, _ in found)}); {_HINT}")
    _, towers = found[0]
    names = {id(m): n for n, m in model.named_modules()}
    names.update({id(t): n for n, t in model.named_parameters()})
    out = []
    for tower, blocks, post, proj in towers:
        if p.kind == "last":
            depth = len(blocks)
            if p.k > depth:
                raise ECIFInputError(f'params="{p}": the {tower} tower has {depth} transformer blocks, fewer than '
                                     f"K = {p.k}; use K <= {min(len(t[1]) for t in towers)}, or \"all\"")
            out += [names[id(b)] for b in list(blocks)[depth - p.k:]]
            out += [names[id(m)] for m in post if m is not None]
        out.append(names[id(proj)])
    return out
