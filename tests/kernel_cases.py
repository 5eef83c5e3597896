"""Shared inputs and references for the kernel tests (lse / infonce over every backend), and the Triton tests'
helpers: the op on the test device, ahead-of-time sm_90 compiles."""
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


def triton_op(name: str):
    """The Triton backend's op ``name`` run through :func:`on_test_device`. Triton is a dev dependency: when
    it does not import, the tests that call the op fail, they do not skip."""
    from ecif_fast.kernels import triton_backend

    def call(*args, **kwargs):
        assert triton_backend.available(), f"triton backend unavailable: {triton_backend.unavailable_reason()}"
        return on_test_device(getattr(triton_backend, name), *args, **kwargs)

    return call


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time sm_90 compiles of the Triton kernels (no GPU needed: triton ships ptxas), so that a kernel the
# GPU compiler rejects fails here, not only on a GPU machine.

TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def compile_sm90(kernel, sig: dict, consts: dict, cfg, aligned=(), fp_fusion=None):
    """``triton.compile`` of ``kernel`` for sm_90 with the types ``sig`` (the constexprs ``consts`` are added),
    the warps and stages of the tile config ``cfg`` and the arguments ``aligned`` specialised as 16-byte
    aligned / multiples of 16, as a launch does; ``fp_fusion``: ``enable_fp_fusion`` (as launched: None for
    triton's default). Checks the shared memory against an H100's. Skips when triton was imported with
    ``TRITON_INTERPRET=1`` (its kernels are interpreted then, not compiled)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not isinstance(kernel, triton.runtime.jit.JITFunction):
        pytest.skip("triton was imported with TRITON_INTERPRET=1: its kernels are interpreted, not compiled")
    sig = dict(sig, **{k: "constexpr" for k in consts if k not in sig})
    attrs = {(kernel.arg_names.index(k),): [["tt.divisibility", 16]] for k in aligned}
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    if fp_fusion is not None:
        options["enable_fp_fusion"] = fp_fusion
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options=options)
    assert compiled.metadata.shared <= 227 * 1024, "needs more shared memory than an H100 has"
    return compiled


def dot_consts(dtype) -> dict:
    """The ``tl.dot`` constexprs of a GPU launch for inputs of ``dtype`` (default fp32 precision)."""
    from ecif_fast.kernels.triton_backend.launch import TL_DTYPES

    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return dict(DOT_DTYPE=TL_DTYPES[dtype], ACC_DTYPE=TL_DTYPES[acc],
                PRECISION={torch.float32: "tf32x3", torch.float64: "ieee"}.get(dtype, "tf32"))


def ptxas_spill_bytes(compiled) -> int:
    """Spill stores that triton's bundled ptxas reports for the compiled kernel's PTX (sm_90a)."""
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90)
    ptxas = getattr(ptxas, "path", ptxas)
    with tempfile.TemporaryDirectory() as tmp:
        with open(f"{tmp}/k.ptx", "w") as f:
            f.write(compiled.asm["ptx"])
        res = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", f"{tmp}/k.ptx", "-o", f"{tmp}/k.cubin"],
                             capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    found = re.findall(r"(\d+) bytes spill stores", res.stderr)
    assert found, res.stderr
    return sum(int(x) for x in found)


def compile_grad_rows(dtype, d, *, mode: str, identity: bool, with_ds: bool, wide: bool, trans: bool = False):
    """sm_90 compile of the infonce / Gauss–Newton row-tile kernel in pass ``mode`` (a name:
    ``"LINE_STATS"``, ``"INFONCE"``, ``"GN_MEANS"``, ``"GN_PRODUCT"``) with the first GPU config for
    (dtype, d), specialised as a launch would be: pointers 16-byte aligned, ``n`` and (when it is) ``d``
    multiples of 16; ``trans``: the swapped launch (tile sizes exchanged, as ``run_passes`` does)."""
    from ecif_fast.kernels.triton_backend import infonce_module as mod
    from ecif_fast.kernels.triton_backend.launch import TL_DTYPES

    directions = mode in ("GN_MEANS", "GN_PRODUCT")
    cfg = mod._gpu_configs(dtype, d, directions=directions)[0]
    name = TRITON_TYPES[dtype]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    acc_name = TRITON_TYPES[acc]
    low = dtype in (torch.float16, torch.bfloat16)
    sig = {k: "*" + name for k in ("A", "B", "dA", "dB")}
    sig.update({k: "*" + acc_name for k in ("top_a", "top_b", "l_a", "l_b", "m_a", "m_b", "ds_ptr", "out",
                                            "row_out", "scale_ptr")})
    sig.update({k: "*i64" for k in ("arg_a", "arg_b")})
    sig.update({k: "*i32" for k in ("perm", "offsets", "tile_start", "tile_batch")})
    sig.update(n="i32", d="i32")
    bm, bn = (cfg.block_n, cfg.block_m) if trans else (cfg.block_m, cfg.block_n)
    consts = dict(MODE=getattr(mod, mode).value, WITH_DS=with_ds, ROW_TERMS=True, TRANS=trans, BLOCK_M=bm,
                  BLOCK_N=bn, BLOCK_K=cfg.block_k, SINGLE_K=d <= cfg.block_k, IDENTITY=identity,
                  G_SPLIT=low and not wide, G_WIDE=wide, LOW_DTYPE=TL_DTYPES[dtype if low else acc],
                  **dot_consts(dtype))
    aligned = [k for k, v in sig.items() if v.startswith("*")] + ["n"] + (["d"] if d % 16 == 0 else [])
    return compile_sm90(mod._grad_rows_kernel, sig, consts, cfg, aligned, fp_fusion=False)  # as launched


def run_in_fresh_interpreter(code: str) -> None:
    """Run ``code`` in a fresh Python with ``TRITON_INTERPRET=1`` set before triton is imported (the usual way to
    run Triton on the CPU: ``triton.jit`` itself returns interpreted kernels then); it must print ``OK``."""
    import subprocess
    import sys
    import textwrap

    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env.pop("ECIF_FAST_BACKEND", None)
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr
