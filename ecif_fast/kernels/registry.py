"""Kernel backend registry (docs/math.md §5), in the style of Liger-Kernel's dispatch.

Every backend is a module exposing the *same op names* (``lse``, ...) with the same contract as the
torch twins. A backend declares its name, the device types it serves and its module path; it may
implement only some ops. Optionally the module defines ``available() -> bool`` and
``unavailable_reason() -> str | None`` (checked after a successful import) and
``supports_device(device_type) -> bool`` (extra devices accepted when the backend is requested
explicitly, e.g. Triton's CPU interpreter in tests; automatic choice only uses the declared devices).

Choosing a backend for ``get_op(op, device, backend)``:

* explicit: ``backend="name"``, else the environment variable ``ECIF_FAST_BACKEND`` (``""`` or
  ``"auto"`` mean automatic). A backend forced this way that does not exist, cannot load, does not
  serve the device, or lacks the op raises :class:`~ecif_fast.errors.BackendUnavailableError`
  saying which and why. No silent fallback.
* automatic: the available backends that serve the device, by priority (triton on CUDA, cpp on
  CPU, torch everywhere as the last resort), first one that implements the op; falls back silently.
"""
from __future__ import annotations

import importlib
import os
import threading
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Optional, Tuple, Union

import torch

from ..errors import BackendUnavailableError, ECIFInputError

ENV_VAR = "ECIF_FAST_BACKEND"
_AUTO = ("", "auto")


@dataclass(frozen=True)
class BackendSpec:
    """A registered backend.

    Attributes:
        name: what ``backend=`` and ``ECIF_FAST_BACKEND`` accept.
        module: import path of the module holding the ops.
        devices: device types it serves (``{"cpu"}``, ``{"cuda"}``); ``None`` means every device.
        priority: automatic choice tries lower values first.
    """

    name: str
    module: str
    devices: Optional[FrozenSet[str]]
    priority: int

    def serves(self, device_type: str) -> bool:
        return self.devices is None or device_type in self.devices

    def devices_text(self) -> str:
        return "every device" if self.devices is None else ", ".join(sorted(self.devices))


_lock = threading.Lock()
_REGISTRY: Dict[str, BackendSpec] = {}
# name -> (module or None, reason it is unavailable or None)
_LOADED: Dict[str, Tuple[object, Optional[str]]] = {}


def register_backend(name: str, module: str, devices=None, *, priority: int = 50) -> BackendSpec:
    """Register (or replace) a backend. ``devices``: iterable of device types, or None for all."""
    if not isinstance(name, str) or not name or name.lower() != name or name in _AUTO:
        raise ValueError(f"backend name must be a non-empty lower-case string other than 'auto', got {name!r}")
    spec = BackendSpec(name, module, None if devices is None else frozenset(devices), int(priority))
    with _lock:
        _REGISTRY[name] = spec
        _LOADED.pop(name, None)
    return spec


def unregister_backend(name: str) -> None:
    """Remove a backend (no error if it is not registered)."""
    with _lock:
        _REGISTRY.pop(name, None)
        _LOADED.pop(name, None)


register_backend("triton", "ecif_fast.kernels.triton_backend", {"cuda"}, priority=10)
register_backend("cpp", "ecif_fast.kernels.cpp_backend", {"cpu"}, priority=20)
register_backend("torch", "ecif_fast.kernels.torch_ref", None, priority=100)


def _load(spec: BackendSpec) -> Tuple[object, Optional[str]]:
    """Import the backend module once; returns ``(module, None)`` or ``(None, reason)``."""
    with _lock:
        hit = _LOADED.get(spec.name)
    if hit is not None:
        return hit
    try:
        mod = importlib.import_module(spec.module)
    except Exception as e:  # ImportError, or a broken optional dependency raising something else
        res: Tuple[object, Optional[str]] = (None, f"cannot import {spec.module}: {type(e).__name__}: {e}")
    else:
        res = (mod, None)
        avail = getattr(mod, "available", None)
        if callable(avail):
            try:
                ok = bool(avail())
            except Exception as e:
                ok, why = False, f"{spec.module}.available() raised {type(e).__name__}: {e}"
            else:
                why = None
            if not ok:
                if why is None:
                    reason_fn = getattr(mod, "unavailable_reason", None)
                    why = reason_fn() if callable(reason_fn) else None
                res = (None, why or f"{spec.module}.available() returned False")
    with _lock:
        _LOADED[spec.name] = res
    return res


def available_backends() -> Dict[str, Union[bool, str]]:
    """``{name: True}`` for every backend that loads here, ``{name: "reason"}`` for the others."""
    with _lock:
        specs = sorted(_REGISTRY.values(), key=lambda s: s.priority)
    out: Dict[str, Union[bool, str]] = {}
    for spec in specs:
        mod, why = _load(spec)
        out[spec.name] = True if mod is not None else why
    return out


def _device_type(device) -> str:
    if isinstance(device, torch.Tensor):
        return device.device.type
    try:
        return torch.device(device).type
    except (TypeError, RuntimeError) as e:
        raise ECIFInputError(f"not a device: {device!r} ({e})") from None


def _requested(backend) -> Tuple[Optional[str], str]:
    """The explicitly requested backend name (or None) and where the request came from."""
    if backend is not None:
        if not isinstance(backend, str):
            raise ECIFInputError(f"backend must be a string such as 'torch', 'cpp' or 'triton', or None; "
                                 f"got {type(backend).__name__}")
        name, source = backend.strip().lower(), f"backend={backend!r}"
    else:
        env = os.environ.get(ENV_VAR)
        if env is None:
            return None, "automatic choice"
        name, source = env.strip().lower(), f"{ENV_VAR}={env!r}"
    if name in _AUTO:
        return None, "automatic choice"
    return name, source


def _supports_explicit(spec: BackendSpec, mod, device_type: str) -> bool:
    if spec.serves(device_type):
        return True
    hook = getattr(mod, "supports_device", None)
    if callable(hook):
        try:
            return bool(hook(device_type))
        except Exception:
            return False
    return False


def resolve(op_name: str, device, backend: Optional[str] = None) -> Tuple[str, Callable]:
    """Pick the backend for ``op_name`` on ``device``; returns ``(backend name, op callable)``.

    Args:
        op_name: e.g. ``"lse"``. device: a ``torch.device``, a string like ``"cuda:0"``, or a tensor.
        backend: a backend name to force, ``"auto"``/None for automatic choice (``None`` also
            consults ``ECIF_FAST_BACKEND``).
    Raises:
        BackendUnavailableError: a forced backend is unknown, does not load, does not serve the
            device or does not implement the op; or (automatic choice) no backend implements it.
    """
    dev = _device_type(device)
    name, source = _requested(backend)
    with _lock:
        registry = dict(_REGISTRY)
    if name is not None:
        spec = registry.get(name)
        if spec is None:
            raise BackendUnavailableError(
                f"unknown backend {name!r} ({source}); registered backends: {', '.join(sorted(registry))}")
        mod, why = _load(spec)
        if mod is None:
            raise BackendUnavailableError(f"backend {name!r} was requested ({source}) but is unavailable: {why}")
        if not _supports_explicit(spec, mod, dev):
            raise BackendUnavailableError(
                f"backend {name!r} was requested ({source}) but does not run on device type {dev!r} "
                f"(it serves: {spec.devices_text()}); move the tensors or choose another backend")
        fn = getattr(mod, op_name, None)
        if not callable(fn):
            raise BackendUnavailableError(
                f"backend {name!r} was requested ({source}) but does not implement op {op_name!r}")
        return name, fn
    for spec in sorted(registry.values(), key=lambda s: s.priority):
        if not spec.serves(dev):
            continue
        mod, _ = _load(spec)
        if mod is None:
            continue
        fn = getattr(mod, op_name, None)
        if callable(fn):
            return spec.name, fn
    raise BackendUnavailableError(f"no available backend implements op {op_name!r} on device type {dev!r}; "
                                  f"backends: {available_backends()}")


def get_op(op_name: str, device, backend: Optional[str] = None) -> Callable:
    """The implementation of ``op_name`` to use on ``device`` (see :func:`resolve`)."""
    return resolve(op_name, device, backend)[1]
