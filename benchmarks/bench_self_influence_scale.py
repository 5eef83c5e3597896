"""Factorised self-influence of every training pair against one influence query, LinearHeads at scale.

The problem, the fit and the query are those of ``bench_end_to_end.py`` (``LinearHeads(512, 512, 256,
normalize=True)``, float32, P = 262144, batches of 512, CG on the Gauss–Newton curvature of 16 random batches,
50 iterations, damping 100 × auto). Timed side by side in one process (``time.perf_counter``):

- **one influence query**: ∇F of 1024 validation pairs, CG solve, JVP pass over all n pairs, ``ecif_reductions``;
- **factor build**: the rank-``--rank`` spectral factor of ``C + δI`` that factorised self-influence uses
  (randomized subspace iteration, ``(4 + 1)·(rank + 10)`` curvature products + 32 Hutchinson probes);
- **self-influence, all pairs**: ``ECIF.self_influence(method="factor")`` — the projections ``a_kj = v_jᵀ g_k``
  (one JVP pass with the ``rank`` eigenvectors as tangents + ``ecif_reductions`` with ``rank`` directions,
  streamed over chunks of batches) and the exact norms ``||g_k||²`` from ``B × B`` Grams (docs/math.md §4.1),
  no per-pair parameter gradient. Its norms part alone is timed again separately (``norms alone``, not in the
  totals) to show the split.

Ratios: self-influence / query, and (factor build + self-influence) / query. ``--check K`` compares K random
pairs against the G-based ``LowRankSolver.quadratic(pair_gradients(K pairs))`` (not timed).

Run::

    python benchmarks/bench_self_influence_scale.py --n 16384
    python benchmarks/bench_self_influence_scale.py                 # n = 262144
    python benchmarks/bench_self_influence_scale.py --write          # also rewrites its section of BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

if __name__ == "__main__":  # script mode from a checkout without an editable install
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ecif_fast as ef
from ecif_fast.core.pair_norms import heads_pair_sq_norms
from bench_end_to_end import (add_problem_args, make_problem, scale_damping,  # benchmarks/bench_end_to_end.py
                             subsample_batches, time_query)
from sections import write_section  # benchmarks/sections.py

SECTION = "## Factorised self-influence of every pair vs one influence query, LinearHeads"


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    model, X, Y, Xv, Yv = make_problem(args.n, args.feat, args.embed, args.val, args.seed, args.train_steps,
                                       args.batch)
    num_batches = -(-args.n // args.batch)
    g = torch.Generator().manual_seed(args.seed + 1)
    sub = subsample_batches(num_batches, args.hessian_batches, g)
    eng = ef.ECIF(model, damping="auto", batches=args.batch, solver="cg", curvature="gauss-newton",
                  cg_tol=args.cg_tol, cg_maxiter=args.cg_maxiter, hessian_batches=sub, rank=args.rank,
                  backend=args.backend, seed=args.seed)
    t0 = time.perf_counter()
    eng.fit(X, Y)
    scale_damping(eng, args.damping_scale)  # as bench_end_to_end.py: CG in float32 needs 100 × auto here
    eng._factor = None
    fit = time.perf_counter() - t0

    query = time_query(eng, Xv, Yv, args.backend)[0]
    query_total = sum(query.values())

    t0 = time.perf_counter()
    factor = eng.factor
    factor_time = time.perf_counter() - t0
    t0 = time.perf_counter()
    s = eng.self_influence(method="factor")
    self_time = time.perf_counter() - t0

    # the norms alone (a second time, not in the totals): the split of the self-influence time
    named = eng.space.unflatten(eng.theta)
    t0 = time.perf_counter()
    for grp in eng.plan.groups():
        heads_pair_sq_norms(X[grp], Y[grp], named["image_proj.weight"], named["text_proj.weight"], eng.log_scale,
                            normalize=True, exact=eng.negative_term == "exact", scale=False)
    norms_time = time.perf_counter() - t0

    out = {"fit": fit, "query": query, "query_total": query_total, "factor": factor_time, "self": self_time,
           "norms": norms_time, "rank": factor.rank, "captured": factor.captured,
           "dropped_error": factor.dropped_error, "num_batches": num_batches, "finite": bool(torch.isfinite(s).all())}
    if args.check:
        idx = torch.randperm(args.n, generator=g)[:args.check].sort().values
        ref = factor.quadratic(eng.pair_gradients(idx)).double()
        got = s[idx].double()
        out["check_rel_max"] = float(((got - ref).abs() / ref.abs()).max())
        out["check_rel_median"] = float(((got - ref).abs() / ref.abs()).median())
    return out


def table(res) -> str:
    q = res["query"]
    rows = [("one influence query: ∇F", q["grad F"]), ("  CG solve", q["CG solve"]), ("  JVP pass", q["JVP pass"]),
            ("  reductions", q["reductions"]), ("**one influence query, total**", res["query_total"]),
            (f"factor build (rank {res['rank']})", res["factor"]),
            ("**self-influence of all pairs** (projections + norms)", res["self"]),
            ("  of which the norms ||g_k||² (timed alone, not in the totals)", res["norms"]),
            ("factor build + self-influence", res["factor"] + res["self"])]
    lines = ["| stage | time (s) |", "|---|---:|"] + [f"| {k} | {v:.1f} |" for k, v in rows]
    lines.append(f"| **ratio self-influence / query** | **{res['self'] / res['query_total']:.2f}** |")
    both = (res["factor"] + res["self"]) / res["query_total"]
    lines.append(f"| ratio (factor build + self-influence) / query | {both:.2f} |")
    return "\n".join(lines)


def describe(args, res) -> str:
    txt = (f"n = {args.n}, {args.feat}-d features, embed {args.embed}, batch {args.batch} ({res['num_batches']} "
           f"batches), float32, {args.threads} threads, P = {2 * args.feat * args.embed}; curvature Gauss–Newton on "
           f"{min(args.hessian_batches, res['num_batches'])} batches, CG max {args.cg_maxiter} iterations, damping "
           f"{args.damping_scale:g} × auto; factor rank {res['rank']} (captured {res['captured']:.3f}, dropped "
           f"error {res['dropped_error']:.3g}). Fit (not in the ratios): {res['fit']:.1f} s.")
    if "check_rel_max" in res:
        txt += (f" Against the G-based quadratic on {args.check} random pairs: relative difference max "
                f"{res['check_rel_max']:.2g}, median {res['check_rel_median']:.2g}.")
    return txt


def write(args, res, path=None):
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    body = (f"{SECTION}\n\n`python benchmarks/bench_self_influence_scale.py {' '.join(sys.argv[1:])}` "
            f"({platform.processor() or 'CPU'}, torch {torch.__version__}, load average at the end {load}, "
            f"{time.strftime('%Y-%m-%d')}).\n\n{describe(args, res)}\n\n{table(res)}\n")
    write_section(SECTION, body, *([path] if path else []))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_problem_args(p)
    p.add_argument("--rank", type=int, default=64, help="eigenpairs of the factor (the engine's default 64)")
    p.add_argument("--check", type=int, default=32, help="pairs compared with the G-based path (0: none)")
    args = p.parse_args(argv)
    res = run(args)
    print(describe(args, res))
    print(table(res))
    if args.write:
        write(args, res)


if __name__ == "__main__":
    main()
