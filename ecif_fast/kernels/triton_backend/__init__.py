"""Triton GPU backend (docs/math.md §5): the same op names and contracts as the torch twins.

Registered in :mod:`ecif_fast.kernels.registry` for CUDA devices. :func:`available` is True when
``triton`` imports. CPU tensors run only when the backend is requested explicitly (``backend="triton"``
or ``ECIF_FAST_BACKEND=triton``) and ``TRITON_INTERPRET=1`` is set (Triton's interpreter, for tests):
see :func:`supports_device`. Automatic choice never picks this backend for CPU tensors.

Ops: ``lse``, ``infonce``, ``gauss_newton_product`` (float16/bfloat16/float32/float64; see :mod:`.lse`,
:mod:`.infonce` and :mod:`.gauss_newton` for the kernel designs).
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
    from . import lse as lse_module  # the submodule (its name ``lse`` is taken by the op below)
    from .lse import interpreting, last_launch, lse  # noqa: F401
    from . import reductions as reductions_module  # the submodule of ``ecif_reductions``
    from .reductions import ecif_reductions  # noqa: F401
    from . import infonce as infonce_module  # the submodule (the name ``infonce`` is the op)
    from .infonce import infonce  # noqa: F401
    from .gauss_newton import gauss_newton_product  # noqa: F401


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


__all__ = ["available", "unavailable_reason", "supports_device", "lse", "interpreting", "last_launch", "ecif_reductions", "infonce",
           "gauss_newton_product"]
