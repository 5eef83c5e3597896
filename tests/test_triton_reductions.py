"""Triton ``ecif_reductions`` vs the torch twin (docs/math.md §4, §6.3), run on the CPU in Triton's interpreter
(``TRITON_INTERPRET=1``, set per test by the ``triton_interpreter`` fixture), plus ahead-of-time sm_90 compiles
of the kernels.
With ``ECIF_FAST_TEST_DEVICE=cuda`` the same tests run the compiled kernels on a GPU
(``kernel_cases.on_test_device``; the twin stays on the CPU) and the CPU-interpreter tests skip.

Triton is a dev dependency: when it does not import these tests fail, they do not skip.

The interpreter costs about a millisecond per operation and program, so the issue's grid
(n ∈ {1, 2, 7, 64, 300} × batches {"all", fixed size, ragged} × d ∈ {1, 3, 64, 130} × Q ∈ {1, 5} ×
scale ∈ {0.01, 1, 100} × dtype × term × dlog_scale) is covered by a subset instead of the product:
every n meets "all" and batch negatives, every d, Q, scale, dtype, term and dlog_scale choice
appears several times, and small tiles (16, or 256 at n = 300) give several row and column tiles,
partial tiles, blocked d (d = 130 over 64-wide blocks), several query chunks and split column
chunks. Adversarial inputs (one pair dominating rows and columns so that 1 − p rounds to 0, in other
tiles and on the diagonal, and exact ties) run in float32 and float64, exact and taylor; a
hypothesis test draws random shapes.

Tolerances (against the twin on the same inputs; both accumulate in float32, float64 for float64):
``16 · eps · T · (1 + L)`` where ``eps`` is the accumulation dtype's epsilon (float32 / float16 /
bfloat16: 1.2e-7, float64: 2.2e-16), ``T`` bounds ``|δS|`` and ``L = |t|·max|u|·max|v|`` bounds the
logits (a rounding error of ``L·eps`` in a logit moves the softmax weights by that much relative).
The largest difference observed on the grid is about ``2 · eps · T · (1 + L)``. 16-bit inputs are compared
with the twin fed the same 16-bit values, so their own rounding does not enter.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ecif_fast.errors import BackendUnavailableError, ECIFInputError
from ecif_fast.kernels import ops, registry, triton_backend
from ecif_fast.core.batches import BatchPlan, resolve_batches
from ecif_fast.kernels.torch_ref.reductions import ecif_reductions as twin
from kernel_cases import (ON_CUDA, TRITON_TYPES, compile_sm90, cpu_interpreter_only, dot_consts, on_test_device,
                          ptxas_spill_bytes, ragged_ids, run_in_fresh_interpreter, triton_op, unit)


_tred = triton_op("ecif_reductions")
pytestmark = pytest.mark.usefixtures("triton_interpreter")


def directions(n, d, Q, gen, dtype, with_ds):
    dU = torch.randn(Q, n, d, generator=gen, dtype=torch.float64).to(dtype)
    dV = torch.randn(Q, n, d, generator=gen, dtype=torch.float64).to(dtype)
    ds = torch.randn(Q, generator=gen, dtype=torch.float64) if with_ds else None
    return dU, dV, ds


def tolerance(U, V, dU, dV, ds, scale) -> float:
    acc = torch.float64 if U.dtype == torch.float64 else torch.float32
    eps = torch.finfo(acc).eps
    nu, nv = U.double().norm(dim=-1).max(), V.double().norm(dim=-1).max()
    L = abs(float(scale)) * float(nu * nv)
    T = abs(float(scale)) * float(dU.double().norm(dim=-1).max() * nv + nu * dV.double().norm(dim=-1).max())
    if ds is not None:
        T += float(torch.as_tensor(ds).abs().max()) * L
    return 16 * eps * (T + 1e-30) * (1 + L)


def check(U, V, scale, plan, dU, dV, ds, term, tag, **kw):
    pos, neg = _tred(U, V, scale, plan, dU, dV, ds, term, **kw)
    acc = torch.float64 if U.dtype == torch.float64 else torch.float32
    assert pos.dtype == neg.dtype == acc and pos.shape == neg.shape == dU.shape[:-1], tag
    assert torch.isfinite(pos).all() and torch.isfinite(neg).all(), tag
    rpos, rneg = twin(U, V, scale, plan, dU, dV, ds, term)
    tol = tolerance(U, V, dU, dV, ds, scale)
    for got, ref, what in ((pos, rpos, "positive"), (neg, rneg, "negative")):
        err = float((got.double() - ref.double()).abs().max())
        assert err <= tol, f"{what}, {tag}: max abs error {err:.3g} > tolerance {tol:.3g}"
    return pos, neg


def few_batches(n, gen, k=5):
    """Ragged batch ids with a few batches of very different sizes (one of them a singleton)."""
    w = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])[:k]
    ids = torch.multinomial(w / w.sum(), n, replacement=True, generator=gen)
    ids[0] = k  # a singleton batch
    return ids


# (n, d, batches, Q, scale, dtype, term, with_ds, tiles); "ragged" = kernel_cases.ragged_ids (n < 300)
# or a few batches of very different sizes (n = 300); tiles = (block_m, block_n, block_k)
GRID = [
    (1, 3, "all", 1, 1.0, torch.float32, "exact", False, (16, 16, None)),
    (1, 1, "size", 5, 100.0, torch.float64, "taylor", True, (16, 16, None)),
    (2, 1, "all", 5, 100.0, torch.float64, "exact", True, (16, 16, None)),
    (2, 64, "ragged", 1, 0.01, torch.bfloat16, "taylor", False, (16, 16, None)),
    (7, 3, "all", 5, 0.01, torch.float16, "exact", True, (16, 16, None)),
    (7, 130, "ragged", 1, 100.0, torch.float32, "exact", False, (16, 16, 64)),
    (7, 1, "size", 5, 1.0, torch.bfloat16, "exact", True, (16, 16, None)),
    (40, 3, "all", 5, 100.0, torch.float32, "exact", True, (16, 16, None)),
    (40, 64, "all", 1, 1.0, torch.bfloat16, "exact", False, (16, 16, None)),
    (40, 1, "all", 1, 0.01, torch.float64, "taylor", True, (16, 16, None)),
    (64, 130, "all", 1, 100.0, torch.float64, "exact", True, (32, 32, 64)),
    (64, 3, "ragged", 5, 100.0, torch.float16, "exact", False, (16, 16, None)),
    (64, 64, "size", 1, 1.0, torch.float32, "taylor", True, (16, 16, None)),
    (300, 3, "all", 1, 100.0, torch.float32, "exact", True, (256, 256, None)),
    (300, 64, "ragged", 1, 1.0, torch.float64, "exact", False, (256, 256, None)),
    (300, 130, "size", 1, 0.01, torch.bfloat16, "taylor", False, (256, 256, 64)),
]


@pytest.mark.parametrize("n, d, batches, Q, scale, dtype, term, with_ds, tiles", GRID,
                         ids=[f"n{c[0]}-d{c[1]}-{c[2]}-Q{c[3]}-t{c[4]}-{str(c[5])[6:]}-{c[6]}-ds{int(c[7])}"
                              for c in GRID])
def test_grid_vs_twin(n, d, batches, Q, scale, dtype, term, with_ds, tiles):
    gen = torch.Generator().manual_seed(1000 * n + d)
    if batches == "ragged":
        b = few_batches(n, gen) if n >= 300 else ragged_ids(n, gen)
    else:
        b = {"all": None, "size": 100 if n >= 300 else 5}[batches]
    plan = resolve_batches(b, n)
    U, V = unit(n, d, gen, dtype), unit(n, d, gen, dtype)
    dU, dV, ds = directions(n, d, Q, gen, dtype, with_ds)
    bm, bn, bk = tiles
    if ON_CUDA and bm == 256:  # 256² tiles only make the interpreter faster; compiled (a float64 one holds
        bm = bn = bk = None    # 512 KiB of accumulators) they take minutes: the GPU's own first choice instead
    check(U, V, scale, plan, dU, dV, ds, term, f"n={n} d={d} {batches} Q={Q} t={scale} {dtype} {term}",
          block_m=bm, block_n=bn, block_k=bk)


def test_two_dimensional_directions_scalar_dlog_scale_and_query_chunks():
    """(n, d) directions give (n,) outputs; Q = 5 in chunks of 2 (the last one partial) with the columns
    split in 2 chunks equals one chunk and per-query calls; a scalar and a one-element dlog_scale are
    broadcast over the queries."""
    gen = torch.Generator().manual_seed(5)
    n, d, Q = 21, 5, 5
    plan = resolve_batches(few_batches(n, gen, 2), n)
    U, V = unit(n, d, gen, torch.float64), unit(n, d, gen, torch.float64)
    dU, dV, ds = directions(n, d, Q, gen, torch.float64, True)
    full = _tred(U, V, 7.0, plan, dU, dV, ds, block_m=16, block_n=16)
    chunks = _tred(U, V, 7.0, plan, dU, dV, ds, block_m=16, block_n=16, block_q=2, split=2)
    info = triton_backend.reductions_module.last_launch()
    assert info["query_chunks"] == 3 and info["block_q"] == 2 and info["split"] == 2
    assert info["interpreted"] == (not ON_CUDA) and not info["identity"]
    for a, b in zip(full, chunks):
        assert torch.allclose(a, b, rtol=1e-13, atol=1e-13)
    pos, neg = _tred(U, V, 7.0, plan, dU[3], dV[3], float(ds[3]), block_m=16, block_n=16)
    assert pos.shape == neg.shape == (n,)
    assert torch.allclose(pos, full[0][3], rtol=1e-13, atol=1e-13)
    assert torch.allclose(neg, full[1][3], rtol=1e-13, atol=1e-13)
    one = _tred(U, V, 7.0, plan, dU[:2], dV[:2], ds[3:4], block_m=16, block_n=16)
    ref = twin(U, V, 7.0, plan, dU[:2], dV[:2], ds[3:4])
    for a, b in zip(one, ref):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def adversarial(n, d, gen, dtype):
    """Unit embeddings where pairs (i, π(i)) dominate their row and column at t = 100 (gaps mostly > 40, so
    1 − p rounds to 0 in float64 too): π moves most of them to other tiles, leaves two on the
    diagonal; plus three columns with identical V (exact ties, in different 16-wide tiles)."""
    U = unit(n, d, gen)
    pi = torch.randperm(n, generator=gen)
    i3, i10 = int((pi == 3).nonzero()), int((pi == 10).nonzero())
    pi[i3], pi[i10] = pi[3], pi[10]
    pi[3], pi[10] = 3, 10  # maxima on the diagonal: not "special" lines
    V = unit(n, d, gen) * 0.1
    V[pi] = V[pi] + 2 * U  # S = 200 at (i, π(i)), |S| <~ 130 elsewhere
    V[5] = V[20] = V[30]  # ties: columns 5, 20 and 30 equal
    return U.to(dtype), V.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("term", ["exact", "taylor"])
def test_adversarial_p_to_one_across_tiles(dtype, term):
    gen = torch.Generator().manual_seed(11)
    n, d, Q = 40, 16, 2
    U, V = adversarial(n, d, gen, dtype)
    S = 100.0 * (U.double() @ V.double().T)
    top2 = S.topk(2, dim=1).values
    assert float((top2[:, 0] - top2[:, 1]).sort().values[n // 4]) > 40  # 1 − p = 0 in most rows, float64 too
    dU, dV, ds = directions(n, d, Q, gen, dtype, True)
    for b, split in ((few_batches(n, gen, 3), 2), (None, 3 if term == "exact" else None)):
        # split: the column tiles in chunks whose line statistics are merged on the host (ties across chunks)
        plan = resolve_batches(b, n)
        pos, neg = check(U, V, 100.0, plan, dU, dV, ds, term, f"adversarial {dtype} {term} split={split}",
                         block_m=16, block_n=16, split=split)
    if dtype == torch.float64 and term == "exact":  # the float32 kernel agrees with float64 to float32 accuracy
        pos32, neg32 = _tred(U.float(), V.float(), 100.0, plan, dU.float(), dV.float(), ds, term,
                             block_m=16, block_n=16)
        scale = float(pos.abs().max() + neg.abs().max())
        assert float((pos32.double() - pos).abs().max()) < 1e-3 * scale
        assert float((neg32.double() - neg).abs().max()) < 1e-3 * scale


@pytest.mark.parametrize("scale", [1e2, 1e4])
def test_constant_direction_has_no_influence_at_large_logits(scale):
    """A constant ``δS`` (every ``v_j`` shares a component that only ``δu`` moves) changes no softmax, so
    both parts are 0. With logits ~``scale`` in float32 this needs every line's weights to sum to 1
    to ``eps``, not to ``eps·|S|``: the kernels use ``exp((S − top) − l)``, never a rounded ``lse``
    (the float32 twin, which does, is off by 2e-3·|δS| at scale 1e4)."""
    gen = torch.Generator().manual_seed(3)
    n, d = 40, 8
    U = torch.randn(n, d, generator=gen) * 1e-2
    V = torch.randn(n, d, generator=gen) * 1e-2
    U[:, 0] = V[:, 0] = 1.0  # S = scale·(1 + O(1e-4)): lines spread over ~scale·1e-3
    dU = torch.zeros(2, n, d)
    dU[0, :, 0], dU[1, :, 0] = 1.0, -2.0  # δS = scale and -2·scale everywhere
    for b, split in ((None, 2), (few_batches(n, gen, 3), None)):
        pos, neg = _tred(U, V, scale, resolve_batches(b, n), dU, torch.zeros_like(dU), None, "exact",
                         block_m=16, block_n=16, split=split)
        bound = 32 * torch.finfo(torch.float32).eps * 2 * scale
        assert float(pos.abs().max()) <= bound and float(neg.abs().max()) <= bound, (pos.abs().max(), neg.abs().max())


def test_no_pairs():
    U = torch.zeros(0, 4)
    dU = torch.zeros(2, 0, 4)
    empty = BatchPlan(0, torch.zeros(0, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
    pos, neg = _tred(U, U, 9.0, empty, dU, dU)
    assert pos.shape == neg.shape == (2, 0)


@settings(max_examples=6, deadline=None)
@given(n=st.integers(1, 30), d=st.integers(1, 9), bs=st.integers(2, 30), Q=st.integers(1, 3),
       log_scale=st.floats(-4.6, 4.6), seed=st.integers(0, 10_000), exact=st.booleans(),
       with_ds=st.booleans(), dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32,
                                                     torch.float64]))
def test_property_random_shapes(n, d, bs, Q, log_scale, seed, exact, with_ds, dtype):
    gen = torch.Generator().manual_seed(seed)
    U = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype)
    V = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype)
    dU, dV, ds = directions(n, d, Q, gen, dtype, with_ds)
    plan = resolve_batches(bs, n)
    check(U, V, math.exp(log_scale), plan, dU, dV, ds, "exact" if exact else "taylor",
          f"n={n} d={d} bs={bs} Q={Q} {dtype}", block_m=16, block_n=16)


def test_dispatch_through_ops_and_registry():
    gen = torch.Generator().manual_seed(13)
    n, d = 24, 6
    U, V = unit(n, d, gen, torch.float32), unit(n, d, gen, torch.float32)
    dU, dV, ds = directions(n, d, 3, gen, torch.float32, True)
    got = on_test_device(ops.ecif_reductions, U, V, 20.0, 8, dU, dV, ds, "taylor", backend="triton")
    ref = ops.ecif_reductions(U, V, 20.0, 8, dU, dV, ds, "taylor", backend="torch")
    for a, b in zip(got, ref):
        assert a.shape == (3, n) and torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    again = on_test_device(ops.ecif_reductions, U, V, 20.0, 8, dU, dV, ds, "taylor", backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(got, again))  # no atomics: bitwise reproducible
    # mixed dtypes are promoted (float16 + float64 directions -> float64 outputs)
    pos, _ = on_test_device(ops.ecif_reductions, U.half(), V.half(), 20.0, 8, dU.double(), dV.double(),
                            backend="triton")
    assert pos.dtype == torch.float64
    assert registry.resolve("ecif_reductions", "cpu")[0] in ("cpp", "torch")
    assert registry.resolve("ecif_reductions", "cuda:0")[0] == "triton"
    if ON_CUDA:  # CUDA tensors get triton without asking
        auto = on_test_device(ops.ecif_reductions, U, V, 20.0, 8, dU, dV, ds, "taylor")
        assert all(torch.equal(a, b) for a, b in zip(got, auto))


@cpu_interpreter_only
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    gen = torch.Generator().manual_seed(13)
    n, d = 24, 6
    U, V = unit(n, d, gen, torch.float32), unit(n, d, gen, torch.float32)
    dU, dV, _ = directions(n, d, 3, gen, torch.float32, True)
    monkeypatch.setenv(registry.ENV_VAR, "triton")
    assert registry.resolve("ecif_reductions", "cpu")[0] == "triton"
    monkeypatch.delenv(registry.ENV_VAR)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        _tred(U, V, 1.0, resolve_batches(None, n), dU, dV)


def test_gpu_launch_shape(monkeypatch):
    """The GPU's choice of query chunk and column split (no GPU needed): split the columns first, then
    shrink the query chunks, only while row tiles × query chunks × splits leave 132 SMs idle."""
    from types import SimpleNamespace

    mod = triton_backend.reductions_module
    monkeypatch.setattr(mod, "sm_count", lambda dev: 132)
    cfg = mod._gpu_configs(torch.bfloat16, 64)[0]
    cuda = torch.device("cuda")

    def shape(Q, n, tiles, largest, **kw):
        tab = SimpleNamespace(num_tiles=tiles, largest_batch=largest)
        return mod._launch_shape(Q, n, tab, cfg, cuda, False, kw.get("block_q"), kw.get("split"))

    assert shape(1, 4096, 64, 4096) == (1, 5)           # one "all" batch: 64 row tiles x 5 chunks
    assert shape(100, 4096, 64, 4096) == (8, 1)         # 13 query chunks of 8 fill the GPU
    assert shape(8, 100, 2, 100) == (1, 1)              # 2 column tiles: no split, one query per program
    assert shape(3, 10 ** 6, 20000, 64) == (4, 1)       # many small batches
    assert shape(2, 2048, 32, 2048) == (2, 9)           # both queries in one program, 9 column chunks
    assert shape(5, 4096, 64, 4096, block_q=2, split=7) == (2, 7)
    assert shape(5, 4096, 64, 4096, block_q=1) == (1, 1)


def test_bad_inputs():
    U = torch.randn(4, 3)
    plan = resolve_batches(None, 4)
    with pytest.raises(ECIFInputError, match="negative_term"):
        _tred(U, U, 1.0, plan, U, U, None, "approx")
    with pytest.raises(ECIFInputError, match="powers of two"):
        _tred(U, U, 1.0, plan, U, U, block_m=24)
    with pytest.raises(ECIFInputError, match="block_q"):
        _tred(U, U, 1.0, plan, U, U, block_q=3)
    with pytest.raises(ECIFInputError, match="covers"):
        _tred(U, U, 1.0, resolve_batches(None, 5), U, U)
    with pytest.raises(ECIFInputError, match="dlog_scale"):
        _tred(U, U, 1.0, plan, U.expand(2, 4, 3), U.expand(2, 4, 3), torch.ones(3))
    with pytest.raises(ECIFInputError, match=r"\(Q, n, d\)"):
        _tred(U, U, 1.0, plan, U[:3], U[:3])
    M = torch.empty(4, 3, device="meta")
    with pytest.raises(ECIFInputError, match=r"backend 'triton'.*meta"):
        _tred(M, M, 1.0, plan, M, M)


@cpu_interpreter_only
def test_interpreter_set_before_import_in_a_fresh_process():
    """TRITON_INTERPRET=1 before triton is imported; dispatch through the public op."""
    run_in_fresh_interpreter("""
        import torch
        from ecif_fast.kernels.ops import ecif_reductions
        g = torch.Generator().manual_seed(0)
        U, V = torch.randn(33, 5, generator=g), torch.randn(33, 5, generator=g)
        dU, dV = torch.randn(2, 33, 5, generator=g), torch.randn(2, 33, 5, generator=g)
        args = (U.bfloat16(), V.bfloat16(), 3.0, torch.arange(33) % 2, dU, dV, torch.ones(2))
        a = ecif_reductions(*args, backend="triton")
        b = ecif_reductions(*args, backend="torch")
        assert all(torch.allclose(x, y, atol=1e-4, rtol=1e-4) for x, y in zip(a, b)), (a, b)
        print("OK")
    """)


# ---------------------------------------------------------------------------------------------------
# The GPU code path (native 16-bit tl.dot, tf32x3, float64 dot, blocked d) never runs here: compile the
# first-choice config of each kernel ahead of time for sm_90 (kernel_cases.compile_sm90).

def _signature(kernel: str, dtype, d: int, identity: bool, exact: bool, has_ds: bool):
    """``(cfg, signature, constexprs, aligned)`` of a kernel's first GPU config, specialised as a launch with
    contiguous inputs, ``n`` a multiple of 16 and 16-byte aligned pointers would be."""
    mod = triton_backend.reductions_module
    cfg = mod._gpu_configs(dtype, d)[0]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    ptr, accp = "*" + TRITON_TYPES[dtype], "*" + TRITON_TYPES[acc]
    plan = {"perm": "*i32", "offsets": "*i32", "tile_start": "*i32", "tile_batch": "*i32", "scale_ptr": accp}
    if kernel == "stats":
        sig = {"A": ptr, "B": ptr, "top_out": accp, "arg_out": "*i32", "rest_m_out": accp,
               "rest_s_out": accp, **plan, "d": "i32", "sa0": "i32", "sa1": "constexpr", "sb0": "i32",
               "sb1": "constexpr", "split_stride": "i32", "nsplit": "i32"}
        consts = {"sa1": 1, "sb1": 1}
    elif kernel == "pass2":
        sig = {"A": ptr, "B": ptr, "dA": ptr, "dB": ptr, **plan, "ds_ptr": accp, "own_top": accp,
               "own_l": accp, "own_rm": accp, "own_rl": accp, "own_arg": "*i32", "oth_top": accp,
               "oth_l": accp, "oth_arg": "*i32", "out_m": accp, "out_e": accp, "out_x": accp, "d": "i32",
               "Q": "i32", "sa0": "i32", "sa1": "constexpr", "sb0": "i32", "sb1": "constexpr", "sda_q": "i32",
               "sda0": "i32", "sda1": "constexpr", "sdb_q": "i32", "sdb0": "i32", "sdb1": "constexpr",
               "out_q_stride": "i32", "split_stride": "i32", "nsplit": "i32"}
        consts = {"sa1": 1, "sb1": 1, "sda1": 1, "sdb1": 1, "BLOCK_Q": mod._GPU_MAX_BLOCK_Q, "EXACT": exact,
                  "HAS_DS": has_ds}
    else:
        sig = {"A": ptr, "B": ptr, **plan, "oth_top": accp, "oth_l": accp, "oth_arg": "*i32", "mean_o": accp,
               "c_o": accp, "out_z": accp, "d": "i32", "Q": "i32", "sa0": "i32", "sa1": "constexpr",
               "sb0": "i32", "sb1": "constexpr", "vec_q_stride": "i32", "split_stride": "i32", "nsplit": "i32"}
        consts = {"sa1": 1, "sb1": 1, "BLOCK_Q": mod._GPU_MAX_BLOCK_Q, "EXACT": exact}
    consts.update(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SINGLE_K=d <= cfg.block_k,
                  IDENTITY=identity, **dot_consts(dtype))
    aligned = [k for k, v in sig.items() if v.startswith("*")]
    aligned += [k for k in ("sda_q", "sdb_q", "out_q_stride", "vec_q_stride", "split_stride") if k in sig]
    if d % 16 == 0:
        aligned += [k for k in ("d", "sa0", "sb0", "sda0", "sdb0") if k in sig]
    return cfg, sig, consts, aligned


@pytest.mark.parametrize("kernel, dtype, d, identity, exact, has_ds", [
    ("pass2", torch.bfloat16, 512, False, True, True),   # blocked d, gathers, every optional term
    ("pass2", torch.bfloat16, 128, True, True, False),   # single d block
    ("pass2", torch.float32, 16, True, False, False),    # tf32x3, taylor
    ("stats", torch.float16, 130, False, True, False),
    ("pass3", torch.float64, 64, True, True, False),
])
def test_compiles_for_hopper_without_a_gpu(kernel, dtype, d, identity, exact, has_ds):
    """The GPU code path (native 16-bit tl.dot, tf32x3, float64 dot, blocked d) never runs here: compile
    the first-choice config ahead of time for sm_90 as a launch specialises it."""
    cfg, sig, consts, aligned = _signature(kernel, dtype, d, identity, exact, has_ds)
    compiled = compile_sm90(triton_backend.reductions_module._KERNELS[kernel], sig, consts, cfg, aligned,
                            fp_fusion=False)  # as launched (launch.fp_fusion)
    if dtype == torch.bfloat16:  # the common CLIP case: pass 2, the heaviest kernel, must not spill
        assert ptxas_spill_bytes(compiled) == 0
