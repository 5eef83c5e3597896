"""A real, badly scaled training set for benchmarks: digit pixels and MiniLM captions with no feature reduction.

``load_digits()`` images as their raw 64 pixel values (0..16) and captions built from the demo's templates
(:mod:`ecif_fast.demo.data`), embedded by the offline MiniLM encoder as raw 384-d vectors; a fraction of the
training captions describe another digit. This is the demo's data without its PCA and standardisation: the
scaling a user's own feature files often have. Needs the demo extra (scikit-learn, the MiniLM package).

    from real_digits import real_digits, save_pairs
    data = real_digits(n_train=1200, noise=0.2, seed=0)
    save_pairs("train.npz", data)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RealDigits:
    """``n`` training pairs: ``images (n, 64)`` pixels, ``texts (n, 384)`` caption embeddings, float64.

    ``labels (n,)``: the digit shown; ``caption_labels (n,)``: the digit the caption names; ``misaligned (n,)``:
    they differ; ``captions (n,)``: the caption strings.
    """

    images: np.ndarray
    texts: np.ndarray
    labels: np.ndarray
    caption_labels: np.ndarray
    misaligned: np.ndarray
    captions: np.ndarray


def real_digits(n_train: int = 1200, noise: float = 0.2, seed: int = 0) -> RealDigits:
    """Pick ``n_train`` digits at random (``seed``) and caption them, ``noise`` of them with another digit."""
    from sklearn.datasets import load_digits

    from ecif_fast.demo.data import DIGIT_WORDS, TEMPLATES, encode_texts

    digits = load_digits()
    rng = np.random.default_rng(seed)
    idx = rng.permutation(digits.target.shape[0])[:n_train]
    labels = digits.target[idx].astype(np.int64)
    cls = labels.copy()
    bad = rng.permutation(n_train)[:int(round(noise * n_train))]
    cls[bad] = (cls[bad] + rng.integers(1, len(DIGIT_WORDS), bad.shape[0])) % len(DIGIT_WORDS)
    tmpl = rng.integers(0, len(TEMPLATES), n_train)
    table = [[t.format(w=w, d=d) for t in TEMPLATES] for d, w in enumerate(DIGIT_WORDS)]
    emb = encode_texts([c for row in table for c in row]).astype(np.float64).reshape(len(DIGIT_WORDS), len(TEMPLATES), -1)
    captions = np.array([table[c][t] for c, t in zip(cls, tmpl)])
    return RealDigits(digits.data[idx].astype(np.float64), emb[cls, tmpl], labels, cls, cls != labels, captions)


def save_pairs(path, data: RealDigits) -> None:
    """Write a command-line pairs file (``.npz``: ``image_features``, ``text_features``, ``captions``,
    ``labels``, ``misaligned``; see :mod:`ecif_fast.cli.data_files`)."""
    np.savez(path, image_features=data.images, text_features=data.texts, captions=data.captions,
             labels=data.labels, misaligned=data.misaligned)
