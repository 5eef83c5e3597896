"""Newton-CG on normalised linear heads: the dense Gauss–Newton preconditioner against the block-diagonal one.

The set of ``real_digits.py`` (1,200 pairs of raw 64-d digit pixels and raw 384-d MiniLM caption embeddings,
20 % of captions naming another digit), ``LinearHeads.from_features(max_rank=--rank)`` with embedding size
``--rank`` (normalised, started at the canonical correlation directions), batches of 256, damping ``--damping``
towards the start, float64. Both preconditioners (``trust_region.DensePreconditioner`` and the block one, forced
by ``training.DENSE_PRECONDITIONER_MAX_P = 0``) train the same start side by side in one run, for at most
``--max-iter`` Newton-CG steps to ``--tol``; the table gives the wall time, steps, conjugate-gradient iterations
and the final max|grad R| of each, and the ratio of times.

Run::

    HF_HUB_OFFLINE=1 python benchmarks/bench_training.py --rank 16 --max-iter 60
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import ecif_fast as ef  # noqa: E402
from ecif_fast import training, trust_region  # noqa: E402


def run(X, Y, args, dense: bool) -> dict:
    model = ef.LinearHeads.from_features(X, Y, args.rank, max_rank=args.rank).double()
    ref = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
    limit = training.DENSE_PRECONDITIONER_MAX_P
    training.DENSE_PRECONDITIONER_MAX_P = limit if dense else 0
    cg = []
    real = trust_region.steihaug

    def counted(*a, **k):
        out = real(*a, **k)
        cg.append(out[1])
        return out
    trust_region.steihaug = counted
    try:
        t0 = time.perf_counter()
        res = ef.train(model, X, Y, batches=torch.arange(X.shape[0]) // 256, damping=args.damping, theta_ref=ref,
                       method="newton-cg", max_iter=args.max_iter, tol=args.tol)
        secs = time.perf_counter() - t0
    finally:
        training.DENSE_PRECONDITIONER_MAX_P = limit
        trust_region.steihaug = real
    return {"seconds": secs, "steps": res.iterations, "cg": sum(cg), "max_cg": max(cg, default=0),
            "grad": res.grad_norm, "P": ref.numel()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1200)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--damping", type=float, default=10.0)
    ap.add_argument("--max-iter", type=int, default=60)
    ap.add_argument("--tol", type=float, default=1e-8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from real_digits import real_digits

    data = real_digits(args.n, 0.2, args.seed)
    X, Y = torch.as_tensor(data.images), torch.as_tensor(data.texts)
    rows = {name: run(X, Y, args, dense) for name, dense in (("dense Gauss–Newton", True), ("block", False))}
    P = rows["block"]["P"]
    print(f"n = {args.n}, rank {args.rank} (P = {P}), damping {args.damping:g}, batches of 256, "
          f"at most {args.max_iter} steps to max|grad R| < {args.tol:g}")
    print("| preconditioner | wall (s) | steps | CG iterations (max per step) | final max abs grad R |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['seconds']:.1f} | {r['steps']} | {r['cg']} ({r['max_cg']}) | {r['grad']:.1e} |")
    print(f"block / dense wall time: {rows['block']['seconds'] / rows['dense Gauss–Newton']['seconds']:.2f}x")


if __name__ == "__main__":
    main()
