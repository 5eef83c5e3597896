"""C++ fused InfoNCE forward + backward vs autograd of the materialising torch loss (docs/math.md §2, §4, §6).

Oracle: ``torch.autograd.grad`` of ``ecif_fast.core.loss.contrastive_loss`` (per-batch ``U@V.T``,
``logsumexp``) in float64 on the inputs as the kernel sees them (fp16/bf16 rounded, then upcast
exactly), with ``scale = exp(log_scale)`` so that the derivative w.r.t. ``log_scale`` is checked too.

Tolerances (stated per dtype):
  * float64: relative 1e-10 — |err| <= 1e-10 * (|reference| + 1) for the loss and d log_scale, and
    |err| <= 1e-10 * (max|reference gradient| + t·max‖v‖) for dU/dV;
  * float32, and float16/bfloat16 (computed in float32 after an exact upcast): the same form with
    the float32 budget c·eps32·(1 + L) with L = t·max‖u‖·max‖v‖, the largest logit (the absolute error
    of a logit is ~eps·L, and exp() turns it into a relative error of the softmax weights), c = 16
    for gradients and c = 16·B for the loss and d log_scale (sums of B log-sum-exps / B² terms).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ecif_fast.errors import ECIFInputError
from ecif_fast.kernels import cpp_backend
from ecif_fast.core.batches import BatchPlan, resolve_batches
from ecif_fast.core.loss import contrastive_loss
from kernel_cases import DTYPES, SCALES, ragged_ids, shifted_logits, unit, on_every_isa_and_thread_count

pytestmark = pytest.mark.skipif(not cpp_backend.available(),
                                reason=f"C++ extension not built: {cpp_backend.unavailable_reason()}")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The oracle runs many tiny ops (one thread is faster for them on a shared 2-core machine). The
    C++ kernel follows torch.get_num_threads(); its threaded path is tested explicitly below."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def reference(U, V, scale, plan: BatchPlan):
    """float64 autograd of the materialising loss: (loss, dU, dV, d log_scale)."""
    U = U.detach().double().requires_grad_()
    V = V.detach().double().requires_grad_()
    s = torch.tensor(math.log(scale), dtype=torch.float64, requires_grad=True)
    loss = contrastive_loss(U, V, s.exp(), plan)
    gU, gV, gs = torch.autograd.grad(loss, (U, V, s))
    return loss.detach(), gU, gV, gs


def check(out, ref, U, V, scale, plan, dtype, tag):
    loss, dU, dV, ds = out
    rl, rU, rV, rs = ref
    out_dt = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == dU.dtype == dV.dtype == ds.dtype == out_dt, tag
    assert loss.shape == () and ds.shape == () and dU.shape == dV.shape == U.shape, tag
    U64, V64 = U.double(), V.double()
    L = scale * float(U64.norm(dim=1).max()) * float(V64.norm(dim=1).max()) if U.numel() else 0.0
    if dtype == torch.float64:
        eg = es = 1e-10
    else:
        eps = torch.finfo(torch.float32).eps
        B = int(plan.sizes.max())
        eg = 16 * eps * (1 + L)
        es = 16 * B * eps * (1 + L)
    gmag = scale * float(torch.cat([U64.norm(dim=1), V64.norm(dim=1)]).max()) if U.numel() else 0.0
    for name, got, want, e in (("loss", loss, rl, es), ("dlog_scale", ds, rs, es)):
        err = abs(float(got) - float(want))
        assert err <= e * (abs(float(want)) + 1), f"{name}: error {err:.3g} (ref {float(want):.6g}), {tag}"
    for name, got, want in (("dU", dU, rU), ("dV", dV, rV)):
        err = float((got.double() - want).abs().max()) if want.numel() else 0.0
        tol = eg * (float(want.abs().max() if want.numel() else 0) + gmag)
        assert err <= tol, f"{name}: max abs error {err:.3g} > {tol:.3g}, {tag}"


@pytest.mark.parametrize("batches", ["all", "ragged", "size"])
@pytest.mark.parametrize("d", [1, 3, 64, 130])
@pytest.mark.parametrize("n", [1, 2, 7, 64, 300])
def test_grid_vs_autograd(n, d, batches):
    gen = torch.Generator().manual_seed(1000 * n + d)
    b = {"all": None, "ragged": ragged_ids(n, gen), "size": 5}[batches]
    plan = resolve_batches(b, n)
    U64, V64 = unit(n, d, gen), unit(n, d, gen)
    for dtype in DTYPES:
        U, V = U64.to(dtype), V64.to(dtype)
        for scale in SCALES:
            ref = reference(U, V, scale, plan)
            out = cpp_backend.infonce(U, V, scale, plan, True)
            check(out, ref, U, V, scale, plan, dtype, f"n={n} d={d} batches={batches} {dtype} scale={scale}")


def test_without_scale_and_tensor_scale():
    gen = torch.Generator().manual_seed(1)
    n, d = 50, 8
    U, V = unit(n, d, gen, torch.float32), unit(n, d, gen, torch.float32)
    plan = resolve_batches(None, n)
    loss, dU, dV, ds = cpp_backend.infonce(U, V, 3.0, plan, False)
    assert ds is None
    loss2, dU2, dV2, ds2 = cpp_backend.infonce(U, V, torch.tensor(3.0, requires_grad=True), plan, True)
    assert float(loss) == float(loss2) and torch.equal(dU, dU2) and torch.equal(dV, dV2)
    check((loss2, dU2, dV2, ds2), reference(U, V, 3.0, plan), U, V, 3.0, plan, torch.float32, "tensor scale")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adversarial_one_pair_dominates_each_row(dtype):
    # Each row has one logit far above the rest, in a random column: softmax weights -> one-hot, the
    # tiles' log-sum-exp spread is huge (the two-exponential path), and exp() of a raw logit overflows.
    gen = torch.Generator().manual_seed(0)
    n, d = 300, 64
    U, V = unit(n, d, gen), unit(n, d, gen)
    pi = torch.randperm(n, generator=gen)
    V[pi] = V[pi] + 50.0 * U
    U, V = U.to(dtype), V.to(dtype)
    for scale in (1.0, 100.0):
        for b in (None, ragged_ids(n, gen), 40):
            plan = resolve_batches(b, n)
            out = cpp_backend.infonce(U, V, scale, plan, True)
            assert all(torch.isfinite(x).all() for x in out)
            check(out, reference(U, V, scale, plan), U, V, scale, plan, dtype, f"{dtype} scale={scale}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_diagonal_dominates_p_to_one(dtype):
    # Positive pairs dominate: p_kk -> 1, G_kk = p + q - 2 is a cancellation; gradients are tiny.
    gen = torch.Generator().manual_seed(4)
    n, d = 200, 32
    U = unit(n, d, gen)
    V = U + 0.01 * unit(n, d, gen)
    U, V = U.to(dtype), V.to(dtype)
    plan = resolve_batches(None, n)
    for scale in (10.0, 100.0):
        check(cpp_backend.infonce(U, V, scale, plan, True), reference(U, V, scale, plan), U, V, scale, plan,
              dtype, f"{dtype} scale={scale}")


def test_shift_invariance_at_large_logits(monkeypatch):
    """The loss does not change when every score of a batch moves by the same amount, so Σ_ij G_ij = 0
    per batch; with u_i0 = v_j0 = 1 (kernel_cases.shifted_logits) that is Σ_{i∈b} dU_i0 = t·Σ_ij G_ij = 0,
    and the same for dV. This holds for the rounded S the kernel computes too, so the test sees only
    whether every line of P and Qc sums to 1: at |S| ≈ 1e5 with lines neither uniform nor one-hot, a
    rounded log-sum-exp (eps·|S|) misses the bound 5 to 1400 times. Bound: eps·t·(6B + 4B^1.5), for the
    rounding of the 2B² weights (a few ulp each, Σ = 2B) and of the B-term row sums of t·G·V
    (~√B·eps·Σ_j |G_ij|, Σ_j |G_ij| <~ 4). "all" negatives run the per-batch mode on one thread and the
    streaming mode (statistics from the lse kernel) on two; batches of 10 the per-batch mode. Every ISA."""
    gen = torch.Generator().manual_seed(21)
    n, d = 300, 32
    plans = (resolve_batches(None, n), resolve_batches(10, n))
    for dtype in (torch.float32, torch.float64):
        eps = torch.finfo(dtype).eps
        for scale in (1e2, 1e5):
            U, V = (x.to(dtype) for x in shifted_logits(n, d, gen, scale))
            for plan in plans:
                for tag, (out,) in on_every_isa_and_thread_count(
                        monkeypatch, lambda: cpp_backend.infonce(U, V, scale, plan, False)):
                    for idx in plan.groups():
                        bound = eps * scale * (6 * len(idx) + 4 * len(idx) ** 1.5)
                        for name, g in (("dU", out[1]), ("dV", out[2])):
                            err = abs(float(g[idx, 0].double().sum()))
                            assert err <= bound, f"Σ {name}[:, 0] = {err:.3g} > {bound:.3g}, {tag} {dtype} t={scale:g}"


def test_every_isa_and_thread_count(monkeypatch):
    """Each compiled instruction-set variant that this CPU runs, on 1 and 2 threads: one multi-tile
    batch (per-thread dV partials), mixed big/small/singleton batches, d not a multiple of the panel
    width and d > 256 (blocked inner dimension), moderate and adversarial logits."""
    gen = torch.Generator().manual_seed(11)
    n = 400
    ids = torch.cat([torch.zeros(210, dtype=torch.int64), torch.ones(97, dtype=torch.int64),
                     torch.arange(2, 95)])
    ids = ids[torch.randperm(n, generator=gen)]
    plans = [resolve_batches(None, n), resolve_batches(ids, n)]
    old = torch.get_num_threads()
    try:
        for d in (37, 300):
            U, V = unit(n, d, gen), unit(n, d, gen)
            Vhuge = V.clone()
            Vhuge[torch.randperm(n, generator=gen)] += 30.0 * U
            for dtype in (torch.float32, torch.float64):
                for Vc, scale in ((V, 30.0), (Vhuge, 50.0)):
                    Uc, Vc = U.to(dtype), Vc.to(dtype)
                    for plan in plans:
                        ref = reference(Uc, Vc, scale, plan)
                        for tag, (out,) in on_every_isa_and_thread_count(
                                monkeypatch, lambda: cpp_backend.infonce(Uc, Vc, scale, plan, True)):
                            check(out, ref, Uc, Vc, scale, plan, dtype,
                                  f"{tag} d={d} {dtype} scale={scale} batches={plan.num_batches}")
    finally:
        torch.set_num_threads(old)
    monkeypatch.setenv(cpp_backend.ISA_ENV_VAR, "no-such-isa")
    with pytest.raises(ValueError, match="no-such-isa"):
        cpp_backend.infonce(U, V, 1.0, plans[0], True)


def test_threaded_result_is_deterministic_up_to_rounding():
    gen = torch.Generator().manual_seed(6)
    n, d = 600, 48
    U, V = unit(n, d, gen, torch.float64), unit(n, d, gen, torch.float64)
    plan = resolve_batches(None, n)
    old = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(cpp_backend.infonce(U, V, 20.0, plan, True))
    finally:
        torch.set_num_threads(old)
    for o in outs[1:]:
        for a, b in zip(outs[0], o):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


# ---- many batches: the per-batch mode (one thread runs each batch whole, score tiles cached) ---------

MANY_SIZES = [200, 193, 190, 180, 180, 170, 160, 160, 150, 150, 150, 140, 140, 130, 120, 120, 110, 100, 97, 97,
              96, 96, 95, 64, 33, 5, 2, 1]


def many_batch_plan(sizes, gen):
    """A plan with the given batch sizes, pairs shuffled across batches (ragged, singletons)."""
    ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    n = int(ids.numel())
    return resolve_batches(ids[torch.randperm(n, generator=gen)], n)


def per_batch_mode(plan, threads, d):
    """The driver's mode rule (csrc/infonce.cpp, the directional ops' rule): whole batches per thread
    when one thread runs everything or no batch dominates: maxB² · 4 · threads <= Σ B² (plans with
    more than one batch; one thread with a single batch too big for the cache streams instead)."""
    assert plan.num_batches > 1
    sq = float((plan.sizes.double() ** 2).sum())
    if threads == 1 or sq * (d + 32) < 4.0e6:
        return True
    return float(plan.sizes.max()) ** 2 * 4 * threads <= sq


def logit_cases(U, V, gen):
    """(name, V, scale): moderate logits, one logit dominating each row (softmax one-hot, the tiles'
    log-sum-exps far apart: the two-exponential path), the positive pair dominating (p_kk -> 1)."""
    n = U.shape[0]
    Vrow = V.clone()
    Vrow[torch.randperm(n, generator=gen)] += 30.0 * U
    Vdiag = U + 0.01 * V
    return [("moderate", V, 30.0), ("row-dominant", Vrow, 50.0), ("diag-dominant", Vdiag, 100.0)]


def test_many_batches_every_isa_and_thread_count(monkeypatch):
    """Many ragged batches (1 to 200 pairs: singletons, one-tile batches, batches just over one
    96-pair tile, multi-tile ones), so that 2 threads run whole batches each (per-batch mode, asserted
    via the driver's rule and enough work for the threads), on every compiled ISA this CPU runs, 1 and
    2 threads, float32 / float64, d not a multiple of the panel width and d > 256, adversarial logits."""
    gen = torch.Generator().manual_seed(21)
    plan = many_batch_plan(MANY_SIZES, gen)
    n = plan.n
    old = torch.get_num_threads()
    try:
        for d in (37, 300):
            assert per_batch_mode(plan, 2, d) and float((plan.sizes.double() ** 2).sum()) * (d + 32) >= 4.0e6
            U, V = unit(n, d, gen), unit(n, d, gen)
            for name, Vc0, scale in logit_cases(U, V, gen):
                for dtype in (torch.float32, torch.float64):
                    Uc, Vc = U.to(dtype), Vc0.to(dtype)
                    ref = reference(Uc, Vc, scale, plan)
                    for tag, (out,) in on_every_isa_and_thread_count(
                            monkeypatch, lambda: cpp_backend.infonce(Uc, Vc, scale, plan, True)):
                        assert all(torch.isfinite(x).all() for x in out)
                        check(out, ref, Uc, Vc, scale, plan, dtype, f"{tag} d={d} {dtype} {name} scale={scale}")
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_many_batches_bitwise_reproducible(dtype):
    """Per-batch mode: static schedule, no shared partials. For a fixed thread count every output is
    bitwise repeatable; dU and dV do not even depend on the thread count (each batch is computed whole
    by one thread with the same code), only the loss / d log_scale sums are ordered by thread."""
    gen = torch.Generator().manual_seed(22)
    plan = many_batch_plan(MANY_SIZES, gen)
    n, d = plan.n, 130
    U, V = unit(n, d, gen, dtype), unit(n, d, gen, dtype)
    old = torch.get_num_threads()
    try:
        outs = {}
        for threads in (1, 2, 3):
            assert per_batch_mode(plan, threads, d)
            torch.set_num_threads(threads)
            a = cpp_backend.infonce(U, V, 20.0, plan, True)
            b = cpp_backend.infonce(U, V, 20.0, plan, True)
            assert all(torch.equal(x, y) for x, y in zip(a, b)), f"not bitwise repeatable, threads={threads}"
            outs[threads] = a
    finally:
        torch.set_num_threads(old)
    for threads in (2, 3):
        assert torch.equal(outs[1][1], outs[threads][1]) and torch.equal(outs[1][2], outs[threads][2])
        for i in (0, 3):
            assert torch.allclose(outs[1][i], outs[threads][i], rtol=1e-5 if dtype == torch.float32 else 1e-12)
    check(outs[2], reference(U, V, 20.0, plan), U, V, 20.0, plan, dtype, "threads=2")


def test_many_batches_larger_than_the_cache():
    """A batch's score tiles are cached when they fit (64 MiB per thread: float64 B <= 2880). A
    2900-pair float64 batch does not: it is streamed on its thread (lse kernel, then pass-2 row tiles)
    next to cached small batches. One thread checked against autograd; two threads (nine such batches,
    so per-batch mode applies) give bitwise the same dU / dV as one thread."""
    gen = torch.Generator().manual_seed(23)
    d = 3
    plan = many_batch_plan([2900] + [150, 97, 60, 1, 2], gen)
    U, V = unit(plan.n, d, gen), unit(plan.n, d, gen)
    out = cpp_backend.infonce(U, V, 5.0, plan, True)  # one thread (autouse fixture)
    check(out, reference(U, V, 5.0, plan), U, V, 5.0, plan, torch.float64, "batch over the cache, 1 thread")

    plan = many_batch_plan([2900] * 8 + [3000, 150, 97, 1], gen)
    assert per_batch_mode(plan, 2, d)
    U, V = unit(plan.n, d, gen), unit(plan.n, d, gen)
    one = cpp_backend.infonce(U, V, 5.0, plan, True)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = cpp_backend.infonce(U, V, 5.0, plan, True)
        again = cpp_backend.infonce(U, V, 5.0, plan, True)
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(x, y) for x, y in zip(two, again))
    assert torch.equal(one[1], two[1]) and torch.equal(one[2], two[2])
    for i in (0, 3):
        assert torch.allclose(one[i], two[i], rtol=1e-12)
    # spot check of the streamed batches against autograd on one of them alone (a lone batch too big
    # for the cache on one thread takes the streaming path: same log-sum-exps and row tiles, same bits)
    big = plan.groups()[0]
    sub = resolve_batches(None, int(big.numel()))
    ref = reference(U[big], V[big], 5.0, sub)
    got = cpp_backend.infonce(U[big], V[big], 5.0, sub, True)
    check(got, ref, U[big], V[big], 5.0, sub, torch.float64, "one streamed batch")
    assert torch.equal(got[1], two[1][big]) and torch.equal(got[2], two[2][big])


def test_zero_dim_embeddings_and_strided_inputs():
    plan = resolve_batches(3, 7)
    U = torch.zeros(7, 0)
    loss, dU, dV, ds = cpp_backend.infonce(U, U, 2.0, plan, True)
    sizes = plan.sizes.double()
    assert math.isclose(float(loss), float((2 * sizes * sizes.log()).sum()), rel_tol=1e-6)
    assert dU.shape == dV.shape == (7, 0) and float(ds) == 0.0
    gen = torch.Generator().manual_seed(2)
    Ut = torch.randn(9, 50, generator=gen, dtype=torch.float64).T  # non-contiguous view
    Vg = torch.randn(50, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    plan = resolve_batches(7, 50)
    out = cpp_backend.infonce(Ut, Vg, 2.0, plan, True)
    check(out, reference(Ut, Vg, 2.0, plan), Ut, Vg.detach(), 2.0, plan, torch.float64, "strided")


def test_bad_inputs_are_clear_errors():
    plan = resolve_batches(None, 4)
    U = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="same shape|shape"):
        cpp_backend.infonce(U, torch.zeros(4, 2), 1.0, plan, True)
    with pytest.raises(ValueError, match="covers 4 pairs but U has 5 rows"):
        cpp_backend.infonce(torch.zeros(5, 3), torch.zeros(5, 3), 1.0, plan, True)
    with pytest.raises(ECIFInputError, match=r"backend 'cpp'.*meta"):
        M = torch.empty(4, 3, device="meta")
        cpp_backend.infonce(M, M, 1.0, plan, True)


class TestExtensionValidation:
    """The C++ entry point itself rejects malformed arguments with ValueError."""

    def setup_method(self):
        from ecif_fast import _C
        self.C = _C
        self.U = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
        self.perm = np.arange(5, dtype=np.int64)
        self.off = np.array([0, 2, 5], dtype=np.int64)

    def call(self, U=None, V=None, perm=None, off=None, scale=1.0):
        U = self.U if U is None else U
        V = self.U if V is None else V
        return self.C.infonce(U, V, scale, self.perm if perm is None else perm,
                              self.off if off is None else off, True)

    def test_ok(self):
        loss, dU, dV, ds = self.call()
        assert isinstance(loss, float) and isinstance(ds, float)
        assert dU.shape == (5, 3) and dU.dtype == np.float32

    @pytest.mark.parametrize("kwargs, match", [
        (dict(V=np.zeros((4, 3), np.float32)), "same shape"),
        (dict(U=np.zeros((5,), np.float32)), "2-D"),
        (dict(V=np.zeros((5, 3), np.float64)), "same dtype"),
        (dict(U=np.zeros((5, 3), np.float16), V=np.zeros((5, 3), np.float16)), "float32 or float64"),
        (dict(perm=np.array([0, 1, 2, 3, 3])), "not a permutation"),
        (dict(perm=np.array([0, 1, 2, 3, 9])), "out of range"),
        (dict(off=np.array([0, 2, 4])), r"offsets\[-1\]"),
        (dict(off=np.array([0, 3, 2, 5])), "non-decreasing"),
        (dict(perm=np.arange(5.0)), "integer"),
        (dict(scale=float("nan")), "finite"),
    ])
    def test_rejects(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            self.call(**kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_streaming_column_chunks(monkeypatch, dtype):
    """Few-big-batches mode with its column range cut into several chunks (phases; forced small via the
    ECIF_INFONCE_CHUNK_TILES test hook): "all" negatives (one 1000-pair batch, 11 column tiles, 2 tiles
    per chunk) and a mixed plan (700 + 300 + small batches: chunks holding the end of one batch and the
    start of the next, small batches written directly). Matches autograd on 2 threads, is bitwise
    repeatable there, and dU equals the unchunked run bitwise (its row sums carry across chunks exactly)."""
    gen = torch.Generator().manual_seed(31)
    n, d = 1000, 40
    U, V = unit(n, d, gen, dtype), unit(n, d, gen, dtype)
    plans = {"all": resolve_batches(None, n), "mixed": many_batch_plan([600, 300, 64, 33, 2, 1], gen)}
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for name, plan in plans.items():
            assert plan.num_batches == 1 or not per_batch_mode(plan, 2, d), name  # one batch: streaming
            Un, Vn = U[:plan.n], V[:plan.n]
            monkeypatch.delenv("ECIF_INFONCE_CHUNK_TILES", raising=False)
            whole = cpp_backend.infonce(Un, Vn, 20.0, plan, True)
            for tiles in ("2", "3"):
                monkeypatch.setenv("ECIF_INFONCE_CHUNK_TILES", tiles)
                a = cpp_backend.infonce(Un, Vn, 20.0, plan, True)
                b = cpp_backend.infonce(Un, Vn, 20.0, plan, True)
                tag = f"{name} chunk={tiles} tiles {dtype}"
                assert all(torch.equal(x, y) for x, y in zip(a, b)), f"not bitwise repeatable, {tag}"
                assert torch.equal(a[1], whole[1]), tag
                check(a, reference(Un, Vn, 20.0, plan), Un, Vn, 20.0, plan, dtype, tag)
    finally:
        torch.set_num_threads(old)
