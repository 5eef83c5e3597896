"""C++ fused InfoNCE forward + backward vs the GEMM limit and a naive materialising implementation.

"All" negatives (one batch of n pairs), d = 256, float32, unit-norm embeddings, t = 20. Per size:

* ``cpp``: ``cpp_backend.infonce(U, V, t, plan, with_scale=True)`` — loss, dU, dV, d log_scale;
* ``GEMM limit`` (docs/math.md §5): 3 × the time of ``torch.mm`` of an (n×d)·(d×n) product, timed in the same
  process, interleaved with the cpp runs, on the same thread count;
* ``twin``: the streaming torch twin ``torch_ref.infonce.infonce`` (chunked torch matmuls, same contract);
* ``naive``: what a user writes — ``S = t·U@V.T``, ``log_softmax`` over rows and columns, the
  diagonal, ``autograd`` backward to U and V (materialises several n×n matrices).

Each method runs in its own subprocess (so that peak-RSS numbers are not polluted by another
method's n×n buffers); ``peak RSS`` is the growth of ``ru_maxrss`` over the process's footprint after
the inputs were created, i.e. the extra memory of one fwd+bwd. Times are minima over the repetitions.
Every worker also times ``torch.mm`` itself, so each ratio is taken against a GEMM measured in the
same process; the table shows the cpp worker's GEMM, and the cross-method ratios (naive/cpp,
twin/cpp) compare GEMM-normalised times so that a load change between workers cancels out.

Run (prints a table; about 1–2 minutes on 2 cores)::

    python benchmarks/bench_infonce_cpu.py                    # n = 4096 16384, torch.get_num_threads()
    python benchmarks/bench_infonce_cpu.py --sizes 4096 --threads 1 --reps 3
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's ecif_fast

import torch  # noqa: E402

D = 256
SCALE = 20.0


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _inputs(n: int):
    g = torch.Generator().manual_seed(0)
    U = torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=1)
    V = torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=1)
    return U.contiguous(), V.contiguous()


def _naive(U, V):
    U = U.detach().requires_grad_()
    V = V.detach().requires_grad_()
    S = SCALE * (U @ V.T)
    loss = -(torch.log_softmax(S, 1).diagonal().sum() + torch.log_softmax(S, 0).diagonal().sum())
    loss.backward()
    return loss.detach(), U.grad, V.grad


def _timed(fn, reps):
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
        del out
    return best


def worker(method: str, n: int, threads: int, reps: int) -> dict:
    torch.set_num_threads(threads)
    from ecif_fast.kernels import cpp_backend
    from ecif_fast.core.batches import resolve_batches

    U, V = _inputs(n)
    plan = resolve_batches(None, n)
    Vt = V.T.contiguous()
    if method == "cpp":
        fn = lambda: cpp_backend.infonce(U, V, SCALE, plan, True)  # noqa: E731
    elif method == "twin":
        from ecif_fast.kernels.torch_ref.infonce import infonce as twin_infonce
        fn = lambda: twin_infonce(U, V, SCALE, plan, True)  # noqa: E731
    else:
        fn = lambda: _naive(U, V)  # noqa: E731
    base = _rss_mib()
    out = fn()  # warm-up, and the peak-memory measurement (before any n x n GEMM output exists)
    peak = _rss_mib() - base
    loss = float(out[0])
    del out
    t_method, t_mm = float("inf"), float("inf")
    for _ in range(reps):  # interleaved, so that both see the same machine load
        t_method = min(t_method, _timed(fn, 1))
        t_mm = min(t_mm, _timed(lambda: torch.mm(U, Vt), 1))
    return {"method": method, "n": n, "time": t_method, "mm": t_mm, "peak_mib": peak, "loss": loss}


def run_worker(method, n, threads, reps) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--sizes", str(n),
           "--threads", str(threads), "--reps", str(reps)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-naive", action="store_true", help="skip the naive implementation and the twin")
    ap.add_argument("--worker", choices=["cpp", "twin", "naive"], help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker, a.sizes[0], a.threads, a.reps)))
        return

    from ecif_fast.kernels import cpp_backend
    if not cpp_backend.available():
        sys.exit(f"cpp backend unavailable: {cpp_backend.unavailable_reason()}")
    info = cpp_backend.info()
    isa = os.environ.get(cpp_backend.ISA_ENV_VAR, "auto")
    print(f"# fused InfoNCE fwd+bwd, 'all' negatives, d={D}, float32, t={SCALE}; threads={a.threads}; "
          f"isa={isa} (supported {info['supported_isas']}); load average at start "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; min of {a.reps} reps")
    hdr = (f"{'n':>6} | {'torch.mm':>9} | {'3×mm':>8} | {'cpp':>8} | {'cpp/3mm':>7} | {'naive':>8} | "
           f"{'naive/3mm':>9} | {'naive/cpp':>9} | {'twin':>8} | {'twin/cpp':>8} | {'cpp RSS':>9} | "
           f"{'twin RSS':>9} | {'naive RSS':>9}")
    print(hdr)
    print("-" * len(hdr))
    for n in a.sizes:
        c = run_worker("cpp", n, a.threads, a.reps)
        if a.no_naive:
            nv = tw = None
        else:
            nv = run_worker("naive", n, a.threads, a.reps)
            tw = run_worker("twin", n, a.threads, a.reps)
            for other in (nv, tw):
                rel = abs(other["loss"] - c["loss"]) / abs(other["loss"])
                assert rel < 1e-4, f"cpp and {other['method']} losses differ: {c['loss']} vs {other['loss']}"
        mm3 = 3 * c["mm"]
        naive_cols = (f"{nv['time']:8.3f} | {nv['time'] / (3 * nv['mm']):9.2f} | {(nv['time'] / nv['mm']) / (c['time'] / c['mm']):9.2f} | "
                      if nv else f"{'-':>8} | {'-':>9} | {'-':>9} | ")
        print(f"{n:>6} | {c['mm']:8.3f}s | {mm3:7.3f}s | {c['time']:7.3f}s | {c['time'] / mm3:7.2f} | "
              + naive_cols
              + (f"{tw['time']:7.3f}s | {(tw['time'] / tw['mm']) / (c['time'] / c['mm']):8.2f} | " if tw else f"{'-':>8} | {'-':>8} | ")
              + f"{c['peak_mib']:5.0f} MiB | "
              + (f"{tw['peak_mib']:5.0f} MiB | {nv['peak_mib']:5.0f} MiB" if nv else f"{'-':>9} | {'-':>9}"))
    print("Each worker (own process) times torch.mm interleaved with its method; naive/3mm uses the naive\n"
          "worker's GEMM, and naive/cpp, twin/cpp compare GEMM-normalised times, (t/mm)_other / (t/mm)_cpp,\n"
          "so that load changes between workers cancel. RSS = peak growth over the inputs' footprint.")


if __name__ == "__main__":
    main()
