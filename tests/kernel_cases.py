"""Shared inputs and references for the kernel tests (lse / infonce over every backend)."""
from __future__ import annotations

import math
import os

import pytest
import torch

from ecif_fast.core.batches import BatchPlan, resolve_batches

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
SCALES = [0.01, 1.0, 100.0]


def brute_lse64(U, V, scale, plan: BatchPlan):
    """float64 ``torch.logsumexp`` of every batch's full score matrix."""
    U, V = U.double(), V.double()
    row = torch.empty(plan.n, dtype=torch.float64)
    col = torch.empty(plan.n, dtype=torch.float64)
    for idx in plan.groups():
        S = float(scale) * (U[idx] @ V[idx].T)
        row[idx] = torch.logsumexp(S, 1)
        col[idx] = torch.logsumexp(S, 0)
    return row, col


def unit(n, d, gen, dtype=torch.float64):
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    return torch.nn.functional.normalize(x, dim=1).to(dtype)


def shifted_logits(n, d, gen, scale, spread=4.0):
    """Float64 ``U, V (n, d)`` with ``u_i0 = v_j0 = 1`` and small other components: every score is
    ``scale·(1 + O(spread/scale))``, so ``|S| ≈ scale`` while each line spreads by about ``spread`` (its
    softmax is neither uniform nor one-hot). A rounded log-sum-exp is off by ``eps·scale`` there, which
    the weights of a line would inherit. The first component is what :func:`constant_direction` moves."""
    a = math.sqrt(spread / (scale * math.sqrt(max(d - 1, 1))))
    U = torch.randn(n, d, generator=gen, dtype=torch.float64) * a
    V = torch.randn(n, d, generator=gen, dtype=torch.float64) * a
    U[:, 0] = V[:, 0] = 1.0
    return U, V


def constant_direction(n, d, Q=1):
    """``dU (Q, n, d)``: ``δu_i = e_0`` for every pair, so with :func:`shifted_logits` (``v_j0 = 1``)
    ``δS_ij = t`` for all ``i, j`` — a shift of every score of a batch by the same amount, which changes
    no softmax: the Gauss–Newton product and both influence parts along it are 0."""
    dU = torch.zeros(Q, n, d, dtype=torch.float64)
    dU[:, :, 0] = 1.0
    return dU


def ragged_ids(n, gen):
    """Random batch ids: a few batches of random sizes, including singletons when n allows."""
    k = max(1, n // 5)
    ids = torch.randint(0, k, (n,), generator=gen)
    if n >= 3:
        ids[0] = k + 7  # a singleton batch
    return ids


def directions(n, d, Q, gen, with_ds):
    """Random float64 query directions ``dU, dV (Q, n, d)`` and ``ds (Q,)`` (None unless ``with_ds``)."""
    dU = torch.randn(Q, n, d, generator=gen, dtype=torch.float64)
    dV = torch.randn(Q, n, d, generator=gen, dtype=torch.float64)
    ds = torch.randn(Q, generator=gen, dtype=torch.float64) if with_ds else None
    return dU, dV, ds


def mixed_plan(n, gen):
    """n ≥ 308 pairs: one multi-tile batch (per-thread partials in the C++ kernels), one just over a 96-pair
    tile, and many small ones, in random order."""
    ids = torch.cat([torch.zeros(210, dtype=torch.int64), torch.ones(97, dtype=torch.int64),
                     torch.arange(2, 2 + n - 307)])
    return resolve_batches(ids[torch.randperm(n, generator=gen)], n)


def on_every_isa_and_thread_count(monkeypatch, call, repeats: int = 1):
    """Run ``call()`` ``repeats`` times under every compiled C++ ISA (``ECIF_FAST_CPU_ISA``) on 1 and 2 torch
    threads. Yields ``(tag, [outputs])``; the thread count is back to 1 before each yield."""
    from ecif_fast import _C
    from ecif_fast.kernels import cpp_backend

    for isa in _C.supported_isas():
        monkeypatch.setenv(cpp_backend.ISA_ENV_VAR, isa)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs = [call() for _ in range(repeats)]
            torch.set_num_threads(1)
            yield f"isa={isa} threads={threads}", outs


# ---------------------------------------------------------------------------------------------------
# Where the Triton kernel tests run: ``ECIF_FAST_TEST_DEVICE=cpu`` (default; Triton's interpreter, what CI
# runs) or ``cuda`` (compiled kernels on a GPU: ``benchmarks/gpu_check.py`` sets it).

TEST_DEVICE = os.environ.get("ECIF_FAST_TEST_DEVICE", "cpu").strip().lower() or "cpu"
if TEST_DEVICE not in ("cpu", "cuda"):
    raise ValueError(f"ECIF_FAST_TEST_DEVICE must be 'cpu' or 'cuda', got {TEST_DEVICE!r}")
ON_CUDA = TEST_DEVICE == "cuda"

# tests of the CPU interpreter itself (fresh-process import, errors for CPU tensors without it, ...): CI runs
# them in cpu mode; in cuda mode they are not a missing feature, just beside the point
cpu_interpreter_only = pytest.mark.skipif(ON_CUDA, reason="CPU-interpreter test (runs in cpu mode, as in CI)")


def _to(x, device):
    if torch.is_tensor(x):
        return x.to(device) if x.device.type == "cpu" else x  # differentiable; meta tensors stay put
    if isinstance(x, (tuple, list)):
        return type(x)(_to(y, device) for y in x)
    return x


def _back(x, device):
    if torch.is_tensor(x):
        assert x.device.type == device.type, f"output on {x.device}, the inputs were on {device}"
        return x.cpu()  # differentiable, so autograd through the op reaches CPU leaves
    if isinstance(x, (tuple, list)):
        return type(x)(_back(y, device) for y in x)
    return x


def on_test_device(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on :data:`TEST_DEVICE`: CPU tensor arguments (also inside tuples/lists) are
    moved there, and tensor outputs are checked to be on that device type (the ops' contract: outputs on
    U's device) and moved back to the CPU, so the references stay on the CPU. A no-op in cpu mode apart from
    the device check. ``BatchPlan``s stay on the CPU, as ``resolve_batches`` makes them: the Triton backend
    copies ``perm``/``offsets`` to the tensors' device itself. Tensors on other devices (``meta``) pass
    unchanged, so error paths keep their messages."""
    if ON_CUDA and not torch.cuda.is_available():
        raise RuntimeError("ECIF_FAST_TEST_DEVICE=cuda but torch.cuda.is_available() is False")
    device = torch.device(TEST_DEVICE)
    out = fn(*_to(args, device), **{k: _to(v, device) for k, v in kwargs.items()})
    return _back(out, device)
