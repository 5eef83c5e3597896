"""CPU timing of the directional ops: C++ ecif_reductions / gauss_newton_product vs one C++ infonce
forward + backward of the same shape, and vs the torch twins. Plain script, prints a table.

    python benchmarks/bench_directional_cpu.py                     # both default problems
    python benchmarks/bench_directional_cpu.py --n 16384 --d 256 --batch all --threads 2

Default problems (float32, unit-norm embeddings, t = 20, Q = 1, with dlog_scale):
  * "all" negatives, n = 16384, d = 256;
  * batch negatives, n = 65536, batches of 512, d = 512 (``--n 262144`` for the full-size problem:
    ~2 GiB of inputs plus the ops' packed panels and partials).
Each op runs once to warm up, then the best of ``--repeats`` timings is reported (the twins run once,
they are slow). The ratio column is time / (cpp infonce fwd+bwd).
"""
from __future__ import annotations

import argparse
import time

import torch

from ecif_fast.kernels import cpp_backend
from ecif_fast.kernels import torch_ref
from ecif_fast.core.batches import resolve_batches


def best_time(fn, repeats: int, warmup: bool = True) -> float:
    if warmup:
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def problem(n: int, d: int, Q: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    U = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    V = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    dU = torch.randn(Q, n, d, generator=g) / d ** 0.5
    dV = torch.randn(Q, n, d, generator=g) / d ** 0.5
    ds = torch.randn(Q, generator=g)
    return U, V, dU, dV, ds


def run(n: int, d: int, batch, threads: int, Q: int, repeats: int, twins: bool) -> list[tuple[str, float]]:
    torch.set_num_threads(threads)
    U, V, dU, dV, ds = problem(n, d, Q)
    plan = resolve_batches(None if batch == "all" else int(batch), n)
    t = 20.0
    rows = [("cpp infonce fwd+bwd", best_time(lambda: cpp_backend.infonce(U, V, t, plan, True), repeats))]
    rows.append((f"cpp ecif_reductions Q={Q}",
                 best_time(lambda: cpp_backend.ecif_reductions(U, V, t, plan, dU, dV, ds), repeats)))
    rows.append((f"cpp ecif_reductions Q={Q} taylor",
                 best_time(lambda: cpp_backend.ecif_reductions(U, V, t, plan, dU, dV, ds, "taylor"), repeats)))
    rows.append((f"cpp gauss_newton_product Q={Q}",
                 best_time(lambda: cpp_backend.gauss_newton_product(U, V, t, plan, dU, dV, ds), repeats)))
    if twins:
        rows.append((f"torch twin ecif_reductions Q={Q}",
                     best_time(lambda: torch_ref.ecif_reductions(U, V, t, plan, dU, dV, ds), 1, warmup=False)))
        rows.append((f"torch twin gauss_newton_product Q={Q}",
                     best_time(lambda: torch_ref.gauss_newton_product(U, V, t, plan, dU, dV, ds), 1, warmup=False)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, help="pairs (default: both default problems)")
    ap.add_argument("--d", type=int, default=None)
    ap.add_argument("--batch", default=None, help="'all' or a batch size")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--queries", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-twins", action="store_true", help="skip the (slow) torch twins")
    a = ap.parse_args()
    if a.n is None:
        problems = [(16384, 256, "all"), (65536, 512, "512")]
    else:
        problems = [(a.n, a.d or 256, a.batch or "all")]
    print(f"ecif_fast C++ directional ops, float32, {a.threads} threads, isa={cpp_backend.info()['supported_isas'][0]}"
          f" (ECIF_FAST_CPU_ISA={cpp_backend._isa()})")
    for n, d, batch in problems:
        rows = run(n, d, batch, a.threads, a.queries, a.repeats, not a.no_twins)
        base = rows[0][1]
        print(f"\nn={n} d={d} batches={batch}")
        print(f"  {'op':40s} {'seconds':>10s} {'x infonce':>10s}")
        for name, sec in rows:
            print(f"  {name:40s} {sec:10.3f} {sec / base:10.2f}")


if __name__ == "__main__":
    main()
