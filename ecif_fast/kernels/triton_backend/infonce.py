"""Triton ``infonce`` op: fused contrastive loss and gradients (docs/math.md §2, §4), flash-attention style.

Design (no atomics, deterministic; nothing bigger than a ``BLOCK_M × BLOCK_N`` tile of ``S`` exists):

* Everything runs through one row-tile kernel, :func:`_grad_rows_kernel`, over the CSR row tiles of
  :mod:`.lse`: program ``(i, k)`` loads its ``BLOCK_M`` rows of ``A`` and streams over the column
  tiles of its batch, recomputing ``S = t·A Bᵀ``. Launched with ``A = U, B = V`` it works on the rows
  of ``S``; with the roles swapped (``A = V, B = U``, ``TRANS``) on the rows of ``Sᵀ``, i.e. the
  columns of ``S`` (the row softmax of ``Sᵀ`` is the column softmax of ``S``). The swapped launch
  uses the transposed tile shape (``BLOCK_N × BLOCK_M``) and computes each tile as the transpose of
  the very product ``U_tile V_tileᵀ`` the row launch computes (same operands, same shape, same
  order), so every pass and launch sees bitwise the same ``S`` (and ``δS``): ``V_tile U_tileᵀ``
  would sum in another order, and ``t`` times an ulp of ``U·V`` is large at large ``t``.
* Pass 1 (``MODE=3``, both launches): per row of ``S`` and per row of ``Sᵀ`` (column of ``S``) the
  line statistics ``top`` (maximum), ``arg`` (pair index of the maximum) and ``l = lse − top``
  (online, like the :mod:`.lse` kernel). Why this form: see the kernel's docstring.
* Pass 2 (``MODE=0``): ``G = P + Qc − 2I`` (``P``, ``Qc``: row and column softmax of ``S``) and
  ``dA = t·G B`` (the ``k``-th ``BLOCK_D`` slice of the columns of ``B``) accumulated in registers,
  plus per-row ``lse_i − S_ii`` (loss) and ``Σ_j G_ij S_ij`` (``∂loss/∂log t``). The row launch
  gives ``dU``, the swapped one ``dV = t·Gᵀ U``. The per-row partial sums are added up on the host
  with torch (deterministic).
* The same kernel serves the Gauss–Newton product (:mod:`.gauss_newton`): ``MODE=1`` gives the row
  means ``m_i = Σ_j P_ij δS_ij`` (per query), ``MODE=2`` accumulates ``t·G B`` for
  ``G = P∘(δS − m) + Qc∘(δS − mc)``; queries are a grid axis there.

Precision: ``S`` and ``δS`` come from ``tl.dot`` as in :mod:`.lse` (16-bit operands as they
are with float32 accumulation, float32 with ``tf32x3`` by default, float64 in float64). ``G`` is a
float32 tile; its product with a 16-bit ``B`` tile splits ``G`` into a 16-bit head plus a 16-bit
remainder (two tensor-core products, about 16 significant bits for bfloat16 and 22 for float16)
instead of rounding it to 16 bits. Where ``G`` may exceed the float16 range (Gauss–Newton with float16
inputs) the ``B`` tile is widened to float32 instead. In the CPU interpreter every operand is cast
to the accumulation dtype before ``tl.dot`` (the split is still applied, so the numbers match the GPU).
On the GPU the kernel is compiled without floating-point contraction (``enable_fp_fusion=False``,
:func:`.lse.fp_fusion`), although its accuracy no longer depends on it: the weight at a line's maximum
is ``exp(−l)`` whatever rounding the recomputed ``S`` gets (see the kernel's docstring).

Outputs float32 (float64 for float64 inputs). Pairs in no batch get zero gradients.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ...errors import ECIFInputError
from ...core.batches import BatchPlan
from .lse import (_TL_DTYPES, _max_combine, _p2, _plan_tables, _sum_combine, check_inputs, dot_setup,
                  fp_fusion, kernel_for)
from .reductions import _min_combine


@triton.jit
def _grad_rows_kernel(
    A, B, dA, dB, top_a, top_b, l_a, l_b, arg_a, arg_b, m_a, m_b, ds_ptr, out, row_out, scale_ptr,
    perm, offsets, tile_start, tile_batch, n, d,
    MODE: tl.constexpr, WITH_DS: tl.constexpr, ROW_TERMS: tl.constexpr, TRANS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SINGLE_K: tl.constexpr, IDENTITY: tl.constexpr, G_SPLIT: tl.constexpr, G_WIDE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, LOW_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Row-tile pass over ``S = t·A Bᵀ`` (per batch); all tensors contiguous.

    ``A, B``: ``(n, d)``; ``dA, dB``: ``(Q, n, d)`` directions (MODE 1, 2); ``top_a, l_a, arg_a`` /
    ``top_b, l_b, arg_b``: ``(n,)`` line statistics of the rows of ``S`` / of ``Sᵀ`` as written by
    MODE 3; ``m_a / m_b``: ``(Q, n)`` means ``Σ P δS`` along the same (MODE 2); ``ds_ptr``: ``(Q,)``
    δs; ``scale_ptr``: ``(1,)`` t. Program ``(tile, k, q)``. ``δS = t(dA Bᵀ + A dBᵀ) + δs·S`` (δs
    only WITH_DS) and, with ``z = 0`` at the line's ``arg`` and ``z = S − top`` elsewhere,
    ``P = exp(z_a − l_a)`` (rows, own statistics), ``Qc = exp(z_b − l_b)`` (columns, the other side's).

    * MODE 3 (line statistics): ``row_out (2, n)``: ``top`` and ``l = log Σ_j exp(S_ij − top_i)``
      (so ``lse = top + l``); ``arg_a (n,)`` int64: the pair index of the maximum (the smallest on a
      tie within a tile, the earlier tile across tiles).
    * MODE 0 (infonce): ``out (n, d) = t·G B`` for ``G = P + Qc − 2I``; ``row_out (2, n)``:
      ``(top_a_i − S_ii) + l_a_i`` and (ROW_TERMS) ``Σ_j G_ij S_ij``.
    * MODE 1 (means): ``row_out (Q, n) = Σ_j P_ij δS_ij``.
    * MODE 2 (Gauss–Newton): ``out (Q, n, d) = t·G B`` for ``G = P∘(δS − m_a) + Qc∘(δS − m_b)``;
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
    DIRS: tl.constexpr = MODE == 1 or MODE == 2
    pid = tl.program_id(0)
    kid = tl.program_id(1)
    q = tl.program_id(2).to(tl.int64)
    t0 = tl.load(tile_start + pid)
    b = tl.load(tile_batch + pid)
    b_lo = tl.load(offsets + b)
    b_hi = tl.load(offsets + b + 1)
    scale = tl.load(scale_ptr)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    pos_m = t0 + offs_m
    mmask = pos_m < b_hi
    if IDENTITY:
        rows = pos_m.to(tl.int64)
    else:
        rows = tl.load(perm + pos_m, mask=mmask, other=0).to(tl.int64)
    qoff = q * n * d  # start of query q in dA / dB / out
    od = kid * BLOCK_D + offs_d  # this program's slice of the embedding columns (MODE 0, 2)
    odmask = od < d

    if MODE != 3:
        top_r = tl.load(top_a + rows, mask=mmask, other=0.0)
        l_r = tl.load(l_a + rows, mask=mmask, other=0.0)
        arg_r = tl.load(arg_a + rows, mask=mmask, other=-1)
    if MODE == 2:
        m_r = tl.load(m_a + q * n + rows, mask=mmask, other=0.0)
    if WITH_DS:
        if DIRS:
            dsq = tl.load(ds_ptr + q)
    if SINGLE_K:
        a = tl.load(A + rows[:, None] * d + offs_d[None, :],
                    mask=mmask[:, None] & odmask[None, :], other=0.0).to(DOT_DTYPE)
        if DIRS:
            da = tl.load(dA + qoff + rows[:, None] * d + offs_d[None, :],
                         mask=mmask[:, None] & odmask[None, :], other=0.0).to(DOT_DTYPE)

    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, ACC_DTYPE)
    row1 = tl.full([BLOCK_M], 0.0, ACC_DTYPE)  # MODE 3: running maximum
    row2 = tl.full([BLOCK_M], 0.0, ACC_DTYPE)  # MODE 3: running sum of exp(S − maximum)
    argm = tl.full([BLOCK_M], 0, tl.int64)  # MODE 3: pair index of the running maximum
    if MODE == 3:
        row1 = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)
    for c0 in range(b_lo, b_hi, BLOCK_N):
        pos_n = c0 + offs_n
        nmask = pos_n < b_hi
        if IDENTITY:
            cols = pos_n.to(tl.int64)
        else:
            cols = tl.load(perm + pos_n, mask=nmask, other=0).to(tl.int64)
        # s = A Bᵀ and (MODE 1, 2) e = dA Bᵀ + A dBᵀ over the whole of d
        # (TRANS: the same products with the U rows, here B's, first, then transposed)
        if SINGLE_K:
            bt = tl.load(B + cols[:, None] * d + offs_d[None, :],
                         mask=nmask[:, None] & odmask[None, :], other=0.0).to(DOT_DTYPE)
            if TRANS:
                s = tl.trans(tl.dot(bt, tl.trans(a), input_precision=PRECISION, out_dtype=ACC_DTYPE))
            else:
                s = tl.dot(a, tl.trans(bt), input_precision=PRECISION, out_dtype=ACC_DTYPE)
            if DIRS:
                dbt = tl.load(dB + qoff + cols[:, None] * d + offs_d[None, :],
                              mask=nmask[:, None] & odmask[None, :], other=0.0).to(DOT_DTYPE)
                if TRANS:
                    e = tl.dot(dbt, tl.trans(a), input_precision=PRECISION, out_dtype=ACC_DTYPE)
                    e = tl.trans(tl.dot(bt, tl.trans(da), e, input_precision=PRECISION, out_dtype=ACC_DTYPE))
                else:
                    e = tl.dot(da, tl.trans(bt), input_precision=PRECISION, out_dtype=ACC_DTYPE)
                    e = tl.dot(a, tl.trans(dbt), e, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        else:
            if TRANS:
                s = tl.full([BLOCK_N, BLOCK_M], 0.0, ACC_DTYPE)
                if DIRS:
                    e = tl.full([BLOCK_N, BLOCK_M], 0.0, ACC_DTYPE)
            else:
                s = tl.full([BLOCK_M, BLOCK_N], 0.0, ACC_DTYPE)
                if DIRS:
                    e = tl.full([BLOCK_M, BLOCK_N], 0.0, ACC_DTYPE)
            for k0 in range(0, d, BLOCK_D):
                kk = k0 + offs_d
                km = kk < d
                ak = tl.load(A + rows[:, None] * d + kk[None, :],
                             mask=mmask[:, None] & km[None, :], other=0.0).to(DOT_DTYPE)
                bk = tl.load(B + cols[:, None] * d + kk[None, :],
                             mask=nmask[:, None] & km[None, :], other=0.0).to(DOT_DTYPE)
                if TRANS:
                    s = tl.dot(bk, tl.trans(ak), s, input_precision=PRECISION, out_dtype=ACC_DTYPE)
                else:
                    s = tl.dot(ak, tl.trans(bk), s, input_precision=PRECISION, out_dtype=ACC_DTYPE)
                if DIRS:
                    dak = tl.load(dA + qoff + rows[:, None] * d + kk[None, :],
                                  mask=mmask[:, None] & km[None, :], other=0.0).to(DOT_DTYPE)
                    dbk = tl.load(dB + qoff + cols[:, None] * d + kk[None, :],
                                  mask=nmask[:, None] & km[None, :], other=0.0).to(DOT_DTYPE)
                    if TRANS:
                        e = tl.dot(dbk, tl.trans(ak), e, input_precision=PRECISION, out_dtype=ACC_DTYPE)
                        e = tl.dot(bk, tl.trans(dak), e, input_precision=PRECISION, out_dtype=ACC_DTYPE)
                    else:
                        e = tl.dot(dak, tl.trans(bk), e, input_precision=PRECISION, out_dtype=ACC_DTYPE)
                        e = tl.dot(ak, tl.trans(dbk), e, input_precision=PRECISION, out_dtype=ACC_DTYPE)
            if TRANS:
                s = tl.trans(s)
                if DIRS:
                    e = tl.trans(e)
        s = s * scale
        if MODE == 3:
            s = tl.where(nmask[None, :], s, float("-inf"))
            tv = tl.reduce(s, 1, _max_combine)
            ti = tl.reduce(tl.where(s == tv[:, None], cols[None, :], n), 1, _min_combine)
            argm = tl.where(tv > row1, ti, argm)
            m_new = tl.maximum(row1, tv)
            row2 = row2 * tl.exp(row1 - m_new) + tl.reduce(tl.exp(s - m_new[:, None]), 1, _sum_combine)
            row1 = m_new
        else:
            valid = mmask[:, None] & nmask[None, :]
            # exp((S − top) − l), with S − top taken as exactly 0 at the line's maximum (masked lanes
            # go to exp(−inf) = 0 instead of overflowing)
            zr = tl.where(cols[None, :] == arg_r[:, None], 0.0, s - top_r[:, None])
            p = tl.exp(tl.where(valid, zr - l_r[:, None], float("-inf")))
            if MODE != 1:
                top_c = tl.load(top_b + cols, mask=nmask, other=0.0)
                l_c = tl.load(l_b + cols, mask=nmask, other=0.0)
                arg_c = tl.load(arg_b + cols, mask=nmask, other=-1)
                zc = tl.where(rows[:, None] == arg_c[None, :], 0.0, s - top_c[None, :])
                qc = tl.exp(tl.where(valid, zc - l_c[None, :], float("-inf")))
            if MODE == 0:
                diag = valid & (rows[:, None] == cols[None, :])
                g = p + qc - tl.where(diag, 2.0, 0.0)
                row1 += tl.reduce(tl.where(diag, s, 0.0), 1, _sum_combine)
                if ROW_TERMS:
                    row2 += tl.reduce(g * s, 1, _sum_combine)
            else:
                dsm = e * scale
                if WITH_DS:
                    dsm = dsm + dsq * s
                if MODE == 1:
                    row1 += tl.reduce(p * dsm, 1, _sum_combine)
                else:
                    m_c = tl.load(m_b + q * n + cols, mask=nmask, other=0.0)
                    g = p * (dsm - m_r[:, None]) + qc * (dsm - m_c[None, :])
                    if ROW_TERMS:
                        if WITH_DS:
                            row1 += tl.reduce(g * s, 1, _sum_combine)
            if MODE != 1:
                # acc += G · B[:, this slice]
                if SINGLE_K:
                    bo = bt
                else:
                    bo = tl.load(B + cols[:, None] * d + od[None, :],
                                 mask=nmask[:, None] & odmask[None, :], other=0.0).to(DOT_DTYPE)
                if G_SPLIT:
                    g_hi = g.to(LOW_DTYPE)
                    g_lo = (g - g_hi.to(ACC_DTYPE)).to(LOW_DTYPE)
                    acc = tl.dot(g_hi.to(DOT_DTYPE), bo, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
                    acc = tl.dot(g_lo.to(DOT_DTYPE), bo, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
                elif G_WIDE:  # float16 B widened to float32 (G may exceed the float16 range)
                    acc = tl.dot(g, bo.to(tl.float32), acc, input_precision="tf32x3", out_dtype=ACC_DTYPE)
                else:
                    acc = tl.dot(g.to(DOT_DTYPE), bo, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)

    if MODE == 0 or MODE == 2:
        tl.store(out + qoff + rows[:, None] * d + od[None, :], acc * scale,
                 mask=mmask[:, None] & odmask[None, :])
    if kid == 0:
        if MODE == 3:
            tl.store(row_out + rows, row1, mask=mmask)
            tl.store(row_out + n + rows, tl.log(tl.where(mmask, row2, 1.0)), mask=mmask)
            tl.store(arg_a + rows, argm, mask=mmask)
        elif MODE == 0:
            tl.store(row_out + rows, (top_r - row1) + l_r, mask=mmask)
            if ROW_TERMS:
                tl.store(row_out + n + rows, row2, mask=mmask)
        elif MODE == 1:
            tl.store(row_out + q * n + rows, row1, mask=mmask)
        elif ROW_TERMS:
            if WITH_DS:
                tl.store(row_out + q * n + rows, row1, mask=mmask)


class _Cfg(NamedTuple):
    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int


def _gpu_configs(dtype: torch.dtype, d: int, directions: bool = False) -> List[_Cfg]:
    """Tile configurations for the GPU, first choice then smaller fall-backs (like :mod:`.lse`).

    ``block_d`` is both the K step of ``S = A Bᵀ`` and the width of the slice of ``dA`` one program
    accumulates; ``d > block_d`` recomputes ``S`` once per slice (grid axis 1). ``directions``: the
    Gauss–Newton passes (``dA``, ``dB`` tiles too). Chosen without a GPU at hand, by compiling for
    sm_90 as a launch specialises the kernel (``d`` a multiple of 16, aligned pointers) and reading
    ptxas' spill report: the first choices do not spill, except float16 and float64 Gauss–Newton (a
    few dozen bytes) and 16-bit Gauss–Newton at d > 128 (about 150 bytes). GPU timings are the place
    to tune them.
    """
    if dtype in (torch.float16, torch.bfloat16):
        if d <= 64:
            cfgs = [_Cfg(128, 64, _p2(d), 8, 2)]
        elif d <= 128:
            cfgs = [_Cfg(128, 32, 128, 8, 2)]
        else:
            cfgs = [_Cfg(64, 32, 128, 4, 2)]
        cfgs += [_Cfg(64, 32, 64, 4, 1), _Cfg(32, 32, 32, 4, 1)]
    elif dtype == torch.float32:
        if d <= 64:
            cfgs = [_Cfg(64, 32, _p2(d), 4, 2)]
        else:
            cfgs = [_Cfg(64, 32, 64, 8, 2)]
        cfgs += [_Cfg(32, 32, 64, 4, 1), _Cfg(32, 16, 32, 4, 1)]
    else:  # float64
        cfgs = [_Cfg(32, 32, min(_p2(d), 32 if directions else 64), 4, 1), _Cfg(16, 16, 32, 4, 1)]
    return cfgs


_GOOD_CFG: Dict[Tuple, int] = {}
_LAST_LAUNCH: Dict[str, object] = {}


def last_launch() -> Dict[str, object]:
    """What the latest :func:`infonce` / ``gauss_newton_product`` pass-2/3 launch used (config, ...)."""
    return dict(_LAST_LAUNCH)


def scale_tensor(scale, acc: torch.dtype, device) -> torch.Tensor:
    """``t`` as a ``(1,)`` tensor of the accumulation dtype."""
    t = float(scale.detach().reshape(())) if torch.is_tensor(scale) else float(scale)
    return torch.tensor([t], dtype=acc, device=device)


def stats_launches(U, V, rstats, cstats, rarg, carg, t, n, d) -> list:
    """The two MODE 3 launches (rows of ``S``, rows of ``Sᵀ``) that fill ``rstats`` / ``cstats``
    ``(2, n)`` with ``top`` and ``l = lse − top``, and ``rarg`` / ``carg`` ``(n,)`` int64 with the pair
    index of each line's maximum."""
    def grid(cfg, ntiles):
        return (ntiles, 1, 1)

    kw = dict(dA=t, dB=t, top_a=t, top_b=t, l_a=t, l_b=t, arg_b=rarg, m_a=t, m_b=t, ds_ptr=t, out=t,
              scale_ptr=t, n=n, d=d, MODE=3, WITH_DS=False, ROW_TERMS=False)
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
    compiles (GPU) or a small one (interpreter).

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
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if interp:
        cfgs = [_Cfg(block_m or 32, block_n or 32, block_d or min(_p2(d), 64), 4, 1)]
    else:
        cfgs = _gpu_configs(dtype, d, directions=directions)
        if block_m or block_n or block_d:
            c0 = cfgs[0]
            cfgs = [_Cfg(block_m or c0.block_m, block_n or c0.block_n, block_d or c0.block_d,
                         c0.num_warps, c0.num_stages)]
    for c in cfgs:
        for v in c[:3]:
            if v < 16 or v & (v - 1):
                raise ECIFInputError(f"tile sizes must be powers of two >= 16, got {c[:3]}")
    precision, dot_dt = dot_setup(dtype, interp)
    low = dtype in (torch.float16, torch.bfloat16)
    g_wide = low and directions and dtype == torch.float16
    g_split = low and not g_wide
    consts = dict(G_SPLIT=g_split, G_WIDE=g_wide and not interp, DOT_DTYPE=dot_dt,
                  LOW_DTYPE=_TL_DTYPES[dtype] if low else _TL_DTYPES[acc], ACC_DTYPE=_TL_DTYPES[acc],
                  PRECISION=precision)
    kernel = kernel_for(_grad_rows_kernel, "grad_rows", dev.type)
    # no a·b + c → fma contraction on the GPU (see lse.fp_fusion; the weights no longer need it);
    # the interpreter never contracts
    fusion = {} if interp else dict(enable_fp_fusion=fp_fusion())
    key = (op, dtype, _p2(d), str(dev), precision)
    start = _GOOD_CFG.get(key, 0) if len(cfgs) > 1 else 0
    last_err: Optional[BaseException] = None
    for ci in range(start, len(cfgs)):
        cfg = cfgs[ci]
        tab = _plan_tables(plan, dev, cfg.block_m)
        single_k = d <= cfg.block_d
        try:
            guard = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
            with guard:  # launch on the tensors' GPU, not the current one
                for grid_fn, kw in launches:
                    bm, bn = (cfg.block_n, cfg.block_m) if kw["TRANS"] else (cfg.block_m, cfg.block_n)
                    tb = _plan_tables(plan, dev, bm)
                    kernel[grid_fn(cfg, tb.num_tiles)](
                        perm=tb.perm, offsets=tb.offsets, tile_start=tb.tile_start,
                        tile_batch=tb.tile_batch, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=cfg.block_d,
                        SINGLE_K=single_k, IDENTITY=tb.identity, num_warps=cfg.num_warps,
                        num_stages=cfg.num_stages, **fusion, **consts, **kw)
        except Exception as e:  # compile-time failure (e.g. out of shared memory): try a smaller tile
            if interp or ci + 1 == len(cfgs):
                raise
            warnings.warn(f"triton {op}: tile config {tuple(cfg)} failed for {dtype}, d={d} "
                          f"({type(e).__name__}: {str(e)[:200]}); trying a smaller one")
            last_err = e
            continue
        if len(cfgs) > 1:
            _GOOD_CFG[key] = ci
        _LAST_LAUNCH.clear()
        _LAST_LAUNCH.update(op=op, config=cfg._asdict(), precision=precision, single_k=single_k,
                            g_split=g_split, g_wide=g_wide, identity=tab.identity, num_tiles=tab.num_tiles,
                            interpreted=interp, fp_fusion=fusion.get("enable_fp_fusion", False))
        return cfg
    raise RuntimeError(f"triton {op}: no tile configuration worked: {last_err}")  # pragma: no cover


def infonce(U: torch.Tensor, V: torch.Tensor, scale, plan: BatchPlan, with_scale: bool, *,
            block_m: Optional[int] = None, block_n: Optional[int] = None, block_d: Optional[int] = None):
    """Fused loss and gradients of ``Σ_batches Σ_{k∈b} ℓ_k``; same contract as the torch twin.

    Args:
        U, V: ``(n, d)`` float16 / bfloat16 / float32 / float64 on a CUDA device (or the CPU with
            ``TRITON_INTERPRET=1``). scale: ``t`` (number or one-element tensor, not tracked).
        plan: the batches. with_scale: also return the derivative with respect to ``s = log t``.
        block_m, block_n, block_d: tile sizes of pass 2 (powers of two >= 16); testing/tuning knobs.
    Returns:
        ``(loss 0-d, dU (n, d), dV (n, d), dlog_scale 0-d or None)``, float32 (float64 for float64
        inputs), on U's device.
    """
    U, V = check_inputs(U, V, plan)
    dev = U.device
    n, d = U.shape
    acc = torch.float64 if U.dtype == torch.float64 else torch.float32
    dU = torch.zeros((n, d), dtype=acc, device=dev)
    dV = torch.zeros((n, d), dtype=acc, device=dev)
    if n == 0 or plan.num_batches == 0 or d == 0:
        ds = torch.zeros((), dtype=acc, device=dev) if with_scale else None
        return torch.zeros((), dtype=acc, device=dev), dU, dV, ds
    U, V = U.contiguous(), V.contiguous()
    t = scale_tensor(scale, acc, dev)
    rstats = torch.zeros((2, n), dtype=acc, device=dev)  # top and l = lse − top, rows of S
    cstats = torch.zeros((2, n), dtype=acc, device=dev)  # the same for the columns
    rarg = torch.zeros(n, dtype=torch.int64, device=dev)  # pair index of each line's maximum
    carg = torch.zeros(n, dtype=torch.int64, device=dev)
    rterms = torch.zeros((2, n), dtype=acc, device=dev)
    cterms = torch.zeros((2, n), dtype=acc, device=dev)

    def grid(cfg, ntiles):
        return (ntiles, triton.cdiv(d, cfg.block_d), 1)

    common = dict(dA=t, dB=t, m_a=t, m_b=t, ds_ptr=t, scale_ptr=t, n=n, d=d, WITH_DS=False)
    rows_side, cols_side = side_args(U, V, rstats, cstats, rarg, carg)
    launches = stats_launches(U, V, rstats, cstats, rarg, carg, t, n, d) + [
        (grid, dict(**rows_side, out=dU, row_out=rterms, MODE=0, ROW_TERMS=with_scale, **common)),
        (grid, dict(**cols_side, out=dV, row_out=cterms, MODE=0, ROW_TERMS=False, **common))]
    run_passes("infonce", U, d, plan, launches, block_m=block_m, block_n=block_n, block_d=block_d)
    loss = rterms[0].sum() + cterms[0].sum()
    ds = rterms[1].sum() if with_scale else None
    return loss, dU, dV, ds
