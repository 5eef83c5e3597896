"""Self-influence of every pair on a user's real, badly scaled data: the spectral factor vs a solve per pair.

The set of ``real_digits.py`` (1,200 training pairs: raw 64-d digit pixels, raw 384-d MiniLM caption embeddings,
20 % of captions naming another digit). Two parts, both on this machine in one run:

1. The command line as a user runs it: ``ecif-fast train --train train.npz --out heads.pt`` (defaults: softly
   normalised heads on whitened features started at their canonical correlation directions, the number of
   whitened directions chosen by held-out loss, embed min(64, that rank), batches of 256, damping 10) then
   ``ecif-fast detect --train train.npz --model heads.pt --scoring self`` (at this P the default solver is the
   exact one: the dense Gauss–Newton matrix of linear heads has a closed form, docs/math.md §4.2) and the default
   ``detect`` (scoring ``cleaned``); wall time of each and the training's final max|grad R|.
2. Through the API on that checkpoint: ``ECIF(model, damping=δ, batches=..., solver="cg")`` (Gauss–Newton, CG
   preconditioned by the rank-``rank`` factor) and every pair's self-influence from the factor
   (``method="factor"``) at each ``--ranks``, against the same quantity solved per block of pairs by that
   preconditioned CG to a relative residual of ``--ref-tol`` (``method="solve"``; the dense matrix, P² in
   float64, is not formed) for ``--ref-pairs`` random pairs (0: all; a solve per pair is what the factor
   avoids, and on 2 cores all 1,200 take over half an hour) with ``--ref solve``; by default (``--ref exact``) the
   dense exact solver on all pairs.
   Spearman and Pearson of the two on those pairs, the factor's captured share and times.

Run::

    python benchmarks/bench_self_influence.py                 # prints the tables
    python benchmarks/bench_self_influence.py --ranks 64 256 --ref-tol 1e-8
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import ecif_fast as ef  # noqa: E402
from ecif_fast.training import objective  # noqa: E402
from real_digits import real_digits, save_pairs  # noqa: E402


def _cli(*argv) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ecif_fast", *map(str, argv)], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().double()


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a @ b) / (a.norm() * b.norm()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1200)
    ap.add_argument("--ranks", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--ref-tol", type=float, default=1e-8)
    ap.add_argument("--ref-pairs", type=int, default=256, help="pairs solved for the reference (0: all)")
    ap.add_argument("--ref", choices=["exact", "solve"], default="exact",
                    help="reference: the dense exact solver on all pairs (default), or per-pair CG on --ref-pairs")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        train = os.path.join(tmp, "train.npz")
        save_pairs(train, real_digits(n_train=args.n, noise=0.2, seed=args.seed))
        ckpt = os.path.join(tmp, "heads.pt")
        t_train = _cli("train", "--train", train, "--out", ckpt)
        t_detect = _cli("detect", "--train", train, "--model", ckpt, "--scoring", "self", "--out",
                        os.path.join(tmp, "report"), "--quiet")
        t_default = _cli("detect", "--train", train, "--model", ckpt, "--out", os.path.join(tmp, "default"),
                         "--quiet")
        from ecif_fast.cli.checkpoint import load_checkpoint
        from ecif_fast.cli.data_files import load_pairs

        model, training = load_checkpoint(ckpt)
        data = load_pairs(train)
        X, Y = data.images.double(), data.texts.double()
        damping = float(training["damping"])
        ids = training.get("batch_ids")
        batches = ids.to(torch.int64) if ids is not None else training.get("batch_size")
        state = objective(model, X, Y, batches=batches, damping=damping, theta_ref=training["theta_ref"])
        print(f"machine: {os.cpu_count()} CPU cores; n = {args.n}, P = {sum(p.numel() for p in model.parameters())}")
        print(f"| step | wall (s) |\n|---|---:|\n| ecif-fast train | {t_train:.1f} |\n"
              f"| ecif-fast detect --scoring self | {t_detect:.1f} |\n| total | {t_train + t_detect:.1f} |\n"
              f"| ecif-fast detect (default scoring, cleaned) | {t_default:.1f} |")
        print(f"rank chosen: {model.image_rank} + {model.text_rank} whitened directions; "
              + ", ".join(f"{e['rank']}: {e['held_out_loss']:.4f}" for e in training.get("rank_selection", [])))
        print(f"training: max|grad R| = {state.grad_norm:.3g} at the checkpoint\n")
        t0 = time.perf_counter()
        if args.ref == "exact":
            pick = torch.arange(args.n)
            ref = ef.ECIF(model, damping=damping, batches=batches, solver="exact").fit(X, Y).self_influence()
            how = "the dense exact solver (Cholesky of the damped Gauss–Newton matrix)"
        else:
            ref_engine = ef.ECIF(model, damping=damping, batches=batches, cg_tol=args.ref_tol,
                                 rank=max(args.ranks), solver="cg").fit(X, Y)
            g = torch.Generator().manual_seed(args.seed)
            pick = (torch.randperm(args.n, generator=g)[:args.ref_pairs].sort().values
                    if 0 < args.ref_pairs < args.n else torch.arange(args.n))
            ref = ref_engine.self_influence(pick, method="solve")
            how = f"per-block preconditioned CG to {args.ref_tol:g}"
        t_ref = time.perf_counter() - t0
        print(f"reference: {pick.numel()} pairs by {how}: {t_ref:.1f} s (fit included)\n")
        print("| rank | fit (s) | self-influence, all pairs (s) | Spearman | Pearson | captured |\n|---:|---:|---:|---:|---:|---:|")
        for rank in args.ranks:
            t0 = time.perf_counter()
            eng = ef.ECIF(model, damping=damping, batches=batches, rank=rank, solver="cg").fit(X, Y)
            t_fit = time.perf_counter() - t0
            t0 = time.perf_counter()
            got = eng.self_influence(method="factor")
            t_si = time.perf_counter() - t0
            got = got[pick]
            print(f"| {rank} | {t_fit:.1f} | {t_si:.1f} | {_corr(_ranks(got), _ranks(ref)):.4f} | "
                  f"{_corr(got, ref):.4f} | {eng.factor_summary()['captured']:.4f} |")


if __name__ == "__main__":
    main()
