"""Triton GPU backend (docs/math.md §5): the same op names and contracts as the torch twins.

Registered in :mod:`ecif_fast.kernels.registry` for CUDA devices. :func:`available` is True when
``triton`` imports. CPU tensors run only when the backend is requested explicitly (``backend="triton"``
or ``ECIF_FAST_BACKEND=triton``) and ``TRITON_INTERPRET=1`` is set (Triton's interpreter, for tests):
see :func:`supports_device`. Automatic choice never picks this backend for CPU tensors.

Ops: ``lse``, ``infonce``, ``ecif_reductions``, ``gauss_newton_product`` (float16 / bfloat16 / float32 /
float64). Modules: :mod:`.launch` (host side shared by the ops: inputs, dtypes, plan tables, launching
with a fall-back), :mod:`.tiles` (device helpers: row and column tiles, products of tiles), one module
per op with its kernels and design notes (:mod:`.lse`, :mod:`.infonce`, :mod:`.gauss_newton`,
:mod:`.reductions`). Each op module's ``last_launch()`` says what its latest call launched.
"""
from __future__ import annotations

import os
from typing import Optional

NAME = "triton"
DEVICES = frozenset({"cuda"})

_IMPORT_ERROR: Optional[str] = None
try:
    import triton  # noqa: F401
except Exception as e:  # ImportError, or a broken installation raising something else
    _IMPORT_ERROR = (f"triton could not be imported ({type(e).__name__}: {e}); install it with "
                     "`pip install triton` (or the package's `dev`/`triton` extras)")
else:
    # the op modules under other names: ``lse`` and ``infonce`` are the ops themselves
    from . import infonce as infonce_module, lse as lse_module, reductions as reductions_module  # noqa: F401
    from .gauss_newton import gauss_newton_product  # noqa: F401
    from .infonce import infonce  # noqa: F401
    from .launch import interpreting  # noqa: F401
    from .lse import last_launch, lse  # noqa: F401
    from .reductions import ecif_reductions  # noqa: F401


def available() -> bool:
    """True when triton imports (a GPU is not required to load the backend)."""
    return _IMPORT_ERROR is None


def unavailable_reason() -> Optional[str]:
    """Why :func:`available` is False (None when it is True)."""
    return _IMPORT_ERROR


def supports_device(device_type: str) -> bool:
    """Devices accepted on explicit request: CUDA, and the CPU while ``TRITON_INTERPRET=1`` is set."""
    if device_type == "cuda":
        return True
    if device_type == "cpu":
        return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on", "y")
    return False


__all__ = ["available", "unavailable_reason", "supports_device", "lse", "infonce", "ecif_reductions",
           "gauss_newton_product", "interpreting", "last_launch"]
