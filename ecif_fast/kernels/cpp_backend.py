"""C++/OpenMP CPU backend (the compiled extension ``ecif_fast._C``, SPEC §5).

The extension is imported lazily, so ``import ecif_fast`` works without a compiler-built module;
:func:`available` says whether it loaded. Tensors cross into C++ as zero-copy numpy views
(``tensor.numpy()``); the extension accepts float32 and float64 only, so float16/bfloat16 inputs are
upcast to float32 here (accumulation dtype, SPEC §5). The number of threads follows
``torch.get_num_threads()``. ``ECIF_FAST_CPU_ISA`` (``auto``, ``avx512``, ``avx2``, ``generic``)
forces one compiled instruction-set variant (default ``auto``: the best the CPU supports).
"""
from __future__ import annotations

import importlib
import os
from typing import Optional

import torch

from ..errors import BackendUnavailableError, ECIFInputError
from .batching import BatchPlan

NAME = "cpp"
DEVICES = frozenset({"cpu"})
ISA_ENV_VAR = "ECIF_FAST_CPU_ISA"

_C = None
_IMPORT_ERROR: Optional[str] = None


def _load():
    global _C, _IMPORT_ERROR
    if _C is None and _IMPORT_ERROR is None:
        try:
            _C = importlib.import_module("ecif_fast._C")
        except ImportError as e:  # not built, or built for another Python
            _IMPORT_ERROR = (f"the compiled extension ecif_fast._C could not be imported ({e}); "
                             "build it with `pip install -e .` (needs a C++ compiler and CMake)")
    return _C


def available() -> bool:
    """True when the compiled extension imports."""
    return _load() is not None


def unavailable_reason() -> Optional[str]:
    """Why :func:`available` is False (None when it is True)."""
    _load()
    return _IMPORT_ERROR


def info() -> dict:
    """Build facts of the extension: instruction sets compiled in / usable here, OpenMP, threads."""
    C = _require()
    return {"compiled_isas": list(C.compiled_isas()), "supported_isas": list(C.supported_isas()),
            "openmp": bool(C.has_openmp()), "max_threads": int(C.max_threads())}


def _require():
    C = _load()
    if C is None:
        raise BackendUnavailableError(f"backend 'cpp' is unavailable: {_IMPORT_ERROR}")
    return C


def _isa() -> str:
    return os.environ.get(ISA_ENV_VAR, "auto").strip().lower() or "auto"


def _check_cpu(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.device.type != "cpu":
            raise ECIFInputError(
                f"backend 'cpp' runs on the CPU only, but {name} is on device '{t.device}'; "
                "move the tensors to the CPU (.cpu()) or use backend='triton' or backend='torch'")


def _to_numpy(t: torch.Tensor, dtype: torch.dtype):
    t = t.detach()
    if t.dtype != dtype:
        t = t.to(dtype)
    return t.contiguous().numpy()  # zero-copy for contiguous CPU tensors of the right dtype


def _plan_numpy(plan: BatchPlan):
    return (plan.perm.to("cpu", torch.int64).contiguous().numpy(),
            plan.offsets.to("cpu", torch.int64).contiguous().numpy())


def lse(U: torch.Tensor, V: torch.Tensor, scale, plan: BatchPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column log-sum-exp of every batch's ``S = t·U_b V_bᵀ``; same contract as the torch twin.

    Returns ``(row, col)``, ``(n,)`` float32 (float64 for float64 ``U``) CPU tensors. Streams tiles of
    ``S`` (never stores a batch's full score matrix). Not differentiable.
    """
    C = _require()
    _check_cpu(U=U, V=V)
    dt = torch.float64 if U.dtype == torch.float64 else torch.float32
    perm, offsets = _plan_numpy(plan)
    row, col = C.lse(_to_numpy(U, dt), _to_numpy(V, dt), float(scale), perm, offsets,
                     isa=_isa(), num_threads=torch.get_num_threads())
    return torch.from_numpy(row), torch.from_numpy(col)


def infonce(U: torch.Tensor, V: torch.Tensor, scale, plan: BatchPlan, with_scale: bool):
    """Fused contrastive loss forward + backward (SPEC §2, §4); same contract as the torch twin.

    Returns ``(loss 0-d, dU (n, d), dV (n, d), dlog_scale 0-d or None)``: float32 (float64 for
    float64 ``U``) CPU tensors. ``scale`` is ``t`` (a number or a 0-d tensor, not tracked). Two
    streaming passes over 96×96 tiles of ``S = t·U_b V_bᵀ`` (log-sum-exps, then the gradients); never
    stores a batch's score matrix. Extra memory: ``num_threads·B·d`` elements of per-thread dV
    partials for every batch larger than 96 pairs. Not differentiable (see ``InfoNCE``).
    """
    C = _require()
    _check_cpu(U=U, V=V)
    if U.dim() != 2 or V.dim() != 2 or U.shape != V.shape:
        raise ValueError(f"infonce: U and V must both have shape (n, d), got {tuple(U.shape)} and {tuple(V.shape)}")
    if plan.n != U.shape[0]:
        raise ValueError(f"infonce: the batch plan covers {plan.n} pairs but U has {U.shape[0]} rows")
    dt = torch.float64 if U.dtype == torch.float64 else torch.float32
    t = float(scale.detach().reshape(())) if torch.is_tensor(scale) else float(scale)
    perm, offsets = _plan_numpy(plan)
    loss, dU, dV, ds = C.infonce(_to_numpy(U, dt), _to_numpy(V, dt), t, perm, offsets, bool(with_scale),
                                 isa=_isa(), num_threads=torch.get_num_threads())
    return (torch.tensor(loss, dtype=dt), torch.from_numpy(dU), torch.from_numpy(dV),
            torch.tensor(ds, dtype=dt) if with_scale else None)
