"""Triton fused ``infonce`` (loss + gradients) vs a float64 brute force and the torch twin (SPEC §2, §4,
§6.3), on the CPU in Triton's interpreter (``TRITON_INTERPRET=1`` per test, via monkeypatch), or with
``ECIF_FAST_TEST_DEVICE=cuda`` the compiled kernels on a GPU (``kernel_cases.on_test_device``).

The interpreter is slow, so the issue grid is covered by a subset rather than the full product:
n ∈ {1, 2, 7, 48, 64, 100} with "all" and batch (ragged, or fixed size 24) negatives, d rotating over
{1, 3, 64, 130} (130 > the 64-wide d slice: several slices and a partial one), every dtype at every
scale ∈ {0.01, 1, 100} somewhere, with and without ``dlog_scale``; 16/32-row tiles give several
row and column tiles and partial ones; n = 300 once with 64-wide tiles. Plus adversarial logits,
autograd of ``infonce_loss``, a hypothesis property test and ahead-of-time sm_90 compiles.

Tolerances (per dtype, from a float64 brute force on the inputs as the kernel sees them):
  * ``δ = 2·eps·(t·max‖u‖·max‖v‖·√d + log B + 1)``: absolute error of a logit / log-sum-exp
    (eps of the accumulation dtype: float32, float64 for float64 inputs);
  * ``η = δ + ε_G + eps·√B`` relative error of a ``G`` entry times a ``B`` row summed over ``B``
    columns; ``ε_G`` is the rounding of ``G`` in the ``G·B`` product: 2⁻¹⁶ (bfloat16, head +
    remainder split), 2⁻²² (float16), eps (float32 / float64);
  * dU, dV: ``2·η·t·max_i Σ_j (P_ij + Qc_ij + 2δ_ij)·max|v|`` (``|G|`` bounded termwise);
  * loss: ``4·B_total·δ``; dlog_scale: ``2·Σ_ij ((P+Qc+2I)·η·|S| + |G|·δ)``.
The twin (float32 for non-float64 inputs) is checked with twice these. For non-float64 inputs the
error must also stay within 4 × the twin's own error plus a floor (``4(ε_G + eps)`` times the
magnitudes above without δ; loss: ``4·eps·n·(t·max‖u‖·max‖v‖ + log B + 1)``).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ecif_fast.kernels import ops, registry, triton_backend
from ecif_fast.kernels.batching import BatchPlan, resolve_batches
from ecif_fast.kernels.torch_ref.infonce import infonce as twin_infonce
from ecif_fast.kernels.torch_ref.loss import contrastive_loss
from kernel_cases import ON_CUDA, on_test_device, ragged_ids, unit


def _tinfo(*args, **kwargs):
    assert triton_backend.available(), f"triton backend unavailable: {triton_backend.unavailable_reason()}"
    return on_test_device(triton_backend.infonce, *args, **kwargs)


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    if ON_CUDA:  # compiled kernels on the GPU (ECIF_FAST_TEST_DEVICE=cuda)
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    monkeypatch.delenv("ECIF_FAST_TRITON_FP32_DOT", raising=False)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


G_EPS = {torch.bfloat16: 2.0 ** -16, torch.float16: 2.0 ** -22, torch.float32: torch.finfo(torch.float32).eps,
         torch.float64: torch.finfo(torch.float64).eps}


def brute(U, V, scale, plan):
    """float64 dense reference: loss, dU, dV, dlog_scale and the tolerances of the module docstring."""
    dtype = U.dtype
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    U, V = U.double(), V.double()
    n, d = U.shape
    t = float(scale)
    loss = torch.zeros((), dtype=torch.float64)
    ds = torch.zeros((), dtype=torch.float64)
    dU, dV = torch.zeros_like(U), torch.zeros_like(V)
    tol_g = tol_s = floor_g = floor_s = 0.0
    bmax = int(plan.sizes.max()) if plan.num_batches else 1
    L = t * float(U.norm(dim=1).max()) * float(V.norm(dim=1).max()) if n else 0.0
    delta = 2 * eps * (abs(L) * math.sqrt(d) + math.log(bmax) + 1)
    eta = delta + G_EPS[dtype] + eps * math.sqrt(bmax)
    vmax = float(torch.maximum(U.abs().max(), V.abs().max())) if n else 0.0
    for idx in plan.groups():
        S = t * (U[idx] @ V[idx].T)
        r, c = torch.logsumexp(S, 1), torch.logsumexp(S, 0)
        P, Qc = torch.exp(S - r[:, None]), torch.exp(S - c[None, :])
        eye = torch.eye(len(idx), dtype=torch.float64)
        G = P + Qc - 2 * eye
        loss += (r + c - 2 * S.diagonal()).sum()
        dU[idx] = t * (G @ V[idx])
        dV[idx] = t * (G.T @ U[idx])
        ds += (G * S).sum()
        absG = P + Qc + 2 * eye
        tol_g = max(tol_g, 2 * eta * abs(t) * vmax * float(torch.maximum(absG.sum(1).max(), absG.sum(0).max())))
        tol_s += 2 * float((absG * eta * S.abs() + G.abs() * delta).sum())
        floor_g = max(floor_g, abs(t) * vmax * float(torch.maximum(absG.sum(1).max(), absG.sum(0).max())))
        floor_s += float((absG * S.abs()).sum())
    tol_loss = 4 * plan.n * delta + 4 * eps * float(loss.abs())
    c = 4 * (G_EPS[dtype] + eps)
    floors = (4 * eps * plan.n * (abs(L) + math.log(bmax) + 1), c * floor_g, c * floor_g, c * floor_s)
    return (loss, dU, dV, ds), (tol_loss, tol_g, tol_g, tol_s + 4 * eps * float(ds.abs())), floors


def check(U, V, scale, plan, with_scale, tag, **kw):
    out = _tinfo(U, V, scale, plan, with_scale, **kw)
    out_dt = torch.float64 if U.dtype == torch.float64 else torch.float32
    loss, dU, dV, ds = out
    assert loss.dtype == dU.dtype == dV.dtype == out_dt and loss.shape == () and dU.shape == dV.shape == U.shape, tag
    assert (ds is None) == (not with_scale), tag
    if with_scale:
        assert ds.dtype == out_dt and ds.shape == (), tag
    for x in out:
        assert x is None or bool(torch.isfinite(x).all()), tag
    ref, tols, floors = brute(U, V, scale, plan)
    twin = twin_infonce(U, V, scale, plan, with_scale)
    names = ("loss", "dU", "dV", "dlog_scale")
    for k in range(4 if with_scale else 3):
        errs = {}
        for r, f, what in ((ref[k], 1, "float64"), (twin[k], 2, "twin")):
            err = float((out[k].double() - r.double()).abs().max()) if out[k].numel() else 0.0
            assert err <= f * tols[k], f"{names[k]} vs {what}, {tag}: max abs error {err:.3g} > {f * tols[k]:.3g}"
            errs[what] = err
        if U.dtype != torch.float64 and out[k].numel():  # no less accurate than the float32 twin
            bound = 4 * float((twin[k].double() - ref[k]).abs().max()) + floors[k]
            assert errs["float64"] <= bound, f"{names[k]}, {tag}: error {errs['float64']:.3g} > 4 × twin's + floor {bound:.3g}"
    return out


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SCALES = [0.01, 1.0, 100.0]
DS = [1, 3, 64, 130]


def _grid_cases():
    """n × batches, d rotating; each (n, batches) runs the four dtypes with rotating scales."""
    cases = []
    k = 0
    for n, batches in ((1, "all"), (2, "all"), (2, "ragged"), (7, "all"), (7, "ragged"), (64, "all"),
                       (64, "ragged"), (48, "size"), (100, "all")):
        cases.append((n, DS[k % 4], batches, k))
        k += 1
    return cases


@pytest.mark.parametrize("n, d, batches, k", _grid_cases())
def test_grid_vs_bruteforce_and_twin(n, d, batches, k):
    gen = torch.Generator().manual_seed(100 * n + d)
    plan = resolve_batches({"all": None, "ragged": ragged_ids(n, gen), "size": 24}[batches], n)
    U64, V64 = unit(n, d, gen), unit(n, d, gen)
    for j, dtype in enumerate(DTYPES):
        if dtype == torch.float64 and d == 130 and n > 7:
            continue  # float64 at d = 130 is the slowest interpreted case: covered at n = 7 and below
        scale = SCALES[(k + j) % 3]
        check(U64.to(dtype), V64.to(dtype), scale, plan, (k + j) % 2 == 0,
              f"n={n} d={d} batches={batches} {dtype} scale={scale}", block_m=16 if n > 32 else 32)


def test_every_dtype_scale_pair_covered():
    seen = set()
    for _, _, _, k in _grid_cases():
        for j, dtype in enumerate(DTYPES):
            seen.add((dtype, SCALES[(k + j) % 3]))
    assert len(seen) == len(DTYPES) * len(SCALES)


def test_n300_with_large_tiles():
    """The grid's largest n: "all" (5 × 5 tiles of 64, a partial one) and ragged batches."""
    gen = torch.Generator().manual_seed(300)
    n, d = 300, 64
    U, V = unit(n, d, gen, torch.bfloat16), unit(n, d, gen, torch.bfloat16)
    check(U, V, 100.0, resolve_batches(None, n), True, "n=300 all bf16", block_m=64, block_n=64)
    U, V = unit(n, 3, gen, torch.float32), unit(n, 3, gen, torch.float32)
    check(U, V, 1.0, resolve_batches(ragged_ids(n, gen), n), False, "n=300 ragged fp32", block_m=64, block_n=64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_adversarial_one_pair_dominates(dtype):
    """One pair dominates its row and column (p so close to 1 that 1 − p rounds to 0 at t = 1e4);
    results stay finite and exact, with "all" and ragged batches."""
    gen = torch.Generator().manual_seed(5)
    n, d = 40, 16
    U, V = unit(n, d, gen), unit(n, d, gen)
    pi = torch.randperm(n, generator=gen)
    V[pi] = V[pi] + 20.0 * U
    U, V = U.to(dtype), V.to(dtype)
    for scale in (1.0, 1e4):
        for b in (None, ragged_ids(n, gen)):
            check(U, V, scale, resolve_batches(b, n), True, f"adversarial {dtype} scale={scale}")


def test_tolerance_can_fail():
    """The checks reject a result that is off by a little: the tolerances are not vacuous."""
    gen = torch.Generator().manual_seed(3)
    n, d = 20, 8
    U, V = unit(n, d, gen, torch.float32), unit(n, d, gen, torch.float32)
    plan = resolve_batches(7, n)
    (loss, dU, dV, ds), tols, _ = brute(U, V, 10.0, plan)
    out = _tinfo(U, V, 10.0, plan, True)
    assert float((out[1].double() - dU).abs().max()) <= tols[1]
    assert 1e-3 * float(dU.abs().max()) > tols[1] and 1e-3 * float(loss.abs()) > tols[0]
    assert 1e-3 * float(ds.abs()) > tols[3]
    # dropping one pair from its batch changes the gradients by far more than the tolerance
    other = _tinfo(U, V, 10.0, resolve_batches(torch.arange(n) // 7 + (torch.arange(n) == 6), n), True)
    assert float((other[1].double() - dU).abs().max()) > 10 * tols[1]


def test_uncovered_pairs_get_zero_gradients_and_blocked_d():
    """A plan that leaves pairs out (``BatchPlan.without``), identity perm off, d over several slices."""
    gen = torch.Generator().manual_seed(11)
    n, d = 37, 70
    U, V = unit(n, d, gen, torch.float32), unit(n, d, gen, torch.float32)
    plan = resolve_batches(ragged_ids(n, gen), n).without(torch.tensor([0, 5, 6]))
    loss, dU, dV, ds = check(U, V, 3.0, plan, True, "without", block_m=16, block_n=16, block_d=32)
    assert float(dU[[0, 5, 6]].abs().max()) == 0.0 and float(dV[[0, 5, 6]].abs().max()) == 0.0
    info = triton_backend.infonce_module.last_launch()
    assert info["interpreted"] == (not ON_CUDA) and not info["single_k"] and not info["identity"]
    assert info["config"]["block_d"] == 32


def test_infonce_loss_autograd_vs_twin():
    """ops.infonce_loss(backend="triton") through the backend-generic autograd Function: gradients
    to U, V and a tensor scale match autograd of the materialising torch loss."""
    gen = torch.Generator().manual_seed(8)
    n, d = 30, 6
    for dtype, atol in ((torch.float64, 1e-10), (torch.float32, 2e-4)):
        U0, V0 = unit(n, d, gen, dtype), unit(n, d, gen, dtype)
        ids = ragged_ids(n, gen)
        grads = []
        for which in ("triton", "twin"):
            U, V = U0.clone().requires_grad_(), V0.clone().requires_grad_()
            t = torch.tensor(7.0, dtype=dtype, requires_grad=True)
            if which == "triton":
                loss = on_test_device(ops.infonce_loss, U, V, t, ids, backend="triton")
            else:
                loss = contrastive_loss(U, V, t, resolve_batches(ids, n))
            (2.5 * loss).backward()
            grads.append((loss.detach(), U.grad, V.grad, t.grad))
        for a, b, what in zip(grads[0], grads[1], ("loss", "U", "V", "scale")):
            assert a.dtype == b.dtype, what
            err = float((a - b).abs().max())
            assert err <= atol * (1 + float(b.abs().max())), f"{what} {dtype}: {err:.3g}"
    # the raw op through the dispatcher, with_scale
    out = on_test_device(ops.infonce, U0, V0, 7.0, ids, with_scale=True, backend="triton")
    ref = ops.infonce(U0, V0, 7.0, ids, with_scale=True, backend="torch")
    for a, b in zip(out, ref):
        assert torch.allclose(a, b, atol=2e-4, rtol=1e-5)


# the autouse fixture (interpreter on) wraps all examples of one test call, so reusing it is fine
@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 40), d=st.integers(1, 20), nb=st.integers(1, 5),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
       log_scale=st.floats(-3.0, 4.0), with_scale=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_property_random_shapes(n, d, nb, dtype, log_scale, with_scale, seed):
    gen = torch.Generator().manual_seed(seed)
    U, V = torch.randn(n, d, generator=gen, dtype=torch.float64), torch.randn(n, d, generator=gen,
                                                                            dtype=torch.float64)
    ids = torch.randint(0, nb, (n,), generator=gen)
    check(U.to(dtype), V.to(dtype), math.exp(log_scale), resolve_batches(ids, n), with_scale,
          f"n={n} d={d} nb={nb} {dtype} log_scale={log_scale}", block_m=16, block_n=16)


def test_registered_and_empty():
    assert "infonce" in triton_backend.__all__
    empty = BatchPlan(0, torch.zeros(0, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
    loss, dU, dV, ds = _tinfo(torch.zeros(0, 3), torch.zeros(0, 3), 1.0, empty, True)
    assert loss.item() == 0 and dU.shape == (0, 3) and ds.item() == 0


@pytest.mark.parametrize("dtype, d, identity, mode", [(torch.bfloat16, 128, False, 0), (torch.float64, 130, True, 0),
                                                      (torch.float32, 64, True, 3)])
def test_compiles_for_hopper_without_a_gpu(dtype, d, identity, mode):
    """The GPU code path (native 16-bit tl.dot with the split G; float64 dot over several d slices;
    the statistics pass with tf32x3) never runs here: compile it ahead of time for sm_90 with the
    first-choice tile config, as a launch specialises it. The bfloat16 d = 128 gradient kernel (the
    common CLIP case) must not spill."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    compiled = compile_grad_rows(triton, GPUTarget, ASTSource, dtype, d, mode=mode, identity=identity,
                                 with_ds=False, wide=False)
    assert compiled.metadata.shared <= 227 * 1024, "needs more shared memory than an H100 has"
    if dtype == torch.bfloat16:
        assert ptxas_spill_bytes(triton, compiled) == 0


def compile_grad_rows(triton, GPUTarget, ASTSource, dtype, d, *, mode, identity, with_ds, wide):
    """``triton.compile`` of ``_grad_rows_kernel`` for sm_90 with the first GPU config for (dtype, d),
    specialised as a launch would be: pointers 16-byte aligned, ``n`` and (when it is) ``d`` multiples
    of 16."""
    mod = triton_backend.infonce_module
    lse_mod = triton_backend.lse_module
    kernel = mod._grad_rows_kernel
    if not isinstance(kernel, triton.runtime.jit.JITFunction):
        pytest.skip("triton was imported with TRITON_INTERPRET=1: its kernels are interpreted, not compiled")
    cfg = mod._gpu_configs(dtype, d, directions=mode in (1, 2))[0]
    name = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}[dtype]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    acc_name = "fp64" if acc == torch.float64 else "fp32"
    low = dtype in (torch.float16, torch.bfloat16)
    sig = {k: "*" + name for k in ("A", "B", "dA", "dB")}
    sig.update({k: "*" + acc_name for k in ("lse_a", "lse_b", "lo_a", "lo_b", "m_a", "m_b", "ds_ptr", "out",
                                            "row_out", "scale_ptr")})
    sig.update({k: "*i32" for k in ("perm", "offsets", "tile_start", "tile_batch")})
    sig.update(n="i32", d="i32")
    consts = dict(MODE=mode, WITH_DS=with_ds, ROW_TERMS=True, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                  BLOCK_D=cfg.block_d, SINGLE_K=d <= cfg.block_d, IDENTITY=identity,
                  G_SPLIT=low and not wide, G_WIDE=wide, DOT_DTYPE=lse_mod._TL_DTYPES[dtype],
                  LOW_DTYPE=lse_mod._TL_DTYPES[dtype if low else acc], ACC_DTYPE=lse_mod._TL_DTYPES[acc],
                  PRECISION={torch.float32: "tf32x3", torch.float64: "ieee"}.get(dtype, "tf32"))
    names = kernel.arg_names
    aligned = [k for k, v in sig.items() if v.startswith("*")] + ["n"] + (["d"] if d % 16 == 0 else [])
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in aligned}
    sig.update({k: "constexpr" for k in consts})
    return triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                                   "enable_fp_fusion": False})  # as launched (lse.fp_fusion)


def ptxas_spill_bytes(triton, compiled) -> int:
    """Spill stores reported by triton's bundled ptxas for the compiled kernel's PTX (sm_90a)."""
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90)
    ptxas = getattr(ptxas, "path", ptxas)
    with tempfile.TemporaryDirectory() as tmp:
        src = f"{tmp}/k.ptx"
        with open(src, "w") as f:
            f.write(compiled.asm["ptx"])
        res = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", src, "-o", f"{tmp}/k.cubin"],
                             capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    found = re.findall(r"(\d+) bytes spill stores", res.stderr)
    assert found, res.stderr
    return sum(int(x) for x in found)
