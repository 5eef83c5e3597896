"""Triton ``ecif_reductions``: positive and negative influence parts along query directions (docs/math.md §4).

Same contract as the torch twin (:mod:`ecif_fast.kernels.torch_ref.reductions`), computed in "δS form":
per batch ``S = t·U_b V_bᵀ`` and, per query ``q``, ``δS = t(δU V_bᵀ + U_b δVᵀ) + δs·S`` exist only as
``BLOCK_M × BLOCK_N`` tiles in registers. Row tiles, dtypes and devices as in :mod:`.launch`.

Design (one "line" kernel family, no atomics, deterministic):

* A line is a row of ``S`` (own side ``A = U``, other side ``B = V``) or a column (``A = V, B = U``: the
  columns of ``S`` are the rows of ``Sᵀ = t·V Uᵀ``, and ``δSᵀ`` swaps ``δU`` and ``δV`` the same way).
  Every kernel is launched once for rows and once with the roles swapped; a program owns ``BLOCK_M``
  lines of one batch and streams over the batch's column tiles, so each output element is written by
  exactly one program.
* Stats kernel: per line the online "top-1 + rest" of :func:`ecif_fast.core.lines.stream_line_stats` —
  maximum ``top``, its pair index ``arg`` and the rest (the line without ``arg``) as its own running
  maximum ``rest_m`` and sum ``Σ exp(S − rest_m)``, so it stays exact when the rest is ~200 below the
  top. The host turns them into ``l = lse − top`` and ``rest − rest_m`` (both in ``[0, log B]``): the
  kernels evaluate ``exp(S − lse)`` as ``exp((S − top) − l)``, where ``S − top`` is a difference of two
  scores, so the rounding of a large ``lse`` (``eps·|S|``) never scales a whole line of weights.
* Pass 2 kernel, per own line ``k`` and query: ``m_k = Σ_j P_kj δS_kj``, the cross sum
  ``x_k = Σ_j W_kj δS_kj`` where ``W`` is the removal weight of the *other* side's line ``j``
  (``Wc_kj`` for rows, ``Wr_jk`` for columns: its ``top``/``l``/``arg`` come in as vectors) and, exact only,
  ``e_k = δS_{k,arg_k} − Σ_{j≠arg_k} exp(S_kj − rest_k) δS_kj`` (the cancellation-free line-maximum
  term of :mod:`ecif_fast.core.lines`, including the single δS entry at the maximum; docs/math.md §8).
* Pass 3 kernel, per own line ``k``: ``z_k = Σ_j [arg_j = k ≠ j] c_j − Σ_j W_kj mean_j`` with the other
  side's means ``mean_j`` (``m'`` for rows, ``m`` for columns) and line-maximum terms
  ``c_j = exp(−l_j)·e_j``: the mean part of the negative term and the crediting of every
  other line's maximum term to the pair at that maximum (a gather, so no ``index_add``/atomics).
* Host: ``positive = m_rows + m_cols − 2 δS_kk`` (the diagonal as ``(Q, n)`` dot products),
  ``negative = x_rows + x_cols + z_rows + z_cols``.

Queries: grid axis 1 holds chunks of up to ``BLOCK_Q`` queries, and a program loops over the queries
of its chunk inside each tile. The loop shares the tile's ``S`` and every weight (``P``, ``W``, the
rest softmax: three exponentials per entry) among the chunk's queries, so a query costs two
``tl.dot`` of the tile plus a few multiply-adds per entry; the grid axis bounds the per-program
accumulators (``BLOCK_Q × BLOCK_M`` each; at most 8 queries per program on the GPU) and adds
parallelism when there are few row tiles (one "all" batch), at the price of recomputing ``S`` and
the weights per chunk. Cost per batch of ``B`` pairs: ``2·(1 + (1 + 2Q) + 1)·B²d`` multiply-adds
(stats, pass 2, pass 3; rows and columns) with one query chunk.

Split columns (as in :mod:`.lse`): when row tiles × query chunks are too few to fill the GPU (one
"all" batch of a few thousand pairs), grid axis 2 cuts each batch's column tiles into ``nsplit``
contiguous chunks; every kernel writes one partial result per chunk into ``(nsplit, ...)`` buffers,
merged on the host (the line statistics by "largest top wins, the other tops join the rest", the
sums by adding) — deterministic, nothing recomputed.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ...core.batches import BatchPlan
from ...core.loss import acc_dtype
from ...errors import ECIFInputError
from .launch import Cfg, Launcher, check_queries, kernel_for, p2, plan_tables, scale_tensor, sm_count
from .tiles import (col_chunk, col_tile, load_rows, max_combine, min_combine, row_tile, score_tiles, sum_combine,
                    tile_dot)


@triton.jit
def _line_stats_kernel(
    A, B, top_out, arg_out, rest_m_out, rest_s_out, perm, offsets, tile_start, tile_batch, scale_ptr,
    d, sa0, sa1, sb0, sb1, split_stride, nsplit,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SINGLE_K: tl.constexpr, IDENTITY: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Per own line ``r`` of the tile: ``top``, ``arg`` (pair index) and the rest as ``(rest_m, rest_s)`` (its
    largest entry and ``Σ exp(S − rest_m)``) of ``t·<A_r, B_c>`` over the columns ``c`` of chunk ``s`` of its
    batch (``top = rest_m = -inf``, ``rest_s = 0`` where empty)."""
    rid, mmask, b_lo, b_hi = row_tile(tile_start, tile_batch, offsets, perm, BLOCK_M, IDENTITY)
    rows = rid.to(tl.int64)
    sid = tl.program_id(1)
    c_lo, c_hi = col_chunk(b_lo, b_hi, sid, nsplit, BLOCK_N)
    scale = tl.load(scale_ptr)
    kk = tl.arange(0, BLOCK_K)
    a = load_rows((A, sa0, sa1), rows, mmask, kk, kk < d, DOT_DTYPE) if SINGLE_K else None

    top = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)
    arg = tl.full([BLOCK_M], 0, tl.int32)
    rest_m = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)  # rest = rest_m + log(rest_s)
    rest_s = tl.full([BLOCK_M], 0.0, ACC_DTYPE)
    for c0 in range(c_lo, c_hi, BLOCK_N):
        cid, nmask = col_tile(perm, c0, c_hi, BLOCK_N, IDENTITY)
        cols = cid.to(tl.int64)
        b = load_rows((B, sb0, sb1), cols, nmask, kk, kk < d, DOT_DTYPE) if SINGLE_K else None
        s = tile_dot(tl.full([BLOCK_M, BLOCK_N], 0.0, ACC_DTYPE), (A, sa0, sa1), rows, mmask, a, (B, sb0, sb1),
                     cols, nmask, b, d, BLOCK_K, SINGLE_K, DOT_DTYPE, PRECISION)
        s = tl.where(nmask[None, :], s * scale, float("-inf"))
        # the tile's top-1 (smallest pair index among ties) and the log-sum-exp of the tile's other entries
        tv = tl.reduce(s, 1, max_combine)
        ti = tl.reduce(tl.where(s == tv[:, None], cid[None, :], 2147483647), 1, min_combine)
        sr = tl.where(cid[None, :] == ti[:, None], float("-inf"), s)
        t2 = tl.reduce(sr, 1, max_combine)
        t2b = tl.where(t2 == float("-inf"), 0.0, t2)
        ts = tl.reduce(tl.exp(sr - t2b[:, None]), 1, sum_combine)
        # merge: the larger top wins, the smaller one ("loser") joins the rest (ties keep the earlier entry)
        new = tv > top
        loser = tl.where(new, top, tv)
        top = tl.where(new, tv, top)
        arg = tl.where(new, ti, arg)
        m_new = tl.maximum(tl.maximum(rest_m, t2), loser)
        base = tl.where(m_new == float("-inf"), 0.0, m_new)
        rest_s = rest_s * tl.exp(rest_m - base) + ts * tl.exp(t2 - base) + tl.exp(loser - base)
        rest_m = m_new

    out = sid.to(tl.int64) * split_stride + rows
    tl.store(top_out + out, top, mask=mmask)
    tl.store(arg_out + out, arg, mask=mmask)
    tl.store(rest_m_out + out, rest_m, mask=mmask)
    tl.store(rest_s_out + out, rest_s, mask=mmask)


@triton.jit
def _line_pass2_kernel(
    A, B, dA, dB, perm, offsets, tile_start, tile_batch, scale_ptr, ds_ptr,
    own_top, own_l, own_rm, own_rl, own_arg, oth_top, oth_l, oth_arg, out_m, out_e, out_x,
    d, Q, sa0, sa1, sb0, sb1, sda_q, sda0, sda1, sdb_q, sdb0, sdb1, out_q_stride, split_stride, nsplit,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_Q: tl.constexpr,
    SINGLE_K: tl.constexpr, IDENTITY: tl.constexpr, EXACT: tl.constexpr, HAS_DS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Per own line ``k`` and query ``q`` of the query chunk: ``m``, ``e`` (exact) and ``x`` over column
    chunk ``s``."""
    rid, mmask, b_lo, b_hi = row_tile(tile_start, tile_batch, offsets, perm, BLOCK_M, IDENTITY)
    rows = rid.to(tl.int64)
    q_lo = tl.program_id(1) * BLOCK_Q
    q_hi = tl.minimum(q_lo + BLOCK_Q, Q)
    sid = tl.program_id(2)
    c_lo, c_hi = col_chunk(b_lo, b_hi, sid, nsplit, BLOCK_N)
    scale = tl.load(scale_ptr)
    offs_q = tl.arange(0, BLOCK_Q)
    kk = tl.arange(0, BLOCK_K)
    a_op = (A, sa0, sa1)
    b_op = (B, sb0, sb1)
    a = load_rows(a_op, rows, mmask, kk, kk < d, DOT_DTYPE) if SINGLE_K else None

    top_i = tl.load(own_top + rows, mask=mmask, other=0.0)
    l_i = tl.load(own_l + rows, mask=mmask, other=0.0)
    if EXACT:
        rm_i = tl.load(own_rm + rows, mask=mmask, other=0.0)
        rl_i = tl.load(own_rl + rows, mask=mmask, other=0.0)
        arg_i = tl.load(own_arg + rows, mask=mmask, other=-1)
    acc_m = tl.full([BLOCK_Q, BLOCK_M], 0.0, ACC_DTYPE)
    acc_e = tl.full([BLOCK_Q, BLOCK_M], 0.0, ACC_DTYPE)
    acc_x = tl.full([BLOCK_Q, BLOCK_M], 0.0, ACC_DTYPE)
    for c0 in range(c_lo, c_hi, BLOCK_N):
        cid, nmask = col_tile(perm, c0, c_hi, BLOCK_N, IDENTITY)
        cols = cid.to(tl.int64)
        b = load_rows(b_op, cols, nmask, kk, kk < d, DOT_DTYPE) if SINGLE_K else None
        s = tile_dot(tl.full([BLOCK_M, BLOCK_N], 0.0, ACC_DTYPE), a_op, rows, mmask, a, b_op, cols, nmask, b, d,
                     BLOCK_K, SINGLE_K, DOT_DTYPE, PRECISION) * scale
        valid = mmask[:, None] & nmask[None, :]
        # weights of the tile, shared by every query of the chunk; exp(S − lse) as exp((S − top) − l) with
        # l = lse − top kept apart, so the rounding of a large lse does not scale a whole line
        p = tl.where(valid, tl.exp(tl.minimum((s - top_i[:, None]) - l_i[:, None], 0.0)), 0.0)
        top_j = tl.load(oth_top + cols, mask=nmask, other=0.0)
        l_j = tl.load(oth_l + cols, mask=nmask, other=0.0)
        qo = tl.exp(tl.minimum((s - top_j[None, :]) - l_j[None, :], 0.0))
        if EXACT:
            # off the other line's maximum q <= 1/2, so q/(1-q) is safe; the maximum is handled by e/c
            arg_j = tl.load(oth_arg + cols, mask=nmask, other=-1)
            keep = valid & (rid[:, None] != cid[None, :]) & (arg_j[None, :] != rid[:, None])
            w = tl.where(keep, qo / (1.0 - tl.minimum(qo, 0.5)), 0.0)
            # e weights: 1 at the own line's maximum, -r (softmax of the line without it) elsewhere
            # (S <= rest off the maximum: the clamp only keeps the masked entries finite)
            r = tl.exp(tl.minimum((s - rm_i[:, None]) - rl_i[:, None], 0.0))
            ew = tl.where(arg_i[:, None] == cid[None, :], 1.0, -r)
            ew = tl.where(valid, ew, 0.0)
        else:
            w = tl.where(valid & (rid[:, None] != cid[None, :]), qo, 0.0)
        for q in range(q_lo, q_hi):
            q64 = q_lo.to(tl.int64) + (q - q_lo)  # (q is a Python int in the interpreter)
            da_op = (dA + q64 * sda_q, sda0, sda1)
            db_op = (dB + q64 * sdb_q, sdb0, sdb1)
            da = load_rows(da_op, rows, mmask, kk, kk < d, DOT_DTYPE) if SINGLE_K else None
            db = load_rows(db_op, cols, nmask, kk, kk < d, DOT_DTYPE) if SINGLE_K else None
            _, g = score_tiles(None, tl.full([BLOCK_M, BLOCK_N], 0.0, ACC_DTYPE), a_op, da_op, rows, mmask, a, da,
                               b_op, db_op, cols, nmask, b, db, d, BLOCK_K, SINGLE_K, False, True, DOT_DTYPE,
                               PRECISION)
            g = g * scale
            if HAS_DS:
                g = g + tl.load(ds_ptr + q) * s
            sel = (offs_q == q - q_lo)[:, None]
            acc_m = tl.where(sel, acc_m + tl.reduce(p * g, 1, sum_combine)[None, :], acc_m)
            acc_x = tl.where(sel, acc_x + tl.reduce(w * g, 1, sum_combine)[None, :], acc_x)
            if EXACT:
                acc_e = tl.where(sel, acc_e + tl.reduce(ew * g, 1, sum_combine)[None, :], acc_e)

    qq = q_lo + offs_q
    optr = sid.to(tl.int64) * split_stride + qq.to(tl.int64)[:, None] * out_q_stride + rows[None, :]
    omask = mmask[None, :] & (qq < Q)[:, None]
    tl.store(out_m + optr, acc_m, mask=omask)
    tl.store(out_x + optr, acc_x, mask=omask)
    if EXACT:
        tl.store(out_e + optr, acc_e, mask=omask)


@triton.jit
def _line_pass3_kernel(
    A, B, perm, offsets, tile_start, tile_batch, scale_ptr, oth_top, oth_l, oth_arg, mean_o, c_o, out_z,
    d, Q, sa0, sa1, sb0, sb1, vec_q_stride, split_stride, nsplit,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_Q: tl.constexpr,
    SINGLE_K: tl.constexpr, IDENTITY: tl.constexpr, EXACT: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Per own line ``k`` and query ``q`` of the query chunk: ``z = Σ_j [arg_j = k ≠ j] c_j − Σ_j W_kj mean_j``
    over column chunk ``s``."""
    rid, mmask, b_lo, b_hi = row_tile(tile_start, tile_batch, offsets, perm, BLOCK_M, IDENTITY)
    rows = rid.to(tl.int64)
    q_lo = tl.program_id(1) * BLOCK_Q
    q_hi = tl.minimum(q_lo + BLOCK_Q, Q)
    sid = tl.program_id(2)
    c_lo, c_hi = col_chunk(b_lo, b_hi, sid, nsplit, BLOCK_N)
    scale = tl.load(scale_ptr)
    offs_q = tl.arange(0, BLOCK_Q)
    kk = tl.arange(0, BLOCK_K)
    a = load_rows((A, sa0, sa1), rows, mmask, kk, kk < d, DOT_DTYPE) if SINGLE_K else None

    acc_z = tl.full([BLOCK_M, BLOCK_Q], 0.0, ACC_DTYPE)
    for c0 in range(c_lo, c_hi, BLOCK_N):
        cid, nmask = col_tile(perm, c0, c_hi, BLOCK_N, IDENTITY)
        cols = cid.to(tl.int64)
        b = load_rows((B, sb0, sb1), cols, nmask, kk, kk < d, DOT_DTYPE) if SINGLE_K else None
        s = tile_dot(tl.full([BLOCK_M, BLOCK_N], 0.0, ACC_DTYPE), (A, sa0, sa1), rows, mmask, a, (B, sb0, sb1),
                     cols, nmask, b, d, BLOCK_K, SINGLE_K, DOT_DTYPE, PRECISION) * scale
        valid = mmask[:, None] & nmask[None, :]
        top_j = tl.load(oth_top + cols, mask=nmask, other=0.0)
        l_j = tl.load(oth_l + cols, mask=nmask, other=0.0)
        qo = tl.exp(tl.minimum((s - top_j[None, :]) - l_j[None, :], 0.0))
        if EXACT:
            arg_j = tl.load(oth_arg + cols, mask=nmask, other=-1)
            off_diag = valid & (rid[:, None] != cid[None, :])
            w = tl.where(off_diag & (arg_j[None, :] != rid[:, None]), qo / (1.0 - tl.minimum(qo, 0.5)), 0.0)
            credit = off_diag & (arg_j[None, :] == rid[:, None])
        else:
            w = tl.where(valid & (rid[:, None] != cid[None, :]), qo, 0.0)
        for q in range(q_lo, q_hi):
            vptr = (q_lo.to(tl.int64) + (q - q_lo)) * vec_q_stride + cols
            mo = tl.load(mean_o + vptr, mask=nmask, other=0.0)
            z = -tl.reduce(w * mo[None, :], 1, sum_combine)
            if EXACT:
                co = tl.load(c_o + vptr, mask=nmask, other=0.0)
                z = z + tl.reduce(tl.where(credit, co[None, :], 0.0), 1, sum_combine)
            sel = (offs_q == q - q_lo)[None, :]
            acc_z = tl.where(sel, acc_z + z[:, None], acc_z)

    qq = q_lo + offs_q
    optr = sid.to(tl.int64) * split_stride + qq.to(tl.int64)[None, :] * vec_q_stride + rows[:, None]
    tl.store(out_z + optr, acc_z, mask=mmask[:, None] & (qq < Q)[None, :])


_KERNELS = {"stats": _line_stats_kernel, "pass2": _line_pass2_kernel, "pass3": _line_pass3_kernel}


def _kernel(name: str, device_type: str):
    """The compiled kernel for CUDA; an interpreted one for CPU tensors under ``TRITON_INTERPRET=1``."""
    return kernel_for(_KERNELS[name], "reductions_" + name, device_type)


def _gpu_configs(dtype: torch.dtype, d: int) -> List[Cfg]:
    """Tile configurations for the GPU, first choice then smaller fall-backs.

    Pass 2 keeps ``S``, three weight tiles and a ``δS`` tile per query live, plus the address tensors
    of its four operand tiles, so ``d`` is streamed in narrower blocks than in :mod:`.lse` where a
    wide block spilled. The first choices, with up to ``_GPU_MAX_BLOCK_Q`` queries per program,
    compile for sm_90 without register spills (ptxas, kernels specialised as a launch with aligned
    pointers and ``d`` a multiple of 16 does; float32 and float64 with ``d`` not a multiple of 16 spill
    a few dozen bytes). Chosen without a GPU at hand; ``benchmarks/gpu_check.py`` times them.
    """
    if dtype in (torch.float16, torch.bfloat16):
        if d % 16:
            bk = 32 if d > 16 else 16
        else:
            bk = max(16, p2(d)) if d <= 128 else 64
        cfgs = [Cfg(64, 64, bk, 8, 2)]
    elif dtype == torch.float32:
        cfgs = [Cfg(64, 64, 16, 8, 2)]
    else:  # float64
        cfgs = [Cfg(32, 32, 16, 4, 1)]
    cfgs += [Cfg(16, 16, 16, 4, 1)]
    return cfgs


_GPU_MAX_BLOCK_Q = 8  # queries per program on the GPU (register pressure of pass 2)

_LAUNCHER = Launcher(fp_fusion_off=True)  # pass 2/3 weights from the rounded S of the stats (launch.fp_fusion)
last_launch = _LAUNCHER.last_launch


class _Stats(NamedTuple):
    """Line statistics, ``(n,)`` each; large logarithms are kept as an exact score plus a small part."""

    top: torch.Tensor  # line maximum (a score)
    arg: torch.Tensor  # int32 pair index of the maximum
    l: torch.Tensor  # lse − top = log(1 + Σ_{j≠arg} exp(S_j − top)), in [0, log B]
    rest_m: torch.Tensor  # largest score without the maximum (-inf for a line of one entry)
    rest_l: torch.Tensor  # rest − rest_m = log Σ_{j≠arg} exp(S_j − rest_m), in [0, log B] (0 for one entry)


def ecif_reductions(U: torch.Tensor, V: torch.Tensor, scale, plan: BatchPlan, dU: torch.Tensor,
                    dV: torch.Tensor, dlog_scale=None, negative_term: str = "exact", *,
                    block_m: Optional[int] = None, block_n: Optional[int] = None,
                    block_k: Optional[int] = None, block_q: Optional[int] = None,
                    split: Optional[int] = None):
    """Positive and negative influence parts of every pair along ``Q`` query directions (docs/math.md §4).

    Same contract as the torch twin :func:`ecif_fast.kernels.torch_ref.reductions.ecif_reductions`.

    Args:
        U, V: ``(n, d)`` embeddings (float16 / bfloat16 / float32 / float64), on a CUDA device (or the CPU
            with ``TRITON_INTERPRET=1``). Any strides. scale: ``t`` (number or one-element tensor).
        plan: the training batches.
        dU, dV: ``(Q, n, d)`` (or ``(n, d)``) directional derivatives of the embeddings.
        dlog_scale: ``(Q,)`` (or scalar) derivative of ``s = log t`` along the query; None if fixed.
        negative_term: ``"exact"`` (``w = p/(1−p)``) or ``"taylor"`` (``w = p``).
        block_m, block_n, block_k: tile sizes (powers of two >= 16); block_q: queries per program
            (a power of two); split: number of column chunks per row tile (partial results merged on
            the host); tuning/testing knobs, chosen automatically when None.
    Returns:
        ``(positive, negative)``: ``(Q, n)`` (``(n,)`` for 2-D ``dU``), float32 (float64 for float64
        inputs), on U's device. Not differentiable.
    """
    if negative_term not in ("exact", "taylor"):
        raise ECIFInputError(f"negative_term must be 'exact' or 'taylor', got {negative_term!r}")
    exact = negative_term == "exact"
    U, V, dU, dV, ds, squeeze = check_queries(U, V, plan, dU, dV, dlog_scale)
    dev = U.device
    Q, n, d = dU.shape
    acc = acc_dtype(U)
    scale_t = scale_tensor(scale, acc, dev)
    has_ds = ds is not None
    if not has_ds:
        ds = scale_t  # unused (HAS_DS=False)
    if block_q is not None and (block_q < 1 or block_q & (block_q - 1)):
        raise ECIFInputError(f"block_q must be a power of two >= 1, got {block_q}")
    if n == 0 or Q == 0:
        out = torch.zeros(Q, n, dtype=acc, device=dev)
        return (out[0], out[0].clone()) if squeeze else (out, out.clone())
    interp = dev.type == "cpu"

    def attempt(cfg: Cfg, consts: dict):
        tab = plan_tables(plan, dev, cfg.block_m)
        bq, nsplit = _launch_shape(Q, n, tab, cfg, dev, interp, block_q, split)
        pos, neg = _run(U, V, dU, dV, scale_t, ds, has_ds, exact, tab, consts, bq, nsplit, acc)
        return ((pos[0], neg[0]) if squeeze else (pos, neg)), dict(
            block_q=bq, query_chunks=-(-Q // bq), split=nsplit, identity=tab.identity, num_tiles=tab.num_tiles)

    return _LAUNCHER.run("ecif_reductions", U, d, _gpu_configs(U.dtype, d), attempt, (block_m, block_n, block_k))


def _launch_shape(Q: int, n: int, tab, cfg: Cfg, dev: torch.device, interp: bool, block_q: Optional[int],
                  split: Optional[int]) -> Tuple[int, int]:
    """``(BLOCK_Q, nsplit)``: queries per program and column chunks per row tile.

    All queries in one chunk (up to 16; ``_GPU_MAX_BLOCK_Q`` on the GPU) and no split, unless
    the row tiles times the query chunks leave the GPU idle: then the columns are split first (partial
    sums only, nothing recomputed; bounded so that the partials stay under 2^24 elements per output),
    then the query chunks shrink (each chunk recomputes ``S`` and the weights).
    """
    bq = block_q or min(p2(Q, 1), 16 if interp else _GPU_MAX_BLOCK_Q)
    if split is not None:
        return bq, max(1, int(split))
    if interp:
        return bq, 1
    want = 2 * sm_count(dev)
    col_tiles = -(-tab.largest_batch // cfg.block_n)
    nsplit = -(-want // max(tab.num_tiles * -(-Q // bq), 1))
    nsplit = max(1, min(nsplit, col_tiles // 2, 64, (1 << 24) // max(Q * n, 1)))
    while block_q is None and bq > 1 and tab.num_tiles * -(-Q // bq) * nsplit < want:
        bq //= 2
    return bq, nsplit


def _run(U, V, dU, dV, scale_t, ds, has_ds, exact, tab, consts, bq, nsplit, acc):
    """Stats, pass 2 and pass 3 for rows and columns; returns ``(positive, negative)`` ``(Q, n)``."""
    dev = U.device
    Q, n, d = dU.shape
    grid1 = (tab.num_tiles, nsplit)
    grid2 = (tab.num_tiles, -(-Q // bq), nsplit)
    common = dict(IDENTITY=tab.identity, **consts)
    plan_args = (tab.perm, tab.offsets, tab.tile_start, tab.tile_batch, scale_t)

    def stats(A, B) -> _Stats:
        top, arg, rest_m, rest_s = (torch.empty(nsplit, n, dtype=dt, device=dev)
                                    for dt in (acc, torch.int32, acc, acc))
        _kernel("stats", dev.type)[grid1](A, B, top, arg, rest_m, rest_s, *plan_args, d, A.stride(0), A.stride(1),
                                          B.stride(0), B.stride(1), n, nsplit, **common)
        if nsplit == 1:
            top, arg, rest_m, rest_s = top[0], arg[0], rest_m[0], rest_s[0]
        else:  # merge the chunks: the largest top wins (the first on ties), the other tops join the rest
            top_s = top
            top, win = top_s.max(0)
            arg = arg.gather(0, win[None])[0]
            ms = torch.cat([rest_m, top_s.scatter(0, win[None], float("-inf"))])
            ss = torch.cat([rest_s, torch.ones_like(top_s)])
            rest_m = ms.max(0).values
            base = torch.where(rest_m == float("-inf"), 0.0, rest_m)
            rest_s = (ss * torch.exp(ms - base)).sum(0)
        has_rest = rest_s > 0
        rest_l = torch.where(has_rest, torch.log(torch.where(has_rest, rest_s, 1.0)), 0.0)
        l = torch.log1p(rest_s * torch.exp(torch.where(has_rest, rest_m - top, 0.0)))
        return _Stats(top, arg, l, rest_m, rest_l)

    def pass2(A, B, dA, dB, own: _Stats, oth: _Stats):
        out = [torch.empty(nsplit, Q, n, dtype=acc, device=dev) for _ in range(3)]  # m, e, x
        _kernel("pass2", dev.type)[grid2](
            A, B, dA, dB, *plan_args, ds, own.top, own.l, own.rest_m, own.rest_l, own.arg, oth.top, oth.l,
            oth.arg, *out,
            d, Q, A.stride(0), A.stride(1), B.stride(0), B.stride(1), dA.stride(0), dA.stride(1), dA.stride(2),
            dB.stride(0), dB.stride(1), dB.stride(2), n, Q * n, nsplit,
            BLOCK_Q=bq, EXACT=exact, HAS_DS=has_ds, **common)
        return [o[0] if nsplit == 1 else o.sum(0) for o in out]

    def pass3(A, B, oth: _Stats, mean_o, c_o):
        z = torch.empty(nsplit, Q, n, dtype=acc, device=dev)
        _kernel("pass3", dev.type)[grid2](
            A, B, *plan_args, oth.top, oth.l, oth.arg, mean_o, c_o, z, d, Q, A.stride(0), A.stride(1), B.stride(0),
            B.stride(1), n, Q * n, nsplit, BLOCK_Q=bq, EXACT=exact, **common)
        return z[0] if nsplit == 1 else z.sum(0)

    rows = stats(U, V)
    cols = stats(V, U)
    m_r, e_r, x_r = pass2(U, V, dU, dV, rows, cols)
    m_c, e_c, x_c = pass2(V, U, dV, dU, cols, rows)
    if exact:  # line-maximum terms c = p_max·e, credited by pass 3 to the pair at the maximum
        c_r = torch.exp(-rows.l) * e_r
        c_c = torch.exp(-cols.l) * e_c
    else:
        c_r = c_c = m_r  # unused (EXACT=False)
    z_r = pass3(U, V, cols, m_c, c_c)
    z_c = pass3(V, U, rows, m_r, c_r)
    diag = _diagonal(U, V, dU, dV, scale_t, ds if has_ds else None, acc)
    return m_r + m_c - 2 * diag, x_r + x_c + z_r + z_c


def _diagonal(U, V, dU, dV, scale_t, ds, acc) -> torch.Tensor:
    """``δS_kk = t(<δu_k, v_k> + <u_k, δv_k>) + δs·t<u_k, v_k>``, ``(Q, n)`` in ``acc``; the directions are
    upcast a few queries at a time (about 2^24 elements), never as a whole ``(Q, n, d)`` copy."""
    Q, n, d = dU.shape
    U, V = U.to(acc), V.to(acc)
    out = torch.empty(Q, n, dtype=acc, device=U.device)
    step = max(1, (1 << 24) // max(n * d, 1))
    for q0 in range(0, Q, step):
        q1 = min(Q, q0 + step)
        out[q0:q1] = (dU[q0:q1].to(acc) * V).sum(-1) + (U * dV[q0:q1].to(acc)).sum(-1)
    out *= scale_t
    if ds is not None:
        out += ds[:, None] * (scale_t * (U * V).sum(1))
    return out
