"""Triton ``gauss_newton_product`` vs a float64 brute force and the torch twin (docs/math.md §4, §6.3), on the
CPU in Triton's interpreter (``TRITON_INTERPRET=1`` per test: the ``triton_interpreter`` fixture), or with
``ECIF_FAST_TEST_DEVICE=cuda`` the compiled kernels on a GPU (``kernel_cases.on_test_device``).

The interpreter is slow (and this op runs ``2 + 4Q`` row-tile launches), so the issue grid is covered by
a subset rather than the full product: n ∈ {1, 2, 7, 30, 40, 48, 64} with "all", ragged and fixed-size
batches, d rotating over {1, 3, 64, 130} (130: several d slices, a partial one), Q ∈ {1, 5} and 2-D
directions, ``dlog_scale`` None / a number / a ``(Q,)`` tensor, every dtype at every scale
∈ {0.01, 1, 100} somewhere; 16/32-row tiles give several row and column tiles and partial ones;
n = 300 once with 64-wide tiles.
Plus adversarial logits, a constant direction at |S| ≈ 1e5, the public dispatch, a hypothesis property
test and ahead-of-time sm_90 compiles of the two kernel modes this op adds.

Tolerances (per dtype, from a float64 brute force on the inputs as the kernel sees them):
  * ``δ = 2·eps·(t·max‖u‖·max‖v‖·√d + log B + 1)``: absolute error of a logit / log-sum-exp;
    ``E = 2·eps·√d·t·max(‖δu‖‖v‖ + ‖u‖‖δv‖) + |δs|·δ``: absolute error of a ``δS`` entry
    (eps of the accumulation dtype: float32, float64 for float64 inputs);
  * ``η = δ + ε_G + eps·√B`` with ``ε_G`` the rounding of ``G`` in ``G·B``: 2⁻¹⁶ for bfloat16 (head +
    remainder split), eps for the others (float16 widens ``B`` to float32 here);
  * per entry ``err_G = η·A + 2(P + Qc)·E`` with ``A = P(|δS| + |m|) + Qc(|δS| + |mc|)``;
  * gU, gV: ``2·t·max_i Σ_j err_G_ij·max|v|``; gs: ``2·Σ_ij (err_G·|S| + |G|·δ)``.
The twin (float32 for non-float64 inputs) is checked with twice these. Those bounds allow a
coherent error of every ``P`` line sum of size δ, which a softmax does not make; so, for
non-float64 inputs, the error must also stay within 4 × the twin's own error plus a floor of
``4(ε_G + eps)·t·max_i Σ_j A_ij·max|v|`` with ``A = P(|δS| + |m|) + Qc(|δS| + |mc|)`` (gs:
``4(ε_G + eps)·Σ A∘|S|``).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ecif_fast.errors import ECIFInputError
from ecif_fast.kernels import ops, registry, triton_backend
from ecif_fast.core.batches import resolve_batches
from ecif_fast.kernels.torch_ref.gauss_newton import gauss_newton_product as twin_gn
from kernel_cases import (compile_grad_rows, constant_direction, on_test_device, ragged_ids, shifted_logits,
                          triton_op, unit)


_tgn = triton_op("gauss_newton_product")
pytestmark = pytest.mark.usefixtures("triton_interpreter")


G_EPS = {torch.bfloat16: 2.0 ** -16, torch.float16: torch.finfo(torch.float32).eps,
         torch.float32: torch.finfo(torch.float32).eps, torch.float64: torch.finfo(torch.float64).eps}


def brute(U, V, scale, plan, dU, dV, dlog_scale):
    """float64 dense reference ``(gU, gV, gs)`` (query axis always present) and the tolerances."""
    dtype = U.dtype
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    U, V = U.double(), V.double()
    dU, dV = dU.double(), dV.double()
    if dU.dim() == 2:
        dU, dV = dU[None], dV[None]
    Q, n, d = dU.shape
    t = float(scale)
    ds = torch.zeros(Q, dtype=torch.float64) if dlog_scale is None else \
        torch.as_tensor(dlog_scale, dtype=torch.float64).reshape(-1).expand(Q)
    gU, gV, gs = torch.zeros_like(dU), torch.zeros_like(dV), torch.zeros(Q, dtype=torch.float64)
    tol_g = torch.zeros(Q, dtype=torch.float64)
    tol_s = torch.zeros(Q, dtype=torch.float64)
    floor_g = torch.zeros(Q, dtype=torch.float64)
    floor_s = torch.zeros(Q, dtype=torch.float64)
    bmax = int(plan.sizes.max())
    L = t * float(U.norm(dim=1).max()) * float(V.norm(dim=1).max())
    delta = 2 * eps * (abs(L) * math.sqrt(d) + math.log(bmax) + 1)
    eta = delta + G_EPS[dtype] + eps * math.sqrt(bmax)
    vmax = float(torch.maximum(U.abs().max(), V.abs().max()))
    for idx in plan.groups():
        Ub, Vb, dUb, dVb = U[idx], V[idx], dU[:, idx], dV[:, idx]
        S = t * (Ub @ Vb.T)
        P, Qc = torch.softmax(S, 1), torch.softmax(S, 0)
        dS = t * (dUb @ Vb.T + Ub @ dVb.transpose(1, 2)) + ds[:, None, None] * S
        m = (P * dS).sum(2, keepdim=True)
        mc = (Qc * dS).sum(1, keepdim=True)
        G = P * (dS - m) + Qc * (dS - mc)
        gU[:, idx] = t * (G @ Vb)
        gV[:, idx] = t * (G.transpose(1, 2) @ Ub)
        gs += (G * S).sum((1, 2))
        E = 2 * eps * math.sqrt(d) * abs(t) * float(
            (dUb.norm(dim=2)[:, :, None] * Vb.norm(dim=1)[None, None, :]
             + Ub.norm(dim=1)[None, :, None] * dVb.norm(dim=2)[:, None, :]).max()) + ds.abs()[:, None, None] * delta
        A = P * (dS.abs() + m.abs()) + Qc * (dS.abs() + mc.abs())  # magnitude of the terms of G
        errG = eta * A + 2 * (P + Qc) * E
        tol_g = torch.maximum(tol_g, 2 * abs(t) * vmax * torch.maximum(errG.sum(2).amax(1), errG.sum(1).amax(1)))
        tol_s += 2 * (errG * S.abs() + G.abs() * delta).sum((1, 2))
        floor_g = torch.maximum(floor_g, abs(t) * vmax * torch.maximum(A.sum(2).amax(1), A.sum(1).amax(1)))
        floor_s += (A * S.abs()).sum((1, 2))
    if dlog_scale is None:  # the op's contract: gs is zeros when the scale is fixed
        gs.zero_()
        floor_s.zero_()
    c = 4 * (G_EPS[dtype] + eps)
    return (gU, gV, gs), (tol_g, tol_g, tol_s + 4 * eps * gs.abs()), (c * floor_g, c * floor_g, c * floor_s)


def check(U, V, scale, plan, dU, dV, dlog_scale, tag, **kw):
    out = _tgn(U, V, scale, plan, dU, dV, dlog_scale, **kw)
    out_dt = torch.float64 if U.dtype == torch.float64 else torch.float32
    gU, gV, gs = out
    assert gU.dtype == gV.dtype == gs.dtype == out_dt and gU.shape == gV.shape == dU.shape, tag
    assert gs.shape == (() if dU.dim() == 2 else (dU.shape[0],)), tag
    for x in out:
        assert bool(torch.isfinite(x).all()), tag
    if dlog_scale is None:
        assert float(gs.abs().max()) == 0.0, tag
    ref, tols, floors = brute(U, V, scale, plan, dU, dV, dlog_scale)
    twin = twin_gn(U, V, scale, plan, dU, dV, dlog_scale)
    for k, name in enumerate(("gU", "gV", "gs")):
        got = out[k].double().reshape(ref[k].shape)
        tw = twin[k].double().reshape(ref[k].shape)
        tol = tols[k].reshape(-1, *([1] * (ref[k].dim() - 1)))
        for r, f, what in ((ref[k], 1, "float64"), (tw, 2, "twin")):
            excess = (got - r).abs() - f * tol
            assert float(excess.max()) <= 0, (f"{name} vs {what}, {tag}: max abs error "
                                               f"{float((got - r).abs().max()):.3g}, tolerance {tols[k].tolist()}")
        if U.dtype != torch.float64:  # no less accurate than the float32 twin (see the module docstring)
            err = float((got - ref[k]).abs().max())
            bound = 4 * float((tw - ref[k]).abs().max()) + float(floors[k].max())
            assert err <= bound, f"{name}, {tag}: error {err:.3g} > 4 × the twin's + floor = {bound:.3g}"
    return out


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SCALES = [0.01, 1.0, 100.0]
DS = [1, 3, 64, 130]


def _grid_cases():
    """(n, batches, Q) with d rotating; each case runs the four dtypes with rotating scales and
    rotating dlog_scale kinds (None, a number, a (Q,) tensor)."""
    rows = [(1, "all", 5), (2, "ragged", None), (7, "all", 5), (7, "ragged", 1), (40, "all", 1),
            (30, "ragged", 5), (48, "size", None), (64, "all", 1)]
    return [(n, DS[k % 4], b, Q, k) for k, (n, b, Q) in enumerate(rows)]


def _directions(n, d, Q, gen, dtype):
    shape = (n, d) if Q is None else (Q, n, d)
    dU = 0.7 * torch.randn(shape, generator=gen, dtype=torch.float64)
    dV = 0.7 * torch.randn(shape, generator=gen, dtype=torch.float64)
    return dU.to(dtype), dV.to(dtype)


def _dlog(kind, Q, gen):
    if kind == 0:
        return None
    if kind == 1:
        return 0.37
    return torch.randn(1 if Q is None else Q, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("n, d, batches, Q, k", _grid_cases())
def test_grid_vs_bruteforce_and_twin(n, d, batches, Q, k):
    gen = torch.Generator().manual_seed(100 * n + d)
    plan = resolve_batches({"all": None, "ragged": ragged_ids(n, gen), "size": 24}[batches], n)
    U64, V64 = unit(n, d, gen), unit(n, d, gen)
    for j, dtype in enumerate(DTYPES):
        if dtype == torch.float64 and d == 130 and n > 7:
            continue  # float64 at d = 130 is the slowest interpreted case: covered at n = 7
        scale = SCALES[(k + j) % 3]
        dU, dV = _directions(n, d, Q, gen, dtype)
        dls = _dlog((k + j) % 3, Q, gen)
        check(U64.to(dtype), V64.to(dtype), scale, plan, dU, dV, dls,
              f"n={n} d={d} batches={batches} Q={Q} {dtype} scale={scale} dlog_scale={dls}",
              block_m=16 if n > 32 else 32)


def test_every_dtype_scale_query_combination_covered():
    seen, qs, kinds = set(), set(), set()
    for _, _, _, Q, k in _grid_cases():
        qs.add(Q)
        for j, dtype in enumerate(DTYPES):
            seen.add((dtype, SCALES[(k + j) % 3]))
            kinds.add((dtype, (k + j) % 3))
    assert len(seen) == len(DTYPES) * len(SCALES) and qs == {None, 1, 5}
    assert len(kinds) == len(DTYPES) * 3


def test_n300_with_large_tiles():
    """The grid's largest n, batches of 100 (two 64-row tiles each, a partial one), Q = 1."""
    gen = torch.Generator().manual_seed(301)
    n, d = 300, 3
    U, V = unit(n, d, gen, torch.float32), unit(n, d, gen, torch.float32)
    dU, dV = _directions(n, d, 1, gen, torch.float32)
    check(U, V, 100.0, resolve_batches(100, n), dU, dV, 0.25, "n=300 size=100", block_m=64, block_n=64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_adversarial_one_pair_dominates(dtype):
    """One pair dominates its row and column (p so close to 1 that 1 − p rounds to 0 at t = 1e4)."""
    gen = torch.Generator().manual_seed(6)
    n, d, Q = 30, 8, 2
    U, V = unit(n, d, gen), unit(n, d, gen)
    pi = torch.randperm(n, generator=gen)
    V[pi] = V[pi] + 20.0 * U
    U, V = U.to(dtype), V.to(dtype)
    dU, dV = _directions(n, d, Q, gen, dtype)
    for scale in (1.0, 1e4):
        for b in (None, ragged_ids(n, gen)):
            check(U, V, scale, resolve_batches(b, n), dU, dV, torch.tensor([0.5, -1.0]),
                  f"adversarial {dtype} scale={scale}", block_m=16, block_n=16)



def test_constant_direction_gives_zero_at_large_logits():
    """δS = t for every entry of a batch (kernel_cases.constant_direction) shifts every line equally,
    which changes no softmax: G = P∘(δS − m) + Qc∘(δS − mc) = 0, so gU, gV and gs are 0 up to rounding.
    At |S| ≈ 1e5 with soft lines (kernel_cases.shifted_logits) that needs every line of P and Qc, in both
    launches, to sum to 1 within a few eps. Bounds as in tests/test_gauss_newton_cpp.py: with
    ε = 8·√B·eps (the error of a line sum of B rounded terms) |gU|, |gV| <= 4·ε·t·|δS|·max‖v‖ and
    |gs| <= 2B·ε·|δS|·max|S|."""
    gen = torch.Generator().manual_seed(22)
    n, d = 40, 16
    eps = torch.finfo(torch.float32).eps
    dU = constant_direction(n, d).float()
    dV = torch.zeros_like(dU)
    for scale in (1e2, 1e5):
        U, V = (x.float() for x in shifted_logits(n, d, gen, scale))
        vmax = float(torch.maximum(U.norm(dim=1).max(), V.norm(dim=1).max()))
        for plan in (resolve_batches(None, n), resolve_batches(ragged_ids(n, gen), n)):
            gU, gV, gs = _tgn(U, V, scale, plan, dU, dV, torch.zeros(1), block_m=16, block_n=16)
            eps_line = 8 * math.sqrt(int(plan.sizes.max())) * eps
            g_bound = 4 * eps_line * scale * scale * vmax
            tag = f"t={scale:g} batches={plan.num_batches}"
            assert float(gU.abs().max()) <= g_bound, f"|gU| {float(gU.abs().max()):.3g} > {g_bound:.3g}, {tag}"
            assert float(gV.abs().max()) <= g_bound, f"|gV| {float(gV.abs().max()):.3g} > {g_bound:.3g}, {tag}"
            s_bound = 2 * int(plan.sizes.max()) * eps_line * scale * scale * vmax ** 2
            assert float(gs.abs().max()) <= s_bound, f"|gs| {float(gs.abs().max()):.3g} > {s_bound:.3g}, {tag}"

def test_tolerance_can_fail():
    """The checks reject a slightly wrong result: the tolerances are not vacuous."""
    gen = torch.Generator().manual_seed(4)
    n, d, Q = 20, 8, 2
    U, V = unit(n, d, gen, torch.float32), unit(n, d, gen, torch.float32)
    dU, dV = _directions(n, d, Q, gen, torch.float32)
    plan = resolve_batches(7, n)
    (gU, gV, gs), tols, _ = brute(U, V, 10.0, plan, dU, dV, 0.3)
    out = _tgn(U, V, 10.0, plan, dU, dV, 0.3)
    assert float((out[0].double() - gU).abs().max()) <= float(tols[0].max())
    assert 1e-3 * float(gU.abs().max()) > float(tols[0].max())
    assert bool((1e-2 * gs.abs() > tols[2]).all())  # gs = Σ G∘S sums B² terms that largely cancel
    # a different dlog_scale moves the result by far more than the tolerance
    other = _tgn(U, V, 10.0, plan, dU, dV, 0.4)
    assert float((other[0].double() - gU).abs().max()) > 10 * float(tols[0].max())


def test_dispatch_and_blocked_d():
    """Through ops.gauss_newton_product(backend="triton"); ragged batches (identity perm off); d over slices."""
    gen = torch.Generator().manual_seed(12)
    n, d, Q = 33, 70, 2
    U, V = unit(n, d, gen, torch.float32), unit(n, d, gen, torch.float32)
    dU, dV = _directions(n, d, Q, gen, torch.float32)
    plan = resolve_batches(ragged_ids(n, gen), n)
    check(U, V, 2.0, plan, dU, dV, torch.tensor([0.2, -0.1]), "ragged", block_m=16, block_n=16, block_d=32)
    info = triton_backend.infonce_module.last_launch()
    assert info["op"] == "gauss_newton_product" and not info["single_k"] and not info["identity"]
    ids = torch.arange(n) % 3
    a = on_test_device(ops.gauss_newton_product, U, V, 2.0, ids, dU, dV, 0.5, backend="triton")
    b = ops.gauss_newton_product(U, V, 2.0, ids, dU, dV, 0.5, backend="torch")
    for x, y in zip(a, b):
        assert x.shape == y.shape and torch.allclose(x, y, atol=1e-4, rtol=1e-4)
    with pytest.raises(ECIFInputError):
        _tgn(U, V, 2.0, plan, dU, dV[:1])


@settings(max_examples=5, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 30), d=st.integers(1, 12), nb=st.integers(1, 4), Q=st.integers(1, 3),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
       log_scale=st.floats(-3.0, 4.0), with_ds=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_property_random_shapes(n, d, nb, Q, dtype, log_scale, with_ds, seed):
    gen = torch.Generator().manual_seed(seed)
    U, V = (torch.randn(n, d, generator=gen, dtype=torch.float64) for _ in range(2))
    dU, dV = _directions(n, d, Q, gen, dtype)
    ids = torch.randint(0, nb, (n,), generator=gen)
    dls = torch.randn(Q, generator=gen, dtype=torch.float64) if with_ds else None
    check(U.to(dtype), V.to(dtype), math.exp(log_scale), resolve_batches(ids, n), dU, dV, dls,
          f"n={n} d={d} nb={nb} Q={Q} {dtype} log_scale={log_scale}", block_m=16, block_n=16)


def test_registered():
    assert "gauss_newton_product" in triton_backend.__all__
    assert registry.resolve("gauss_newton_product", "cuda:0")[0] == "triton"


@pytest.mark.parametrize("dtype, d, mode, wide, trans", [(torch.float32, 130, "GN_MEANS", False, False),
                                                        (torch.float16, 64, "GN_PRODUCT", True, False),
                                                        (torch.float16, 64, "GN_PRODUCT", True, True)])
def test_compiles_for_hopper_without_a_gpu(dtype, d, mode, wide, trans):
    """The GPU code of the means pass (float32 tf32x3, several d slices) and of the product pass
    (float16 with B widened to float32, identity perm; row and swapped launch) never runs here: compile it
    for sm_90."""
    compile_grad_rows(dtype, d, mode=mode, identity=mode == "GN_PRODUCT", with_ds=True, wide=wide, trans=trans)
