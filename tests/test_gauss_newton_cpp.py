"""C++ ``gauss_newton_product`` vs the torch twin (docs/math.md §4, §6).

Oracle: ``torch_ref.gauss_newton.gauss_newton_product`` in float64 on the inputs as the kernel sees them
(float16/bfloat16 rounded, then upcast exactly); the twin itself is checked against autograd in
``tests/test_reductions.py``.

Tolerances (per query q, max abs error): tol = c·eps·(1 + L)·R with L = t·max‖u‖·max‖v‖ the largest
logit, eps the float64 epsilon for float64 inputs and the float32 epsilon for float32 and
float16/bfloat16 (computed in float32 after an exact upcast), c = 8, and R the size of the terms:
M_q = t·(max‖δu_q‖·max‖v‖ + max‖u‖·max‖δv_q‖) + |δs_q|·L bounds |δS|, so
|G_ij| <= 2 M_q (p_ij + q_ij); with N = t·max(max‖u‖, max‖v‖) and B the largest batch,
R = max|reference_q| + N·M_q for gU and gV and R = |reference_q| + B·M_q·L for gs (a sum of B² terms
G∘S). The absolute error of a logit is ~eps·L and exp() turns it into a relative error of every
softmax weight. (Measured worst case over the grid: c ≈ 2, so the margin is ~4x.)

Grid (the issue's test standard): n ∈ {1, 2, 7, 64, 300} × d ∈ {1, 3, 64, 130} × {"all", ragged,
batches of 5}, each over all four dtypes × scales {0.01, 1, 100}. The remaining axes (Q ∈ {1, 5},
with / without dlog_scale) rotate through those 12 cases per grid point instead of multiplying them
(a covering subset that keeps the module fast), so every grid point sees several combinations and
every combination appears at every (n, batches). Separate tests cover every compiled ISA on 1 and 2
threads (bitwise determinism for a thread count), many big batches on two threads, a batch too big
for the batch cache, adversarial p → 1 logits, a constant direction at |S| ≈ 1e5, the twin's streaming
path, hypothesis random shapes, and the raw binding's errors.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ecif_fast.kernels import cpp_backend, registry
from ecif_fast.core.batches import resolve_batches
from ecif_fast.kernels.torch_ref.gauss_newton import gauss_newton_product as twin
from kernel_cases import (DTYPES, SCALES, constant_direction, directions, mixed_plan, ragged_ids, shifted_logits, unit,
                          on_every_isa_and_thread_count)

pytestmark = pytest.mark.skipif(not cpp_backend.available(),
                                reason=f"C++ extension not built: {cpp_backend.unavailable_reason()}")

COMBOS = list(itertools.product([1, 5], [False, True]))  # Q, with dlog_scale


@pytest.fixture(autouse=True)
def _one_torch_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def check(out, U, V, scale, plan, dU, dV, ds, dtype, tag, c=8.0):
    """Compare (gU, gV, gs) with the float64 twin on the inputs as the kernel sees them."""
    gU, gV, gs = out
    out_dt = torch.float64 if dtype == torch.float64 else torch.float32
    U64, V64 = U.double(), V.double()
    dU64, dV64 = dU.double(), dV.double()
    ds64 = None if ds is None else torch.as_tensor(ds).double()
    squeeze = dU.dim() == 2
    rU, rV, rs = twin(U64, V64, scale, plan, dU64, dV64, ds64)
    assert gU.dtype == gV.dtype == gs.dtype == out_dt, tag
    assert gU.shape == rU.shape and gV.shape == rV.shape and gs.shape == rs.shape, tag
    assert all(torch.isfinite(x).all() for x in out), tag
    if ds is None:
        assert not gs.any(), tag
    if squeeze:
        gU, gV, gs, rU, rV, rs = gU[None], gV[None], gs[None], rU[None], rV[None], rs[None]
        dU64, dV64 = dU64[None], dV64[None]
    if U.shape[0] == 0 or U.shape[1] == 0:
        return
    nu, nv = float(U64.norm(dim=1).max()), float(V64.norm(dim=1).max())
    L = scale * nu * nv
    N = scale * max(nu, nv)
    B = int(plan.sizes.max())
    eps = c * torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps * (1 + L)
    Q = gU.shape[0]
    dsv = torch.zeros(Q, dtype=torch.float64) if ds64 is None else ds64.reshape(-1).expand(Q)
    for q in range(Q):
        M = scale * (float(dU64[q].norm(dim=1).max()) * nv + nu * float(dV64[q].norm(dim=1).max()))
        M += abs(float(dsv[q])) * L
        for name, got, want in (("gU", gU[q], rU[q]), ("gV", gV[q], rV[q])):
            err = float((got.double() - want).abs().max())
            tol = eps * (float(want.abs().max()) + N * M)
            assert err <= tol, f"{name}[q={q}]: max abs error {err:.3g} > {tol:.3g}, {tag}"
        err = abs(float(gs[q]) - float(rs[q]))
        tol = eps * (abs(float(rs[q])) + B * M * L)
        assert err <= tol, f"gs[q={q}]: error {err:.3g} > {tol:.3g}, {tag}"


@pytest.mark.parametrize("batches", ["all", "ragged", "size"])
@pytest.mark.parametrize("d", [1, 3, 64, 130])
@pytest.mark.parametrize("n", [1, 2, 7, 64, 300])
def test_grid_vs_twin(n, d, batches):
    gen = torch.Generator().manual_seed(1000 * n + d)
    b = {"all": None, "ragged": ragged_ids(n, gen), "size": 5}[batches]
    plan = resolve_batches(b, n)
    U64, V64 = unit(n, d, gen), unit(n, d, gen)
    for k, (dtype, scale) in enumerate(itertools.product(DTYPES, SCALES)):
        Q, with_ds = COMBOS[(k + n + d) % len(COMBOS)]
        dU64, dV64, ds = directions(n, d, Q, gen, with_ds)
        U, V, dU, dV = U64.to(dtype), V64.to(dtype), dU64.to(dtype), dV64.to(dtype)
        if ds is not None:
            ds = ds.to(dtype)
        out = cpp_backend.gauss_newton_product(U, V, scale, plan, dU, dV, ds)
        check(out, U, V, scale, plan, dU, dV, ds, dtype,
              f"n={n} d={d} batches={batches} {dtype} scale={scale} Q={Q} ds={with_ds}")


def test_every_isa_and_thread_count_deterministic(monkeypatch):
    """Every compiled instruction-set variant this CPU runs, on 1 and 2 threads: one multi-tile batch,
    mixed batch sizes, d not a multiple of the panel width and d > 256 (blocked inner dimension),
    moderate and adversarial logits. The same thread count gives bitwise the same result."""
    gen = torch.Generator().manual_seed(11)
    n = 400
    plans = [resolve_batches(None, n), mixed_plan(n, gen)]
    for d, dtype in ((37, torch.float32), (300, torch.float64)):
        U, V = unit(n, d, gen), unit(n, d, gen)
        Vhuge = V.clone()
        Vhuge[torch.randperm(n, generator=gen)] += 30.0 * U
        dU, dV, ds = directions(n, d, 2, gen, True)
        U, dU, dV, ds = U.to(dtype), dU.to(dtype), dV.to(dtype), ds.to(dtype)
        for Vc, scale in ((V.to(dtype), 30.0), (Vhuge.to(dtype), 50.0)):
            for plan, dsc in zip(plans, (ds, None)):
                for tag, (out, again) in on_every_isa_and_thread_count(
                        monkeypatch, lambda: cpp_backend.gauss_newton_product(U, Vc, scale, plan, dU, dV, dsc), 2):
                    tag = f"{tag} d={d} {dtype} scale={scale} ds={dsc is not None}"
                    assert all(torch.equal(a, b) for a, b in zip(out, again)), f"not deterministic, {tag}"
                    check(out, U, Vc, scale, plan, dU, dV, dsc, dtype, tag)
    monkeypatch.setenv(cpp_backend.ISA_ENV_VAR, "no-such-isa")
    with pytest.raises(ValueError, match="no-such-isa"):
        cpp_backend.gauss_newton_product(U, V.to(dtype), 1.0, plans[0], dU, dV)


def test_many_big_batches_two_threads():
    """Many batches over one row tile and none dominating (10 x 110 pairs: the sum of B² is at least
    4·threads·max B²): on two threads each batch is run whole by one thread (no per-thread partials);
    must match the twin and repeat bitwise."""
    gen = torch.Generator().manual_seed(7)
    n, d = 1100, 20
    U, V = unit(n, d, gen, torch.float32), unit(n, d, gen, torch.float32)
    dU, dV, ds = directions(n, d, 2, gen, True)
    dU, dV, ds = dU.float(), dV.float(), ds.float()
    plan = resolve_batches(torch.randperm(n, generator=gen) % 10, n)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out = cpp_backend.gauss_newton_product(U, V, 10.0, plan, dU, dV, ds)
        again = cpp_backend.gauss_newton_product(U, V, 10.0, plan, dU, dV, ds)
        torch.set_num_threads(1)
        assert all(torch.equal(a, b) for a, b in zip(out, again)), f"not deterministic, threads={threads}"
        check(out, U, V, 10.0, plan, dU, dV, ds, torch.float32, f"threads={threads}")


def test_batch_too_big_for_the_batch_cache():
    """One thread runs each batch whole and keeps its score and δS tiles between the passes when they
    fit (64 MiB); this batch (2200 pairs, 5 queries, float64: ~120 MiB) does not, so they are
    recomputed. Also the twin's streaming path (2200 > its chunk)."""
    gen = torch.Generator().manual_seed(8)
    n, d, Q = 2200, 3, 5
    U = torch.randn(n, d, generator=gen, dtype=torch.float64)
    V = torch.randn(n, d, generator=gen, dtype=torch.float64)
    dU, dV, ds = directions(n, d, Q, gen, True)
    plan = resolve_batches(None, n)
    out = cpp_backend.gauss_newton_product(U, V, 2.0, plan, dU, dV, ds)
    check(out, U, V, 2.0, plan, dU, dV, ds, torch.float64, "no batch cache")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adversarial_p_to_one(dtype):
    """p → 1: one pair dominating each row at a random column, and the diagonal dominating; single-tile
    and multi-tile batches; must stay finite and match the twin."""
    gen = torch.Generator().manual_seed(0)
    n, d = 300, 64
    U, V = unit(n, d, gen), unit(n, d, gen)
    pi = torch.randperm(n, generator=gen)
    Vrow = V.clone()
    Vrow[pi] += 50.0 * U
    Vdiag = U + 0.01 * unit(n, d, gen)
    dU, dV, ds = directions(n, d, 2, gen, True)
    for Vc, scale in ((Vrow, 1.0), (Vrow, 100.0), (Vdiag, 100.0)):
        for b in (None, 40):
            plan = resolve_batches(b, n)
            args = (U.to(dtype), Vc.to(dtype), scale, plan, dU.to(dtype), dV.to(dtype), ds.to(dtype))
            out = cpp_backend.gauss_newton_product(*args)
            check(out, *args, dtype, f"{dtype} scale={scale} batches={b}")


def test_constant_direction_gives_zero_at_large_logits(monkeypatch):
    """δS = t for every entry of a batch (kernel_cases.constant_direction) shifts every line equally,
    which changes no softmax: G = P∘(δS − m) + Qc∘(δS − mc) = 0, so gU, gV and gs are 0 up to rounding.
    That needs every line of P and Qc to sum to 1: at |S| ≈ 1e5 (kernel_cases.shifted_logits) a
    rounded log-sum-exp leaves δS − m ≈ eps·|S|·δS, 100 to 1000 times the bounds.
    Bounds, with ε = 8·√B·eps for the error of a line sum of B rounded terms: |G_ij| <= (P_ij + Qc_ij)·ε·|δS|,
    a row of P sums to 1 and the rows of Qc to B in all, so |gU|, |gV| <= 2·ε·t·|δS|·max‖v‖ on average
    over the rows (allowed once more: 4·ε·t·|δS|·max‖v‖) and |gs| <= 2B·ε·|δS|·max|S|. "all" negatives
    run the per-batch mode on one thread and the partial mode (statistics from the lse kernel) on two;
    batches of 10 the per-batch mode. Every ISA."""
    gen = torch.Generator().manual_seed(22)
    n, d = 300, 32
    plans = (resolve_batches(None, n), resolve_batches(10, n))
    for dtype in (torch.float32, torch.float64):
        eps = torch.finfo(dtype).eps
        dU = constant_direction(n, d).to(dtype)
        dV, ds = torch.zeros_like(dU), torch.zeros(1, dtype=dtype)
        for scale in (1e2, 1e5):
            U, V = (x.to(dtype) for x in shifted_logits(n, d, gen, scale))
            vmax = float(torch.maximum(U.norm(dim=1).max(), V.norm(dim=1).max()))
            smax = scale * vmax ** 2
            for plan in plans:
                B = int(plan.sizes.max())
                eps_line = 8 * B ** 0.5 * eps
                for tag, (out,) in on_every_isa_and_thread_count(
                        monkeypatch, lambda: cpp_backend.gauss_newton_product(U, V, scale, plan, dU, dV, ds)):
                    tag = f"{tag} {dtype} t={scale:g} B={B}"
                    g_bound = 4 * eps_line * scale * scale * vmax
                    assert float(out[0].abs().max()) <= g_bound, f"|gU| {float(out[0].abs().max()):.3g}, {tag}"
                    assert float(out[1].abs().max()) <= g_bound, f"|gV| {float(out[1].abs().max()):.3g}, {tag}"
                    s_bound = 2 * B * eps_line * scale * smax
                    assert float(out[2].abs().max()) <= s_bound, f"|gs| {float(out[2].abs().max()):.3g}, {tag}"


def test_matches_twin_streaming_path():
    """The twin's streaming path (batches over its chunk size) agrees with the kernel as well."""
    gen = torch.Generator().manual_seed(3)
    n, d = 260, 20
    U, V = unit(n, d, gen), unit(n, d, gen)
    dU, dV, ds = directions(n, d, 5, gen, True)
    plan = resolve_batches(None, n)
    ref = twin(U, V, 20.0, plan, dU, dV, ds, chunk=64)
    out = cpp_backend.gauss_newton_product(U, V, 20.0, plan, dU, dV, ds)
    for a, b in zip(out, ref):
        assert float((a - b).abs().max()) <= 1e-11 * float(b.abs().max())


def test_wrapper_shapes_and_dlog_scale_forms():
    gen = torch.Generator().manual_seed(5)
    n, d = 30, 6
    U, V = unit(n, d, gen, torch.float32), unit(n, d, gen, torch.float32)
    dU, dV, _ = directions(n, d, 3, gen, False)
    dU, dV = dU.float(), dV.float()
    plan = resolve_batches(7, n)
    a3 = cpp_backend.gauss_newton_product(U, V, 4.0, plan, dU, dV, 0.3)
    assert a3[0].shape == a3[1].shape == (3, n, d) and a3[2].shape == (3,) and a3[0].dtype == torch.float32
    at = cpp_backend.gauss_newton_product(U, V, torch.tensor(4.0), plan, dU, dV, torch.full((3,), 0.3))
    a0 = cpp_backend.gauss_newton_product(U, V, 4.0, plan, dU, dV, torch.tensor(0.3))
    assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(a3, at, a0))
    a1 = cpp_backend.gauss_newton_product(U, V, 4.0, plan, dU[1], dV[1], 0.3)  # 2-D directions squeeze
    assert a1[0].shape == a1[1].shape == (n, d) and a1[2].shape == ()
    for x, y in zip(a1, a3):
        assert torch.allclose(x, y[1], rtol=1e-6, atol=1e-6)
    none = cpp_backend.gauss_newton_product(U, V, 4.0, plan, dU, dV)
    assert not none[2].any()
    ah = cpp_backend.gauss_newton_product(U.bfloat16(), V.bfloat16(), 4.0, plan, dU.bfloat16(), dV.bfloat16())
    assert all(x.dtype == torch.float32 for x in ah)
    with pytest.raises(ValueError, match=r"dU and dV must have shape"):
        cpp_backend.gauss_newton_product(U, V, 4.0, plan, dU, dV[:, :5])
    with pytest.raises(ValueError, match="covers 30 pairs"):
        cpp_backend.gauss_newton_product(U[:5], V[:5], 4.0, plan, dU[:, :5], dV[:, :5])


def test_automatic_choice_on_cpu_is_cpp():
    name, fn = registry.resolve("gauss_newton_product", "cpu", "auto")
    assert name == "cpp" and fn is cpp_backend.gauss_newton_product


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 140), d=st.integers(1, 40), bs=st.one_of(st.none(), st.integers(1, 140)),
       Q=st.integers(1, 3), log_scale=st.floats(-3.0, 4.6), with_ds=st.booleans(), seed=st.integers(0, 2**16))
def test_property_random_shapes(n, d, bs, Q, log_scale, with_ds, seed):
    gen = torch.Generator().manual_seed(seed)
    U = torch.randn(n, d, generator=gen, dtype=torch.float64)  # not normalised: varied norms
    V = torch.randn(n, d, generator=gen, dtype=torch.float64)
    dU, dV, ds = directions(n, d, Q, gen, with_ds)
    scale = float(np.exp(log_scale)) / max(1.0, d ** 0.5)
    plan = resolve_batches(bs, n)
    out = cpp_backend.gauss_newton_product(U, V, scale, plan, dU, dV, ds)
    check(out, U, V, scale, plan, dU, dV, ds, torch.float64, f"n={n} d={d} bs={bs} Q={Q} scale={scale}")


class TestExtensionValidation:
    """The C++ entry point itself rejects malformed arguments with ValueError."""

    def setup_method(self):
        from ecif_fast import _C
        self.C = _C
        rng = np.random.default_rng(0)
        self.U = rng.standard_normal((5, 3)).astype(np.float64)
        self.dU = rng.standard_normal((2, 5, 3)).astype(np.float64)
        self.perm = np.arange(5, dtype=np.int64)
        self.off = np.array([0, 2, 5], dtype=np.int64)

    def call(self, U=None, V=None, perm=None, off=None, dU=None, dV=None, ds=None, scale=1.0):
        U = self.U if U is None else U
        V = self.U if V is None else V
        dU = self.dU if dU is None else dU
        dV = self.dU if dV is None else dV
        return self.C.gauss_newton_product(U, V, scale, self.perm if perm is None else perm,
                                           self.off if off is None else off, dU, dV, ds)

    def test_ok(self):
        gU, gV, gs = self.call(ds=np.array([0.1, 0.2]))
        assert gU.shape == gV.shape == (2, 5, 3) and gs.shape == (2,) and gU.dtype == np.float64

    @pytest.mark.parametrize("kwargs, match", [
        (dict(V=np.zeros((4, 3))), "same shape"),
        (dict(U=np.zeros((5,))), "2-D"),
        (dict(V=np.zeros((5, 3), np.float32)), "same dtype"),
        (dict(U=np.zeros((5, 3), np.int32), V=np.zeros((5, 3), np.int32)), "float32 or float64"),
        (dict(dU=np.zeros((2, 5, 4))), r"\(Q, n, d\)"),
        (dict(dV=np.zeros((3, 5, 3))), r"\(Q, n, d\)"),
        (dict(dV=np.zeros((2, 5, 3), np.float32)), "same dtype"),
        (dict(ds=np.zeros((2, 1))), "dlog_scale"),
        (dict(perm=np.array([0, 1, 2, 3, 3])), "not a permutation"),
        (dict(off=np.array([0, 3, 2, 5])), "non-decreasing"),
        (dict(off=np.array([1, 5])), r"offsets\[0\]"),
        (dict(scale=float("nan")), "finite"),
    ])
    def test_rejects(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            self.call(**kwargs)
