"""C++/OpenMP CPU backend (the compiled extension ``ecif_fast._C``, docs/math.md §5).

The extension is imported lazily, so ``import ecif_fast`` works without a compiler-built module;
:func:`available` says whether it loaded. Tensors cross into C++ as zero-copy numpy views
(``tensor.numpy()``); the extension accepts float32 and float64 only, so float16/bfloat16 inputs are
upcast to float32 here (accumulation dtype, docs/math.md §5). The number of threads follows
``torch.get_num_threads()``. ``ECIF_FAST_CPU_ISA`` (``auto``, ``avx512``, ``avx2``, ``generic``)
forces one compiled instruction-set variant (default ``auto``: the best the CPU supports).
"""
from __future__ import annotations

import importlib
import os
from typing import Optional

import torch

from ..errors import BackendUnavailableError, ECIFInputError
from ..core.batches import BatchPlan
from ..core.loss import acc_dtype

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


def _scale(scale) -> float:
    """``t`` as a Python float (a tensor scale is not tracked here)."""
    return float(scale.detach().reshape(())) if torch.is_tensor(scale) else float(scale)


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
    dt = acc_dtype(U)
    perm, offsets = _plan_numpy(plan)
    row, col = C.lse(_to_numpy(U, dt), _to_numpy(V, dt), _scale(scale), perm, offsets,
                     isa=_isa(), num_threads=torch.get_num_threads())
    return torch.from_numpy(row), torch.from_numpy(col)


def infonce(U: torch.Tensor, V: torch.Tensor, scale, plan: BatchPlan, with_scale: bool):
    """Fused contrastive loss forward + backward (docs/math.md §2, §4); same contract as the torch twin.

    Returns ``(loss 0-d, dU (n, d), dV (n, d), dlog_scale 0-d or None)``: float32 (float64 for
    float64 ``U``) CPU tensors. ``scale`` is ``t`` (a number or a 0-d tensor, not tracked). Not
    differentiable (see ``InfoNCE``). Two modes over 96×96 tiles of ``S = t·U_b V_bᵀ``, chosen like
    the directional ops (``csrc/infonce.cpp``):

    * **per-batch** (many batches, e.g. "batch" negatives; ``max B² · 4 · threads <= Σ B²``, or one
      thread unless the plan is a single batch too big for the cache): each thread runs whole batches (static round robin). A batch whose score tiles fit
      the cache (64 MiB per thread, 512 MiB in all: float32 ``B <~ 4000``, float64 ``B <~ 2880``)
      computes them once, takes the row / column log-sum-exps from them, then forms G in place and
      accumulates ``dU = t·G V`` and ``dV = t·Gᵀ U``: 3 score-sized products per batch. A bigger batch
      is streamed on its thread (log-sum-exps, then recomputed tiles: 4 products). Extra memory
      ``O(threads·(B·d + cache))`` (about ``3·B·d`` elements plus ``B²`` for the cache, per thread);
      no shared partials, so every output is bitwise reproducible for a given thread count (dU and
      dV are even the same across thread counts while the mode and the cache choice are: up to 8
      threads; only the loss and d log_scale sums are ordered by thread).
    * **few big batches** (e.g. "all" negatives): two streaming passes (log-sum-exps, then the
      gradients, 4 products), never storing a batch's score matrix. Pass 2 walks the columns in
      chunks (about 8 MiB of per-thread dV partials in all, at least 768 columns): per chunk, the
      (batch, row tile) tasks are split statically among the threads, dU of a row tile carries over
      between chunks exactly, and the chunk's dV partials are merged in thread order. Extra memory:
      ``~num_threads·chunk·d`` elements of partials plus ``B·d`` of packed V (the peak growth at
      n = 65536: BENCHMARKS.md, "Targets of the fused kernels"); bitwise reproducible for a
      given thread count (dU even across chunk sizes), equal up to rounding across thread counts.
    """
    C = _require()
    _check_cpu(U=U, V=V)
    dt = acc_dtype(U)
    perm, offsets = _plan_numpy(plan)
    loss, dU, dV, ds = C.infonce(_to_numpy(U, dt), _to_numpy(V, dt), _scale(scale), perm, offsets, bool(with_scale),
                                 isa=_isa(), num_threads=torch.get_num_threads())
    return (torch.tensor(loss, dtype=dt), torch.from_numpy(dU), torch.from_numpy(dV),
            torch.tensor(ds, dtype=dt) if with_scale else None)


def _directions(U: torch.Tensor, V: torch.Tensor, scale, plan: BatchPlan, dU, dV, dlog_scale):
    """Common prologue of the directional ops: accumulation dtype, query axis, numpy views. Shapes were
    checked by the dispatcher (``ops``); the extension re-checks what its memory safety needs.

    Returns ``(C, squeeze, args)`` with ``args = (U, V, t, perm, offsets, dU (Q, n, d), dV (Q, n, d),
    ds (Q,) or None)`` as numpy views of the accumulation dtype.
    """
    C = _require()
    _check_cpu(U=U, V=V, dU=dU, dV=dV)
    squeeze = dU.dim() == 2
    if squeeze:
        dU, dV = dU.unsqueeze(0), dV.unsqueeze(0)
    dt = acc_dtype(U)
    ds = None
    if dlog_scale is not None:
        if torch.is_tensor(dlog_scale):
            _check_cpu(dlog_scale=dlog_scale)
        # a Python number goes straight to the accumulation dtype (torch.as_tensor(0.3) would round it to float32)
        ds = (dlog_scale.detach().to("cpu", dt) if torch.is_tensor(dlog_scale) else torch.tensor(float(dlog_scale), dtype=dt))
        ds = ds.reshape(-1).expand(dU.shape[0]).contiguous().numpy()
    perm, offsets = _plan_numpy(plan)
    return C, squeeze, (_to_numpy(U, dt), _to_numpy(V, dt), _scale(scale), perm, offsets, _to_numpy(dU, dt),
                        _to_numpy(dV, dt), ds)


def ecif_reductions(U: torch.Tensor, V: torch.Tensor, scale, plan: BatchPlan, dU: torch.Tensor, dV: torch.Tensor,
                    dlog_scale=None, negative_term: str = "exact"):
    """Positive and negative influence parts along ``Q`` query directions (docs/math.md §4); same contract as the
    torch twin (``torch_ref/reductions.py``).

    Args:
        U, V: ``(n, d)``; scale: ``t`` (number or 0-d tensor, not tracked); plan: the batches.
        dU, dV: ``(Q, n, d)`` or ``(n, d)`` directions. dlog_scale: None, a number or a ``(Q,)`` tensor.
        negative_term: ``"exact"`` (``w = p/(1-p)``) or ``"taylor"`` (``w = p``).
    Returns:
        ``(positive, negative)``: ``(Q, n)`` (``(n,)`` for 2-D directions), float32 (float64 for float64
        ``U``) CPU tensors.

    Fused and streaming in "δS form": per batch, the tiles of ``S = t·U_b V_bᵀ`` and of every query's
    ``δS`` are formed from packed panels (96×96); three passes (line statistics; the softmax-weighted
    sums of ``δS``; the sums of the means), about ``(3 + 2Q)·B²d`` multiply-adds per batch. With many
    batches, each thread runs whole batches and keeps a batch's score tiles between the passes when
    they fit (64 MiB per thread, 512 MiB in all): ``(1 + 2Q)·B²d``. A few big batches ("all"
    negatives) are shared by all threads and never stored (extra memory O(threads·Q·B + (Q + 1)·B·d)).
    Bitwise reproducible for a given thread count.
    """
    C, squeeze, a = _directions(U, V, scale, plan, dU, dV, dlog_scale)
    pos, neg = C.ecif_reductions(*a, negative_term == "exact", isa=_isa(), num_threads=torch.get_num_threads())
    pos, neg = torch.from_numpy(pos), torch.from_numpy(neg)
    if squeeze:
        return pos[0], neg[0]
    return pos, neg


def gauss_newton_product(U: torch.Tensor, V: torch.Tensor, scale, plan: BatchPlan, dU: torch.Tensor,
                         dV: torch.Tensor, dlog_scale=None):
    """Embedding-space Gauss–Newton product (docs/math.md §4); same contract as the torch twin
    (``torch_ref/gauss_newton.py``).

    Args: as for :func:`ecif_reductions` (no ``negative_term``).
    Returns:
        ``(gU, gV, gs)``: ``gU, gV`` shaped like ``dU``; ``gs`` ``(Q,)`` (0-d for 2-D directions), zeros
        when ``dlog_scale`` is None. float32 (float64 for float64 ``U``) CPU tensors.

    Three streaming passes over 96×96 tiles: row / column log-sum-exp, the means ``m, m'`` from ``δS``,
    then ``G = P∘(δS − m) + Q∘(δS − m')`` per query mapped back by the micro-kernel (``gU += t·G V``,
    ``gV += t·Gᵀ U``). About ``(3 + 6Q)·B²d`` multiply-adds per batch; ``(1 + 4Q)·B²d`` with many
    batches whose score and ``δS`` tiles fit the batch cache (64 MiB per thread, 512 MiB in all).
    Extra memory for a few big batches: O(threads·Q·B·d + (Q + 2)·B·d). Bitwise reproducible for a
    given thread count.
    """
    C, squeeze, a = _directions(U, V, scale, plan, dU, dV, dlog_scale)
    gU, gV, gs = C.gauss_newton_product(*a, isa=_isa(), num_threads=torch.get_num_threads())
    gU, gV, gs = torch.from_numpy(gU), torch.from_numpy(gV), torch.from_numpy(gs)
    if squeeze:
        return gU[0], gV[0], gs[0]
    return gU, gV, gs
