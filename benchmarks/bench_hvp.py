"""Exact Hessian-vector products: all columns vmapped per chunk of batches vs one column and one batch at a time.

Setting: ``LinearHeads(6, 5, 8, normalize=True)`` in float64 (P = 88) trained on 200 pairs, batches of 20,
``ECIF(solver="cg", curvature="hessian")``. Timed side by side in one process (one thread):

(a) ``Curvature.matvec`` on P columns (the vmapped product) vs ``Curvature._hessian_columnwise`` (the former
    implementation: ``jvp(grad)`` per column per batch), and that both agree with the dense Hessian;
(b) ``self_influence()`` of all 200 pairs (200 right-hand sides through CG) with either product, with the same
    ``cg_maxiter`` so that both run the same iterations (``--maxiter``; the column loop needs ~3 s per CG
    iteration here, so a full solve of ``2P`` iterations takes minutes).

Run::

    python benchmarks/bench_hvp.py [--maxiter 10] [--write]

``--write`` records the ratios in BENCHMARKS.md (section "Exact Hessian products").
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__))))
import ecif_fast as ef  # noqa: E402
from ecif_fast.evaluation.problems import paired_features  # noqa: E402
from sections import write_section  # noqa: E402

HEADING = "## Exact Hessian products (`cg` / `lowrank` with `curvature=\"hessian\"`)"


def problem(n=200, batch=20):
    X, Y = paired_features(n, image_dim=6, text_dim=5, seed=0)
    torch.manual_seed(0)
    model = ef.LinearHeads(6, 5, 8, normalize=True, logit_scale=1.6).double()
    ref = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
    ef.train(model, X, Y, batches=batch, damping=1.0, theta_ref=ref)
    return model, X, Y, batch


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--maxiter", type=int, default=10, help="CG iterations in (b), the same for both (default 10)")
    ap.add_argument("--write", action="store_true", help="record the results in BENCHMARKS.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, X, Y, batch = problem()
    engine = ef.ECIF(model, damping=1.0, batches=batch, solver="cg", curvature="hessian",
                     cg_maxiter=args.maxiter).fit(X, Y)
    curv = engine.curvature
    P = curv.size
    V = torch.randn(P, P, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dense = curv.dense() @ V
    fast, t_fast = timed(curv.matvec, V)
    slow, t_slow = timed(curv._hessian_columnwise, V)
    err = max(float((fast - dense).abs().max()), float((slow - dense).abs().max())) / float(dense.abs().max())
    print(f"(a) C·V, V ({P}, {P}): vmapped {t_fast:.3f} s, column loop {t_slow:.3f} s, "
          f"ratio {t_slow / t_fast:.1f}x (max rel. difference to the dense Hessian {err:.1e})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the capped CG does not converge: same for both
        a, t_a = timed(engine._self_influence_of, None)
        curv._hessian = curv._hessian_columnwise
        b, t_b = timed(engine._self_influence_of, None)
    diff = float((a - b).abs().max() / b.abs().max())
    print(f"(b) self_influence() of {engine.n} pairs, cg_maxiter={args.maxiter}: vmapped {t_a:.2f} s, column loop "
          f"{t_b:.2f} s, ratio {t_b / t_a:.1f}x (max rel. difference {diff:.1e})")
    if args.write:
        write_section(HEADING, f"""{HEADING}

`python benchmarks/bench_hvp.py --maxiter {args.maxiter} --write` ({machine()}, one torch thread, float64):
normalised `LinearHeads(6, 5, 8)` (P = {P}) trained on {engine.n} pairs in batches of {batch}. The exact
Hessian product pushes all columns through one vmapped forward-over-reverse pass per chunk of batches; the
former product ran `jvp(grad)` per column and per batch. Both are timed side by side in one process.

| what | vmapped / column loop | agreement |
|---|---|---|
| `C·V` on {P} columns | {t_slow / t_fast:.0f}× faster | both within {err:.0e} of the dense Hessian |
| `self_influence()` of {engine.n} pairs, CG capped at {args.maxiter} iterations | {t_b / t_a:.0f}× faster | {diff:.0e} relative |

With one batch ("all" negatives) the two ran at about the same speed (measured once, not in this table).
""")


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return f"{model}, {os.cpu_count()} shared cores, torch {torch.__version__}"


if __name__ == "__main__":
    main()
