"""Misalignment detection by kind of misalignment on raw digits + MiniLM captions, with the command line's model.

For each kind of ``ecif_fast.evaluation.misalignment`` (``--kinds``): ``--n`` training pairs of raw 64-d digit
pixels and raw 384-d MiniLM caption embeddings with ``--noise`` of them corrupted, ``--n-val`` correctly captioned
validation pairs; the command line's default model (normalised heads on whitened features, started at their
canonical correlation directions, embed ``--embed``, batches of ``--batch``, damping ``--damping``) trained by
``train`` to ``--tol``; then ``ECIF(model, damping, batches)`` (the default solver) and the AUROC of:

- baselines: ``clip_score`` (−cos), ``loss`` (the pair's loss in its batch);
- ``self``: self-influence ``g_kᵀH⁻¹g_k``; ``validation``: −influence on the validation pairs' loss;
- ``held_out_cos`` / ``held_out_loss``: the pair's own fit predicted with the pair left out
  (``ECIF.held_out_fit``, docs/math.md §3.1).

Needs the demo extra (scikit-learn, the MiniLM package). Run::

    HF_HUB_OFFLINE=1 python benchmarks/bench_detection_kinds.py --kinds uniform confusable --seed 1
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

import ecif_fast as ef
from ecif_fast.apps.detection import baseline_scores
from ecif_fast.apps.metrics import auroc
from ecif_fast.evaluation.misalignment import KINDS, caption_pairs, nearest_other_class

_EMBEDDED: dict = {}


def _embed(texts) -> np.ndarray:
    from ecif_fast.demo.data import encode_texts

    new = sorted(set(texts) - set(_EMBEDDED))
    if new:
        _EMBEDDED.update(zip(new, encode_texts(new).astype(np.float64)))
    return np.stack([_EMBEDDED[t] for t in texts])


def kind_data(kind: str, noise: float, seed: int, n: int, n_val: int):
    """``(X, Y, X_val, Y_val, misaligned)``: raw pixels and caption embeddings, float64 tensors."""
    from sklearn.datasets import load_digits

    from ecif_fast.demo.data import DIGIT_WORDS, TEMPLATES

    digits = load_digits()
    pixels, labels = digits.data.astype(np.float64), digits.target.astype(np.int64)
    idx = np.random.default_rng(1000 + seed).permutation(labels.size)
    tr, va = idx[:n], idx[n:n + n_val]
    confusable = nearest_other_class(pixels, labels)
    ink = pixels.sum(1)
    cap = caption_pairs(labels[tr], ink[tr], confusable, kind, noise, seed, DIGIT_WORDS, TEMPLATES)
    val = caption_pairs(labels[va], ink[va], confusable, kind, 0.0, seed + 1, DIGIT_WORDS, TEMPLATES)
    t = torch.tensor
    return t(pixels[tr]), t(_embed(list(cap.text))), t(pixels[va]), t(_embed(list(val.text))), cap.misaligned


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--noise", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=1200)
    ap.add_argument("--n-val", type=int, default=300)
    ap.add_argument("--embed", type=int, default=64)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--damping", type=float, default=10.0)
    ap.add_argument("--tol", type=float, default=1e-8)
    ap.add_argument("--rank", type=int, default=None, help="whitened dimensions per side at most (default all)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(os.cpu_count() or 1)
    cols = ["clip_score", "loss", "self", "validation", "held_out_cos", "held_out_loss"]
    print(f"n = {args.n}, noise {args.noise:.0%}, seed {args.seed}, embed {args.embed}, batches of {args.batch}, "
          f"damping {args.damping:g}, whitened rank {args.rank or 'all'}")
    print("| kind | train (s) | max abs grad R | " + " | ".join(cols) + " |")
    print("|---|---:|---:|" + "---:|" * len(cols))
    for kind in args.kinds:
        X, Y, Xv, Yv, bad = kind_data(kind, args.noise, args.seed, args.n, args.n_val)
        model = ef.LinearHeads.from_features(X, Y, args.embed, max_rank=args.rank).double()
        ref = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
        ids = torch.arange(args.n) // args.batch
        t0 = time.perf_counter()
        fit = ef.train(model, X, Y, batches=ids, damping=args.damping, theta_ref=ref, tol=args.tol)
        secs = time.perf_counter() - t0
        try:
            ecif = ef.ECIF(model, damping=args.damping, batches=ids).fit(X, Y)
        except ef.NotPositiveDefiniteError as err:   # training left an embedding near zero norm
            print(f"| {kind} | {secs:.0f} | {fit.grad_norm:.1e} | " + " | ".join("n/a" for _ in cols)
                  + f" |  (no ECIF: {str(err)[:80]}…)", flush=True)
            continue
        scores = baseline_scores(ecif)
        scores["self"] = ecif.self_influence().double().numpy()
        scores["validation"] = (-ecif.influence(Xv, Yv).total).double().numpy()
        held = ecif.held_out_fit()
        scores["held_out_cos"] = (-held["cos_held_out"]).double().numpy()
        scores["held_out_loss"] = held["loss_held_out"].double().numpy()
        print(f"| {kind} | {secs:.0f} | {fit.grad_norm:.1e} | "
              + " | ".join(f"{auroc(scores[c], bad):.3f}" for c in cols) + " |", flush=True)


if __name__ == "__main__":
    main()
