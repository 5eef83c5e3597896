"""Host side shared by the Triton ops (docs/math.md §5): inputs, dtypes, plan tables, and launching.

* Devices: CUDA tensors run compiled kernels; CPU tensors run when ``TRITON_INTERPRET=1`` is set at
  call time, in Triton's interpreter (slow, for tests). The interpreter is used through explicitly
  built ``InterpretedFunction`` objects (:func:`kernel_for`), so setting the variable after
  ``import triton`` works too.
* Dtypes: float16 / bfloat16 / float32 / float64 inputs (mixed inputs are promoted to one dtype);
  accumulation and outputs in float32 (float64 for float64 inputs). On the GPU 16-bit tiles go to
  ``tl.dot`` as they are (exact products, float32 accumulation, like the torch twins' upcast);
  float32 tiles use ``input_precision="tf32x3"`` by default (three TF32 tensor-core products, about
  float32 accuracy; ``ECIF_FAST_TRITON_FP32_DOT=ieee`` for plain float32 FMA); float64 uses
  ``tl.dot`` in float64. In the interpreter every tile is cast to the accumulation dtype before
  ``tl.dot`` (the interpreter's ``tl.dot`` is wrong on bfloat16): :func:`dot_setup`.
* Batches as CSR row tiles: every batch of the plan (``perm`` / ``offsets``) is cut into row tiles of
  ``BLOCK_M`` consecutive positions of ``perm``, listed in a table tile -> (start in ``perm``,
  batch) built on the host in O(number of tiles) and cached per plan (:func:`plan_tables`). A kernel
  program owns one row tile (:func:`.tiles.row_tile`).
* Tile configurations: each op lists GPU configs, best guess first. A :class:`Launcher` (one per
  op module) launches with the first that works, remembers it per (dtype, d bucket, device, dot
  precision) and records what it launched (``last_launch()``). The interpreter uses one small config.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from collections import OrderedDict
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ...core.batches import BatchPlan
from ...core.loss import acc_dtype
from ...errors import BackendUnavailableError, ECIFInputError

INTERPRET_ENV = "TRITON_INTERPRET"
FP32_DOT_ENV = "ECIF_FAST_TRITON_FP32_DOT"
_FP32_DOT_CHOICES = ("tf32x3", "ieee", "tf32")
# Floating-point contraction (a·b + c → one fma) in the kernels that re-evaluate softmax weights: off by
# default, see :func:`fp_fusion`; "1" turns it back on (for A/B diagnostics).
FP_FUSION_ENV = "ECIF_FAST_TRITON_FP_FUSION"

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
             torch.float64: tl.float64}


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` asks for Triton's CPU interpreter (read at call time)."""
    return os.environ.get(INTERPRET_ENV, "0").strip().lower() in ("1", "true", "yes", "on", "y")


# ---- the interpreter --------------------------------------------------------------------------------

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


# ---- inputs, dtypes, dot precision ------------------------------------------------------------------

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
    if dt not in TL_DTYPES:
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
    if plan.perm.numel() != plan.n:  # the kernels write every output through the batches
        raise ECIFInputError(f"the plan must put each of its {plan.n} pairs in one batch, but its batches hold "
                             f"{plan.perm.numel()}")
    return tuple(ts)


def check_queries(U: torch.Tensor, V: torch.Tensor, plan: BatchPlan, dU: torch.Tensor, dV: torch.Tensor,
                  dlog_scale) -> tuple:
    """:func:`check_inputs` for the ops with query directions: ``(U, V, dU, dV, ds, squeeze)`` with ``dU, dV``
    ``(Q, n, d)`` (``squeeze``: they came as ``(n, d)``) and ``ds`` the ``(Q,)`` ``dlog_scale`` in the
    accumulation dtype (one value is broadcast), or None."""
    U, V, dU, dV = check_inputs(U, V, plan, dU, dV)
    if dU.shape != dV.shape:
        raise ECIFInputError(f"dU and dV must have the same shape, got {tuple(dU.shape)} and {tuple(dV.shape)}")
    squeeze = dU.dim() == 2
    if squeeze:
        dU, dV = dU.unsqueeze(0), dV.unsqueeze(0)
    ds = None
    if dlog_scale is not None:
        Q = dU.shape[0]
        ds = torch.as_tensor(dlog_scale, dtype=acc_dtype(U), device=U.device).detach().reshape(-1)
        if ds.numel() not in (1, Q):
            raise ECIFInputError(f"dlog_scale must hold 1 or Q = {Q} values, got {ds.numel()}")
        ds = ds.expand(Q).contiguous()
    return U, V, dU, dV, ds, squeeze


def scale_tensor(scale, acc: torch.dtype, device, factor: float = 1.0) -> torch.Tensor:
    """``factor·t`` as a ``(1,)`` tensor of the accumulation dtype (``scale``: number or one-element tensor)."""
    t = float(scale.detach().reshape(())) if torch.is_tensor(scale) else float(scale)
    return torch.tensor([t * factor], dtype=acc, device=device)


def _fp32_precision() -> str:
    p = os.environ.get(FP32_DOT_ENV, "tf32x3").strip().lower() or "tf32x3"
    if p not in _FP32_DOT_CHOICES:
        raise ECIFInputError(f"{FP32_DOT_ENV} must be one of {', '.join(_FP32_DOT_CHOICES)}, got {p!r}")
    return p


def dot_setup(dtype: torch.dtype, interp: bool):
    """``(precision, operand dtype)`` of ``tl.dot`` for inputs of ``dtype`` (see the module docstring)."""
    if interp:
        return "ieee", TL_DTYPES[torch.float64 if dtype == torch.float64 else torch.float32]
    if dtype == torch.float32:
        return _fp32_precision(), tl.float32
    # precision only matters for float32 operands; float64 is exact ("ieee") anyway
    return ("ieee" if dtype == torch.float64 else "tf32"), TL_DTYPES[dtype]


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


# ---- tile configurations and plan tables -------------------------------------------------------------

class Cfg(NamedTuple):
    """A tile configuration: ``BLOCK_M × BLOCK_N`` score tiles, ``d`` in steps of ``block_k``."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def p2(x: int, lo: int = 16) -> int:
    """The smallest power of two >= ``x`` and >= ``lo``."""
    return max(lo, 1 << max(0, int(x) - 1).bit_length())


_SM_COUNT: Dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Number of streaming multiprocessors of a CUDA device (cached)."""
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


class PlanTables(NamedTuple):
    plan: BatchPlan  # held so that id(plan) stays unique while the entry is cached
    identity: bool  # perm == arange(n): the kernels skip the gathers
    perm: torch.Tensor  # int32 on the device (a dummy when identity)
    offsets: torch.Tensor  # int32 on the device
    tile_start: torch.Tensor
    tile_batch: torch.Tensor
    num_tiles: int
    largest_batch: int


_PLAN_CACHE: "OrderedDict[Tuple, PlanTables]" = OrderedDict()
_PLAN_CACHE_SIZE = 8


def plan_tables(plan: BatchPlan, device: torch.device, block_m: int) -> PlanTables:
    """Device copies of the plan and its row-tile table; cached for the last few plans (a BatchPlan is
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
    entry = PlanTables(plan, identity, perm, offsets, tile_start.to(device), tile_batch.to(device), ntiles, bmax)
    _PLAN_CACHE[key] = entry
    while len(_PLAN_CACHE) > _PLAN_CACHE_SIZE:
        _PLAN_CACHE.popitem(last=False)
    return entry


# ---- launching with a fall-back ------------------------------------------------------------------------

class Launcher:
    """Launches one op's kernels with the first tile configuration that works.

    On the GPU the op's configs are tried best first; one whose launch raises (a compile-time failure,
    e.g. out of shared memory) gives a warning and the next one is tried. The config that worked is
    remembered per (op, dtype, d bucket, device, dot precision), so later calls start there.
    ``fp_fusion_off``: compile without fp contraction unless ``ECIF_FAST_TRITON_FP_FUSION=1``
    (:func:`fp_fusion`; for the kernels that re-evaluate softmax weights).
    """

    def __init__(self, *, fp_fusion_off: bool = False):
        self.fp_fusion_off = fp_fusion_off
        self._good: Dict[Tuple, int] = {}
        self._last: Dict[str, object] = {}

    def last_launch(self) -> Dict[str, object]:
        """What the latest successful call launched (op, tile config, dot precision, ...)."""
        return dict(self._last)

    def run(self, op: str, U: torch.Tensor, d: int, gpu_configs: List[Cfg],
            attempt: Callable[[Cfg, dict], Tuple[object, dict]],
            tiles: Tuple[Optional[int], Optional[int], Optional[int]] = (None, None, None)):
        """Return ``attempt(cfg, consts)[0]`` for the first config that works.

        ``gpu_configs``: the op's GPU configs, best first; ``tiles``: ``(block_m, block_n, block_k)``
        overrides (testing/tuning knobs), applied to the first GPU config or to the interpreter's small
        one. ``attempt(cfg, consts) -> (result, info)`` makes every launch of the op for one config;
        ``consts`` holds the keyword arguments they share (tile sizes, ``SINGLE_K``, dot dtypes and
        precision, warps, stages, fp fusion); ``info`` is added to :meth:`last_launch`.
        """
        dev = U.device
        interp = dev.type == "cpu"
        bm, bn, bk = tiles
        if interp:
            cfgs = [Cfg(bm or 32, bn or 32, bk or min(p2(d), 64), 4, 1)]
        elif bm or bn or bk:
            c0 = gpu_configs[0]
            cfgs = [Cfg(bm or c0.block_m, bn or c0.block_n, bk or c0.block_k, c0.num_warps, c0.num_stages)]
        else:
            cfgs = list(gpu_configs)
        for c in cfgs:
            if any(v < 16 or v & (v - 1) for v in c[:3]):
                raise ECIFInputError(f"tile sizes must be powers of two >= 16, got {tuple(c[:3])}")
        precision, dot_dt = dot_setup(U.dtype, interp)
        acc = acc_dtype(U)
        options = {}
        if self.fp_fusion_off and not interp:  # the interpreter never contracts
            options["enable_fp_fusion"] = fp_fusion()
        key = (op, U.dtype, p2(d), str(dev), precision)
        start = self._good.get(key, 0) if len(cfgs) > 1 else 0
        last_err: Optional[BaseException] = None
        for ci in range(start, len(cfgs)):
            cfg = cfgs[ci]
            consts = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SINGLE_K=d <= cfg.block_k,
                          DOT_DTYPE=dot_dt, ACC_DTYPE=TL_DTYPES[acc], PRECISION=precision,
                          num_warps=cfg.num_warps, num_stages=cfg.num_stages, **options)
            try:
                guard = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
                with guard:  # launch on the tensors' GPU, not the current one
                    result, info = attempt(cfg, consts)
            except Exception as e:  # compile-time failure (e.g. out of shared memory): try a smaller tile
                if interp or ci + 1 == len(cfgs):
                    raise
                warnings.warn(f"triton {op}: tile config {tuple(cfg)} failed for {U.dtype}, d={d} "
                              f"({type(e).__name__}: {str(e)[:200]}); trying a smaller one")
                last_err = e
                continue
            if len(cfgs) > 1:
                self._good[key] = ci
            self._last = dict(op=op, config=cfg._asdict(), precision=precision, single_k=d <= cfg.block_k,
                              interpreted=interp, fp_fusion=options.get("enable_fp_fusion", not interp), **info)
            return result
        raise RuntimeError(f"triton {op}: no tile configuration worked: {last_err}")  # pragma: no cover
