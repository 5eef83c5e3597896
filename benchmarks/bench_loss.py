"""The public loss ``ecif_fast.contrastive_loss``, forward + backward, next to its twin and the GEMM limit.

Methods, "all" negatives (one batch of n pairs), d = 256, float32, ``t = 20``, gradients with respect to U and V:

* ``public``: ``ecif_fast.contrastive_loss(U, V, t)`` and ``backward()`` — the fused streaming ``infonce`` op of
  the automatic backend under its own autograd (docs/math.md §4);
* ``twin``: ``ecif_fast.core.loss.contrastive_loss`` and ``backward()`` — plain torch autograd over the
  materialised ``n × n`` scores (what Newton training and exact Hessians differentiate).

Each method runs in its own subprocess, so a peak-memory figure belongs to one method (growth of ``ru_maxrss``,
CUDA: ``max_memory_allocated``, over the inputs, for one call). Times are minima of ``--reps`` calls, each
interleaved with the score GEMM of the case (``torch.mm`` of (n×d)·(d×n), on column blocks above n = 8192): the
**GEMM limit** of docs/math.md §5 is 3 × that time. "vs twin" compares GEMM-normalised times, so a load change
between the two processes cancels out. "same result": loss and ``Σ|∂/∂U|`` agree with the twin's to 1e-3 relative.

Run::

    python benchmarks/bench_loss.py                  # n = 4096 and 16384
    python benchmarks/bench_loss.py --write          # + its section of BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's ecif_fast

import torch  # noqa: E402

from bench_ops import _mem_mib, _sync, _timed, gemm_fn, inputs  # noqa: E402  (benchmarks/bench_ops.py)
from sections import write_section  # noqa: E402  (benchmarks/sections.py)

SCALE = 20.0
D = 256
DEFAULT_SIZES = (4096, 16384)
METHODS = ("public", "twin")
SECTION = "## Public contrastive_loss (fused) vs its twin: forward + backward"


def loss_fn(method: str, U: torch.Tensor, V: torch.Tensor):
    """``() -> (loss, Σ|∂loss/∂U|)``: one forward + backward of ``method``."""
    import ecif_fast as ef
    from ecif_fast.core.batches import resolve_batches
    from ecif_fast.core.loss import contrastive_loss as twin

    plan = resolve_batches(None, U.shape[0])

    def run():
        Ug, Vg = U.detach().requires_grad_(), V.detach().requires_grad_()
        loss = ef.contrastive_loss(Ug, Vg, SCALE) if method == "public" else twin(Ug, Vg, SCALE, plan)
        loss.backward()
        return float(loss), float(Ug.grad.double().abs().sum())

    return run


def worker(method: str, n: int, device: str, threads: int, reps: int) -> dict:
    torch.set_num_threads(threads)
    U, V = inputs(n, D, device)[:2]
    fn, mm = loss_fn(method, U, V), gemm_fn(U, V, n)
    _sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    base = _mem_mib(device)
    t0 = time.perf_counter()
    loss, grad = fn()  # the peak-memory measurement (and warm-up)
    _sync(device)
    t_fn = time.perf_counter() - t0
    peak = _mem_mib(device) - base
    t_mm = _timed(mm, device)
    if reps > 1:
        t_fn = float("inf")
    for _ in range(reps if reps > 1 else 0):  # interleaved, so that both see the same machine load
        t_fn = min(t_fn, _timed(fn, device))
        t_mm = min(t_mm, _timed(mm, device))
    return {"method": method, "n": n, "time": t_fn, "mm": t_mm, "peak_mib": peak, "loss": loss, "grad": grad}


def run_worker(method: str, n: int, device: str, threads: int, reps: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, str(n), "--device", device,
           "--threads", str(threads), "--reps", str(reps)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return {"method": method, "n": n, "error": (res.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def render(results: list[dict]) -> str:
    lines = ["| n | method | time (s) | / GEMM limit | vs twin | extra memory (MiB) | same result |",
             "|---:|---|---:|---:|---:|---:|---|"]
    by = {(r["n"], r["method"]): r for r in results}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['n']} | {r['method']} | failed: {r['error']} | | | | |")
            continue
        ref = by.get((r["n"], "twin"))
        ok = ref is not None and "time" in ref
        rel = (r["time"] / r["mm"]) / (ref["time"] / ref["mm"]) if ok else float("nan")
        same = "-" if not ok else ("yes" if all(abs(r[k] - ref[k]) <= 1e-3 * abs(ref[k]) for k in ("loss", "grad"))
                                   else f"NO (loss {r['loss']:.6g}, Σ|dU| {r['grad']:.6g})")
        lines.append(f"| {r['n']} | {r['method']} | {r['time']:.3f} | {r['time'] / (3 * r['mm']):.2f} | {rel:.2f}× "
                     f"| {r['peak_mib']:.0f} | {same} |")
    return "\n".join(lines)


def machine(device: str, threads: int) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = "CPU"
    return (f"{model}, {os.cpu_count()} cores (shared), {threads} threads, torch {torch.__version__}, "
            f"load average at start {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", type=int, default=list(DEFAULT_SIZES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--write", action="store_true", help="rewrite this benchmark's section of BENCHMARKS.md")
    ap.add_argument("--worker", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker[0], int(a.worker[1]), a.device, a.threads, a.reps)))
        return
    about = machine(a.device, a.threads)
    results = []
    for n in a.sizes:
        for m in METHODS:
            results.append(run_worker(m, n, a.device, a.threads, a.reps))
            print(json.dumps(results[-1]), flush=True)
    table = render(results)
    print(table)
    if a.write:
        head = (f"{SECTION}\n\n`python benchmarks/bench_loss.py {' '.join(argv or sys.argv[1:])}` — {about}, "
                f"{time.strftime('%Y-%m-%d')}. \"All\" negatives, d = {D}, float32, t = {SCALE:g}, gradients with "
                f"respect to U and V; minimum of {a.reps} calls; GEMM limit = 3 × the score GEMM timed in the same "
                "process (docs/math.md §5); vs twin = GEMM-normalised time over the twin's; extra memory = peak "
                "growth over the inputs for one call.\n\n")
        write_section(SECTION, head + table + "\n")


if __name__ == "__main__":
    main()
