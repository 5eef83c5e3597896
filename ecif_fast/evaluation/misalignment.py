"""Kinds of misalignment for the detection benchmark: which training captions go wrong, and how.

Every kind starts from correctly captioned images (class ``c``, a caption template) and corrupts a fraction
``noise`` of the training pairs (drawn under ``seed``). A pair is *misaligned* when its caption is wrong about
its image:

- ``uniform``: the caption names a random other class;
- ``systematic``: the caption names class ``(c + 1) mod C`` (one consistent confusion);
- ``confusable``: the caption names the class the image is most easily mistaken for (the nearest other
  class centroid in image space, from the data, not from a hand-made table);
- ``vague``: a generic caption that names no class ("a handwritten digit"), true of every image but useless;
- ``attribute``: every caption states an attribute of the image as well as its class (the stroke weight:
  "bold" above the class median ink, "thin" below); corrupted captions keep the class and flip the attribute;
- ``duplicate``: one caption string (one class, one template) is given to all the corrupted images; those of
  that very class are then still correct and are not counted as misaligned.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KINDS = ("uniform", "systematic", "confusable", "vague", "attribute", "duplicate")

VAGUE_CAPTIONS = (
    "a handwritten digit",
    "a number written by hand",
    "a small grayscale scan",
    "a symbol someone drew with a pen",
)
ATTRIBUTE_TEMPLATES = (
    "a {a} handwritten digit {w}",
    "the number {w} written in a {a} stroke",
    "a {a} scan of the numeral {d}",
    "someone wrote a {a} {d} with a pen",
)
ATTRIBUTES = ("thin", "bold")


@dataclass(frozen=True)
class Captions:
    """The caption of every training pair.

    Attributes:
        text: ``(n,)`` caption strings. named_class: ``(n,)`` the class the caption names (-1: none).
        misaligned: ``(n,)`` bool, the caption is wrong about its image. corrupted: ``(n,)`` bool, the pairs the
            kind touched (a superset of ``misaligned``: a duplicate caption can fall on its own class).
    """

    text: np.ndarray
    named_class: np.ndarray
    misaligned: np.ndarray
    corrupted: np.ndarray


def nearest_other_class(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``(C,)`` for each class, the other class whose centroid of ``features`` is nearest to its own."""
    classes = np.unique(labels)
    cent = np.stack([features[labels == c].mean(0) for c in classes])
    dist = ((cent[:, None, :] - cent[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(dist, np.inf)
    return classes[dist.argmin(1)]


def caption_pairs(labels: np.ndarray, ink: np.ndarray, confusable: np.ndarray, kind: str, noise: float, seed: int,
                  words, templates) -> Captions:
    """Captions for images of class ``labels (n,)`` with ``noise`` of them corrupted by ``kind``.

    Args:
        labels: ``(n,)`` class of each image (0..C-1). ink: ``(n,)`` the attribute's measure (stroke weight).
        confusable: ``(C,)`` the class each class is mistaken for (:func:`nearest_other_class`).
        kind: one of :data:`KINDS`. noise: fraction of pairs corrupted. seed: draws.
        words: ``(C,)`` class names. templates: caption templates with ``{w}`` (name) and ``{d}`` (numeral).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not 0 <= noise < 1:
        raise ValueError(f"noise must be in [0, 1), got {noise}")
    rng = np.random.default_rng(seed)
    n, C = labels.shape[0], len(words)
    named = labels.copy()
    bad = np.zeros(n, dtype=bool)
    bad[rng.permutation(n)[:int(round(noise * n))]] = True
    if kind == "attribute":
        median = np.array([np.median(ink[labels == c]) if (labels == c).any() else 0.0 for c in range(C)])
        attr = (ink > median[labels]).astype(np.int64)
        attr[bad] = 1 - attr[bad]
        tmpl = rng.integers(0, len(ATTRIBUTE_TEMPLATES), n)
        text = np.array([ATTRIBUTE_TEMPLATES[t].format(a=ATTRIBUTES[a], w=words[c], d=c)
                         for c, a, t in zip(labels, attr, tmpl)], dtype=object)
        return Captions(text, named, bad.copy(), bad)
    tmpl = rng.integers(0, len(templates), n)
    if kind == "uniform":
        named[bad] = (labels[bad] + rng.integers(1, C, bad.sum())) % C
    elif kind == "systematic":
        named[bad] = (labels[bad] + 1) % C
    elif kind == "confusable":
        named[bad] = confusable[labels[bad]]
    elif kind == "duplicate":
        c0, t0 = int(rng.integers(0, C)), int(rng.integers(0, len(templates)))
        named[bad], tmpl[bad] = c0, t0
    # object dtype: a fixed-width string array would truncate the longer captions assigned below
    text = np.array([templates[t].format(w=words[c], d=c) for c, t in zip(named, tmpl)], dtype=object)
    if kind == "vague":
        named[bad] = -1
        text[bad] = np.array(VAGUE_CAPTIONS, dtype=object)[rng.integers(0, len(VAGUE_CAPTIONS), bad.sum())]
    misaligned = bad & (named != labels)
    return Captions(text, named, misaligned, bad)
