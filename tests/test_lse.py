"""C++ lse kernel vs the torch twin and a float64 brute force (docs/math.md §6.3)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ecif_fast.errors import ECIFInputError
from ecif_fast.kernels import cpp_backend
from ecif_fast.core.batches import resolve_batches
from ecif_fast.kernels.ops import lse as ops_lse
from ecif_fast.kernels.torch_ref.lse import lse as twin_lse
from kernel_cases import DTYPES, SCALES, brute_lse64, ragged_ids, unit

pytestmark = pytest.mark.skipif(not cpp_backend.available(),
                                reason=f"C++ extension not built: {cpp_backend.unavailable_reason()}")

@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The oracles (torch twin, brute force) run hundreds of tiny ops; on a busy machine torch's
    intra-op thread pool makes each one cost milliseconds. The C++ kernel follows
    torch.get_num_threads(), so its multi-threaded path is tested explicitly below."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tolerance(U, V, scale, plan, dtype) -> float:
    """Absolute tolerance: a few ulps of the accumulation dtype times the size of the largest logit
    (error of a length-d dot product ~ sqrt(d)·eps·|t|·|u||v|) plus the log-sum of the batch."""
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    mag = abs(float(scale)) * float(U.double().norm(dim=1).max()) * float(V.double().norm(dim=1).max())
    bmax = int(plan.sizes.max())
    return 4 * eps * (mag * math.sqrt(U.shape[1]) + math.log(bmax) + 1)


def check_close(got, ref, tol, what):
    err = float((got.double() - ref.double()).abs().max())
    assert err <= tol, f"{what}: max abs error {err:.3g} > tolerance {tol:.3g}"


@pytest.mark.parametrize("batches", ["all", "ragged", "size"])
@pytest.mark.parametrize("d", [1, 3, 64, 130])
@pytest.mark.parametrize("n", [1, 2, 7, 64, 300])
def test_grid_vs_twin_and_bruteforce(n, d, batches):
    gen = torch.Generator().manual_seed(1000 * n + d)
    b = {"all": None, "ragged": ragged_ids(n, gen), "size": 5}[batches]
    plan = resolve_batches(b, n)
    U64, V64 = unit(n, d, gen), unit(n, d, gen)
    for dtype in DTYPES:
        U, V = U64.to(dtype), V64.to(dtype)
        out_dt = torch.float64 if dtype == torch.float64 else torch.float32
        for scale in SCALES:
            row, col = cpp_backend.lse(U, V, scale, plan)
            assert row.dtype == col.dtype == out_dt and row.shape == col.shape == (n,)
            trow, tcol = twin_lse(U, V, scale, plan)
            brow, bcol = brute_lse64(U, V, scale, plan)  # of the (exactly upcast) rounded inputs
            tol = tolerance(U, V, scale, plan, dtype)
            tag = f"n={n} d={d} batches={batches} {dtype} scale={scale}"
            check_close(row, trow, 2 * tol, f"row vs twin, {tag}")
            check_close(col, tcol, 2 * tol, f"col vs twin, {tag}")
            check_close(row, brow, tol, f"row vs float64, {tag}")
            check_close(col, bcol, tol, f"col vs float64, {tag}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adversarial_one_huge_logit_per_row(dtype):
    # Each row i has one logit ~ 50x larger than the rest, in a random column: the tiles' logit
    # spread is huge (exercises the two-exponential path) and exp() of it overflows any dtype.
    gen = torch.Generator().manual_seed(0)
    n, d = 300, 64
    U, V = unit(n, d, gen), unit(n, d, gen)
    pi = torch.randperm(n, generator=gen)
    V[pi] = V[pi] + 50.0 * U
    U, V = U.to(dtype), V.to(dtype)
    for scale in (1.0, 100.0, 1e4):
        for b in (None, ragged_ids(n, gen)):
            plan = resolve_batches(b, n)
            row, col = cpp_backend.lse(U, V, scale, plan)
            assert torch.isfinite(row).all() and torch.isfinite(col).all()
            brow, bcol = brute_lse64(U, V, scale, plan)
            tol = tolerance(U, V, scale, plan, dtype)
            check_close(row, brow, tol, f"row {dtype} scale={scale}")
            check_close(col, bcol, tol, f"col {dtype} scale={scale}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_values_do_not_overflow(dtype):
    # identity-like embeddings: S = t on the diagonal, 0 elsewhere; LSE = t + log1p((B-1)e^-t).
    n = 70
    U = torch.eye(n, dtype=dtype) * 1e3
    V = torch.eye(n, dtype=dtype) * 1e3
    row, col = cpp_backend.lse(U, V, 10.0, resolve_batches(None, n))
    expected = torch.full((n,), 1e7, dtype=torch.float64)
    assert torch.allclose(row.double(), expected, rtol=1e-6, atol=0)
    assert torch.allclose(col.double(), expected, rtol=1e-6, atol=0)
    # all logits hugely negative: the max subtraction keeps the sum well defined
    row, col = cpp_backend.lse(U, V, -10.0, resolve_batches(None, n))
    assert torch.allclose(row.double(), torch.full((n,), math.log(n - 1), dtype=torch.float64), rtol=1e-5)


def test_scale_zero_and_singletons():
    gen = torch.Generator().manual_seed(3)
    n, d = 200, 16
    U, V = unit(n, d, gen, torch.float32), unit(n, d, gen, torch.float32)
    ids = torch.randint(0, 3, (n,), generator=gen)
    plan = resolve_batches(ids, n)
    row, col = cpp_backend.lse(U, V, 0.0, plan)
    sizes = torch.bincount(ids).double()
    assert torch.allclose(row.double(), sizes[ids].log(), atol=1e-5)
    assert torch.allclose(col.double(), sizes[ids].log(), atol=1e-5)
    # every pair its own batch: row = col = t<u_i, v_i>
    row, col = cpp_backend.lse(U, V, 7.0, resolve_batches(1, n))
    diag = 7.0 * (U.double() * V.double()).sum(1)
    assert torch.allclose(row.double(), diag, atol=1e-5) and torch.allclose(col.double(), diag, atol=1e-5)


def test_mixed_batch_sizes_and_threads():
    # batches larger than one 96-row tile (per-thread column partials + merge) next to tiny ones
    gen = torch.Generator().manual_seed(5)
    n, d = 700, 40
    U, V = unit(n, d, gen, torch.float32), unit(n, d, gen, torch.float32)
    ids = torch.cat([torch.zeros(350, dtype=torch.int64), torch.ones(200, dtype=torch.int64),
                     torch.arange(2, 152)])
    ids = ids[torch.randperm(n, generator=gen)]
    plan = resolve_batches(ids, n)
    brow, bcol = brute_lse64(U, V, 30.0, plan)
    tol = tolerance(U, V, 30.0, plan, torch.float32)
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            row, col = cpp_backend.lse(U, V, 30.0, plan)
            check_close(row, brow, tol, f"row threads={threads}")
            check_close(col, bcol, tol, f"col threads={threads}")
    finally:
        torch.set_num_threads(old)


def test_every_compiled_isa(monkeypatch):
    """Each instruction-set variant (AVX-512 / AVX2 / baseline, whichever this CPU runs), on one
    multi-tile batch and on ragged batches, with moderate logits (one exponential per score) and
    with one huge logit per row (two exponentials per score)."""
    from ecif_fast import _C
    gen = torch.Generator().manual_seed(11)
    n, d = 250, 70
    plans = [resolve_batches(None, n), resolve_batches(ragged_ids(n, gen), n)]
    for dtype in (torch.float32, torch.float64):
        U, V = unit(n, d, gen), unit(n, d, gen)
        Vhuge = V.clone()
        Vhuge[torch.randperm(n, generator=gen)] += 30.0 * U
        cases = [(U.to(dtype), V.to(dtype), 1.0), (U.to(dtype), V.to(dtype), 50.0),
                 (U.to(dtype), Vhuge.to(dtype), 50.0)]
        for Uc, Vc, scale in cases:
            for plan in plans:
                brow, bcol = brute_lse64(Uc, Vc, scale, plan)
                tol = tolerance(Uc, Vc, scale, plan, dtype)
                for isa in _C.supported_isas():
                    monkeypatch.setenv(cpp_backend.ISA_ENV_VAR, isa)
                    row, col = cpp_backend.lse(Uc, Vc, scale, plan)
                    tag = f"isa={isa} {dtype} scale={scale} batches={plan.num_batches}"
                    check_close(row, brow, tol, "row " + tag)
                    check_close(col, bcol, tol, "col " + tag)
    monkeypatch.setenv(cpp_backend.ISA_ENV_VAR, "no-such-isa")
    with pytest.raises(ValueError, match="no-such-isa"):
        cpp_backend.lse(U, V, 1.0, plans[0])


def test_long_embeddings_span_several_inner_blocks(monkeypatch):
    # d > 256 exercises the blocked inner dimension (two full blocks and a partial one)
    from ecif_fast import _C
    gen = torch.Generator().manual_seed(12)
    n, d = 150, 600
    plan = resolve_batches(None, n)
    for dtype in (torch.float32, torch.float64):
        U, V = unit(n, d, gen, dtype), unit(n, d, gen, dtype)
        brow, bcol = brute_lse64(U, V, 40.0, plan)
        tol = tolerance(U, V, 40.0, plan, dtype)
        for isa in _C.supported_isas():
            monkeypatch.setenv(cpp_backend.ISA_ENV_VAR, isa)
            row, col = cpp_backend.lse(U, V, 40.0, plan)
            check_close(row, brow, tol, f"row isa={isa} {dtype}")
            check_close(col, bcol, tol, f"col isa={isa} {dtype}")


def test_strided_and_grad_inputs_and_tensor_scale():
    gen = torch.Generator().manual_seed(2)
    n, d = 50, 9
    U = torch.randn(d, n, generator=gen).T  # non-contiguous view
    V = torch.randn(n, d, generator=gen, requires_grad=True)
    plan = resolve_batches(7, n)
    row, col = cpp_backend.lse(U, V, torch.tensor(2.0), plan)
    trow, tcol = twin_lse(U, V.detach(), 2.0, plan)
    check_close(row, trow, 1e-4, "row")
    check_close(col, tcol, 1e-4, "col")


def test_non_cpu_tensor_is_a_clear_error():
    U = torch.empty(4, 3, device="meta")
    with pytest.raises(ECIFInputError, match=r"backend 'cpp'.*meta"):
        cpp_backend.lse(U, U, 1.0, resolve_batches(None, 4))


def test_dispatching_op_matches_twin():
    gen = torch.Generator().manual_seed(9)
    n, d = 120, 32
    U, V = unit(n, d, gen, torch.float32), unit(n, d, gen, torch.float32)
    r1, c1 = ops_lse(U, V, 20.0, 16, backend="cpp")
    r2, c2 = ops_lse(U, V, 20.0, 16, backend="torch")
    check_close(r1, r2, 1e-4, "row")
    check_close(c1, c2, 1e-4, "col")
    # mixed dtypes are promoted (float16 + float64 -> float64)
    r3, _ = ops_lse(U.half(), V.double(), 20.0, 16, backend="cpp")
    assert r3.dtype == torch.float64


class TestExtensionValidation:
    """The C++ entry point itself rejects malformed arguments with ValueError."""

    def setup_method(self):
        from ecif_fast import _C
        self.C = _C
        self.U = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
        self.perm = np.arange(5, dtype=np.int64)
        self.off = np.array([0, 2, 5], dtype=np.int64)

    def call(self, U=None, V=None, perm=None, off=None):
        U = self.U if U is None else U
        V = self.U if V is None else V
        return self.C.lse(U, V, 1.0, self.perm if perm is None else perm, self.off if off is None else off)

    def test_ok(self):
        row, col = self.call()
        assert row.shape == (5,) and row.dtype == np.float32

    @pytest.mark.parametrize("kwargs, match", [
        (dict(V=np.zeros((4, 3), np.float32)), "same shape"),
        (dict(U=np.zeros((5,), np.float32)), "2-D"),
        (dict(V=np.zeros((5, 3), np.float64)), "same dtype"),
        (dict(U=np.zeros((5, 3), np.float16), V=np.zeros((5, 3), np.float16)), "float32 or float64"),
        (dict(perm=np.array([0, 1, 2, 3, 3])), "not a permutation"),
        (dict(perm=np.array([0, 1, 2, 3, 9])), "out of range"),
        (dict(perm=np.arange(4)), "one entry per pair"),
        (dict(off=np.array([0, 2, 4])), r"offsets\[-1\]"),
        (dict(off=np.array([1, 5])), r"offsets\[0\]"),
        (dict(off=np.array([0, 3, 2, 5])), "non-decreasing"),
        (dict(perm=np.arange(5.0)), "integer"),
    ])
    def test_rejects(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            self.call(**kwargs)
