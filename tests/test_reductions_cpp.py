"""C++ ``ecif_reductions`` vs the torch twin (docs/math.md §4, §6).

Oracle: ``torch_ref.reductions.ecif_reductions`` in float64 on the inputs as the kernel sees them
(float16/bfloat16 rounded, then upcast exactly); the twin itself is checked against forward-mode
autograd in ``tests/test_reductions.py``.

Tolerances (per query q, on the max abs error over pairs), with L = t·max‖u‖·max‖v‖ the largest logit
and M_q = t·(max‖δu_q‖·max‖v‖ + max‖u‖·max‖δv_q‖) + |δs_q|·L the largest |δS|:
  c·eps·(1 + L)·(max|reference_q| + M_q), with eps the float64 epsilon for float64 inputs and the
  float32 epsilon for float32 and float16/bfloat16 (computed in float32 after an exact upcast), and
  c = 8: the absolute error of a logit is ~eps·L and exp() turns it into a relative error of every
  softmax weight; the sums over a line add a few ulps more. (Measured worst case over the grid:
  c ≈ 1, so the margin is ~8x.)

Grid (the issue's test standard): n ∈ {1, 2, 7, 64, 300} × d ∈ {1, 3, 64, 130} × {"all", ragged,
batches of 5}, each over all four dtypes × scales {0.01, 1, 100}. The remaining axes (negative term
exact / taylor, Q ∈ {1, 5}, with / without dlog_scale) rotate through those 12 cases per grid point
instead of multiplying them (a covering subset that keeps the module fast), so every grid point
sees several combinations and every combination appears at every (n, batches). Separate tests cover
every compiled ISA on 1 and 2 threads (bitwise determinism for a thread count), many big batches on
two threads, adversarial p → 1 logits, a constant direction at |S| ≈ 1e5, the twin's streaming path,
hypothesis random shapes, the raw binding's errors, and that the automatic backend choice on CPU is now
cpp.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ecif_fast.kernels import cpp_backend, ops, registry
from ecif_fast.core.batches import resolve_batches
from ecif_fast.kernels.torch_ref.reductions import ecif_reductions as twin
from kernel_cases import (DTYPES, SCALES, constant_direction, directions, mixed_plan, ragged_ids, shifted_logits, unit,
                          on_every_isa_and_thread_count)

pytestmark = pytest.mark.skipif(not cpp_backend.available(),
                                reason=f"C++ extension not built: {cpp_backend.unavailable_reason()}")

COMBOS = list(itertools.product(["exact", "taylor"], [1, 5], [False, True]))  # term, Q, with dlog_scale


@pytest.fixture(autouse=True)
def _one_torch_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def check(out, U, V, scale, plan, dU, dV, ds, term, dtype, tag, c=8.0):
    """Compare (positive, negative) with the float64 twin on the inputs as the kernel sees them."""
    pos, neg = out
    out_dt = torch.float64 if dtype == torch.float64 else torch.float32
    U64, V64 = U.double(), V.double()
    dU64, dV64 = dU.double(), dV.double()
    ds64 = None if ds is None else torch.as_tensor(ds).double()
    squeeze = dU.dim() == 2
    rp, rn = twin(U64, V64, scale, plan, dU64, dV64, ds64, term)
    assert pos.dtype == neg.dtype == out_dt, tag
    assert pos.shape == neg.shape == rp.shape, tag
    assert torch.isfinite(pos).all() and torch.isfinite(neg).all(), tag
    if squeeze:
        pos, neg, rp, rn = pos[None], neg[None], rp[None], rn[None]
        dU64, dV64 = dU64[None], dV64[None]
    if U.shape[0] == 0 or U.shape[1] == 0:
        return
    nu, nv = float(U64.norm(dim=1).max()), float(V64.norm(dim=1).max())
    L = scale * nu * nv
    eps = c * torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps * (1 + L)
    Q = pos.shape[0]
    dsv = torch.zeros(Q, dtype=torch.float64) if ds64 is None else ds64.reshape(-1).expand(Q)
    for q in range(Q):
        M = scale * (float(dU64[q].norm(dim=1).max()) * nv + nu * float(dV64[q].norm(dim=1).max()))
        M += abs(float(dsv[q])) * L
        for name, got, want in (("positive", pos[q], rp[q]), ("negative", neg[q], rn[q])):
            err = float((got.double() - want).abs().max())
            tol = eps * (float(want.abs().max()) + M)
            assert err <= tol, f"{name}[q={q}]: max abs error {err:.3g} > {tol:.3g}, {tag}"


@pytest.mark.parametrize("batches", ["all", "ragged", "size"])
@pytest.mark.parametrize("d", [1, 3, 64, 130])
@pytest.mark.parametrize("n", [1, 2, 7, 64, 300])
def test_grid_vs_twin(n, d, batches):
    gen = torch.Generator().manual_seed(1000 * n + d)
    b = {"all": None, "ragged": ragged_ids(n, gen), "size": 5}[batches]
    plan = resolve_batches(b, n)
    U64, V64 = unit(n, d, gen), unit(n, d, gen)
    for k, (dtype, scale) in enumerate(itertools.product(DTYPES, SCALES)):
        term, Q, with_ds = COMBOS[(k + n + d) % len(COMBOS)]
        dU64, dV64, ds = directions(n, d, Q, gen, with_ds)
        U, V, dU, dV = U64.to(dtype), V64.to(dtype), dU64.to(dtype), dV64.to(dtype)
        if ds is not None:
            ds = ds.to(dtype)
        out = cpp_backend.ecif_reductions(U, V, scale, plan, dU, dV, ds, term)
        check(out, U, V, scale, plan, dU, dV, ds, term, dtype,
              f"n={n} d={d} batches={batches} {dtype} scale={scale} {term} Q={Q} ds={with_ds}")


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
            for plan, term in zip(plans, ("exact", "taylor")):
                for tag, (out, again) in on_every_isa_and_thread_count(
                        monkeypatch, lambda: cpp_backend.ecif_reductions(U, Vc, scale, plan, dU, dV, ds, term), 2):
                    tag = f"{tag} d={d} {dtype} scale={scale} {term}"
                    assert all(torch.equal(a, b) for a, b in zip(out, again)), f"not deterministic, {tag}"
                    check(out, U, Vc, scale, plan, dU, dV, ds, term, dtype, tag)
    monkeypatch.setenv(cpp_backend.ISA_ENV_VAR, "no-such-isa")
    with pytest.raises(ValueError, match="no-such-isa"):
        cpp_backend.ecif_reductions(U, V.to(dtype), 1.0, plans[0], dU, dV)


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
    for term in ("exact", "taylor"):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = cpp_backend.ecif_reductions(U, V, 10.0, plan, dU, dV, ds, term)
            again = cpp_backend.ecif_reductions(U, V, 10.0, plan, dU, dV, ds, term)
            torch.set_num_threads(1)
            assert all(torch.equal(a, b) for a, b in zip(out, again)), f"not deterministic, threads={threads}"
            check(out, U, V, 10.0, plan, dU, dV, ds, term, torch.float32, f"threads={threads} {term}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adversarial_p_to_one(dtype):
    """p → 1 so that 1 − p rounds to 0: one pair dominating each row at a random column (line maxima
    off the diagonal, the cancellation-free special terms), and the diagonal dominating (maxima on the
    diagonal). Both single-tile and multi-tile batches; must stay finite and match the twin."""
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
            for term in ("exact", "taylor"):
                args = (U.to(dtype), Vc.to(dtype), scale, plan, dU.to(dtype), dV.to(dtype), ds.to(dtype), term)
                out = cpp_backend.ecif_reductions(*args)
                check(out, *args[:6], ds.to(dtype), term, dtype, f"{dtype} scale={scale} batches={b} {term}")


def test_constant_direction_has_no_influence_at_large_logits(monkeypatch):
    """δS = t for every entry of a batch (kernel_cases.constant_direction) changes no softmax, so both
    parts are 0 (positive = m + mc − 2δS_kk, negative = Σ W∘(δS − mean) plus the line-maximum terms).
    That needs every line of P and Qc to sum to 1: at |S| ≈ 1e5 (kernel_cases.shifted_logits) a rounded
    log-sum-exp makes them eps·|S|·|δS|, 600 to 3000 times the bound 8·√B·eps·|δS| (the error of a line sum of
    B rounded terms, ~√B·eps, times |δS|). Both terms, one and two threads, every ISA; "all" negatives
    (the partial mode on two threads) and batches of 10."""
    gen = torch.Generator().manual_seed(23)
    n, d = 300, 32
    plans = (resolve_batches(None, n), resolve_batches(10, n))
    for dtype in (torch.float32, torch.float64):
        eps = torch.finfo(dtype).eps
        dU = constant_direction(n, d).to(dtype)
        dV = torch.zeros_like(dU)
        for scale in (1e2, 1e5):
            U, V = (x.to(dtype) for x in shifted_logits(n, d, gen, scale))
            for plan in plans:
                bound = 8 * float(plan.sizes.max()) ** 0.5 * eps * scale
                for term in ("exact", "taylor"):
                    for tag, (out,) in on_every_isa_and_thread_count(
                            monkeypatch, lambda: cpp_backend.ecif_reductions(U, V, scale, plan, dU, dV, None, term)):
                        tag = f"{tag} {dtype} t={scale:g} {term} batches={plan.num_batches}"
                        for name, x in zip(("positive", "negative"), out):
                            err = float(x.abs().max())
                            assert err <= bound, f"|{name}| {err:.3g} > {bound:.3g}, {tag}"


def test_matches_twin_streaming_path():
    """The twin's streaming path (batches over its chunk size) agrees with the kernel as well."""
    gen = torch.Generator().manual_seed(3)
    n, d = 260, 20
    U, V = unit(n, d, gen), unit(n, d, gen)
    dU, dV, ds = directions(n, d, 5, gen, True)
    plan = resolve_batches(None, n)
    for term in ("exact", "taylor"):
        rp, rn = twin(U, V, 20.0, plan, dU, dV, ds, term, chunk=64)
        pos, neg = cpp_backend.ecif_reductions(U, V, 20.0, plan, dU, dV, ds, term)
        scale = float(rp.abs().max() + rn.abs().max())
        assert float((pos - rp).abs().max()) <= 1e-11 * scale
        assert float((neg - rn).abs().max()) <= 1e-11 * scale


def test_wrapper_shapes_and_dlog_scale_forms():
    gen = torch.Generator().manual_seed(5)
    n, d = 30, 6
    U, V = unit(n, d, gen, torch.float32), unit(n, d, gen, torch.float32)
    dU, dV, _ = directions(n, d, 3, gen, False)
    dU, dV = dU.float(), dV.float()
    plan = resolve_batches(7, n)
    p3, n3 = cpp_backend.ecif_reductions(U, V, 4.0, plan, dU, dV, 0.3)
    assert p3.shape == n3.shape == (3, n) and p3.dtype == torch.float32
    p3t, n3t = cpp_backend.ecif_reductions(U, V, torch.tensor(4.0), plan, dU, dV, torch.full((3,), 0.3))
    assert torch.equal(p3, p3t) and torch.equal(n3, n3t)
    p0, n0 = cpp_backend.ecif_reductions(U, V, 4.0, plan, dU, dV, torch.tensor(0.3))
    assert torch.equal(p3, p0) and torch.equal(n3, n0)
    p1, n1 = cpp_backend.ecif_reductions(U, V, 4.0, plan, dU[1], dV[1], 0.3)  # 2-D directions squeeze
    assert p1.shape == n1.shape == (n,)
    assert torch.allclose(p1, p3[1], rtol=1e-6, atol=1e-6) and torch.allclose(n1, n3[1], rtol=1e-6, atol=1e-6)
    ph, nh = cpp_backend.ecif_reductions(U.half(), V.half(), 4.0, plan, dU.half(), dV.half())
    assert ph.dtype == nh.dtype == torch.float32
    with pytest.raises(ValueError, match="negative_term"):  # checked once, by the dispatcher
        ops.ecif_reductions(U, V, 4.0, plan, dU, dV, None, "exactly", backend="cpp")
    with pytest.raises(ValueError, match=r"dU and dV must have shape"):
        cpp_backend.ecif_reductions(U, V, 4.0, plan, dU, dV[:, :5])
    with pytest.raises(ValueError, match="covers 30 pairs"):
        cpp_backend.ecif_reductions(U[:5], V[:5], 4.0, plan, dU[:, :5], dV[:, :5])


def test_automatic_choice_on_cpu_is_cpp():
    for op in ("ecif_reductions", "gauss_newton_product"):
        name, fn = registry.resolve(op, "cpu", "auto")
        assert name == "cpp" and fn is getattr(cpp_backend, op)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 140), d=st.integers(1, 40), bs=st.one_of(st.none(), st.integers(1, 140)),
       Q=st.integers(1, 3), log_scale=st.floats(-3.0, 4.6), exact=st.booleans(), with_ds=st.booleans(),
       seed=st.integers(0, 2**16))
def test_property_random_shapes(n, d, bs, Q, log_scale, exact, with_ds, seed):
    gen = torch.Generator().manual_seed(seed)
    U = torch.randn(n, d, generator=gen, dtype=torch.float64)  # not normalised: varied norms
    V = torch.randn(n, d, generator=gen, dtype=torch.float64)
    dU, dV, ds = directions(n, d, Q, gen, with_ds)
    scale = float(np.exp(log_scale)) / max(1.0, d ** 0.5)
    plan = resolve_batches(bs, n)
    term = "exact" if exact else "taylor"
    out = cpp_backend.ecif_reductions(U, V, scale, plan, dU, dV, ds, term)
    check(out, U, V, scale, plan, dU, dV, ds, term, torch.float64, f"n={n} d={d} bs={bs} Q={Q} scale={scale}")


class TestExtensionValidation:
    """The C++ entry point itself rejects malformed arguments with ValueError."""

    def setup_method(self):
        from ecif_fast import _C
        self.C = _C
        rng = np.random.default_rng(0)
        self.U = rng.standard_normal((5, 3)).astype(np.float32)
        self.dU = rng.standard_normal((2, 5, 3)).astype(np.float32)
        self.perm = np.arange(5, dtype=np.int64)
        self.off = np.array([0, 2, 5], dtype=np.int64)

    def call(self, U=None, V=None, perm=None, off=None, dU=None, dV=None, ds=None, scale=1.0):
        U = self.U if U is None else U
        V = self.U if V is None else V
        dU = self.dU if dU is None else dU
        dV = self.dU if dV is None else dV
        return self.C.ecif_reductions(U, V, scale, self.perm if perm is None else perm,
                                      self.off if off is None else off, dU, dV, ds, True)

    def test_ok(self):
        pos, neg = self.call(ds=np.array([0.1, 0.2], np.float32))
        assert pos.shape == neg.shape == (2, 5) and pos.dtype == np.float32

    @pytest.mark.parametrize("kwargs, match", [
        (dict(V=np.zeros((4, 3), np.float32)), "same shape"),
        (dict(U=np.zeros((5,), np.float32)), "2-D"),
        (dict(V=np.zeros((5, 3), np.float64)), "same dtype"),
        (dict(U=np.zeros((5, 3), np.float16), V=np.zeros((5, 3), np.float16)), "float32 or float64"),
        (dict(dU=np.zeros((2, 5, 4), np.float32)), r"\(Q, n, d\)"),
        (dict(dV=np.zeros((3, 5, 3), np.float32)), r"\(Q, n, d\)"),
        (dict(dU=np.zeros((5, 3), np.float32)), r"\(Q, n, d\)"),
        (dict(dV=np.zeros((2, 5, 3), np.float64)), "same dtype"),
        (dict(ds=np.zeros(3, np.float32)), "dlog_scale"),
        (dict(ds=np.zeros(2, np.float64)), "dlog_scale"),
        (dict(perm=np.array([0, 1, 2, 3, 3])), "not a permutation"),
        (dict(perm=np.array([0, 1, 2, 3, 9])), "out of range"),
        (dict(off=np.array([0, 2, 4])), r"offsets\[-1\]"),
        (dict(off=np.array([0, 3, 2, 5])), "non-decreasing"),
        (dict(perm=np.arange(5.0)), "integer"),
        (dict(scale=float("inf")), "finite"),
    ])
    def test_rejects(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            self.call(**kwargs)
