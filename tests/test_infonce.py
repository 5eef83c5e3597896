"""Fused ``infonce`` op (torch twin, streaming path) and the ``InfoNCE`` autograd function vs autograd of
the materialising ``contrastive_loss`` (docs/math.md §2, §6.3)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ecif_fast.errors import ECIFInputError
from ecif_fast.kernels import ops
from ecif_fast.core.batches import resolve_batches
from ecif_fast.kernels.torch_ref import common
from ecif_fast.kernels.torch_ref.infonce import infonce, stream_lse
from ecif_fast.core.loss import contrastive_loss


def make(n, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    U = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    V = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return U.to(dtype), V.to(dtype)


def batches_for(kind, n, seed=0):
    if kind == "all":
        return None
    if kind == "int":
        return max(1, n // 3)
    g = torch.Generator().manual_seed(seed + 17)
    return torch.randint(0, max(1, n // 20) + 1, (n,), generator=g)  # ragged sizes, some batches big


def reference(U, V, scale, plan):
    """Loss and gradients (U, V, s = log t) by autograd of the materialising loss, in float64."""
    U = U.double().requires_grad_(True)
    V = V.double().requires_grad_(True)
    s = torch.tensor(float(scale), dtype=torch.float64).log().requires_grad_(True)
    L = contrastive_loss(U, V, s.exp(), plan)
    gU, gV, gs = torch.autograd.grad(L, (U, V, s))
    return L.detach(), gU, gV, gs


def rel(a, b):
    return float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("kind", ["all", "int", "ragged"])
@pytest.mark.parametrize("scale", [0.01, 1.0, 100.0])
@pytest.mark.parametrize("d", [1, 3, 64, 130])
@pytest.mark.parametrize("n", [1, 2, 7, 64, 300])
def test_infonce_float64_matches_autograd(n, d, scale, kind):
    U, V = make(n, d, seed=n * 1000 + d)
    plan = resolve_batches(batches_for(kind, n), n)
    rL, rU, rV, rs = reference(U, V, scale, plan)
    # streaming tiles with ragged edge tiles (7 / 16; 64 at n = 300 to keep the tile count small), and
    # None: the materialising path
    for chunk in ((7, 16) if n <= 64 else (64,)) + (None,):
        L, dU, dV, ds = infonce(U, V, scale, plan, True, chunk=chunk)
        assert L.dtype == dU.dtype == torch.float64 and L.dim() == 0 and dU.shape == U.shape
        assert abs(float(L - rL)) <= 1e-10 * max(abs(float(rL)), 1.0)
        assert rel(dU, rU) < 1e-10 and rel(dV, rV) < 1e-10
        assert abs(float(ds - rs)) <= 1e-10 * max(abs(float(rs)), float(rU.abs().max()), 1e-12)
        _, _, _, none = infonce(U, V, scale, plan, False, chunk=chunk)
        assert none is None


def test_module_chunk_constant_selects_streaming(monkeypatch):
    """The module default chunk is read at call time; patching it forces the streaming path."""
    U, V = make(50, 5, seed=3)
    plan = resolve_batches(None, 50)
    dense = infonce(U, V, 4.0, plan, True)
    monkeypatch.setattr(common, "CHUNK", 8)
    calls = []
    mod = sys.modules["ecif_fast.kernels.torch_ref.infonce"]  # the package re-exports the function name
    real = mod._batch_stream
    monkeypatch.setattr(mod, "_batch_stream", lambda *a: calls.append(1) or real(*a))
    streamed = infonce(U, V, 4.0, plan, True)
    assert calls
    for a, b in zip(dense, streamed):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_stream_lse_matches_logsumexp_with_large_logits():
    U, V = make(37, 4, seed=5)
    U[3] = 500 * V[11]  # one logit of 500 dominates row 3 and column 11
    S = 2.0 * (U @ V.T)
    r, c = stream_lse(U, V, torch.tensor(2.0, dtype=torch.float64), 6)
    assert torch.allclose(r, torch.logsumexp(S, 1), rtol=1e-14, atol=1e-12)
    assert torch.allclose(c, torch.logsumexp(S, 0), rtol=1e-14, atol=1e-12)


def test_dominant_pair_is_finite_and_exact():
    """p → 1 on a row and a column (logit 1000 vs ~1): the fused gradient stays finite and exact."""
    U, V = make(40, 6, seed=8)
    U[5] = 1000 * V[5]
    U[9] = 800 * V[20]
    plan = resolve_batches(None, 40)
    rL, rU, rV, rs = reference(U, V, 1.0, plan)
    L, dU, dV, ds = infonce(U, V, 1.0, plan, True, chunk=7)
    assert torch.isfinite(dU).all() and torch.isfinite(dV).all()
    assert abs(float(L - rL)) <= 1e-10 * abs(float(rL))
    assert rel(dU, rU) < 1e-10 and rel(dV, rV) < 1e-10


# Low precision: inputs rounded to the dtype, compared with float64 autograd on the *same rounded*
# values, so only accumulation error counts (float32 everywhere). Relative to the largest entry.
LOW_TOL = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}


@pytest.mark.parametrize("dtype", list(LOW_TOL))
@pytest.mark.parametrize("kind", ["all", "ragged"])
@pytest.mark.parametrize("scale", [1.0, 100.0])
@pytest.mark.parametrize("n,d", [(7, 3), (64, 130), (300, 64)])
def test_infonce_low_precision_accumulates_in_float32(n, d, scale, kind, dtype):
    U, V = make(n, d, seed=n + d, dtype=dtype)
    plan = resolve_batches(batches_for(kind, n), n)
    rL, rU, rV, rs = reference(U, V, scale, plan)
    tol = LOW_TOL[dtype] * (1 + scale / 10)  # logit rounding grows with t·|u||v|
    for chunk in (16, None):
        L, dU, dV, ds = infonce(U, V, scale, plan, True, chunk=chunk)
        assert L.dtype == dU.dtype == torch.float32
        assert abs(float(L) - float(rL)) <= tol * max(abs(float(rL)), 1.0)
        assert rel(dU, rU) < tol and rel(dV, rV) < tol
        assert abs(float(ds) - float(rs)) <= tol * max(abs(float(rs)), float(rU.abs().max()))


@pytest.mark.parametrize("kind", ["all", "int", "ragged"])
def test_infonce_loss_autograd_function(kind, monkeypatch):
    """``ops.infonce_loss``: value and gradients (U, V and the scale t) equal autograd of the loss."""
    monkeypatch.setattr(common, "CHUNK", 16)
    U, V = make(70, 9, seed=11)
    t0 = 7.0
    batches = batches_for(kind, 70)
    plan = resolve_batches(batches, 70)
    Ur, Vr = U.clone().requires_grad_(True), V.clone().requires_grad_(True)
    tr = torch.tensor(t0, dtype=torch.float64, requires_grad=True)
    rL = contrastive_loss(Ur, Vr, tr, plan)
    (3.0 * rL).backward()
    Ua, Va = U.clone().requires_grad_(True), V.clone().requires_grad_(True)
    ta = torch.tensor(t0, dtype=torch.float64, requires_grad=True)
    L = ops.infonce_loss(Ua, Va, ta, batches, backend="torch")
    assert L.requires_grad and L.dim() == 0
    (3.0 * L).backward()
    assert abs(float(L - rL)) <= 1e-12 * abs(float(rL))
    assert rel(Ua.grad, Ur.grad) < 1e-10 and rel(Va.grad, Vr.grad) < 1e-10
    assert abs(float(ta.grad - tr.grad)) <= 1e-10 * max(abs(float(tr.grad)), 1.0)


def test_infonce_loss_scale_number_and_half_inputs():
    U, V = make(20, 4, seed=12, dtype=torch.float16)
    Ua, Va = U.clone().requires_grad_(True), V.clone().requires_grad_(True)
    L = ops.infonce_loss(Ua, Va, 5.0, 4, backend="torch")
    assert L.dtype == torch.float32
    L.backward()
    assert Ua.grad.dtype == torch.float16 and Va.grad.dtype == torch.float16
    _, rU, rV, _ = reference(U, V, 5.0, resolve_batches(4, 20))
    assert rel(Ua.grad.float(), rU) < 2e-3 and rel(Va.grad.float(), rV) < 2e-3
    # only the inputs that need it get a gradient; no graph is kept inside the op
    Vb = V.clone().requires_grad_(True)
    ops.infonce_loss(U, Vb, torch.tensor(5.0), None, backend="torch").backward()
    assert Vb.grad is not None


def test_raw_op_and_validation():
    U, V = make(10, 3, seed=13)
    L, dU, dV, ds = ops.infonce(U, V, 2.0, 5, with_scale=True, backend="torch")
    rL, rU, rV, rs = reference(U, V, 2.0, resolve_batches(5, 10))
    assert rel(dU, rU) < 1e-12 and abs(float(ds - rs)) < 1e-12 * abs(float(rs))
    with pytest.raises(ECIFInputError):
        ops.infonce_loss(U, V[:9], 1.0, backend="torch")
    with pytest.raises(ECIFInputError):
        ops.infonce_loss(U, V, float("inf"), backend="torch")
    with pytest.raises(ECIFInputError):
        ops.infonce_loss(U.long(), V.long(), 1.0, backend="torch")
    bad = U.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ECIFInputError):
        ops.infonce(bad, V, 1.0, backend="torch")


MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    torch.set_num_threads(2)
    from ecif_fast.core.batches import resolve_batches
    from ecif_fast.kernels.torch_ref.infonce import infonce
    n, d = 16384, 64
    g = torch.Generator().manual_seed(0)
    U = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    V = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    plan = resolve_batches(None, n)
    infonce(U[:300], V[:300], 10.0, resolve_batches(None, 300), True, chunk=64)  # warm up allocator/BLAS
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss, dU, dV, ds = infonce(U, V, 10.0, plan, True)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert torch.isfinite(loss) and torch.isfinite(dU).all()
    print((after - before) * 1024 / 2**20)  # ru_maxrss is in KiB on Linux
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss units are Linux-specific")
def test_all_negatives_streaming_memory_is_linear_in_n():
    """n = 16384 "all" negatives: one n x n float32 score matrix alone would be 1 GiB; the streaming
    twin must stay under 256 MiB of peak-RSS growth. A fresh process so earlier tests' peaks don't hide it."""
    env = dict(os.environ, OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    growth_mib = float(out.stdout.strip().splitlines()[-1])
    assert growth_mib < 256, f"peak RSS grew by {growth_mib:.0f} MiB"


def _cpu_infonce_backends():
    """Backends other than the twin that run ``infonce`` on the CPU here (Triton's CPU interpreter is
    exercised by its own tests)."""
    from ecif_fast.errors import BackendUnavailableError
    from ecif_fast.kernels import registry

    names = []
    for name, ok in registry.available_backends().items():
        if ok is not True or name in ("torch", "triton"):
            continue
        try:
            registry.resolve("infonce", "cpu", name)
        except BackendUnavailableError:
            continue
        names.append(name)
    return names


@pytest.mark.parametrize("backend", _cpu_infonce_backends() or [pytest.param("none", marks=pytest.mark.skip(
    reason="no other CPU backend implements infonce here"))])
@pytest.mark.parametrize("kind", ["all", "int", "ragged"])
def test_infonce_loss_function_over_backend_matches_twin(backend, kind):
    """The autograd Function is backend-agnostic: any backend's raw op gives the twin's loss and gradients."""
    U, V = make(130, 17, seed=14)
    batches = batches_for(kind, 130)
    out = []
    for be in ("torch", backend):
        Ua, Va = U.clone().requires_grad_(True), V.clone().requires_grad_(True)
        ta = torch.tensor(6.0, dtype=torch.float64, requires_grad=True)
        L = ops.infonce_loss(Ua, Va, ta, batches, backend=be)
        out.append((L.detach(),) + torch.autograd.grad(L, (Ua, Va, ta)))
    for a, b in zip(out[1], out[0]):
        assert float((a - b).abs().max()) <= 1e-10 * max(float(b.abs().max()), 1.0)
