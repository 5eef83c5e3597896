"""Embedding-space ops, every backend side by side: time, GEMM-limit ratio and peak memory.

Ops: ``infonce`` (fused loss forward+backward), ``ecif_reductions`` (one query, exact weights) and
``gauss_newton_product`` (one query). Cases:

* ``all``: "all" negatives (one batch of n pairs), n ∈ {4096, 16384, 65536}, d = 256;
* ``batch``: batch negatives, n = 262144, B = 512, d = 512.

Methods: every backend that serves the device (``cpp`` and the ``torch`` twin on CPU; ``triton`` and the twin on
CUDA) and, for ``infonce``, ``naive`` — what a user writes: ``S = t·U@V.T`` (``bmm`` per batch), ``log_softmax``
over rows and columns, autograd backward (materialises the score matrices; not run where they would not fit).

"same result": the method's first output (loss, or Σ|positive|, or Σ|gU|) agrees with the fastest backend's to
1e-3 relative. Inputs: unit-norm random embeddings, ``t = 20``, query directions ``dU, dV ~ N(0, 1/d)``, fp32.
Each (op, case, method) runs in its own subprocess, so a peak-memory figure belongs to one method:
CPU: growth of ``ru_maxrss`` over the footprint after the inputs exist (one call, outputs included);
CUDA: ``torch.cuda.max_memory_allocated`` growth. Times are minima of ``--reps`` calls, and every worker
also times the score GEMM of its case (``torch.mm`` of (n×d)·(d×n), or ``bmm`` over the batches) interleaved
with its own calls (for "all" above n = 8192 on column blocks of 8192, without an n×n output): the
**GEMM limit** of docs/math.md §5 is 3 × that time. Ratios between methods compare
GEMM-normalised times, ``(t/gemm)_a / (t/gemm)_b``, so a load change between workers cancels out.

Run::

    python benchmarks/bench_ops.py                          # every case (long at n = 65536: tens of minutes)
    python benchmarks/bench_ops.py --cases all:4096 all:16384 batch:262144 --write   # + BENCHMARKS.md section
    python -m pytest benchmarks/bench_ops.py -o python_files='bench_*.py' --benchmark-only   # small sizes
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's ecif_fast

import torch  # noqa: E402

from sections import write_section  # noqa: E402  (benchmarks/sections.py)

SCALE = 20.0
OPS = ("infonce", "ecif_reductions", "gauss_newton_product")
DEFAULT_CASES = ("all:4096", "all:16384", "all:65536", "batch:262144")
SECTION = "## Embedding-space ops: every backend side by side"
NAIVE_MAX_BYTES = 6 * 2 ** 30  # naive infonce keeps ~4 score-sized buffers; skip it when one exceeds this


def parse_case(text: str):
    """``"all:N"`` -> (kind, n, B, d) with d = 256; ``"batch:N"`` -> B = 512, d = 512."""
    kind, n = text.split(":")
    n = int(n)
    if kind == "all":
        return kind, n, n, 256
    if kind == "batch":
        return kind, n, 512, 512
    raise ValueError(f"case must be all:N or batch:N, got {text!r}")


def inputs(n: int, d: int, device: str):
    g = torch.Generator().manual_seed(0)
    U = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    V = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    dU = torch.randn(1, n, d, generator=g) / d ** 0.5
    dV = torch.randn(1, n, d, generator=g) / d ** 0.5
    return [x.to(device).contiguous() for x in (U, V, dU, dV)]


def naive_infonce(U, V, B):
    nb = U.shape[0] // B
    U = U.detach().requires_grad_()
    V = V.detach().requires_grad_()
    S = SCALE * torch.bmm(U.view(nb, B, -1), V.view(nb, B, -1).transpose(1, 2))
    loss = -(torch.log_softmax(S, 2).diagonal(dim1=1, dim2=2).sum() +
             torch.log_softmax(S, 1).diagonal(dim1=1, dim2=2).sum())
    loss.backward()
    return loss.detach(), U.grad, V.grad


def method_fn(op, method, U, V, dU, dV, plan, B):
    from ecif_fast.kernels import registry
    if method == "naive":
        return lambda: naive_infonce(U, V, B)
    fn = registry.get_op(op, U.device, method)
    if op == "infonce":
        return lambda: fn(U, V, SCALE, plan, True)
    if op == "ecif_reductions":
        return lambda: fn(U, V, SCALE, plan, dU, dV, None, "exact")
    return lambda: fn(U, V, SCALE, plan, dU, dV, None)


GEMM_BLOCK = 8192  # "all" cases above this time the score GEMM on column blocks (no n x n output)


def gemm_fn(U, V, B):
    """The score GEMM of the case: ``U @ V.T`` ("all") or ``bmm`` over the batches (same FLOPs)."""
    n, d = U.shape
    if B == n:
        Vt = V.T.contiguous()
        if n <= GEMM_BLOCK:
            return lambda: torch.mm(U, Vt)
        out = U.new_empty(n, GEMM_BLOCK)

        def blocked():
            for c in range(0, n, GEMM_BLOCK):
                torch.mm(U, Vt[:, c:c + GEMM_BLOCK], out=out[:, :min(GEMM_BLOCK, n - c)])
            return out

        return blocked
    Ub = U.view(n // B, B, d)
    Vt = V.view(n // B, B, d).transpose(1, 2).contiguous()
    return lambda: torch.bmm(Ub, Vt)


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _mem_mib(device) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def checksum(out) -> float:
    first = out[0]
    return float(first.double().abs().sum()) if torch.is_tensor(first) else float(first)


def _timed(fn, device) -> float:
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    elapsed = time.perf_counter() - t0
    del out
    return elapsed


def worker(op, method, case, device, threads, reps) -> dict:
    torch.set_num_threads(threads)
    from ecif_fast.core.batches import resolve_batches
    kind, n, B, d = parse_case(case)
    U, V, dU, dV = inputs(n, d, device)
    plan = resolve_batches(None if B == n else B, n)
    fn = method_fn(op, method, U, V, dU, dV, plan, B)
    mm = gemm_fn(U, V, B)
    _sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    base = _mem_mib(device)
    t0 = time.perf_counter()
    out = fn()  # the peak-memory measurement; a warm-up when reps > 1, the timed call when reps == 1
    _sync(device)
    t_first = time.perf_counter() - t0
    peak = _mem_mib(device) - base
    check = checksum(out)
    del out
    t_mm = _timed(mm, device)
    t_method = t_first if reps == 1 else float("inf")
    for _ in range(reps if reps > 1 else 0):  # interleaved, so that both see the same machine load
        t_method = min(t_method, _timed(fn, device))
        t_mm = min(t_mm, _timed(mm, device))
    return {"op": op, "method": method, "case": case, "time": t_method, "mm": t_mm, "peak_mib": peak,
            "check": check}


def run_worker(op, method, case, device, threads, reps) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", op, method, case, "--device", device,
           "--threads", str(threads), "--reps", str(reps)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return {"op": op, "method": method, "case": case, "error": res.stderr.strip().splitlines()[-1][:200]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def methods_for(op, device) -> list[str]:
    from ecif_fast.kernels import registry
    names = [name for name, ok in registry.available_backends().items()
             if ok is True and registry._REGISTRY[name].serves(torch.device(device).type)]
    out = [m for m in names if callable(getattr(registry._load(registry._REGISTRY[m])[0], op, None))]
    return out + (["naive"] if op == "infonce" else [])


def render(results, device, threads) -> str:
    fastest = [m for m in ("triton", "cpp") if any(r.get("method") == m for r in results)]
    ours = fastest[0] if fastest else "torch"
    lines = [f"| op | case | method | time (s) | / GEMM limit | vs {ours} | extra memory (MiB) | same result |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    by = {(r["op"], r["case"], r["method"]): r for r in results}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['case']} | {r['method']} | failed: {r['error']} | | | | |")
            continue
        if r.get("skipped"):
            lines.append(f"| {r['op']} | {r['case']} | {r['method']} | not run: {r['skipped']} | | | | |")
            continue
        ref = by.get((r["op"], r["case"], ours))
        rel = ((r["time"] / r["mm"]) / (ref["time"] / ref["mm"])) if ref and "time" in ref else float("nan")
        same = "-" if not ref or "check" not in ref else (
            "yes" if abs(r["check"] - ref["check"]) <= 1e-3 * abs(ref["check"]) else f"NO ({r['check']:.6g})")
        lines.append(f"| {r['op']} | {r['case']} | {r['method']} | {r['time']:.3f} | {r['time'] / (3 * r['mm']):.2f} "
                     f"| {rel:.2f}× | {r['peak_mib']:.0f} | {same} |")
    # target 3: ecif_reductions (one query) vs one infonce fwd+bwd, same backend and case
    extra = []
    for (op, case, m), r in by.items():
        if op == "ecif_reductions" and "time" in r:
            inf = by.get(("infonce", case, m))
            if inf and "time" in inf:
                extra.append(f"| {case} | {m} | {(r['time'] / r['mm']) / (inf['time'] / inf['mm']):.2f} |")
    if extra:
        lines += ["", "`ecif_reductions` (one query) / `infonce` fwd+bwd, same backend and case (GEMM-normalised):",
                  "", "| case | backend | reductions / infonce |", "|---|---|---:|"] + extra
    return "\n".join(lines)


def machine(device, threads) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} , torch {torch.__version__}"
    return (f"{platform.processor() or 'CPU'}, {os.cpu_count()} cores (shared), {threads} threads, "
            f"torch {torch.__version__}, load average at start {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES))
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    ap.add_argument("--methods", nargs="+", help="only these methods (backend names or 'naive'); default all")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--write", action="store_true", help="rewrite this benchmark's section of BENCHMARKS.md")
    ap.add_argument("--log", help="append every result as a JSON line to this file")
    ap.add_argument("--load", nargs="+", help="render (and --write) results from JSON-line logs of earlier runs "
                    "instead of running; a later line replaces an earlier one for the same op, case and method")
    ap.add_argument("--worker", nargs=3, metavar=("OP", "METHOD", "CASE"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(*a.worker, a.device, a.threads, a.reps)))
        return
    if a.load:
        latest = {}
        for path in a.load:
            for line in open(path):
                if line.startswith("{"):
                    r = json.loads(line)
                    latest[(r["op"], r["case"], r["method"])] = r
        order = {op: i for i, op in enumerate(OPS)}
        results = sorted(latest.values(), key=lambda r: (parse_case(r["case"])[0] != "all", parse_case(r["case"])[1],
                                                          order[r["op"]]))
        table = render(results, a.device, a.threads)
        print(table)
        if a.write:
            head = (f"{SECTION}\n\n`python benchmarks/bench_ops.py ...` runs, collected with `--load` — "
                    f"{machine(a.device, a.threads)}, {time.strftime('%Y-%m-%d')}. Each row: minimum of its run's "
                    "calls; GEMM limit = 3 × the score GEMM of the case timed in the same process; extra memory = peak "
                    "growth over the inputs for one call, outputs included.\n\n")
            write_section(SECTION, head + table + "\n")
        return
    results = []
    for case in a.cases:
        kind, n, B, d = parse_case(case)
        reps = a.reps if n * B * d <= 16384 * 16384 * 256 else 1
        for op in a.ops:
            for m in methods_for(op, a.device):
                if a.methods and m not in a.methods:
                    continue
                if m == "naive" and 4 * n * B > NAIVE_MAX_BYTES:
                    results.append({"op": op, "method": m, "case": case,
                                    "skipped": f"one score matrix alone needs {4 * n * B / 2 ** 30:.0f} GiB"})
                else:
                    results.append(run_worker(op, m, case, a.device, a.threads, reps))
                print(json.dumps(results[-1]), flush=True)
                if a.log:
                    with open(a.log, "a") as f:
                        f.write(json.dumps(results[-1]) + "\n")
    table = render(results, a.device, a.threads)
    head = (f"{SECTION}\n\n`python benchmarks/bench_ops.py {' '.join(argv or sys.argv[1:])}` — "
            f"{machine(a.device, a.threads)}, {time.strftime('%Y-%m-%d')}. Minimum of {a.reps} calls "
            f"(a single call for cases above n·B·d = 16384²·256); GEMM limit = 3 × the score GEMM of the case timed in the "
            f"same process; extra memory = peak growth over the inputs for one call, outputs included.\n\n")
    print(table)
    if a.write:
        write_section(SECTION, head + table + "\n")


# ---------------------------------------------------------------------------------------------- pytest-benchmark
# Small sizes, so the whole file runs in about a minute: `--benchmark-only` with python_files='bench_*.py'.

def _bench_params():
    cases = [("all:2048", op) for op in OPS] + [("batch:16384", op) for op in OPS]
    return [(c, op, m) for c, op in cases for m in methods_for(op, "cpu")]


def _pytest_params():
    try:
        return _bench_params()
    except Exception:  # collection must not fail when a backend misbehaves; the test then fails instead
        return [("all:2048", "infonce", "torch")]


try:
    import pytest

    @pytest.mark.parametrize("case,op,method", _pytest_params())
    def test_op(benchmark, case, op, method):
        kind, n, B, d = parse_case(case)
        from ecif_fast.core.batches import resolve_batches
        U, V, dU, dV = inputs(n, d, "cpu")
        plan = resolve_batches(None if B == n else B, n)
        fn = method_fn(op, method, U, V, dU, dV, plan, B)
        benchmark.group = f"{op} {case}"
        out = benchmark(fn)
        assert torch.isfinite(torch.as_tensor(out[0])).all()
except ImportError:  # script mode without pytest
    pass


if __name__ == "__main__":
    main()
