"""Triton ``lse`` op: per-batch row and column log-sum-exp of ``S = t·U Vᵀ`` (docs/math.md §4–§5).

Design (one kernel, launched twice; row tiles, dtypes and devices as in :mod:`.launch`):

* The grid is ``(number of row tiles, nsplit)``. Program ``(i, s)`` loads its ``BLOCK_M`` rows of ``A``
  and streams over the column tiles of its batch (the ``s``-th of ``nsplit`` contiguous chunks of
  them), computing ``t·A_tile B_tileᵀ`` with ``tl.dot`` and an online log-sum-exp (running maximum +
  rescaled sum, in base 2 below float64).
* Row LSE: ``A = U, B = V``. Column LSE of ``S`` is the row LSE of ``Sᵀ = t·V Uᵀ``: the same kernel
  with the roles swapped. No atomics, so results are deterministic (bitwise reproducible).
* ``nsplit > 1`` (chosen automatically on the GPU when there are too few row tiles to fill the
  device, e.g. one small "all" batch) writes one partial LSE per chunk into a ``(nsplit, n)`` buffer,
  merged with ``torch.logsumexp`` (deterministic too).

Outputs float32 (float64 for float64 inputs); float64 uses natural ``exp``/``log`` in float64.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ...core.batches import BatchPlan
from ...core.loss import acc_dtype
from .launch import Cfg, Launcher, check_inputs, kernel_for, p2, plan_tables, scale_tensor, sm_count
from .tiles import col_chunk, col_tile, load_rows, max_combine, row_tile, sum_combine, tile_dot

LOG2E = 1.0 / math.log(2.0)


@triton.jit
def _lse_rows_kernel(
    A, B, out, perm, offsets, tile_start, tile_batch, scale_ptr,
    d, sa0, sa1, sb0, sb1, split_stride, nsplit,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SINGLE_K: tl.constexpr, IDENTITY: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BASE2: tl.constexpr,
):
    """``out[s, r] = log Σ_{c in chunk s of batch(r)} exp(t <A_r, B_c>)`` for the rows ``r`` of one tile."""
    rid, mmask, b_lo, b_hi = row_tile(tile_start, tile_batch, offsets, perm, BLOCK_M, IDENTITY)
    rows = rid.to(tl.int64)
    sid = tl.program_id(1)
    c_lo, c_hi = col_chunk(b_lo, b_hi, sid, nsplit, BLOCK_N)
    # BASE2: scale_ptr holds t·log2(e), sums use exp2; else it holds t and sums use exp (float64)
    scale = tl.load(scale_ptr)
    kk = tl.arange(0, BLOCK_K)
    a = load_rows((A, sa0, sa1), rows, mmask, kk, kk < d, DOT_DTYPE) if SINGLE_K else None

    m_i = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)
    l_i = tl.full([BLOCK_M], 0.0, ACC_DTYPE)
    for c0 in range(c_lo, c_hi, BLOCK_N):
        cid, nmask = col_tile(perm, c0, c_hi, BLOCK_N, IDENTITY)
        cols = cid.to(tl.int64)
        b = load_rows((B, sb0, sb1), cols, nmask, kk, kk < d, DOT_DTYPE) if SINGLE_K else None
        s = tile_dot(tl.full([BLOCK_M, BLOCK_N], 0.0, ACC_DTYPE), (A, sa0, sa1), rows, mmask, a, (B, sb0, sb1),
                     cols, nmask, b, d, BLOCK_K, SINGLE_K, DOT_DTYPE, PRECISION)
        s = tl.where(nmask[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, max_combine))
        if BASE2:
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
        else:
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, sum_combine)
        m_i = m_new

    nonempty = l_i > 0
    safe_l = tl.where(nonempty, l_i, 1.0)
    if BASE2:
        res = m_i * 0.6931471805599453 + tl.log(safe_l)
    else:
        res = m_i + tl.log(safe_l)
    res = tl.where(nonempty, res, float("-inf"))
    tl.store(out + sid.to(tl.int64) * split_stride + rows, res, mask=mmask)


def _gpu_configs(dtype: torch.dtype, d: int) -> List[Cfg]:
    """Tile configurations for the GPU, best guess first, then smaller fall-backs.

    Chosen without a GPU at hand: every first choice compiles for sm_90 without register spills
    (checked with ``triton.compile(..., target=GPUTarget("cuda", 90, 32))`` and ptxas) and fits the
    shared memory of an H100/H200; the timings of ``benchmarks/gpu_check.py`` are the place to tune them.
    """
    if dtype in (torch.float16, torch.bfloat16):
        if d <= 64:
            cfgs = [Cfg(128, 64, p2(d), 4, 3)]
        elif d <= 128:
            cfgs = [Cfg(128, 64, 128, 8, 3)]
        elif d <= 256:
            cfgs = [Cfg(128, 64, 256, 8, 2)]
        elif d <= 512:
            cfgs = [Cfg(64, 64, 512, 8, 2)]
        else:
            cfgs = [Cfg(128, 64, 64, 8, 3)]
        cfgs += [Cfg(64, 64, 64, 4, 2), Cfg(32, 32, 32, 4, 1)]
    elif dtype == torch.float32:
        if d <= 64:
            cfgs = [Cfg(64, 64, p2(d), 4, 3)]
        elif d <= 128:
            cfgs = [Cfg(64, 64, 128, 8, 2)]
        else:
            cfgs = [Cfg(128, 64, 32, 8, 3)]
        cfgs += [Cfg(64, 32, 32, 4, 2), Cfg(32, 32, 16, 4, 1)]
    else:  # float64
        cfgs = [Cfg(32, 32, min(p2(d), 32), 4, 2), Cfg(16, 16, 16, 4, 1)]
    return cfgs


_LAUNCHER = Launcher()
last_launch = _LAUNCHER.last_launch


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
    acc = acc_dtype(U)
    if n == 0:
        return torch.empty(0, dtype=acc, device=dev), torch.empty(0, dtype=acc, device=dev)
    interp = dev.type == "cpu"
    base2 = acc == torch.float32
    scale_t = scale_tensor(scale, acc, dev, LOG2E if base2 else 1.0)
    kernel = kernel_for(_lse_rows_kernel, "lse", dev.type)

    def attempt(cfg: Cfg, consts: dict):
        tab = plan_tables(plan, dev, cfg.block_m)
        if split is not None:
            nsplit = max(1, int(split))
        elif interp:
            nsplit = 1
        else:
            col_tiles = (tab.largest_batch + cfg.block_n - 1) // cfg.block_n
            want = -(-2 * sm_count(dev) // max(tab.num_tiles, 1))
            nsplit = max(1, min(want, col_tiles // 2, 64))
        outs = []
        for A, B in ((U, V), (V, U)):
            buf = torch.empty((nsplit, n), dtype=acc, device=dev)
            kernel[(tab.num_tiles, nsplit)](
                A, B, buf, tab.perm, tab.offsets, tab.tile_start, tab.tile_batch, scale_t,
                d, A.stride(0), A.stride(1), B.stride(0), B.stride(1), n, nsplit,
                IDENTITY=tab.identity, BASE2=base2, **consts)
            outs.append(buf[0] if nsplit == 1 else torch.logsumexp(buf, dim=0))
        return tuple(outs), dict(split=nsplit, identity=tab.identity, num_tiles=tab.num_tiles)

    return _LAUNCHER.run("lse", U, d, _gpu_configs(U.dtype, d), attempt, (block_m, block_n, block_k))
