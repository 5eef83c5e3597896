"""One-shot GPU check of the Triton backend: the kernel tests on CUDA, then every op's Triton kernel timed
side by side with its torch twin and a naive torch version, all within a hard wall-time budget.

Run on a CUDA machine from the repository root (needs torch + triton + pytest + pytest-xdist; the C++
extension ``ecif_fast._C`` is not used, the package imports without it)::

    python3 benchmarks/gpu_check.py --out DIR          # at most 300 s; exits 0 even when tests fail

Stages (each in its own subprocess with its own timeout; a stage that overruns is killed with its whole
process group, reported, and the script goes on):

1. ``env``: GPU name, torch / triton / CUDA versions, nvidia-smi, C compiler (Triton builds its launcher).
2. ``pytest`` (150 s): ``tests/test_triton_*.py`` with ``ECIF_FAST_TEST_DEVICE=cuda`` (compiled kernels,
   references on the CPU), ``-n 8`` (pytest-xdist: Triton's JIT is CPU-bound). Every test result is
   appended to ``tests.jsonl`` as it arrives (this file is also the pytest plugin doing that), so a cut
   run still tells which tests passed and how the failures failed.
   At the same time ``warm``: 8 low-priority processes run each Triton op once at every timing shape, so
   the JIT compiles land in Triton's disk cache before the timing starts.
3. ``timing`` (the rest, at most 120 s): for ``all:4096 batch:262144 all:16384 all:65536`` (as in
   ``bench_ops.py``: "all" = one batch, d = 256; "batch" = B = 512, d = 512), every op
   (``lse``, ``infonce`` fwd+bwd, ``ecif_reductions`` and ``gauss_newton_product`` with one query, exact
   weights, t = 20) in float32 and bfloat16: Triton, the torch twin, a naive dense torch version (scores
   by ``bmm``, softmax/log_softmax in float32, autograd for ``infonce``; not run where its score-sized
   buffers would not fit), and the score GEMM of the case. Median of up to 5 calls (twin, naive: 3) after a
   warm-up call, CUDA events; slow calls fewer. One JSON line per measurement in ``timing.jsonl`` as it goes. float32 twin/naive/GEMM run
   in IEEE float32 (``allow_tf32`` off); Triton's float32 ``tl.dot`` is tf32x3 (about float32 accuracy).
4. ``summary.md``: pass/fail/skip counts, failing test ids with their first error lines, tile-config
   fallbacks seen, the timing table (triton/twin, triton/naive, triton/GEMM) and the machine.

Files in ``--out`` (six): ``gpu_check.log`` (everything the stages print), ``pytest.log``,
``pytest_junit.xml``, ``tests.jsonl``, ``timing.jsonl``, ``summary.md``.

``--dry-run-cpu`` runs the same logic on the CPU: the kernel tests in cpu mode (Triton's interpreter, a
subset), warm-up and timing in the interpreter on tiny shapes with short budgets. Its timings mean
nothing; it tests this script.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the checkout's ecif_fast

TEST_FILES = ["tests/test_triton_lse.py", "tests/test_triton_infonce.py", "tests/test_triton_reductions.py",
              "tests/test_triton_gauss_newton.py"]
# dry run: a quick subset of the same files (the interpreter is slow; CI runs all of them anyway)
DRY_TEST_FILTER = ("compiles_for_hopper or tolerance_can_fail or registered or bad or configs or "
                   "launch_shape or every_dtype or huge_values or dispatch or interpreter_set_before or need_the_interpreter")
OPS = ("lse", "infonce", "ecif_reductions", "gauss_newton_product")
DTYPE_NAMES = ("float32", "bfloat16")
GPU_CASES = ("all:4096", "batch:262144", "all:16384", "all:65536")
DRY_CASES = ("all:64", "batch:256")
SCALE = 20.0
FILES = ("gpu_check.log", "pytest.log", "pytest_junit.xml", "tests.jsonl", "timing.jsonl", "summary.md")


def parse_case(text: str, dry: bool):
    """``all:N`` -> (n, B=n, d=256); ``batch:N`` -> (n, B=512, d=512); dry run: d = 32, B = 64."""
    kind, n = text.split(":")
    n = int(n)
    if kind == "all":
        return n, n, 32 if dry else 256
    if kind == "batch":
        return n, 64 if dry else 512, 32 if dry else 512
    raise ValueError(f"case must be all:N or batch:N, got {text!r}")


# ---------------------------------------------------------------------------------------------------------
# orchestration

class Log:
    """Prints to stdout and appends to ``gpu_check.log`` (flushed line by line)."""

    def __init__(self, path):
        self.path = path
        self.f = open(path, "a", buffering=1)

    def __call__(self, *parts):
        text = " ".join(str(p) for p in parts)
        stamp = time.strftime("%H:%M:%S")
        for line in text.splitlines() or [""]:
            self.f.write(f"[{stamp}] {line}\n")
        self.f.flush()
        print(text, flush=True)


def _kill_group(proc, log=None, what=""):
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            if log:
                log(f"  {what}: process group {proc.pid} did not die after SIGKILL")


def start(cmd, env, stdout, nice=0):
    """A subprocess in its own session (so that a timeout kills its whole process group)."""
    pre = (lambda: os.nice(nice)) if nice else None
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=stdout, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=pre)


def wait(proc, deadline, log, what):
    """Wait until ``deadline`` (time.time()); kill the group past it. Returns (returncode or None, cut?)."""
    left = deadline - time.time()
    try:
        return proc.wait(timeout=max(left, 0.1)), False
    except subprocess.TimeoutExpired:
        log(f"  {what}: over its time budget, killing it")
        _kill_group(proc, log, what)
        return proc.returncode, True


_STUBS = []  # a folder with stand-ins for missing pure-Python dependencies, first on every stage's PYTHONPATH

TQDM_STUB = '''"""Stand-in written by benchmarks/gpu_check.py: tqdm is not installed on this machine and ecif_fast
imports it (progress bars only). Iterates without a bar."""


class tqdm:
    def __init__(self, iterable=None, *args, **kwargs):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable if self.iterable is not None else ())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __getattr__(self, name):  # update, close, set_description, ...
        return lambda *args, **kwargs: None

    @staticmethod
    def write(msg, *args, **kwargs):
        print(msg)
'''


def make_stubs(log) -> str:
    """Stand-ins for pure-Python packages that ``import ecif_fast`` needs but this machine lacks (tqdm: the GPU
    machine's listed packages do not include it). Returns a note for the summary ('' when none was needed)."""
    import importlib.util
    import tempfile

    if importlib.util.find_spec("tqdm") is not None and not os.environ.get("GPU_CHECK_FORCE_TQDM_STUB"):
        return ""
    d = tempfile.mkdtemp(prefix="gpu_check_stubs_")
    os.makedirs(os.path.join(d, "tqdm"))
    with open(os.path.join(d, "tqdm", "__init__.py"), "w") as f:
        f.write(TQDM_STUB)
    with open(os.path.join(d, "tqdm", "auto.py"), "w") as f:
        f.write("from . import tqdm  # noqa: F401\n")
    _STUBS.append(d)
    log(f"  tqdm is not installed: a stand-in (iterates, no bar) in {d} goes first on PYTHONPATH")
    return "tqdm stubbed (not installed)"


def base_env(dry: bool):
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("ECIF_FAST_BACKEND", None)
    env.pop("ECIF_FAST_TRITON_FP32_DOT", None)
    env["PYTHONPATH"] = os.pathsep.join(_STUBS + [ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if dry:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def orchestrate(a) -> int:
    t0 = time.time()
    dry = a.dry_run_cpu
    total = a.total_budget or (600.0 if dry else 300.0)
    t_end = t0 + total
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    for name in FILES:  # a rerun into the same folder starts clean
        p = os.path.join(out, name)
        if os.path.exists(p):
            os.remove(p)
    log = Log(os.path.join(out, "gpu_check.log"))
    log(f"gpu_check: {'DRY RUN on the CPU (Triton interpreter)' if dry else 'CUDA'}; total budget {total:.0f} s; "
        f"out = {out}")
    me = os.path.abspath(__file__)
    stages = {}

    # 1. env --------------------------------------------------------------------------------------------
    stub_note = make_stubs(log)
    env_info = {}
    try:
        res = subprocess.run([sys.executable, me, "--stage", "env"] + (["--dry-run-cpu"] if dry else []), cwd=ROOT,
                             env=base_env(dry), capture_output=True, text=True, timeout=60,
                             start_new_session=True)
        for line in (res.stdout + res.stderr).splitlines():
            if line.startswith("ENV_JSON "):
                env_info = json.loads(line[len("ENV_JSON "):])
            else:
                log("  " + line)
        stages["env"] = f"rc={res.returncode}" + (f" ({stub_note})" if stub_note else "")
    except subprocess.TimeoutExpired:
        stages["env"] = "cut at 60 s"
        log("  env stage: over 60 s, skipped")
    except Exception as e:  # never fatal
        stages["env"] = f"error {type(e).__name__}: {e}"
        log(f"  env stage failed: {e}")

    # 2. pytest, with the compile warm-up of the timing shapes beside it ---------------------------------
    junit = os.path.join(out, "pytest_junit.xml")
    tests_jsonl = os.path.join(out, "tests.jsonl")
    have_xdist = env_info.get("xdist") is not None
    workers = (min(a.workers, os.cpu_count() or 1) if dry else a.workers) if have_xdist else 0
    cmd = [sys.executable, "-m", "pytest", *TEST_FILES, "-q", "-rsfE", "--tb=short", "--durations=15",
           "-p", "no:cacheprovider", f"--junitxml={junit}", "-p", "gpu_check"]
    if workers:
        cmd += ["-n", str(workers)]
    if dry:
        cmd += ["-k", DRY_TEST_FILTER]
    penv = base_env(dry)
    penv.pop("TRITON_INTERPRET", None)  # the tests set it per test in cpu mode; never before import
    penv["ECIF_FAST_TEST_DEVICE"] = "cpu" if dry else "cuda"
    penv["GPU_CHECK_TESTS_JSONL"] = tests_jsonl
    penv["PYTHONPATH"] = os.pathsep.join([os.path.dirname(me), penv["PYTHONPATH"]])  # -p gpu_check
    pytest_budget = min(a.pytest_timeout or (300.0 if dry else 150.0), t_end - time.time() - 30)
    log(f"\n== pytest ({'cpu mode, a subset' if dry else 'ECIF_FAST_TEST_DEVICE=cuda'}, "
        f"{workers or 'no'} xdist workers{'' if have_xdist else ' (pytest-xdist missing)'}, "
        f"budget {pytest_budget:.0f} s)\n   {' '.join(cmd)}")
    t_py = time.time()
    pytest_log = open(os.path.join(out, "pytest.log"), "w", buffering=1)
    proc = start(cmd, penv, pytest_log)

    warm_procs = []
    if not a.no_warm:
        wenv = base_env(dry)
        log(f"== warm-up: {a.warm_procs} processes compile the timing shapes' kernels meanwhile (nice 10)")
        for g in range(a.warm_procs):
            wcmd = [sys.executable, me, "--stage", "warm", "--out", out, "--group", str(g),
                    "--groups", str(a.warm_procs)] + (["--dry-run-cpu"] if dry else [])
            warm_procs.append(start(wcmd, wenv, log.f, nice=10))
    rc, cut = wait(proc, t_py + pytest_budget, log, "pytest")
    pytest_log.close()
    stages["pytest"] = (f"cut after {time.time() - t_py:.0f} s (budget {pytest_budget:.0f} s)" if cut
                        else f"rc={rc} in {time.time() - t_py:.0f} s")
    log(f"   pytest: {stages['pytest']}")

    warm_deadline = max(time.time() + 5, t_py + (a.warm_budget or (200.0 if dry else 100.0)))
    warm_deadline = min(warm_deadline, t_end - 60)
    t_w = time.time()
    n_cut = 0
    for i, p in enumerate(warm_procs):
        _, c = wait(p, warm_deadline, log, f"warm-up {i}")
        n_cut += c
    if warm_procs:
        stages["warm-up"] = (f"{len(warm_procs)} processes, {n_cut} cut; waited {time.time() - t_w:.0f} s "
                             "after pytest")
        log(f"   warm-up: {stages['warm-up']}")

    # 3. timing -------------------------------------------------------------------------------------------
    budget = min(a.timing_budget or (240.0 if dry else 120.0), t_end - time.time() - 10)
    if budget < 15:
        stages["timing"] = f"not run: {budget:.0f} s left"
        log(f"\n== timing: not run, only {budget:.0f} s of the total budget left")
    else:
        log(f"\n== timing (budget {budget:.0f} s)")
        tcmd = [sys.executable, me, "--stage", "timing", "--out", out, "--deadline", str(time.time() + budget - 5)]
        tcmd += ["--cases", *a.cases] if a.cases else []
        tcmd += ["--dry-run-cpu"] if dry else []
        t_t = time.time()
        p = start(tcmd, base_env(dry), log.f)
        rc, cut = wait(p, t_t + budget, log, "timing")
        stages["timing"] = (f"cut after {time.time() - t_t:.0f} s" if cut else f"rc={rc} in {time.time() - t_t:.0f} s")
        log(f"   timing: {stages['timing']}")

    # 4. summary ------------------------------------------------------------------------------------------
    try:
        text = summary(out, env_info, stages, time.time() - t0, dry)
    except Exception:  # the summary must exist even when parsing goes wrong
        text = "# GPU check summary\n\nsummary failed:\n```\n" + traceback.format_exc() + "```\n"
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    log("\n" + text)
    recap = [ln for ln in text.splitlines() if ln.startswith(("- device:", "- stages:")) or " collected tests reported" in ln]
    log("recap: " + " | ".join(recap))
    log(f"gpu_check: done in {time.time() - t0:.0f} s; files: {', '.join(sorted(os.listdir(out)))}")
    log.f.close()
    import shutil
    for d in _STUBS:
        shutil.rmtree(d, ignore_errors=True)
    return 0


# ---------------------------------------------------------------------------------------------------------
# summary

def _read_jsonl(path):
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass  # a line cut by a kill
    return rows


def _first_error_lines(text: str, k: int = 4) -> list:
    lines = text.splitlines()
    err = [ln.strip() for ln in lines if ln.lstrip().startswith("E ")]
    if not err:
        err = [ln.strip() for ln in lines if ln.strip()][-k:]
    return [ln[:300] for ln in err[:k]]


def _fmt_ms(x):
    return "-" if x is None else (f"{x:.3f}" if x < 10 else f"{x:.1f}")


def _fmt_cfg(c: dict) -> str:
    """``last_launch()`` in short: tiles m×n×k, warps, stages, column split, query block, fp32 dot precision."""
    t = c.get("config") or {}
    s = "×".join(str(t.get(k, "?")) for k in ("block_m", "block_n")) + "×" + str(t.get("block_k", t.get("block_d", "?")))
    s += f" w{t.get('num_warps', '?')} s{t.get('num_stages', '?')}"
    for key, tag in (("split", "split"), ("block_q", "q"), ("precision", "")):
        if key in c:
            s += f" {tag}{'=' if tag else ''}{c[key]}"
    return s


def _ratio(a, b):
    return "-" if a is None or b is None or b <= 0 else f"{a / b:.2f}"


RANK = {"passed": 1, "skipped": 2, "failed": 3, "error": 3}
MAX_FAILURES_SHOWN = 30
# "(!)" marks a diff above these: the twin accumulates in float32 from the same inputs; the naive version
# rounds bfloat16 scores to bfloat16 (t·2⁻⁸ in a logit), so only gross differences count there
DIFF_TWIN = 1e-3
DIFF_NAIVE = {"float32": 1e-3, "bfloat16": 5e-2}


def summary(out, env_info, stages, wall, dry) -> str:
    L = ["# GPU check summary" + (" (DRY RUN on the CPU: timings mean nothing)" if dry else ""), ""]
    L.append(f"- device: {env_info.get('device', '?')}")
    L.append(f"- torch {env_info.get('torch', '?')} (CUDA {env_info.get('cuda', '?')}), triton "
             f"{env_info.get('triton', '?')}, python {env_info.get('python', '?')}, pytest-xdist "
             f"{env_info.get('xdist')}, ecif_fast._C {'present' if env_info.get('ecif_C') else 'absent'}, "
             f"checkout {env_info.get('git', '?')}")
    L.append(f"- import ecif_fast: {env_info.get('ecif_fast', '?')}")
    L.append("- stages: " + "; ".join(f"{k}: {v}" for k, v in stages.items()) + f"; total {wall:.0f} s")
    L.append("")

    # tests
    rows = _read_jsonl(os.path.join(out, "tests.jsonl"))
    results = {}
    collected = 0
    finished = None
    started = {}
    for r in rows:
        if r.get("event") == "start":
            started[r["nodeid"]] = r.get("t", 0)
        elif r.get("event") == "collected":
            collected = max(collected, r.get("count", 0))
        elif r.get("event") == "finished":
            finished = r
        elif "nodeid" in r:  # one line per phase that did not pass; the worst phase counts
            prev = results.get(r["nodeid"])
            if prev is None or RANK.get(r["outcome"], 0) > RANK.get(prev["outcome"], 0):
                results[r["nodeid"]] = r
    counts = {}
    for r in results.values():
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    mode = "cpu mode, a subset" if dry else "ECIF_FAST_TEST_DEVICE=cuda"
    L.append(f"## Tests ({mode})")
    L.append("")
    done = sum(counts.values())
    status = ("finished" if finished else "NOT finished (cut by the time budget or crashed): the counts "
              "cover the tests that reported")
    L.append(f"{done} of {collected or '?'} collected tests reported, {status}: " +
             (", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "none"))
    if finished:
        L.append(f"(pytest exit status {finished.get('exitstatus')})")
    L.append("")
    running = sorted(k for k in started if k not in results)
    if running and not finished:
        L.append("Started but never reported (running when the stage was cut, or hung): " +
                 ", ".join(f"`{k.replace('tests/test_triton_', '')}`" for k in running[:20]))
        L.append("")
    bad = [r for r in results.values() if r["outcome"] in ("failed", "error")]
    if bad:
        L.append(f"### Failing ({len(bad)}, in the order they failed)")
        L.append("")
        bad = sorted(bad, key=lambda r: (r.get("t", 0), r["nodeid"]))
        cuda = [r for r in bad if re.search(r"CUDA error|illegal memory|CUDA_ERROR|device-side assert",
                                            r.get("longrepr", ""))]
        if cuda:
            first = {}
            for r in cuda:
                first.setdefault(r.get("worker", "?"), r["nodeid"])
            L.append(f"{len(cuda)} failures are CUDA errors; a CUDA error poisons its worker's context, so later "
                     "failures on the same worker may be fallout. First CUDA error per worker: " +
                     "; ".join(f"{w}: `{k}`" for w, k in sorted(first.items())))
            L.append("")
        for r in bad[:MAX_FAILURES_SHOWN]:
            L.append(f"- `{r['nodeid']}` ({r['outcome']} in {r['when']}, {r.get('duration', 0):.1f} s)")
            for ln in _first_error_lines(r.get("longrepr", ""), 3):
                L.append(f"    - `{ln}`")
        if len(bad) > MAX_FAILURES_SHOWN:
            L.append(f"- ... and {len(bad) - MAX_FAILURES_SHOWN} more: " +
                     ", ".join(f"`{r['nodeid'].replace('tests/test_triton_', '')}`" for r in bad[MAX_FAILURES_SHOWN:]))
            L.append("  (tests.jsonl and pytest.log have every traceback)")
        L.append("")
    skips = {}
    for r in results.values():
        if r["outcome"] == "skipped":
            skips[r.get("reason", "?")] = skips.get(r.get("reason", "?"), 0) + 1
    if skips:
        L.append("Skips: " + "; ".join(f"{v} × {k}" for k, v in sorted(skips.items())))
        L.append("")
    slow = sorted(results.values(), key=lambda r: -r.get("duration", 0))[:8]
    if slow:
        L.append("Slowest: " + ", ".join(f"`{r['nodeid'].replace('tests/test_triton_', '')}` {r.get('duration', 0):.1f} s"
                                          for r in slow))
        L.append("")
    fallbacks = set()
    for name in ("pytest.log", "gpu_check.log"):
        p = os.path.join(out, name)
        if os.path.exists(p):
            with open(p, errors="replace") as f:
                for line in f:
                    if "trying a smaller one" in line:
                        m = re.search(r"triton [\w_]+: tile config .*?\)\)", line)
                        fallbacks.add((m.group(0) if m else line.strip())[:300])
    if fallbacks:
        L.append(f"### Tile-config fallbacks seen ({len(fallbacks)}): a first-choice config failed to compile/launch")
        L.append("")
        L += [f"- {x}" for x in sorted(fallbacks)[:20]]
        L.append("")

    # timing
    trows = _read_jsonl(os.path.join(out, "timing.jsonl"))
    L.append("## Timing: Triton vs torch twin vs naive torch" + (" (interpreter: meaningless)" if dry else ""))
    L.append("")
    meas = {}
    gemm = {}
    order = []
    errors = []
    for r in trows:
        if r.get("method") == "gemm":
            gemm[(r["case"], r["dtype"])] = r.get("ms")
            continue
        key = (r["case"], r["op"], r["dtype"])
        if key not in meas:
            meas[key] = {}
            order.append(key)
        meas[key][r["method"]] = r
        if r.get("error"):
            errors.append(f"{r['case']} {r['op']} {r['dtype']} {r['method']}: {r['error']}")
    if not order:
        L.append("no timing results")
    else:
        L.append("Median ms of up to 5 calls (twin, naive: 3; slow ones fewer) after a warm-up call (CUDA events). Ratios < 1: Triton is faster. "
                 "diff = max |x − triton| / max |triton| over the outputs. GEMM = the case's score GEMM "
                 "(`mm`/`bmm`, same dtype); the fused infonce's limit (docs/math.md §5) is 3 × GEMM. (!) = diff above "
                 f"{DIFF_TWIN:g} (twin) / {DIFF_NAIVE['float32']:g} float32, {DIFF_NAIVE['bfloat16']:g} bfloat16 "
                 "(naive: its bfloat16 scores are rounded to bfloat16).")
        L.append("")
        L.append("| case | op | dtype | triton | twin | naive | triton/twin | triton/naive | GEMM | triton/GEMM "
                 "| diff twin | diff naive | triton first call | config |")
        L.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for key in order:
            m = meas[key]
            tr, tw, nv = m.get("triton", {}), m.get("twin", {}), m.get("naive", {})

            def cell(r):
                if r.get("ms") is not None:
                    return _fmt_ms(r["ms"])
                return r.get("skipped") and f"({r['skipped']})" or (r.get("error") and "ERROR") or "-"
            g = gemm.get((key[0], key[2]))
            diff = lambda r, lim: ("-" if r.get("diff") is None else  # noqa: E731
                                   f"{r['diff']:.1e}" + (" (!)" if r["diff"] > lim else ""))
            cfg_s = _fmt_cfg(tr.get("config") or {})
            L.append(f"| {key[0]} | {key[1]} | {key[2]} | {cell(tr)} | {cell(tw)} | {cell(nv)} | "
                     f"{_ratio(tr.get('ms'), tw.get('ms'))} | {_ratio(tr.get('ms'), nv.get('ms'))} | {_fmt_ms(g)} | "
                     f"{_ratio(tr.get('ms'), g)} | {diff(tw, DIFF_TWIN)} | {diff(nv, DIFF_NAIVE[key[2]])} | {_fmt_ms(tr.get('first_ms'))} | {cfg_s} |")
    if errors:
        L.append("")
        L.append(f"### Timing errors ({len(errors)})")
        L.append("")
        L += [f"- {e[:400]}" for e in errors[:30]]
    L.append("")
    return "\n".join(L)


# ---------------------------------------------------------------------------------------------------------
# stage: env

def stage_env(dry: bool) -> int:
    import importlib.util
    import platform
    import shutil
    import sysconfig

    info = {"python": platform.python_version()}
    try:
        import torch
        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info["device"] = (f"{p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                              f"{p.total_memory / 2 ** 30:.0f} GiB")
        else:
            info["device"] = "CPU, Triton interpreter (dry run)" if dry else "NO CUDA DEVICE"
    except Exception as e:
        info["torch"] = f"import failed: {e}"
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception as e:
        info["triton"] = f"import failed: {e}"
    try:
        import xdist
        info["xdist"] = xdist.__version__
    except Exception:
        info["xdist"] = None
    info["ecif_C"] = importlib.util.find_spec("ecif_fast._C") is not None
    try:  # every test imports it: a missing dependency here fails them all
        import ecif_fast
        from ecif_fast.kernels import triton_backend
        info["ecif_fast"] = ("ok" if triton_backend.available() else
                             f"triton backend unavailable: {triton_backend.unavailable_reason()}")
        info["ecif_fast"] += f" ({os.path.dirname(ecif_fast.__file__)})"
    except Exception as e:
        info["ecif_fast"] = f"IMPORT FAILED: {type(e).__name__}: {e}"
    try:
        info["git"] = subprocess.run(["git", "log", "-1", "--format=%h %s"], cwd=ROOT, capture_output=True,
                                     text=True, timeout=10).stdout.strip()[:80] or "?"
    except Exception:
        info["git"] = "?"
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    inc = sysconfig.get_paths().get("include", "")
    print(f"python {sys.executable} {info['python']}; C compiler {cc} (Triton builds its launcher with it); "
          f"Python.h {'found' if os.path.exists(os.path.join(inc, 'Python.h')) else 'MISSING'} in {inc}")
    print(f"torch {info.get('torch')} CUDA {info.get('cuda')}, triton {info.get('triton')}, "
          f"pytest-xdist {info.get('xdist')}, ecif_fast._C {'present' if info['ecif_C'] else 'absent'}")
    print(f"device: {info.get('device')}; CPUs: {os.cpu_count()}; checkout: {info['git']}")
    print(f"import ecif_fast: {info['ecif_fast']}")
    if not dry:
        try:
            res = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,memory.used,"
                                  "clocks.max.sm,power.limit", "--format=csv"], capture_output=True, text=True,
                                 timeout=20)
            print(res.stdout.strip() or res.stderr.strip())
        except Exception as e:
            print(f"nvidia-smi: {e}")
    print("ENV_JSON " + json.dumps(info), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------------
# stages: warm and timing (same inputs and calls)

def _setup(dry):
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False  # twin / naive / GEMM in IEEE float32
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cpu" if dry else "cuda")
    if not dry and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available")
    return torch, dev


def _inputs(torch, dev, n, d, dtype):
    g = torch.Generator(device=dev).manual_seed(n + d)
    U = torch.nn.functional.normalize(torch.randn(n, d, generator=g, device=dev), dim=1)
    V = torch.nn.functional.normalize(torch.randn(n, d, generator=g, device=dev), dim=1)
    dU = torch.randn(1, n, d, generator=g, device=dev) / d ** 0.5
    dV = torch.randn(1, n, d, generator=g, device=dev) / d ** 0.5
    return [x.to(dtype).contiguous() for x in (U, V, dU, dV)]


def _call(op, fn, U, V, dU, dV, plan):
    if op == "lse":
        return fn(U, V, SCALE, plan)
    if op == "infonce":
        return fn(U, V, SCALE, plan, True)
    if op == "ecif_reductions":
        return fn(U, V, SCALE, plan, dU, dV, None, "exact")
    return fn(U, V, SCALE, plan, dU, dV, None)


def _naive(torch, op, U, V, dU, dV, B):
    """What a user writes: dense per-batch scores by ``bmm`` (float32 softmax), formulas of docs/math.md §4."""
    n, d = U.shape
    nb = n // B
    F = torch.nn.functional

    def scores(U, V):
        Ub, Vb = U.view(nb, B, d), V.view(nb, B, d)
        return Ub, Vb, SCALE * torch.bmm(Ub, Vb.transpose(1, 2)).float()

    if op == "lse":
        _, _, S = scores(U, V)
        return torch.logsumexp(S, 2).reshape(n), torch.logsumexp(S, 1).reshape(n)
    if op == "infonce":
        U = U.detach().requires_grad_()
        V = V.detach().requires_grad_()
        _, _, S = scores(U, V)
        loss = -(F.log_softmax(S, 2).diagonal(dim1=1, dim2=2).sum() + F.log_softmax(S, 1).diagonal(dim1=1, dim2=2).sum())
        loss.backward()
        return loss.detach(), U.grad, V.grad
    Ub, Vb, S = scores(U, V)
    dUb, dVb = dU[0].view(nb, B, d), dV[0].view(nb, B, d)
    dS = SCALE * (torch.bmm(dUb, Vb.transpose(1, 2)) + torch.bmm(Ub, dVb.transpose(1, 2))).float()
    P, Qc = torch.softmax(S, 2), torch.softmax(S, 1)
    del S
    m = (P * dS).sum(2)
    mc = (Qc * dS).sum(1)
    if op == "ecif_reductions":  # exact weights w = p / (1 − p), off the diagonal
        pos = m + mc - 2 * dS.diagonal(dim1=1, dim2=2)
        eye = torch.eye(B, dtype=torch.bool, device=U.device)
        W = (P / (1 - P)).masked_fill_(eye, 0.0)
        neg = (W * (dS - m[:, :, None])).sum(1)
        del W
        Wc = (Qc / (1 - Qc)).masked_fill_(eye, 0.0)
        neg = neg + (Wc * (dS - mc[:, None, :])).sum(2)
        return pos.reshape(1, n), neg.reshape(1, n)
    G = P * (dS - m[:, :, None]) + Qc * (dS - mc[:, None, :])
    del P, Qc, dS
    gU = SCALE * torch.bmm(G, Vb.float())
    gV = SCALE * torch.bmm(G.transpose(1, 2), Ub.float())
    return gU.reshape(1, n, d), gV.reshape(1, n, d)


NAIVE_BUFFERS = {"lse": 3, "infonce": 7, "ecif_reductions": 9, "gauss_newton_product": 8}  # score-sized, float32


def _gemm_fn(torch, U, V, B):
    n, d = U.shape
    if B == n:
        Vt = V.T.contiguous()
        if n <= 16384:
            return lambda: torch.mm(U, Vt)
        out = U.new_empty(n, 8192)

        def blocked():  # no n x n output at n = 65536
            for c in range(0, n, 8192):
                torch.mm(U, Vt[:, c:c + 8192], out=out[:, :min(8192, n - c)])
            return out
        return blocked
    Ub = U.view(n // B, B, d)
    Vt = V.view(n // B, B, d).transpose(1, 2).contiguous()
    return lambda: torch.bmm(Ub, Vt)


def _tensors(out):
    if out is None:
        return []
    if isinstance(out, (tuple, list)):
        return [x for x in out if x is not None]
    return [out]


def _diff(ref, got):
    """max |got − ref| / max |ref| over the outputs (compared in float64 on the device)."""
    worst = 0.0
    for r, g in zip(_tensors(ref), _tensors(got)):
        r, g = r.detach().double().reshape(-1), g.detach().double().reshape(-1)
        if r.numel() == 0:
            continue
        scale = float(r.abs().max()) or 1.0
        worst = max(worst, float((g - r).abs().max()) / scale)
    return worst


def stage_warm(a) -> int:
    import warnings
    torch, dev = _setup(a.dry_run_cpu)
    from ecif_fast.kernels import registry
    from ecif_fast.core.batches import resolve_batches
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    groups = [(op, dt) for op in OPS for dt in DTYPE_NAMES]
    mine = [g for i, g in enumerate(groups) if i % a.groups == a.group]
    cases = a.cases or (DRY_CASES if a.dry_run_cpu else GPU_CASES)
    for op, dt in mine:
        fn = registry.get_op(op, dev, "triton")
        for case in cases:
            n, B, d = parse_case(case, a.dry_run_cpu)
            t0 = time.time()
            try:
                U, V, dU, dV = _inputs(torch, dev, n, d, dtypes[dt])
                plan = resolve_batches(None if B == n else B, n)
                with warnings.catch_warnings(record=True) as w:
                    warnings.simplefilter("always")
                    out = _call(op, fn, U, V, dU, dV, plan)
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                del out, U, V, dU, dV
                msg = "; ".join(str(x.message)[:200] for x in w)
                print(f"[warm {a.group}] {case} {op} {dt}: {time.time() - t0:.1f} s"
                      + (f"  WARNINGS: {msg}" if msg else ""), flush=True)
            except Exception as e:
                print(f"[warm {a.group}] {case} {op} {dt}: ERROR {type(e).__name__}: {str(e)[:300]}", flush=True)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    return 0


def stage_timing(a) -> int:
    import warnings
    torch, dev = _setup(a.dry_run_cpu)
    from ecif_fast.kernels import registry, triton_backend
    from ecif_fast.core.batches import resolve_batches
    t_end = a.deadline or time.time() + 60
    dry = a.dry_run_cpu
    path = os.path.join(a.out, "timing.jsonl")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    cases = a.cases or (DRY_CASES if dry else GPU_CASES)
    last_launch = {"lse": triton_backend.lse_module.last_launch,
                   "infonce": triton_backend.infonce_module.last_launch,
                   "ecif_reductions": triton_backend.reductions_module.last_launch,
                   "gauss_newton_product": triton_backend.infonce_module.last_launch}

    def emit(rec):
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        shown = {k: v for k, v in rec.items() if k not in ("case", "op", "dtype", "method")}
        print(f"  {rec['case']:<13} {rec.get('op', ''):<21} {rec['dtype']:<9} {rec['method']:<7} {shown}", flush=True)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def once(fn):
        """(ms, output) of one call."""
        if dev.type == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            out = fn()
            e1.record()
            torch.cuda.synchronize()
            return e0.elapsed_time(e1), out
        t0 = time.perf_counter()
        out = fn()
        return 1e3 * (time.perf_counter() - t0), out

    def measure(fn, keep=False, main=True):
        """Warm-up call (its output kept if asked), then the median of up to 5 calls (3 for the twin and the
        naive version; fewer for slow ones or when the budget runs short)."""
        first, out = once(fn)
        if not keep:
            out = None
        reps = 0 if dry else (5 if main else 3) if first < 200 else (3 if main else 1) if first < 1000 else 1
        ts = []
        for _ in range(reps):
            if time.time() + 2 * first / 1e3 > t_end:
                break
            ms, o = once(fn)
            del o
            ts.append(ms)
        return (statistics.median(ts) if ts else first), first, len(ts), out

    print(f"timing on {dev}: cases {' '.join(cases)}; {t_end - time.time():.0f} s left", flush=True)
    cost = {}  # (op, dtype, method) -> (first-call ms, n·B) of its last run: predicts the next, bigger case
    for case in cases:
        n, B, d = parse_case(case, dry)
        plan = resolve_batches(None if B == n else B, n)
        for dt in DTYPE_NAMES:
            if time.time() > t_end - 3:
                emit({"case": case, "op": "*", "dtype": dt, "method": "triton", "skipped": "budget"})
                continue
            try:
                U, V, dU, dV = _inputs(torch, dev, n, d, dtypes[dt])
            except Exception as e:
                emit({"case": case, "op": "*", "dtype": dt, "method": "triton", "error": f"inputs: {e}"})
                continue
            try:
                ms, first, reps, _ = measure(_gemm_fn(torch, U, V, B))
                emit({"case": case, "dtype": dt, "method": "gemm", "ms": ms, "reps": reps})
            except Exception as e:
                emit({"case": case, "dtype": dt, "method": "gemm", "error": f"{type(e).__name__}: {str(e)[:200]}"})
            for op in OPS:
                base = {"case": case, "op": op, "dtype": dt, "n": n, "B": B, "d": d}
                ref = None
                for method in ("triton", "naive", "twin"):
                    rec = dict(base, method=method)
                    if time.time() > t_end - 3:
                        rec["skipped"] = "budget"
                        emit(rec)
                        continue
                    if (op, dt, method) in cost:  # calls scale like n·B (score entries)
                        ms0, nb0 = cost[(op, dt, method)]
                        guess = 2 * ms0 / 1e3 * (n * B) / nb0
                        if time.time() + guess > t_end - 3:
                            rec["skipped"] = f"budget (~{guess:.0f} s)"
                            emit(rec)
                            continue
                    if method == "naive" and dev.type == "cuda":
                        need = NAIVE_BUFFERS[op] * n * B * 4
                        free = torch.cuda.mem_get_info()[0]
                        if need > 0.6 * free:
                            rec["skipped"] = f"needs ~{need / 2 ** 30:.0f} GiB"
                            emit(rec)
                            continue
                    try:
                        if method == "naive":
                            call = lambda: _naive(torch, op, U, V, dU, dV, B)  # noqa: E731
                        else:
                            f = registry.get_op(op, dev, "triton" if method == "triton" else "torch")
                            call = lambda: _call(op, f, U, V, dU, dV, plan)  # noqa: E731
                        with warnings.catch_warnings(record=True) as w:
                            warnings.simplefilter("always")
                            ms, first, reps, out = measure(call, keep=True, main=method == "triton")
                        rec.update(ms=ms, first_ms=first, reps=reps)
                        cost[(op, dt, method)] = (max(ms, first if method != "triton" else ms), n * B)
                        if w:
                            rec["warnings"] = "; ".join(str(x.message)[:200] for x in w)[:600]
                        if method == "triton":
                            ref = out
                            rec["config"] = {k: v for k, v in last_launch[op]().items()
                                             if k in ("config", "split", "block_q", "precision", "query_chunks")}
                        elif ref is not None:
                            rec["diff"] = _diff(ref, out)
                        del out
                    except Exception as e:
                        rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                        if dev.type == "cuda":
                            if isinstance(e, torch.cuda.OutOfMemoryError):
                                rec["error"] = "out of memory"
                            sync()
                    emit(rec)
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                del ref
            U = V = dU = dV = None  # free before the next inputs
    return 0


# ---------------------------------------------------------------------------------------------------------
# pytest plugin (``-p gpu_check`` in the pytest stage): every test result into GPU_CHECK_TESTS_JSONL as it
# arrives, from the xdist controller (or the single process) only.

_PLUGIN = {"worker": False}


def _plugin_write(rec):
    path = os.environ.get("GPU_CHECK_TESTS_JSONL")
    if not path or _PLUGIN["worker"]:
        return
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def pytest_configure(config):
    _PLUGIN["worker"] = hasattr(config, "workerinput")


def pytest_collection_finish(session):
    if session.items:
        _plugin_write({"event": "collected", "count": len(session.items)})


def pytest_runtest_logreport(report):
    if report.when != "call" and report.outcome == "passed":
        return
    outcome = report.outcome
    if report.when != "call" and outcome == "failed":
        outcome = "error"
    rec = {"nodeid": report.nodeid, "when": report.when, "outcome": outcome,
           "duration": round(float(getattr(report, "duration", 0.0)), 3), "t": round(time.time(), 2)}
    node = getattr(report, "node", None)
    if node is not None and getattr(node, "gateway", None) is not None:
        rec["worker"] = node.gateway.id
    if outcome == "skipped":
        lr = report.longrepr
        rec["reason"] = (lr[2] if isinstance(lr, tuple) and len(lr) == 3 else str(lr))[:200]
    elif outcome in ("failed", "error"):
        rec["longrepr"] = str(report.longrepr)[-6000:]
    _plugin_write(rec)


def pytest_runtest_logstart(nodeid, location):
    _plugin_write({"event": "start", "nodeid": nodeid, "t": round(time.time(), 2)})


def pytest_sessionfinish(session, exitstatus):
    _plugin_write({"event": "finished", "exitstatus": int(exitstatus)})


try:  # only defined when pytest-xdist is there (an unknown hook would be an error otherwise)
    import pytest as _pytest

    @_pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(node, ids):
        _plugin_write({"event": "collected", "count": len(ids)})
except ImportError:  # script mode without pytest
    pass


# ---------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check_out", help="output folder (created; its six files are replaced)")
    ap.add_argument("--dry-run-cpu", action="store_true", help="the same logic on the CPU, Triton interpreter, "
                    "tiny shapes, a test subset")
    ap.add_argument("--workers", type=int, default=8, help="pytest-xdist workers (default 8)")
    ap.add_argument("--warm-procs", type=int, default=8, help="compile warm-up processes (default 8)")
    ap.add_argument("--no-warm", action="store_true", help="skip the compile warm-up")
    ap.add_argument("--total-budget", type=float, help="seconds for everything (default 300; dry run 600)")
    ap.add_argument("--pytest-timeout", type=float, help="seconds for the pytest stage (default 150)")
    ap.add_argument("--warm-budget", type=float, help="seconds from the pytest start for the warm-up (default 100)")
    ap.add_argument("--timing-budget", type=float, help="seconds for the timing stage (default: the rest, at most 120)")
    ap.add_argument("--cases", nargs="+", help=f"timing cases (default {' '.join(GPU_CASES)})")
    ap.add_argument("--stage", choices=("env", "warm", "timing"), help=argparse.SUPPRESS)
    ap.add_argument("--group", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--groups", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)  # time.time() at which timing stops
    a = ap.parse_args(argv)
    if a.stage == "env":
        return stage_env(a.dry_run_cpu)
    if a.stage == "warm":
        return stage_warm(a)
    if a.stage == "timing":
        return stage_timing(a)
    try:
        return orchestrate(a)
    except Exception:  # exit 0 regardless: the lead reads the logs
        traceback.print_exc()
        return 0


if __name__ == "__main__":
    sys.exit(main())
