"""Triton lse kernel vs the torch twin and a float64 brute force (docs/math.md §6.3), run on the CPU in
Triton's interpreter (``TRITON_INTERPRET=1``, set per test by the ``triton_interpreter`` fixture; the
backend builds interpreted kernels when it sees it at call time).
With ``ECIF_FAST_TEST_DEVICE=cuda`` the same tests run the compiled kernels on a GPU
(``kernel_cases.on_test_device``; the references stay on the CPU) and the CPU-interpreter tests skip.

Triton is a dev dependency: when it does not import these tests fail, they do not skip.
The interpreter is slow, so the shapes are small; tiles of 16/32/64 still give several row and
column tiles, partial tiles, the split-column path and the blocked-d path.
"""
from __future__ import annotations

import math

import pytest
import torch

from ecif_fast.errors import BackendUnavailableError, ECIFInputError
from ecif_fast.kernels import registry, triton_backend
from ecif_fast.core.batches import resolve_batches
from ecif_fast.kernels.ops import lse as ops_lse
from ecif_fast.kernels.torch_ref.lse import lse as twin_lse
from kernel_cases import (ON_CUDA, TRITON_TYPES, brute_lse64, compile_sm90, cpu_interpreter_only, dot_consts,
                          on_test_device, ragged_ids, run_in_fresh_interpreter, triton_op)


_tlse = triton_op("lse")
pytestmark = pytest.mark.usefixtures("triton_interpreter")


def test_triton_imports_and_backend_is_available():
    assert triton_backend.available(), triton_backend.unavailable_reason()
    assert registry.available_backends()["triton"] is True
    assert callable(triton_backend.lse)


def tolerance(U, V, scale, plan, dtype) -> float:
    """A few ulps of the accumulation dtype times (largest logit·sqrt(d) + log of the batch size)."""
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    mag = abs(float(scale)) * float(U.double().norm(dim=1).max()) * float(V.double().norm(dim=1).max())
    return 4 * eps * (mag * math.sqrt(U.shape[1]) + math.log(int(plan.sizes.max())) + 1)


def unit(n, d, gen, dtype=torch.float64):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1).to(dtype)


def check(U, V, scale, plan, dtype, tag, **kw):
    row, col = _tlse(U, V, scale, plan, **kw)
    out_dt = torch.float64 if dtype == torch.float64 else torch.float32
    assert row.dtype == col.dtype == out_dt and row.shape == col.shape == (plan.n,), tag
    # (on_test_device checked that row and col came back on the device the test ran on)
    trow, tcol = twin_lse(U, V, scale, plan)
    brow, bcol = brute_lse64(U, V, scale, plan)
    tol = tolerance(U, V, scale, plan, dtype)
    for got, ref, t, what in ((row, trow, 2 * tol, "row vs twin"), (col, tcol, 2 * tol, "col vs twin"),
                              (row, brow, tol, "row vs float64"), (col, bcol, tol, "col vs float64")):
        err = float((got.double() - ref.double()).abs().max())
        assert err <= t, f"{what}, {tag}: max abs error {err:.3g} > tolerance {t:.3g}"


# The interpreter is slow (milliseconds per program): one batch gets float32 at every scale and the
# other dtypes at one scale each; many small batches (one program per batch) get each dtype once,
# the scales spread over them.
DTYPE_SCALES_ONE_BATCH = [(torch.float32, 0.01), (torch.float32, 1.0), (torch.float32, 100.0),
                          (torch.float16, 100.0), (torch.bfloat16, 100.0), (torch.float64, 1.0)]
DTYPE_SCALES_BATCHES = [(torch.float32, 100.0), (torch.float16, 0.01), (torch.bfloat16, 1.0),
                        (torch.float64, 100.0)]


@pytest.mark.parametrize("batches", ["all", "size", "ragged"])
@pytest.mark.parametrize("d", [1, 3, 64])
@pytest.mark.parametrize("n", [1, 2, 7, 64, 130])
def test_grid_vs_twin_and_bruteforce(n, d, batches):
    gen = torch.Generator().manual_seed(1000 * n + d)
    b = {"all": None, "ragged": ragged_ids(n, gen), "size": 5}[batches]
    plan = resolve_batches(b, n)
    U64, V64 = unit(n, d, gen), unit(n, d, gen)
    for dtype, scale in (DTYPE_SCALES_ONE_BATCH if batches == "all" else DTYPE_SCALES_BATCHES):
        check(U64.to(dtype), V64.to(dtype), scale, plan, dtype,
              f"n={n} d={d} batches={batches} {dtype} scale={scale}", block_m=64, block_n=64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_small_tiles_split_columns_and_blocked_d(dtype):
    """16×16 tiles over d = 100 (several d blocks, a partial one), ragged batches larger than a tile,
    and the column stream split in 3 chunks (with empty chunks for small batches)."""
    gen = torch.Generator().manual_seed(7)
    n, d = 90, 100
    ids = torch.cat([torch.zeros(50, dtype=torch.int64), torch.ones(17, dtype=torch.int64), torch.arange(2, 25)])
    plan = resolve_batches(ids[torch.randperm(n, generator=gen)], n)
    U, V = unit(n, d, gen, dtype), unit(n, d, gen, dtype)
    check(U, V, 30.0, plan, dtype, f"{dtype} split=3 blocks=16", block_m=16, block_n=16, block_k=32, split=3)
    if dtype == torch.float32:
        check(U, V, -5.0, plan, dtype, f"{dtype} split=2 blocks=32", block_m=32, block_n=16, block_k=64, split=2)
    info = triton_backend.lse_module.last_launch()
    assert info["interpreted"] == (not ON_CUDA)
    assert info["split"] in (2, 3) and not info["single_k"] and not info["identity"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adversarial_one_huge_logit_per_row(dtype):
    gen = torch.Generator().manual_seed(0)
    n, d = 100, 16
    U, V = unit(n, d, gen), unit(n, d, gen)
    pi = torch.randperm(n, generator=gen)
    V[pi] = V[pi] + 50.0 * U
    U, V = U.to(dtype), V.to(dtype)
    for scale in (1.0, 1e4):
        for b in (None, ragged_ids(n, gen)):
            plan = resolve_batches(b, n)
            row, col = _tlse(U, V, scale, plan, block_m=32, block_n=32)
            assert torch.isfinite(row).all() and torch.isfinite(col).all()
            brow, bcol = brute_lse64(U, V, scale, plan)
            tol = tolerance(U, V, scale, plan, dtype)
            assert float((row.double() - brow).abs().max()) <= tol, f"row {dtype} scale={scale}"
            assert float((col.double() - bcol).abs().max()) <= tol, f"col {dtype} scale={scale}"


def test_huge_values_and_scale_zero():
    n = 40
    U = torch.eye(n) * 1e3
    row, col = _tlse(U, U, 10.0, resolve_batches(None, n))
    assert torch.allclose(row.double(), torch.full((n,), 1e7, dtype=torch.float64), rtol=1e-6, atol=0)
    assert torch.allclose(col.double(), torch.full((n,), 1e7, dtype=torch.float64), rtol=1e-6, atol=0)
    row, _ = _tlse(U, U, -10.0, resolve_batches(None, n))
    assert torch.allclose(row.double(), torch.full((n,), math.log(n - 1), dtype=torch.float64), rtol=1e-5)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 3, (n,), generator=gen)
    V = unit(n, 5, gen, torch.float32)
    row, col = _tlse(V, V.flip(0), 0.0, resolve_batches(ids, n))
    sizes = torch.bincount(ids).double()
    assert torch.allclose(row.double(), sizes[ids].log(), atol=1e-6)
    assert torch.allclose(col.double(), sizes[ids].log(), atol=1e-6)


def test_strided_grad_mixed_dtype_inputs_and_tensor_scale():
    gen = torch.Generator().manual_seed(2)
    n, d = 50, 9
    U = torch.randn(d, n, generator=gen).T  # non-contiguous view
    V = torch.randn(n, d, generator=gen, requires_grad=True)
    plan = resolve_batches(7, n)
    row, col = _tlse(U, V, torch.tensor(2.0), plan)
    trow, tcol = twin_lse(U, V.detach(), 2.0, plan)
    assert torch.allclose(row, trow, atol=1e-4) and torch.allclose(col, tcol, atol=1e-4)
    row, _ = _tlse(U.half(), V.detach().double(), 2.0, plan)
    assert row.dtype == torch.float64


def test_dispatch_explicit_only_on_cpu():
    gen = torch.Generator().manual_seed(9)
    n, d = 60, 8
    U, V = unit(n, d, gen, torch.float32), unit(n, d, gen, torch.float32)
    r1, c1 = on_test_device(ops_lse, U, V, 20.0, 16, backend="triton")
    r2, c2 = ops_lse(U, V, 20.0, 16, backend="torch")
    assert torch.allclose(r1, r2, atol=1e-4) and torch.allclose(c1, c2, atol=1e-4)
    # automatic choice never picks triton for CPU tensors, even with the interpreter on; it does on CUDA
    assert registry.resolve("lse", "cpu")[0] in ("cpp", "torch")
    assert registry.resolve("lse", "cuda:0")[0] == "triton"
    if ON_CUDA:  # and CUDA tensors get it without asking (bitwise the same: no atomics)
        r3, c3 = on_test_device(ops_lse, U, V, 20.0, 16)
        assert torch.equal(r3, r1) and torch.equal(c3, c1)


@cpu_interpreter_only
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    gen = torch.Generator().manual_seed(9)
    n, d = 60, 8
    U, V = unit(n, d, gen, torch.float32), unit(n, d, gen, torch.float32)
    monkeypatch.setenv(registry.ENV_VAR, "triton")
    assert registry.resolve("lse", "cpu")[0] == "triton"
    monkeypatch.delenv(registry.ENV_VAR)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(BackendUnavailableError, match=r"'triton'.*device type 'cpu'"):
        ops_lse(U, V, 20.0, backend="triton")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        _tlse(U, V, 1.0, resolve_batches(None, n))


def test_bad_device_and_options():
    U = torch.empty(4, 3, device="meta")
    with pytest.raises(ECIFInputError, match=r"backend 'triton'.*meta"):
        _tlse(U, U, 1.0, resolve_batches(None, 4))
    U = torch.randn(4, 3)
    with pytest.raises(ECIFInputError, match="powers of two"):
        _tlse(U, U, 1.0, resolve_batches(None, 4), block_m=24)
    with pytest.raises(ECIFInputError, match="covers"):
        _tlse(U, U, 1.0, resolve_batches(None, 5))


@cpu_interpreter_only
def test_interpreter_set_before_import_in_a_fresh_process():
    """TRITON_INTERPRET=1 before triton is imported; dispatch through the public op."""
    run_in_fresh_interpreter("""
        import torch
        from ecif_fast.kernels.ops import lse
        g = torch.Generator().manual_seed(0)
        U, V = torch.randn(33, 5, generator=g), torch.randn(33, 5, generator=g)
        r1, c1 = lse(U.bfloat16(), V.bfloat16(), 3.0, torch.arange(33) % 4, backend="triton")
        r2, c2 = lse(U.bfloat16(), V.bfloat16(), 3.0, torch.arange(33) % 4, backend="torch")
        assert torch.allclose(r1, r2, atol=1e-5) and torch.allclose(c1, c2, atol=1e-5), (r1 - r2, c1 - c2)
        print("OK")
    """)


@pytest.mark.parametrize("dtype, d, identity", [(torch.bfloat16, 512, False), (torch.float32, 512, True),
                                                (torch.float64, 64, False)])
def test_compiles_for_hopper_without_a_gpu(dtype, d, identity):
    """The GPU code path (native 16-bit tl.dot, tf32x3, float64 dot, blocked d) is never run here;
    compile it ahead of time for sm_90 (triton ships ptxas) with the first-choice tile config, so a
    kernel the GPU compiler rejects fails here, not only on a GPU machine."""
    mod = triton_backend.lse_module
    cfg = mod._gpu_configs(dtype, d)[0]
    name = TRITON_TYPES[dtype]
    acc = TRITON_TYPES[torch.float64 if dtype == torch.float64 else torch.float32]
    sig = {"A": "*" + name, "B": "*" + name, "out": "*" + acc, "perm": "*i32", "offsets": "*i32",
           "tile_start": "*i32", "tile_batch": "*i32", "scale_ptr": "*" + acc, "d": "i32", "sa0": "i32",
           "sa1": "constexpr", "sb0": "i32", "sb1": "constexpr", "split_stride": "i32", "nsplit": "i32"}
    consts = {"sa1": 1, "sb1": 1, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
              "SINGLE_K": d <= cfg.block_k, "IDENTITY": identity, "BASE2": acc == "fp32", **dot_consts(dtype)}
    compile_sm90(mod._lse_rows_kernel, sig, consts, cfg)


def test_gpu_tile_configs_are_valid_for_every_dtype_and_width():
    """Every GPU config the launcher may try passes its own tile-size check (powers of two >= 16)."""
    import importlib
    mod = importlib.import_module("ecif_fast.kernels.triton_backend.lse")
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for d in (1, 3, 8, 9, 16, 64, 130, 512, 1024):
            for cfg in mod._gpu_configs(dtype, d):
                assert all(v >= 16 and not v & (v - 1) for v in cfg[:3]), (dtype, d, cfg)
