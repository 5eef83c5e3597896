"""End to end: ECIF influence of every training pair on one validation function, LinearHeads at scale.

Setting (issue target: n = 262144 pairs, 512-d features, embed 256, batch 512, aim < 60 s on 2 cores):
``LinearHeads(512, 512, 256, normalize=True)`` in float32 (P = 262144 parameters), fixed logit scale,
batch negatives of 512, ``F`` = contrastive loss of 1024 validation pairs. Features share a 64-d latent
factor (``x = zA + 0.5ε``), the heads are trained for a few hundred Adam steps (not timed), so the softmax
is peaked as in a trained CLIP head.

The solve uses what a user at this scale would: matrix-free CG on the Gauss–Newton curvature, subsampled
to ``--hessian-batches`` random training batches (docs/math.md §4 "optional Hessian subsampling"), relative
residual ``--cg-tol`` or ``--cg-maxiter`` iterations, damping ``--damping-scale`` × the "auto" value
(default 100, i.e. δ = 0.1·tr(C)/P: at n = 4096 float32 CG at the auto value 1e-3·tr(C)/P still had a
relative residual of 0.17 after 200 iterations, at 10× it reached 0.013, at 100× 3e-5, where 50
iterations already gave Pearson 0.997 against 200). ``--reference-batches K`` also solves with K batches
(a tighter curvature) and ``--reference-iters K`` solves with up to K CG iterations; either reports the
Pearson correlation of the two influence vectors, so the accuracy cost of the subsample and of the
truncated solve is measured, not assumed. The solve's relative residual is always reported.

Stages (``time.perf_counter``, one run; the machine is shared, so also read the stage split):
fit (embeddings at θ̂ + curvature set-up + damping), ∇F, CG solve, JVP pass over all n pairs,
``ecif_reductions`` over all n pairs (one query), total.

Run::

    python benchmarks/bench_end_to_end.py                       # n = 262144, prints the table
    python benchmarks/bench_end_to_end.py --n 32768 --reference-batches 64
    python benchmarks/bench_end_to_end.py --write               # also rewrites its section of BENCHMARKS.md
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
from ecif_fast.kernels import ops, registry
from ecif_fast.solvers import CGSolver
from sections import write_section  # benchmarks/sections.py

SECTION = "## End to end: influence of every pair, LinearHeads, n = 262144"


def make_problem(n: int, feat: int, embed: int, n_val: int, seed: int, train_steps: int, batch: int):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(64, feat, generator=g) / 8
    Bm = torch.randn(64, feat, generator=g) / 8
    Z = torch.randn(n + n_val, 64, generator=g)
    X = Z @ A + 0.5 * torch.randn(n + n_val, feat, generator=g) / feat ** 0.5
    Y = Z @ Bm + 0.5 * torch.randn(n + n_val, feat, generator=g) / feat ** 0.5
    torch.manual_seed(seed)
    model = ef.LinearHeads(feat, feat, embed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(train_steps):
        idx = torch.randint(0, n, (batch,), generator=g)
        u, v, s = model(X[idx], Y[idx])
        loss = ef.contrastive_loss(u, v, s.exp(), None) / batch
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, X[:n], Y[:n], X[n:], Y[n:]


def time_query(eng, Xv, Yv, backend):
    """One influence query of the fitted ``eng`` on the validation pairs, stage by stage:
    ``({"grad F", "CG solve", "JVP pass", "reductions"}: seconds, G (Q, P), Hq (P, Q), pos, neg)``."""
    times = {}
    t0 = time.perf_counter()
    G = eng._test_gradients(Xv, Yv, None, False)
    times["grad F"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    Hq = eng.solver.solve(G.T.contiguous())
    times["CG solve"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    dU, dV, ds = eng._directions(Hq)
    times["JVP pass"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pos, neg = ops.ecif_reductions(eng.U, eng.V, eng.log_scale.exp(), eng.plan, dU, dV, ds, eng.negative_term,
                                   backend=backend)
    times["reductions"] = time.perf_counter() - t0
    return times, G, Hq, pos, neg


def subsample_batches(num_batches: int, k: int, g: torch.Generator):
    """``k`` random batch indices, sorted (the curvature's ``hessian_batches``), or None when ``k`` covers them all."""
    return torch.randperm(num_batches, generator=g)[:k].sort().values.tolist() if k < num_batches else None


def scale_damping(eng, scale: float) -> None:
    """Multiply the fitted ``eng``'s damping by ``scale`` and give it a plain CG solver at that damping."""
    eng.damping *= scale
    eng.solver = CGSolver(eng.curvature, eng.damping, eng.cg_tol, eng.cg_maxiter)


def add_problem_args(p: argparse.ArgumentParser) -> None:
    """The flags of the problem, fit and query this benchmark shares with ``bench_self_influence_scale.py``."""
    p.add_argument("--n", type=int, default=262144)
    p.add_argument("--feat", type=int, default=512)
    p.add_argument("--embed", type=int, default=256)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--val", type=int, default=1024)
    p.add_argument("--hessian-batches", type=int, default=16)
    p.add_argument("--cg-tol", type=float, default=1e-3)
    p.add_argument("--cg-maxiter", type=int, default=50)
    p.add_argument("--damping-scale", type=float, default=100.0,
                   help="with --damping auto: use this multiple of the auto value 1e-3·tr(C)/P (default 100, "
                        "i.e. 0.1·tr(C)/P: float32 CG does not converge at the auto value on this problem)")
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backend", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write", action="store_true")


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    model, X, Y, Xv, Yv = make_problem(args.n, args.feat, args.embed, args.val, args.seed, args.train_steps,
                                       args.batch)
    num_batches = -(-args.n // args.batch)
    g = torch.Generator().manual_seed(args.seed + 1)

    def subsample(hb):
        return subsample_batches(num_batches, hb, g)

    sub_main = subsample(args.hessian_batches)

    def engine(sub):
        return ef.ECIF(model, damping=args.damping, batches=args.batch, solver="cg", curvature="gauss-newton",
                       cg_tol=args.cg_tol, cg_maxiter=args.cg_maxiter, hessian_batches=sub, backend=args.backend)

    times = {}
    t0 = time.perf_counter()
    eng = engine(sub_main).fit(X, Y)
    if args.damping_scale != 1.0:  # a multiple of the "auto" value (its trace estimate stays in the fit time)
        scale_damping(eng, args.damping_scale)
    times["fit"] = time.perf_counter() - t0
    stages, G, Hq, pos, neg = time_query(eng, Xv, Yv, args.backend)
    times.update(stages)
    iters = eng.solver.last_iterations
    times["total"] = sum(times.values())
    total = (pos + neg)[0]
    b = G.T.contiguous()
    resid = float((eng.curvature.matvec(Hq) + eng.damping * Hq - b).norm() / b.norm())  # not timed
    out = {"times": times, "iterations": iters, "residual": resid, "damping": eng.damping, "num_batches": num_batches,
           "backend": registry.resolve("ecif_reductions", "cpu", args.backend)[0],
           "gn_backend": registry.resolve("gauss_newton_product", "cpu", args.backend)[0]}
    if args.reference_batches or args.reference_iters:
        ref_eng = engine(subsample(args.reference_batches) if args.reference_batches else sub_main)
        ref_eng.cg_maxiter = args.reference_iters or args.cg_maxiter
        ref_eng.cg_tol = 1e-6 if args.reference_iters else args.cg_tol
        ref_eng.fit(X, Y)
        if args.damping_scale != 1.0:
            scale_damping(ref_eng, args.damping_scale)
        ref = ref_eng.influence(Xv, Yv).total
        a, b = total.double() - total.double().mean(), ref.double() - ref.double().mean()
        out["reference_pearson"] = float((a * b).sum() / (a.norm() * b.norm()))
    return out


def table(args, res) -> str:
    t = res["times"]
    lines = ["| stage | time (s) | share |", "|---|---:|---:|"]
    for k, v in t.items():
        lines.append(f"| {k} | {v:.1f} | {100 * v / t['total']:.0f} % |" if k != "total"
                     else f"| **total** | **{v:.1f}** | |")
    return "\n".join(lines)


def describe(args, res) -> str:
    txt = (f"n = {args.n}, {args.feat}-d features, embed {args.embed}, batch {args.batch} "
           f"({res['num_batches']} batches), float32, {args.threads} threads; curvature: Gauss–Newton on "
           f"{min(args.hessian_batches, res['num_batches'])} random batches, CG {res['iterations']} iterations (tol {args.cg_tol:g}, "
           f"max {args.cg_maxiter}), damping {res['damping']:g} "
           f"({f'{args.damping_scale:g} × auto' if args.damping == 'auto' else 'explicit'}); reductions backend `{res['backend']}`, "
           f"Gauss–Newton product backend `{res['gn_backend']}`.")
    txt += f" Relative residual of the solve ‖(C + δI)h − ∇F‖/‖∇F‖: {res['residual']:.2g}."
    if "reference_pearson" in res:
        what = []
        if args.reference_batches:
            what.append(f"{args.reference_batches} batches of curvature")
        if args.reference_iters:
            what.append(f"up to {args.reference_iters} CG iterations (tol 1e-6)")
        txt += (f" Pearson of the influence vector against a reference solve with {' and '.join(what)}: "
                f"{res['reference_pearson']:.4f}.")
    return txt


def write(args, res, path="BENCHMARKS.md"):
    body = (f"{SECTION}\n\n`python benchmarks/bench_end_to_end.py {' '.join(sys.argv[1:])}` "
            f"({platform.processor() or 'CPU'}, "
            f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}).\n\n{describe(args, res)}\n\n"
            f"{table(args, res)}\n")
    write_section(SECTION, body, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_problem_args(p)
    p.add_argument("--reference-batches", type=int, default=0)
    p.add_argument("--reference-iters", type=int, default=0)
    p.add_argument("--damping", default="auto")
    args = p.parse_args(argv)
    if args.damping != "auto":
        args.damping = float(args.damping)
        args.damping_scale = 1.0
    res = run(args)
    print(describe(args, res))
    print(table(args, res))
    if args.write:
        write(args, res)


if __name__ == "__main__":
    main()
