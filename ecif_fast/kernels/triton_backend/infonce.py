"""Triton ``infonce`` op: fused contrastive loss and gradients (docs/math.md §2, §4), flash-attention style.

Design (no atomics, deterministic; row tiles, dtypes and devices as in :mod:`.launch`):

* Everything runs through one row-tile kernel, :func:`_grad_rows_kernel`: program ``(i, k)`` loads its
  ``BLOCK_M`` rows of ``A`` and streams over the column tiles of its batch, recomputing
  ``S = t·A Bᵀ``. Launched with ``A = U, B = V`` it works on the rows of ``S``; with the roles
  swapped (``A = V, B = U``, ``TRANS``) on the rows of ``Sᵀ``, i.e. the columns of ``S`` (the row
  softmax of ``Sᵀ`` is the column softmax of ``S``). The swapped launch uses the transposed tile
  shape (``BLOCK_N × BLOCK_M``) and computes each tile as the transpose of the very product
  ``U_tile V_tileᵀ`` the row launch computes (same operands, same shape, same order), so every pass
  and launch sees bitwise the same ``S`` (and ``δS``): ``V_tile U_tileᵀ`` would sum in another
  order, and ``t`` times an ulp of ``U·V`` is large at large ``t``.
* Pass 1 (``LINE_STATS``, both launches): per row of ``S`` and per row of ``Sᵀ`` (column of ``S``)
  the line statistics ``top`` (maximum), ``arg`` (pair index of the maximum) and ``l = lse − top``
  (online, like the :mod:`.lse` kernel); why this form: docs/math.md §8 and the kernel's docstring.
* Pass 2 (``INFONCE``): ``G = P + Qc − 2I`` (``P``, ``Qc``: row and column softmax of ``S``) and
  ``dA = t·G B`` (the ``k``-th ``BLOCK_K`` slice of the columns of ``B``) accumulated in registers,
  plus per-row ``lse_i − S_ii`` (loss) and ``Σ_j G_ij S_ij`` (``∂loss/∂log t``). The row launch
  gives ``dU``, the swapped one ``dV = t·Gᵀ U``. The per-row partial sums are added up on the host
  with torch (deterministic).
* The same kernel serves the Gauss–Newton product (:mod:`.gauss_newton`): ``GN_MEANS`` gives the
  row means ``m_i = Σ_j P_ij δS_ij`` (per query), ``GN_PRODUCT`` accumulates ``t·G B`` for
  ``G = P∘(δS − m) + Qc∘(δS − mc)``; queries are a grid axis there.

Precision: ``G`` is a float32 tile; its product with a 16-bit ``B`` tile splits ``G`` into a 16-bit
head plus a 16-bit remainder (two tensor-core products, about 16 significant bits for bfloat16 and
22 for float16) instead of rounding it to 16 bits. Where ``G`` may exceed the float16 range
(Gauss–Newton with float16 inputs) the ``B`` tile is widened to float32 instead. In the CPU
interpreter every operand is cast to the accumulation dtype before ``tl.dot`` (the split is still
applied, so the numbers match the GPU). On the GPU the kernel is compiled without floating-point
contraction (:func:`.launch.fp_fusion`), although its accuracy no longer depends on it: the weight
at a line's maximum is ``exp(−l)`` whatever rounding the recomputed ``S`` gets.

Outputs float32 (float64 for float64 inputs).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from ...core.batches import BatchPlan
from ...core.loss import acc_dtype
from .launch import TL_DTYPES, Cfg, Launcher, check_inputs, kernel_for, p2, plan_tables, scale_tensor
from .tiles import col_tile, load_rows, max_combine, min_combine, row_tile, score_tiles, sum_combine

# The passes of _grad_rows_kernel (its MODE); launches pass ``.value``.
LINE_STATS = tl.constexpr(0)  # top, arg and l = lse − top of every line
INFONCE = tl.constexpr(1)  # t·G B for G = P + Qc − 2I, per-row loss terms
GN_MEANS = tl.constexpr(2)  # m = Σ_j P δS per line and query
GN_PRODUCT = tl.constexpr(3)  # t·G B for G = P∘(δS − m) + Qc∘(δS − mc), per query


@triton.jit
def _grad_rows_kernel(
    A, B, dA, dB, top_a, top_b, l_a, l_b, arg_a, arg_b, m_a, m_b, ds_ptr, out, row_out, scale_ptr,
    perm, offsets, tile_start, tile_batch, n, d,
    MODE: tl.constexpr, WITH_DS: tl.constexpr, ROW_TERMS: tl.constexpr, TRANS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SINGLE_K: tl.constexpr, IDENTITY: tl.constexpr, G_SPLIT: tl.constexpr, G_WIDE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, LOW_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Row-tile pass over ``S = t·A Bᵀ`` (per batch); all tensors contiguous.

    ``A, B``: ``(n, d)``; ``dA, dB``: ``(Q, n, d)`` directions (GN passes); ``top_a, l_a, arg_a`` /
    ``top_b, l_b, arg_b``: ``(n,)`` line statistics of the rows of ``S`` / of ``Sᵀ`` as written by
    LINE_STATS; ``m_a / m_b``: ``(Q, n)`` means ``Σ P δS`` along the same (GN_PRODUCT); ``ds_ptr``:
    ``(Q,)`` δs; ``scale_ptr``: ``(1,)`` t. Program ``(tile, k, q)``; ``BLOCK_K`` is both the K step of
    the products and the width of the slice ``k`` of the embedding columns that ``out`` gets.
    ``δS = t(dA Bᵀ + A dBᵀ) + δs·S`` (δs only WITH_DS) and, with ``z = 0`` at the line's ``arg`` and
    ``z = S − top`` elsewhere, ``P = exp(z_a − l_a)`` (rows, own statistics), ``Qc = exp(z_b − l_b)``
    (columns, the other side's).

    * LINE_STATS: ``row_out (2, n)``: ``top`` and ``l = log Σ_j exp(S_ij − top_i)`` (so
      ``lse = top + l``); ``arg_a (n,)`` int64: the pair index of the maximum (the smallest on a tie
      within a tile, the earlier tile across tiles).
    * INFONCE: ``out (n, d) = t·G B`` for ``G = P + Qc − 2I``; ``row_out (2, n)``:
      ``(top_a_i − S_ii) + l_a_i`` and (ROW_TERMS) ``Σ_j G_ij S_ij``.
    * GN_MEANS: ``row_out (Q, n) = Σ_j P_ij δS_ij``.
    * GN_PRODUCT: ``out (Q, n, d) = t·G B`` for ``G = P∘(δS − m_a) + Qc∘(δS − m_b)``;
      ``row_out (Q, n)`` (ROW_TERMS and WITH_DS): ``Σ_j G_ij S_ij``.

    ``TRANS`` (``A = V, B = U``): the tiles of ``S``/``δS`` are computed as ``U_tile V_tileᵀ`` (``B``
    rows first) and transposed, exactly as the ``A = U`` launch computes them.

    Why this form: ``G`` needs every line of ``P`` and ``Qc`` to sum to 1 (``G_kk = p + q − 2`` when
    one pair dominates; ``δS − m`` in Gauss–Newton). A rounded ``lse`` would make them sum to
    ``1 ± eps·|S|`` (a 1.6 % error at ``|S| = 2·10⁵`` in float32); ``l`` lies in ``[0, log B]``, so
    it is rounded to ``eps·log B`` instead. The weights must also come from the very ``S`` the
    statistics saw: every tile is the same product in every mode and launch (``TRANS``), so they
    do, and a line sums to 1 within a few eps. Where ``S`` could still round differently (fma
    contraction of ``dot·t − top`` on the GPU, which the launches turn off), the maximum evaluated
    as ``exp(0 − l)`` keeps the weight that carries the line exact, and the others keep the relative
    error of their own ``S`` entry: the sum is then off by at most ``(1 − max weight)`` times the
    difference of the two roundings (the softmax's own sensitivity to ``S``).

    Only the ``k == 0`` programs write ``row_out``.
    """
    DIRS: tl.constexpr = MODE == GN_MEANS or MODE == GN_PRODUCT
    rid, mmask, b_lo, b_hi = row_tile(tile_start, tile_batch, offsets, perm, BLOCK_M, IDENTITY)
    rows = rid.to(tl.int64)
    kid = tl.program_id(1)
    q = tl.program_id(2).to(tl.int64)
    scale = tl.load(scale_ptr)
    qoff = q * n * d  # start of query q in dA / dB / out
    od = kid * BLOCK_K + tl.arange(0, BLOCK_K)  # this program's slice of the embedding columns
    odmask = od < d
    a_op = (A, d, 1)
    b_op = (B, d, 1)
    da_op = (dA + qoff, d, 1)
    db_op = (dB + qoff, d, 1)

    if MODE != LINE_STATS:
        top_r = tl.load(top_a + rows, mask=mmask, other=0.0)
        l_r = tl.load(l_a + rows, mask=mmask, other=0.0)
        arg_r = tl.load(arg_a + rows, mask=mmask, other=-1)
    if MODE == GN_PRODUCT:
        m_r = tl.load(m_a + q * n + rows, mask=mmask, other=0.0)
    if WITH_DS:
        if DIRS:
            dsq = tl.load(ds_ptr + q)
    a = None  # the row tile of A (dA) when SINGLE_K; else score_tiles loads it block by block
    da = None
    if SINGLE_K:
        a = load_rows(a_op, rows, mmask, od, odmask, DOT_DTYPE)
        if DIRS:
            da = load_rows(da_op, rows, mmask, od, odmask, DOT_DTYPE)

    acc = tl.full([BLOCK_M, BLOCK_K], 0.0, ACC_DTYPE)
    row1 = tl.full([BLOCK_M], 0.0, ACC_DTYPE)  # LINE_STATS: running maximum
    row2 = tl.full([BLOCK_M], 0.0, ACC_DTYPE)  # LINE_STATS: running sum of exp(S − maximum)
    argm = tl.full([BLOCK_M], 0, tl.int64)  # LINE_STATS: pair index of the running maximum
    if MODE == LINE_STATS:
        row1 = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)
    for c0 in range(b_lo, b_hi, BLOCK_N):
        cid, nmask = col_tile(perm, c0, b_hi, BLOCK_N, IDENTITY)
        cols = cid.to(tl.int64)
        b = None
        db = None
        if SINGLE_K:
            b = load_rows(b_op, cols, nmask, od, odmask, DOT_DTYPE)
            if DIRS:
                db = load_rows(db_op, cols, nmask, od, odmask, DOT_DTYPE)
        # s = A Bᵀ and (GN passes) e = dA Bᵀ + A dBᵀ; TRANS: the same products with the U rows (B's) first
        if TRANS:
            e = tl.full([BLOCK_N, BLOCK_M], 0.0, ACC_DTYPE) if DIRS else None
            s, e = score_tiles(tl.full([BLOCK_N, BLOCK_M], 0.0, ACC_DTYPE), e, b_op, db_op, cols, nmask, b, db,
                               a_op, da_op, rows, mmask, a, da, d, BLOCK_K, SINGLE_K, True, DIRS, DOT_DTYPE,
                               PRECISION)
            s = tl.trans(s)
            if DIRS:
                e = tl.trans(e)
        else:
            e = tl.full([BLOCK_M, BLOCK_N], 0.0, ACC_DTYPE) if DIRS else None
            s, e = score_tiles(tl.full([BLOCK_M, BLOCK_N], 0.0, ACC_DTYPE), e, a_op, da_op, rows, mmask, a, da,
                               b_op, db_op, cols, nmask, b, db, d, BLOCK_K, SINGLE_K, True, DIRS, DOT_DTYPE,
                               PRECISION)
        s = s * scale
        if MODE == LINE_STATS:
            s = tl.where(nmask[None, :], s, float("-inf"))
            tv = tl.reduce(s, 1, max_combine)
            ti = tl.reduce(tl.where(s == tv[:, None], cols[None, :], n), 1, min_combine)
            argm = tl.where(tv > row1, ti, argm)
            m_new = tl.maximum(row1, tv)
            row2 = row2 * tl.exp(row1 - m_new) + tl.reduce(tl.exp(s - m_new[:, None]), 1, sum_combine)
            row1 = m_new
        else:
            valid = mmask[:, None] & nmask[None, :]
            # exp((S − top) − l), with S − top taken as exactly 0 at the line's maximum (masked lanes
            # go to exp(−inf) = 0 instead of overflowing)
            zr = tl.where(cols[None, :] == arg_r[:, None], 0.0, s - top_r[:, None])
            p = tl.exp(tl.where(valid, zr - l_r[:, None], float("-inf")))
            if MODE != GN_MEANS:
                top_c = tl.load(top_b + cols, mask=nmask, other=0.0)
                l_c = tl.load(l_b + cols, mask=nmask, other=0.0)
                arg_c = tl.load(arg_b + cols, mask=nmask, other=-1)
                zc = tl.where(rows[:, None] == arg_c[None, :], 0.0, s - top_c[None, :])
                qc = tl.exp(tl.where(valid, zc - l_c[None, :], float("-inf")))
            if MODE == INFONCE:
                diag = valid & (rows[:, None] == cols[None, :])
                g = p + qc - tl.where(diag, 2.0, 0.0)
                row1 += tl.reduce(tl.where(diag, s, 0.0), 1, sum_combine)
                if ROW_TERMS:
                    row2 += tl.reduce(g * s, 1, sum_combine)
            else:
                dsm = e * scale
                if WITH_DS:
                    dsm = dsm + dsq * s
                if MODE == GN_MEANS:
                    row1 += tl.reduce(p * dsm, 1, sum_combine)
                else:
                    m_c = tl.load(m_b + q * n + cols, mask=nmask, other=0.0)
                    g = p * (dsm - m_r[:, None]) + qc * (dsm - m_c[None, :])
                    if ROW_TERMS:
                        if WITH_DS:
                            row1 += tl.reduce(g * s, 1, sum_combine)
            if MODE != GN_MEANS:
                # acc += G · B[:, this slice]
                bo = b if SINGLE_K else load_rows(b_op, cols, nmask, od, odmask, DOT_DTYPE)
                if G_SPLIT:
                    g_hi = g.to(LOW_DTYPE)
                    g_lo = (g - g_hi.to(ACC_DTYPE)).to(LOW_DTYPE)
                    acc = tl.dot(g_hi.to(DOT_DTYPE), bo, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
                    acc = tl.dot(g_lo.to(DOT_DTYPE), bo, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
                elif G_WIDE:  # float16 B widened to float32 (G may exceed the float16 range)
                    acc = tl.dot(g, bo.to(tl.float32), acc, input_precision="tf32x3", out_dtype=ACC_DTYPE)
                else:
                    acc = tl.dot(g.to(DOT_DTYPE), bo, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)

    if MODE == INFONCE or MODE == GN_PRODUCT:
        tl.store(out + qoff + rows[:, None] * d + od[None, :], acc * scale,
                 mask=mmask[:, None] & odmask[None, :])
    if kid == 0:
        if MODE == LINE_STATS:
            tl.store(row_out + rows, row1, mask=mmask)
            tl.store(row_out + n + rows, tl.log(tl.where(mmask, row2, 1.0)), mask=mmask)
            tl.store(arg_a + rows, argm, mask=mmask)
        elif MODE == INFONCE:
            tl.store(row_out + rows, (top_r - row1) + l_r, mask=mmask)
            if ROW_TERMS:
                tl.store(row_out + n + rows, row2, mask=mmask)
        elif MODE == GN_MEANS:
            tl.store(row_out + q * n + rows, row1, mask=mmask)
        elif ROW_TERMS:
            if WITH_DS:
                tl.store(row_out + q * n + rows, row1, mask=mmask)


def _gpu_configs(dtype: torch.dtype, d: int, directions: bool = False) -> List[Cfg]:
    """Tile configurations for the GPU, first choice then smaller fall-backs.

    ``block_k`` is both the K step of ``S = A Bᵀ`` and the width of the slice of ``dA`` one program
    accumulates; ``d > block_k`` recomputes ``S`` once per slice (grid axis 1). ``directions``: the
    Gauss–Newton passes (``dA``, ``dB`` tiles too). Chosen without a GPU at hand, by compiling for
    sm_90 as a launch specialises the kernel (``d`` a multiple of 16, aligned pointers) and reading
    ptxas' spill report: the 16-bit infonce and float32 statistics passes do not spill; float64 at
    d > 64 spills about 100 bytes, the float16 Gauss–Newton product 100–400 bytes and the float32
    Gauss–Newton passes at d > 64 about a kilobyte. GPU timings are the place to tune them.
    """
    if dtype in (torch.float16, torch.bfloat16):
        if d <= 64:
            cfgs = [Cfg(128, 64, p2(d), 8, 2)]
        elif d <= 128:
            cfgs = [Cfg(128, 32, 128, 8, 2)]
        else:
            cfgs = [Cfg(64, 32, 128, 4, 2)]
        cfgs += [Cfg(64, 32, 64, 4, 1), Cfg(32, 32, 32, 4, 1)]
    elif dtype == torch.float32:
        if d <= 64:
            cfgs = [Cfg(64, 32, p2(d), 4, 2)]
        else:
            cfgs = [Cfg(64, 32, 64, 8, 2)]
        cfgs += [Cfg(32, 32, 64, 4, 1), Cfg(32, 16, 32, 4, 1)]
    else:  # float64
        cfgs = [Cfg(32, 32, min(p2(d), 32 if directions else 64), 4, 1), Cfg(16, 16, 32, 4, 1)]
    return cfgs


_LAUNCHER = Launcher(fp_fusion_off=True)  # no a·b + c → fma contraction (see launch.fp_fusion)
last_launch = _LAUNCHER.last_launch  # of infonce and gauss_newton_product


def stats_launches(U, V, rstats, cstats, rarg, carg, t, n, d) -> list:
    """The two LINE_STATS launches (rows of ``S``, rows of ``Sᵀ``) that fill ``rstats`` / ``cstats``
    ``(2, n)`` with ``top`` and ``l = lse − top``, and ``rarg`` / ``carg`` ``(n,)`` int64 with the pair
    index of each line's maximum."""
    def grid(cfg, ntiles):
        return (ntiles, 1, 1)

    kw = dict(dA=t, dB=t, top_a=t, top_b=t, l_a=t, l_b=t, arg_b=rarg, m_a=t, m_b=t, ds_ptr=t, out=t,
              scale_ptr=t, n=n, d=d, MODE=LINE_STATS.value, WITH_DS=False, ROW_TERMS=False)
    return [(grid, dict(A=U, B=V, row_out=rstats, arg_a=rarg, TRANS=False, **kw)),
            (grid, dict(A=V, B=U, row_out=cstats, arg_a=carg, TRANS=True, **kw))]


def side_args(U, V, rstats, cstats, rarg, carg, dU=None, dV=None) -> tuple:
    """Kernel arguments of the row launch (``A = U``) and of the swapped one (``A = V``, ``TRANS``):
    operands and the own / other line statistics."""
    rows = dict(A=U, B=V, top_a=rstats[0], l_a=rstats[1], arg_a=rarg, top_b=cstats[0], l_b=cstats[1], arg_b=carg,
                TRANS=False)
    cols = dict(A=V, B=U, top_a=cstats[0], l_a=cstats[1], arg_a=carg, top_b=rstats[0], l_b=rstats[1], arg_b=rarg,
                TRANS=True)
    if dU is not None:
        rows.update(dA=dU, dB=dV)
        cols.update(dA=dV, dB=dU)
    return rows, cols


def run_passes(op: str, U: torch.Tensor, d: int, plan: BatchPlan, launches, *, directions: bool = False,
               block_m: Optional[int] = None, block_n: Optional[int] = None, block_d: Optional[int] = None):
    """Launch :func:`_grad_rows_kernel` once per entry of ``launches`` with the first tile config that
    works (:class:`.launch.Launcher`); returns the config.

    ``launches``: list of ``(grid_fn, kwargs)``: ``grid_fn(cfg, num_tiles)`` gives the grid and
    ``kwargs`` the kernel arguments except the tile tables and the tile/dtype constants. A ``TRANS``
    launch (``A = V``) runs with ``block_m`` and ``block_n`` exchanged, so that its tiles are the
    transposes of the row launches' tiles (row tiles of ``block_n`` pairs, column tiles of ``block_m``).
    ``directions``: the Gauss–Newton passes; their G may exceed the float16 range, so float16 inputs
    widen ``B`` to float32 instead of splitting G.
    """
    dev = U.device
    interp = dev.type == "cpu"
    dtype = U.dtype
    low = dtype in (torch.float16, torch.bfloat16)
    g_wide = low and directions and dtype == torch.float16
    g_split = low and not g_wide
    kernel = kernel_for(_grad_rows_kernel, "grad_rows", dev.type)

    def attempt(cfg: Cfg, consts: dict):
        for grid_fn, kw in launches:
            bm, bn = (cfg.block_n, cfg.block_m) if kw["TRANS"] else (cfg.block_m, cfg.block_n)
            tab = plan_tables(plan, dev, bm)
            kernel[grid_fn(cfg, tab.num_tiles)](
                perm=tab.perm, offsets=tab.offsets, tile_start=tab.tile_start, tile_batch=tab.tile_batch,
                IDENTITY=tab.identity, G_SPLIT=g_split, G_WIDE=g_wide and not interp,
                LOW_DTYPE=TL_DTYPES[dtype if low else acc_dtype(U)], **dict(consts, BLOCK_M=bm, BLOCK_N=bn), **kw)
        tab = plan_tables(plan, dev, cfg.block_m)
        return cfg, dict(g_split=g_split, g_wide=g_wide, identity=tab.identity, num_tiles=tab.num_tiles)

    return _LAUNCHER.run(op, U, d, _gpu_configs(dtype, d, directions=directions), attempt,
                         (block_m, block_n, block_d))


def infonce(U: torch.Tensor, V: torch.Tensor, scale, plan: BatchPlan, with_scale: bool, *,
            block_m: Optional[int] = None, block_n: Optional[int] = None, block_d: Optional[int] = None):
    """Fused loss and gradients of ``Σ_batches Σ_{k∈b} ℓ_k``; same contract as the torch twin.

    Args:
        U, V: ``(n, d)`` float16 / bfloat16 / float32 / float64 on a CUDA device (or the CPU with
            ``TRITON_INTERPRET=1``). scale: ``t`` (number or one-element tensor, not tracked).
        plan: the batches. with_scale: also return the derivative with respect to ``s = log t``.
        block_m, block_n, block_d: tile sizes (powers of two >= 16; ``block_d``: the K step and output
            slice width); testing/tuning knobs.
    Returns:
        ``(loss 0-d, dU (n, d), dV (n, d), dlog_scale 0-d or None)``, float32 (float64 for float64
        inputs), on U's device.
    """
    U, V = check_inputs(U, V, plan)
    dev = U.device
    n, d = U.shape
    acc = acc_dtype(U)
    if n == 0 or d == 0:
        ds = torch.zeros((), dtype=acc, device=dev) if with_scale else None
        zeros = torch.zeros((n, d), dtype=acc, device=dev)
        return torch.zeros((), dtype=acc, device=dev), zeros, zeros.clone(), ds
    U, V = U.contiguous(), V.contiguous()
    t = scale_tensor(scale, acc, dev)
    dU = torch.empty((n, d), dtype=acc, device=dev)
    dV = torch.empty((n, d), dtype=acc, device=dev)
    rstats = torch.empty((2, n), dtype=acc, device=dev)  # top and l = lse − top, rows of S
    cstats = torch.empty((2, n), dtype=acc, device=dev)  # the same for the columns
    rarg = torch.empty(n, dtype=torch.int64, device=dev)  # pair index of each line's maximum
    carg = torch.empty(n, dtype=torch.int64, device=dev)
    rterms = torch.empty((2, n), dtype=acc, device=dev)
    cterms = torch.empty((2, n), dtype=acc, device=dev)

    def grid(cfg, ntiles):
        return (ntiles, triton.cdiv(d, cfg.block_k), 1)

    common = dict(dA=t, dB=t, m_a=t, m_b=t, ds_ptr=t, scale_ptr=t, n=n, d=d, MODE=INFONCE.value, WITH_DS=False)
    rows_side, cols_side = side_args(U, V, rstats, cstats, rarg, carg)
    launches = stats_launches(U, V, rstats, cstats, rarg, carg, t, n, d) + [
        (grid, dict(**rows_side, out=dU, row_out=rterms, ROW_TERMS=with_scale, **common)),
        (grid, dict(**cols_side, out=dV, row_out=cterms, ROW_TERMS=False, **common))]
    run_passes("infonce", U, d, plan, launches, block_m=block_m, block_n=block_n, block_d=block_d)
    loss = rterms[0].sum() + cterms[0].sum()
    ds = rterms[1].sum() if with_scale else None
    return loss, dU, dV, ds
