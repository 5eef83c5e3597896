"""Device helpers shared by the Triton kernels: row tiles, column tiles and chunks, products of tiles.

Every kernel is a row-tile program (docs/math.md §5): program ``i`` owns the ``BLOCK_M`` rows of row
tile ``i`` of one batch (:func:`row_tile`, from the host's table in :mod:`.launch`) and streams over
that batch's column tiles (:func:`col_tile`), all of them or one of ``nsplit`` contiguous chunks
(:func:`col_chunk`), recomputing each ``BLOCK_M × BLOCK_N`` tile of products with
:func:`score_tiles`. Nothing bigger than such a tile exists. Operands are ``(pointer, row stride,
column stride)`` triples whose rows are pair indices.

The helpers are ``@triton.jit`` functions that the interpreted kernels of :func:`.launch.kernel_for`
can call too (:func:`device_function`). Reductions use triton's own combine functions instead of
``tl.max`` / ``tl.sum`` (and ``tl.full`` instead of ``tl.zeros``): those are ``@triton.jit``
functions of triton's, which an interpreted kernel cannot call when triton was imported without
``TRITON_INTERPRET=1``; the interpreter recognises the combine functions and reduces with numpy.
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.jit import JITFunction


class _DeviceFunction(JITFunction):
    """A ``@triton.jit`` helper that also runs when an interpreted kernel calls it (a plain
    ``JITFunction`` refuses to be called outside a compiled kernel)."""

    def __call__(self, *args, **kwargs):
        fn = self.__dict__.get("_interpreted")
        if fn is None:
            from triton.runtime.interpreter import InterpretedFunction
            fn = self.__dict__["_interpreted"] = InterpretedFunction(self.fn).rewrite()
        return fn(*args, **kwargs)


def device_function(fn):
    """``@triton.jit`` for helpers called by kernels (see :class:`_DeviceFunction`)."""
    jitted = triton.jit(fn)  # an InterpretedFunction when TRITON_INTERPRET=1 was set at import: callable as is
    return _DeviceFunction(fn) if isinstance(jitted, JITFunction) else jitted


max_combine = getattr(tl.standard, "_elementwise_max", None)
sum_combine = getattr(tl.standard, "_sum_combine", None)
min_combine = getattr(tl.standard, "_elementwise_min", None)
if max_combine is None or sum_combine is None or min_combine is None:  # pragma: no cover - other triton versions

    @triton.jit
    def max_combine(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def sum_combine(a, b):
        return a + b

    @triton.jit
    def min_combine(a, b):
        return tl.minimum(a, b)


@device_function
def pair_ids(perm, pos, mask, IDENTITY: tl.constexpr):
    """The pair indices (int32) at positions ``pos`` of the plan's ``perm``; ``pos`` itself when IDENTITY."""
    ids = pos
    if not IDENTITY:
        ids = tl.load(perm + pos, mask=mask, other=0)
    return ids


@device_function
def row_tile(tile_start, tile_batch, offsets, perm, BLOCK_M: tl.constexpr, IDENTITY: tl.constexpr):
    """This program's (``program_id(0)``) row tile: ``(ids, mask, b_lo, b_hi)``, the pair indices of its
    rows (int32), which of them exist, and where its batch starts and ends in ``perm``."""
    tile = tl.program_id(0)
    t0 = tl.load(tile_start + tile)
    b = tl.load(tile_batch + tile)
    b_lo = tl.load(offsets + b)
    b_hi = tl.load(offsets + b + 1)
    pos = t0 + tl.arange(0, BLOCK_M)
    mask = pos < b_hi
    return pair_ids(perm, pos, mask, IDENTITY), mask, b_lo, b_hi


@device_function
def col_tile(perm, c0, c_hi, BLOCK_N: tl.constexpr, IDENTITY: tl.constexpr):
    """``(ids, mask)`` of the column tile at positions ``c0, c0 + 1, ...`` of ``perm`` (up to ``c_hi``)."""
    pos = c0 + tl.arange(0, BLOCK_N)
    mask = pos < c_hi
    return pair_ids(perm, pos, mask, IDENTITY), mask


@device_function
def col_chunk(b_lo, b_hi, chunk, nsplit, BLOCK_N: tl.constexpr):
    """``(c_lo, c_hi)``: chunk ``chunk`` of ``nsplit`` contiguous chunks of the batch's column tiles (the
    whole batch when ``nsplit == 1``; an empty range for chunks past the last tile)."""
    n_ct = (b_hi - b_lo + BLOCK_N - 1) // BLOCK_N
    per = (n_ct + nsplit - 1) // nsplit
    c_lo = tl.minimum(b_lo + chunk * per * BLOCK_N, b_hi)
    return c_lo, tl.minimum(c_lo + per * BLOCK_N, b_hi)


@device_function
def load_rows(X, ids, mask, kk, km, DOT_DTYPE: tl.constexpr):
    """The tile ``X[ids, kk]`` (``[len(ids), len(kk)]``, zeros where masked) as ``DOT_DTYPE``."""
    return tl.load(X[0] + ids[:, None] * X[1] + kk[None, :] * X[2],
                   mask=mask[:, None] & km[None, :], other=0.0).to(DOT_DTYPE)


@device_function
def score_tiles(s, e, X, dX, xi, xmask, x, dx, Y, dY, yi, ymask, y, dy, d, BLOCK_K: tl.constexpr,
                SINGLE_K: tl.constexpr, WITH_S: tl.constexpr, WITH_E: tl.constexpr, DOT_DTYPE: tl.constexpr,
                PRECISION: tl.constexpr):
    """``(s + X[xi] · Y[yi]ᵀ, e + dX[xi] · Y[yi]ᵀ + X[xi] · dY[yi]ᵀ)`` over all ``d`` embedding columns: a
    tile of ``S/t`` and of ``(δS − δs·S)/t`` (docs/math.md §4); WITH_S / WITH_E say which of the two
    to compute (the other comes back as passed, e.g. None).

    SINGLE_K (``d <= BLOCK_K``): one ``tl.dot`` per product of the tiles ``x = X[xi]``, ``dx = dX[xi]``,
    ``y = Y[yi]``, ``dy = dY[yi]`` that the caller loaded with :func:`load_rows` (a row tile once per
    program, a column tile once per column tile); else one loop over ``d`` in blocks of ``BLOCK_K``
    that loads them block by block (``x, dx, y, dy``: None).
    """
    if SINGLE_K:
        if WITH_S:
            s = tl.dot(x, tl.trans(y), s, input_precision=PRECISION, out_dtype=s.dtype)
        if WITH_E:
            e = tl.dot(dx, tl.trans(y), e, input_precision=PRECISION, out_dtype=e.dtype)
            e = tl.dot(x, tl.trans(dy), e, input_precision=PRECISION, out_dtype=e.dtype)
    else:
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(0, d, BLOCK_K):
            kk = k0 + offs_k
            km = kk < d
            xk = load_rows(X, xi, xmask, kk, km, DOT_DTYPE)
            yk = load_rows(Y, yi, ymask, kk, km, DOT_DTYPE)
            if WITH_S:
                s = tl.dot(xk, tl.trans(yk), s, input_precision=PRECISION, out_dtype=s.dtype)
            if WITH_E:
                dxk = load_rows(dX, xi, xmask, kk, km, DOT_DTYPE)
                dyk = load_rows(dY, yi, ymask, kk, km, DOT_DTYPE)
                e = tl.dot(dxk, tl.trans(yk), e, input_precision=PRECISION, out_dtype=e.dtype)
                e = tl.dot(xk, tl.trans(dyk), e, input_precision=PRECISION, out_dtype=e.dtype)
    return s, e


@device_function
def tile_dot(acc, X, xi, xmask, x, Y, yi, ymask, y, d, BLOCK_K: tl.constexpr, SINGLE_K: tl.constexpr,
             DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + X[xi] · Y[yi]ᵀ``: :func:`score_tiles` without ``e``."""
    return score_tiles(acc, None, X, None, xi, xmask, x, None, Y, None, yi, ymask, y, None, d, BLOCK_K, SINGLE_K,
                       True, False, DOT_DTYPE, PRECISION)[0]
