"""Triton ``lse`` op: per-batch row and column log-sum-exp of ``S = t·U Vᵀ`` (docs/math.md §4–§5).

Design (one kernel, launched twice):

* The batches come as a CSR plan (``plan.perm`` / ``plan.offsets``). The host cuts every batch into
  row tiles of ``BLOCK_M`` consecutive positions of ``perm`` and builds a small table
  tile -> (position in ``perm`` where the tile starts, batch number); O(number of tiles).
* The grid is ``(number of row tiles, nsplit)``. Program ``(i, s)`` loads its ``BLOCK_M`` rows of ``A``
  (gathered through ``perm``) and streams over the column tiles of its batch (the ``s``-th of
  ``nsplit`` contiguous chunks of them), computing ``t·A_tile B_tileᵀ`` with ``tl.dot`` (float32
  accumulation; float64 for float64 inputs) and an online log-sum-exp (running max + rescaled sum,
  in base 2). Nothing bigger than a ``BLOCK_M × BLOCK_N`` tile of ``S`` ever exists.
* Row LSE: ``A = U, B = V``. Column LSE of ``S`` is the row LSE of ``Sᵀ = t·V Uᵀ``: the same kernel
  with the roles swapped. No atomics, so results are deterministic (bitwise reproducible).
* ``nsplit > 1`` (chosen automatically on the GPU when there are too few row tiles to fill the
  device, e.g. one small "all" batch) writes one partial LSE per chunk into a ``(nsplit, n)`` buffer,
  merged with ``torch.logsumexp`` (deterministic too).

Dtypes: float16 / bfloat16 / float32 / float64 inputs; outputs float32 (float64 for float64 inputs).
On the GPU 16-bit tiles go to ``tl.dot`` as they are (exact products, float32 accumulation, like the
torch twin's upcast); float32 tiles use ``input_precision="tf32x3"`` by default (three TF32 tensor-core
products, about float32 accuracy; set ``ECIF_FAST_TRITON_FP32_DOT=ieee`` for plain float32 FMA);
float64 uses ``tl.dot`` in float64 (``ieee``) and natural ``exp``/``log`` in float64. In the CPU
interpreter every tile is cast to the accumulation dtype before ``tl.dot`` (the interpreter's
``tl.dot`` is wrong on bfloat16).

Devices: CUDA tensors (compiled kernels), and CPU tensors when ``TRITON_INTERPRET=1`` is set at call
time (Triton's interpreter; slow, for tests). The interpreter is used through explicitly built
``InterpretedFunction`` objects, so setting the variable after ``import triton`` works too.
"""
from __future__ import annotations

import math
import os
import warnings
from collections import OrderedDict
from typing import Dict, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ...errors import BackendUnavailableError, ECIFInputError
from ...core.batches import BatchPlan

INTERPRET_ENV = "TRITON_INTERPRET"
FP32_DOT_ENV = "ECIF_FAST_TRITON_FP32_DOT"
_FP32_DOT_CHOICES = ("tf32x3", "ieee", "tf32")
# Floating-point contraction (a·b + c → one fma) in the compiled gradient / reduction kernels: off by
# default, see :func:`fp_fusion`; "1" turns it back on (diagnostics, benchmarks/gpu_diagnose.py).
FP_FUSION_ENV = "ECIF_FAST_TRITON_FP_FUSION"
_LN2 = math.log(2.0)
_LOG2E = 1.0 / _LN2


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` asks for Triton's CPU interpreter (read at call time)."""
    return os.environ.get(INTERPRET_ENV, "0").strip().lower() in ("1", "true", "yes", "on", "y")


# Reductions go through ``tl.reduce`` with triton's own combine functions instead of ``tl.max`` /
# ``tl.sum`` (and ``tl.full`` replaces ``tl.zeros``): those are ``@triton.jit`` functions, which the
# interpreter cannot call when triton was imported without TRITON_INTERPRET=1. The interpreter
# recognises these combine functions and reduces with numpy.
_max_combine = getattr(tl.standard, "_elementwise_max", None)
_sum_combine = getattr(tl.standard, "_sum_combine", None)
if _max_combine is None or _sum_combine is None:  # pragma: no cover - other triton versions

    @triton.jit
    def _max_combine(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _sum_combine(a, b):
        return a + b


@triton.jit
def _lse_rows_kernel(
    A, B, out, perm, offsets, tile_start, tile_batch, scale_ptr,
    d, sa0, sa1, sb0, sb1, split_stride, nsplit,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SINGLE_K: tl.constexpr, IDENTITY: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BASE2: tl.constexpr,
):
    """``out[s, r] = log Σ_{c in chunk s of batch(r)} exp(t <A_r, B_c>)`` for the rows ``r`` of one tile."""
    pid = tl.program_id(0)
    sid = tl.program_id(1)
    t0 = tl.load(tile_start + pid)
    b = tl.load(tile_batch + pid)
    b_lo = tl.load(offsets + b)
    b_hi = tl.load(offsets + b + 1)
    # BASE2: scale_ptr holds t·log2(e), sums use exp2; else it holds t and sums use exp (float64)
    scale = tl.load(scale_ptr)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    pos_m = t0 + offs_m
    mmask = pos_m < b_hi
    if IDENTITY:
        rows = pos_m.to(tl.int64)
    else:
        rows = tl.load(perm + pos_m, mask=mmask, other=0).to(tl.int64)

    # chunk ``sid`` of ``nsplit`` of this batch's column tiles (all of them when nsplit == 1)
    n_ct = (b_hi - b_lo + BLOCK_N - 1) // BLOCK_N
    per = (n_ct + nsplit - 1) // nsplit
    c_lo = tl.minimum(b_lo + sid * per * BLOCK_N, b_hi)
    c_hi = tl.minimum(c_lo + per * BLOCK_N, b_hi)

    m_i = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)
    l_i = tl.full([BLOCK_M], 0.0, ACC_DTYPE)
    if SINGLE_K:
        kmask = offs_k < d
        a = tl.load(A + rows[:, None] * sa0 + offs_k[None, :] * sa1,
                    mask=mmask[:, None] & kmask[None, :], other=0.0).to(DOT_DTYPE)
    for c0 in range(c_lo, c_hi, BLOCK_N):
        pos_n = c0 + offs_n
        nmask = pos_n < c_hi
        if IDENTITY:
            cols = pos_n.to(tl.int64)
        else:
            cols = tl.load(perm + pos_n, mask=nmask, other=0).to(tl.int64)
        if SINGLE_K:
            bt = tl.load(B + cols[None, :] * sb0 + offs_k[:, None] * sb1,
                         mask=kmask[:, None] & nmask[None, :], other=0.0).to(DOT_DTYPE)
            s = tl.dot(a, bt, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        else:
            s = tl.full([BLOCK_M, BLOCK_N], 0.0, ACC_DTYPE)
            for k0 in range(0, d, BLOCK_K):
                kk = k0 + offs_k
                km = kk < d
                ak = tl.load(A + rows[:, None] * sa0 + kk[None, :] * sa1,
                             mask=mmask[:, None] & km[None, :], other=0.0).to(DOT_DTYPE)
                bk = tl.load(B + cols[None, :] * sb0 + kk[:, None] * sb1,
                             mask=km[:, None] & nmask[None, :], other=0.0).to(DOT_DTYPE)
                s = tl.dot(ak, bk, s, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        s = tl.where(nmask[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _max_combine))
        if BASE2:
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
        else:
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, _sum_combine)
        m_i = m_new

    nonempty = l_i > 0
    safe_l = tl.where(nonempty, l_i, 1.0)
    if BASE2:
        res = m_i * 0.6931471805599453 + tl.log(safe_l)
    else:
        res = m_i + tl.log(safe_l)
    res = tl.where(nonempty, res, float("-inf"))
    tl.store(out + sid.to(tl.int64) * split_stride + rows, res, mask=mmask)


_INTERPRETED: Dict[str, object] = {}


def _triton_version() -> Tuple[int, int]:
    try:
        major, minor = triton.__version__.split(".")[:2]
        return int(major), int(minor)
    except (AttributeError, ValueError):  # pragma: no cover - unusual version strings
        return (99, 0)


def _interpreter_index_compat() -> None:
    """Triton 3.6's interpreter converts an interpreted scalar (a 1-element array) to a Python int
    with ``int(array)`` when it is a ``range`` bound; NumPy 2.4 made that a TypeError ("only
    0-dimensional arrays can be converted to Python scalars"). Triton 3.8 and 3.9 squeeze the array
    first (3.7 unchecked, so patched too): do the same, once, by wrapping the interpreter's tensor
    patching (its scope restores the attribute after each launch, last change first)."""
    if _triton_version() >= (3, 8):
        return
    from triton.runtime import interpreter

    orig = getattr(interpreter, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_ecif_fast_compat", False):
        return

    def index(self):
        return int(self.handle.data.item())

    def patch_lang_tensor(tensor, *args, **kwargs):
        orig(tensor, *args, **kwargs)
        scope = args[0] if args else kwargs.get("scope")
        if hasattr(scope, "set_attr"):
            scope.set_attr(tensor, "__index__", index)
        else:  # older interpreters set the attribute for good
            tensor.__index__ = index

    patch_lang_tensor._ecif_fast_compat = True
    interpreter._patch_lang_tensor = patch_lang_tensor


def kernel_for(kernel, name: str, device_type: str):
    """``kernel`` itself for CUDA; an interpreted twin of it (built once, cached under ``name``) for
    CPU tensors under ``TRITON_INTERPRET=1``."""
    if device_type == "cuda":
        return kernel
    _interpreter_index_compat()
    k = _INTERPRETED.get(name)
    if k is None:
        from triton.runtime.interpreter import InterpretedFunction
        k = kernel if isinstance(kernel, InterpretedFunction) else InterpretedFunction(kernel.fn)
        _INTERPRETED[name] = k
    return k


def _kernel_for(device_type: str):
    """The compiled lse kernel for CUDA; an interpreted one for CPU tensors under ``TRITON_INTERPRET=1``."""
    return kernel_for(_lse_rows_kernel, "lse", device_type)


class _Cfg(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def _p2(x: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, int(x) - 1).bit_length())


def _gpu_configs(dtype: torch.dtype, d: int) -> list:
    """Tile configurations for the GPU, best guess first, then smaller fall-backs.

    Chosen without a GPU at hand: every first choice compiles for sm_90 without register spills
    (checked with ``triton.compile(..., target=GPUTarget("cuda", 90, 32))`` and cuobjdump) and
    fits the shared memory of an H100/H200; the timings of ``benchmarks/gpu_check_lse.py`` are
    the place to tune them. A config that fails to compile or launch falls back to the next one.
    """
    if dtype in (torch.float16, torch.bfloat16):
        if d <= 64:
            cfgs = [_Cfg(128, 64, _p2(d), 4, 3)]
        elif d <= 128:
            cfgs = [_Cfg(128, 64, 128, 8, 3)]
        elif d <= 256:
            cfgs = [_Cfg(128, 64, 256, 8, 2)]
        elif d <= 512:
            cfgs = [_Cfg(64, 64, 512, 8, 2)]
        else:
            cfgs = [_Cfg(128, 64, 64, 8, 3)]
        cfgs += [_Cfg(64, 64, 64, 4, 2), _Cfg(32, 32, 32, 4, 1)]
    elif dtype == torch.float32:
        if d <= 64:
            cfgs = [_Cfg(64, 64, _p2(d), 4, 3)]
        elif d <= 128:
            cfgs = [_Cfg(64, 64, 128, 8, 2)]
        else:
            cfgs = [_Cfg(128, 64, 32, 8, 3)]
        cfgs += [_Cfg(64, 32, 32, 4, 2), _Cfg(32, 32, 16, 4, 1)]
    else:  # float64
        cfgs = [_Cfg(32, 32, min(_p2(d), 32), 4, 2), _Cfg(16, 16, 16, 4, 1)]
    return cfgs


_GOOD_CFG: Dict[Tuple, int] = {}  # (dtype, d bucket, device index) -> index of the config that compiled
_SM_COUNT: Dict[int, int] = {}
_LAST_LAUNCH: Dict[str, object] = {}


def last_launch() -> Dict[str, object]:
    """What the latest successful :func:`lse` call launched (tile config, split, dot precision, ...)."""
    return dict(_LAST_LAUNCH)


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _tile_table(plan: BatchPlan, block_m: int) -> Tuple[torch.Tensor, torch.Tensor, int, int]:
    """``(tile_start, tile_batch, num_tiles, largest batch)`` (int32, CPU) for row tiles of ``block_m``."""
    offsets = plan.offsets.to("cpu", torch.int64)
    sizes = offsets[1:] - offsets[:-1]
    ntiles = (sizes + block_m - 1) // block_m
    nb = sizes.numel()
    tile_batch = torch.repeat_interleave(torch.arange(nb, dtype=torch.int64), ntiles)
    first = torch.cumsum(ntiles, 0) - ntiles  # index of each batch's first tile
    local = torch.arange(tile_batch.numel(), dtype=torch.int64) - first[tile_batch]
    tile_start = offsets[:-1][tile_batch] + local * block_m
    return (tile_start.to(torch.int32), tile_batch.to(torch.int32), int(tile_batch.numel()),
            int(sizes.max()) if nb else 0)


class _PlanTables(NamedTuple):
    plan: BatchPlan  # held so that id(plan) stays unique while the entry is cached
    identity: bool  # perm == arange(n): the kernel skips the gathers
    perm: torch.Tensor  # int32 on the device (a dummy when identity)
    offsets: torch.Tensor  # int32 on the device
    tile_start: torch.Tensor
    tile_batch: torch.Tensor
    num_tiles: int
    largest_batch: int


_PLAN_CACHE: "OrderedDict[Tuple, _PlanTables]" = OrderedDict()
_PLAN_CACHE_SIZE = 8


def _plan_tables(plan: BatchPlan, device: torch.device, block_m: int) -> _PlanTables:
    """Device copies of the plan and its tile table; cached for the last few plans (a BatchPlan is
    immutable), so repeated calls with the same plan do no host work and no host-to-device copies."""
    key = (id(plan), str(device), block_m)
    hit = _PLAN_CACHE.get(key)
    if hit is not None and hit.plan is plan:
        _PLAN_CACHE.move_to_end(key)
        return hit
    n = plan.n
    perm_cpu = plan.perm.to("cpu", torch.int64)
    identity = perm_cpu.numel() == n and bool(torch.equal(perm_cpu, torch.arange(n, dtype=torch.int64)))
    offsets = plan.offsets.to(device=device, dtype=torch.int32)
    perm = offsets if identity else perm_cpu.to(device=device, dtype=torch.int32)
    tile_start, tile_batch, ntiles, bmax = _tile_table(plan, block_m)
    entry = _PlanTables(plan, identity, perm, offsets, tile_start.to(device), tile_batch.to(device), ntiles, bmax)
    _PLAN_CACHE[key] = entry
    while len(_PLAN_CACHE) > _PLAN_CACHE_SIZE:
        _PLAN_CACHE.popitem(last=False)
    return entry


def _fp32_precision() -> str:
    p = os.environ.get(FP32_DOT_ENV, "tf32x3").strip().lower() or "tf32x3"
    if p not in _FP32_DOT_CHOICES:
        raise ECIFInputError(f"{FP32_DOT_ENV} must be one of {', '.join(_FP32_DOT_CHOICES)}, got {p!r}")
    return p


def fp_fusion() -> bool:
    """``enable_fp_fusion`` for launches of the kernels that re-evaluate softmax weights from stored line
    statistics (:mod:`.infonce`, :mod:`.gauss_newton`, :mod:`.reductions`); False unless
    ``ECIF_FAST_TRITON_FP_FUSION=1``.

    Why off: those kernels compute ``S = dot·t`` and then ``exp((S − top) − l)`` against a ``top`` that
    a statistics pass derived from the *rounded* ``S``. With contraction (Triton's default; LLVM and
    ptxas fuse ``dot·t − top`` into one fma) the weight at a line's maximum becomes
    ``exp(dot·t − fl(dot·t)) = exp(±ulp(S)/2)`` instead of 1, so the lines of ``P`` sum to
    ``1 ± ulp(S)/2`` — 8·10⁻³ at ``|S| = 2·10⁵``. Observed on an H200 (sm_90), when the weights were
    still ``exp((S − lse) − lo)``: dU off by 1.9e3 (infonce, ``t = 1e4``), gU by 8e8 (Gauss–Newton), a
    constant δS direction by 4·10⁻⁴·|δS| (reductions). :mod:`.infonce` and :mod:`.gauss_newton` now
    evaluate every line's maximum as ``exp(−l)``, which no rounding of ``S`` reaches; :mod:`.reductions`
    still evaluates some weights at a line's maximum from ``S`` (its own lines' ``P``). The CPU
    interpreter never contracts. Cost: the element-wise multiply-adds of a tile become two
    instructions; the ``tl.dot`` products are unaffected.
    """
    return os.environ.get(FP_FUSION_ENV, "0").strip() == "1"


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
              torch.float64: tl.float64}


def check_inputs(U: torch.Tensor, V: torch.Tensor, plan: BatchPlan, *extra: torch.Tensor) -> tuple:
    """Validate device, dtype and shapes; return ``(U, V, *extra)`` detached and promoted to one dtype.

    ``U, V``: ``(n, d)``; ``extra``: direction tensors ``(Q, n, d)`` (or ``(n, d)``) on the same device.
    """
    dev = U.device
    if dev.type == "cpu":
        if not interpreting():
            raise BackendUnavailableError(
                "backend 'triton' got CPU tensors; Triton runs them only in its interpreter: set "
                f"{INTERPRET_ENV}=1 (slow, meant for tests), move the tensors to a GPU, or use "
                "backend='cpp' or backend='torch'")
    elif dev.type != "cuda":
        raise ECIFInputError(f"backend 'triton' runs on CUDA devices (or the CPU with {INTERPRET_ENV}=1), "
                             f"but U is on device '{dev}'; move the tensors or use backend='torch'")
    for name, x in (("V", V),) + tuple(("a direction tensor", x) for x in extra):
        if x.device != dev:
            raise ECIFInputError(f"U and {name} must be on the same device, got {dev} and {x.device}")
    ts = [x.detach() for x in (U, V) + tuple(extra)]
    dt = ts[0].dtype
    for x in ts[1:]:
        dt = torch.promote_types(dt, x.dtype)
    ts = [x.to(dt) for x in ts]
    U, V = ts[0], ts[1]
    if dt not in _TL_DTYPES:
        raise ECIFInputError(f"backend 'triton' accepts float16, bfloat16, float32 or float64, got {dt}")
    if U.dim() != 2 or U.shape != V.shape:
        raise ECIFInputError(f"U and V must both be (n, d) with the same shape, got {tuple(U.shape)} "
                             f"and {tuple(V.shape)}")
    for x in ts[2:]:
        if x.dim() not in (2, 3) or x.shape[-2:] != U.shape:
            raise ECIFInputError(f"directions must be (Q, n, d) or (n, d) with (n, d) = {tuple(U.shape)}, "
                                 f"got {tuple(x.shape)}")
    if U.shape[0] != plan.n:
        raise ECIFInputError(f"the plan covers {plan.n} pairs but U has {U.shape[0]} rows")
    return tuple(ts)


def dot_setup(dtype: torch.dtype, interp: bool):
    """``(precision, operand dtype)`` of ``tl.dot`` for inputs of ``dtype`` (see the module docstring)."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if interp:
        return "ieee", _TL_DTYPES[acc]
    if dtype == torch.float32:
        return _fp32_precision(), tl.float32
    # precision only matters for float32 operands; float64 is exact ("ieee") anyway
    return ("ieee" if dtype == torch.float64 else "tf32"), _TL_DTYPES[dtype]


def lse(U: torch.Tensor, V: torch.Tensor, scale, plan: BatchPlan, *, block_m: Optional[int] = None,
        block_n: Optional[int] = None, block_k: Optional[int] = None,
        split: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row and column log-sum-exp of every batch's ``S = t·U_b V_bᵀ``; same contract as the torch twin.

    Args:
        U, V: ``(n, d)`` float16 / bfloat16 / float32 / float64, on a CUDA device (or on the CPU with
            ``TRITON_INTERPRET=1``). Any strides. scale: ``t`` (number or one-element tensor).
        plan: the batches.
        block_m, block_n, block_k, split: tile sizes (powers of two >= 16) and number of column chunks
            per row tile; tuning/testing knobs, chosen automatically when None.
    Returns:
        ``(row, col)``: ``(n,)`` float32 (float64 for float64 inputs) on U's device. Not differentiable.
    """
    U, V = check_inputs(U, V, plan)
    dev = U.device
    n, d = U.shape
    acc = torch.float64 if U.dtype == torch.float64 else torch.float32
    if n == 0 or plan.num_batches == 0:
        ninf = torch.full((n,), float("-inf"), dtype=acc, device=dev)  # pairs in no batch: log of an empty sum
        return ninf, ninf.clone()

    interp = dev.type == "cpu"
    if interp:
        cfgs = [_Cfg(block_m or 32, block_n or 32, block_k or min(_p2(d), 64), 4, 1)]
    else:
        cfgs = _gpu_configs(U.dtype, d)
        if block_m or block_n or block_k:
            c0 = cfgs[0]
            cfgs = [_Cfg(block_m or c0.block_m, block_n or c0.block_n, block_k or c0.block_k,
                         c0.num_warps, c0.num_stages)]
    precision, dot_dt = dot_setup(U.dtype, interp)
    for c in cfgs:
        for v in (c.block_m, c.block_n, c.block_k):
            if v < 16 or v & (v - 1):
                raise ECIFInputError(f"tile sizes must be powers of two >= 16, got {c[:3]}")

    base2 = acc == torch.float32
    t = float(scale.detach().reshape(())) if torch.is_tensor(scale) else float(scale)
    scale_t = torch.tensor([t * _LOG2E if base2 else t], dtype=acc, device=dev)
    kernel = _kernel_for(dev.type)

    key = (U.dtype, _p2(d), str(dev), precision)
    start = _GOOD_CFG.get(key, 0) if len(cfgs) > 1 else 0
    last_err: Optional[BaseException] = None
    for ci in range(start, len(cfgs)):
        cfg = cfgs[ci]
        tab = _plan_tables(plan, dev, cfg.block_m)
        ntiles, bmax = tab.num_tiles, tab.largest_batch
        if split is not None:
            nsplit = max(1, int(split))
        elif interp:
            nsplit = 1
        else:
            col_tiles = (bmax + cfg.block_n - 1) // cfg.block_n
            want = -(-2 * _sm_count(dev) // max(ntiles, 1))
            nsplit = max(1, min(want, col_tiles // 2, 64))
        single_k = d <= cfg.block_k
        outs = []
        try:
            for A, B in ((U, V), (V, U)):
                # -inf where no program writes: the pairs a plan leaves out (BatchPlan.without)
                buf = torch.full((nsplit, n), float("-inf"), dtype=acc, device=dev)
                kernel[(ntiles, nsplit)](
                    A, B, buf, tab.perm, tab.offsets, tab.tile_start, tab.tile_batch, scale_t,
                    d, A.stride(0), A.stride(1), B.stride(0), B.stride(1), n, nsplit,
                    BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                    SINGLE_K=single_k, IDENTITY=tab.identity,
                    DOT_DTYPE=dot_dt, ACC_DTYPE=_TL_DTYPES[acc], PRECISION=precision, BASE2=base2,
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                outs.append(buf[0] if nsplit == 1 else torch.logsumexp(buf, dim=0))
        except Exception as e:  # compile-time failure (e.g. out of shared memory): try a smaller tile
            if interp or ci + 1 == len(cfgs):
                raise
            warnings.warn(f"triton lse: tile config {tuple(cfg)} failed for {U.dtype}, d={d} "
                          f"({type(e).__name__}: {str(e)[:200]}); trying a smaller one")
            last_err = e
            continue
        if len(cfgs) > 1:
            _GOOD_CFG[key] = ci
        _LAST_LAUNCH.clear()
        _LAST_LAUNCH.update(config=cfg._asdict(), split=nsplit, precision=precision, single_k=single_k,
                            identity=tab.identity, num_tiles=ntiles, interpreted=interp)
        return outs[0], outs[1]
    raise RuntimeError(f"triton lse: no tile configuration worked: {last_err}")  # pragma: no cover
