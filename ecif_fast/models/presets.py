"""Named parameter selections for CLIP models: ``params="heads"``, ``"last:K"``, ``"lora"``, ``"all"``, ``"trainable"``.

A preset is resolved against the model's module tree, so it works on an adapter that holds the CLIP model
in ``.clip`` (:func:`ecif_fast.wrap`), on the raw CLIP model, and through a ``peft`` wrapper (whose names carry
``base_model.model.``). The CLIP module is found by the children it holds, not by full names: each model family
says where its towers, blocks, final norms and projections sit (:meth:`~ecif_fast.models.families.base.Family.towers`;
the Hugging Face and open_clip layouts are described in their modules under :mod:`ecif_fast.models.families`).

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
from . import families

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
def _find_clip(model: nn.Module):
    return [(name, towers) for name, m in model.named_modules() if (towers := families.towers_of(m)) is not None]


def _tower_prefixes(model: nn.Module, p: Preset) -> list[str]:
    found = _find_clip(model)
    if not found:
        known = " or ".join(f.label for f in families.FAMILIES)
        raise ECIFInputError(f'params="{p}": no CLIP architecture ({known}) found in {type(model).__name__}; {_HINT}')
    if len(found) > 1:
        raise ECIFInputError(f'params="{p}": {type(model).__name__} holds {len(found)} CLIP models '
                             f"({', '.join(repr(n) for n, _ in found)}); {_HINT}")
    _, towers = found[0]
    names = {id(m): n for n, m in model.named_modules()}
    names.update({id(t): n for n, t in model.named_parameters()})
    out = []
    for tower in towers:
        if p.kind == "last":
            depth = len(tower.blocks)
            if p.k > depth:
                raise ECIFInputError(f'params="{p}": the {tower.name} tower has {depth} transformer blocks, fewer '
                                     f"than K = {p.k}; use K <= {min(len(t.blocks) for t in towers)}, or \"all\"")
            out += [names[id(b)] for b in list(tower.blocks)[depth - p.k:]]
            out += [names[id(m)] for m in tower.post if m is not None]
        out.append(names[id(tower.projection)])
    return out
