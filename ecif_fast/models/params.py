"""Selection of the trained parameters θ and their flat-vector view."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Union

import torch
from torch import nn

from ..errors import ECIFInputError
from .presets import PRESETS, Preset, parse_preset

ParamsArg = Union[None, str, Preset, Iterable[Union[str, Preset]], Iterable[nn.Parameter],
                  Callable[[str, nn.Parameter], bool]]


@dataclass(frozen=True)
class ParamSpace:
    """The selected parameters, in a fixed order, viewed as one flat vector ``θ ∈ R^P``."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @property
    def numels(self) -> list[int]:
        return [int(torch.Size(s).numel()) for s in self.shapes]

    @property
    def size(self) -> int:
        return sum(self.numels)

    def flat(self, model: nn.Module) -> torch.Tensor:
        """``(P,)`` detached copy of the current values."""
        named = dict(model.named_parameters())
        return torch.cat([named[n].detach().reshape(-1) for n in self.names])

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` views of a ``(P,)`` vector (differentiable)."""
        out, pos = {}, 0
        for name, shape, k in zip(self.names, self.shapes, self.numels):
            out[name] = theta[pos:pos + k].view(shape)
            pos += k
        return out

    def slices(self) -> dict[str, slice]:
        out, pos = {}, 0
        for name, k in zip(self.names, self.numels):
            out[name] = slice(pos, pos + k)
            pos += k
        return out

    def load_into(self, model: nn.Module, theta: torch.Tensor) -> None:
        """Copy a ``(P,)`` vector into the model's parameters, in place."""
        named = dict(model.named_parameters())
        with torch.no_grad():
            for name, val in self.unflatten(theta).items():
                named[name].copy_(val)


def select_params(model: nn.Module, params: ParamsArg = None) -> ParamSpace:
    """Pick the parameters ECIF treats as trained.

    Args:
        params: ``None`` (all with ``requires_grad``); a name or list of names (a name also selects every
            parameter under it, e.g. ``"image_proj"``); a preset name (:mod:`ecif_fast.models.presets`):
            ``"heads"`` (the two projections), ``"last:K"`` (the last K blocks of each tower and everything
            after them), ``"lora"``, ``"all"`` (every floating-point parameter, frozen ones included),
            ``"trainable"`` (= ``None``), or a :class:`~ecif_fast.models.presets.Preset`
            (``presets.last_blocks(K)``); a list of ``nn.Parameter`` objects of ``model``; or a predicate
            ``(name, param) -> bool``. A list may mix names and presets (the union is taken).

    Precedence: a string that is the name (or a dotted prefix) of some parameter of the model selects by
    name, even when it is also a preset's name; a string that matches no name is read as a preset. A
    :class:`Preset` object is always a preset.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = list(model.named_parameters())
    if params is None:
        chosen = [n for n, p in named if p.requires_grad]
    elif isinstance(params, Preset):
        chosen = params.names(model)
    elif callable(params) and not isinstance(params, nn.Parameter):
        chosen = [n for n, p in named if params(n, p)]
    else:
        items = [params] if isinstance(params, (str, nn.Parameter, Preset)) else list(params)
        if all(isinstance(i, (str, Preset)) for i in items):
            chosen = _by_names_and_presets(model, named, items)
        elif all(isinstance(i, torch.Tensor) for i in items):
            ids = {id(i) for i in items}
            chosen = [n for n, p in named if id(p) in ids]
            if len(chosen) != len(ids):
                raise ECIFInputError("some tensors in params are not parameters of the model")
        else:
            raise TypeError("params must be None, names, parameters of the model, or a predicate "
                            "(name, param) -> bool (or a preset name such as \"heads\")")
    if not chosen:
        raise ECIFInputError(f"no trained parameters selected in {type(model).__name__}: pass params= or set "
                             "requires_grad=True on the parameters to analyse")
    shapes = dict((n, p.shape) for n, p in named)
    dtypes = {dict(named)[n].dtype for n in chosen}
    if len(dtypes) > 1:
        raise ECIFInputError(f"selected parameters have mixed dtypes {sorted(map(str, dtypes))}; cast the model "
                             "with model.double() or model.float()")
    return ParamSpace(tuple(chosen), tuple(shapes[n] for n in chosen))


def _by_names_and_presets(model: nn.Module, named, items) -> list[str]:
    """Union of name prefixes and presets, in the model's order (names first: see select_params)."""
    prefixes, unknown, picked = [], [], set()
    for i in items:
        if isinstance(i, Preset):
            picked.update(i.names(model))
        elif any(n == i or n.startswith(i + ".") for n, _ in named):
            prefixes.append(i)
        elif (p := parse_preset(i)) is not None:
            picked.update(p.names(model))
        else:
            unknown.append(i)
    if unknown:
        raise ECIFInputError(f"params {unknown} match no parameter of {type(model).__name__}; "
                             f"available: {[n for n, _ in named]}; presets: {', '.join(PRESETS)}")
    return [n for n, _ in named if n in picked or any(n == i or n.startswith(i + ".") for i in prefixes)]
