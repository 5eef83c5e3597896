"""The misalignment kinds of the detection benchmark (ecif_fast/evaluation/misalignment.py): each corrupts the
fraction asked for, labels exactly the pairs whose caption is wrong about the image, and is seeded."""
from __future__ import annotations

import numpy as np
import pytest

from ecif_fast.evaluation.misalignment import (ATTRIBUTES, KINDS, VAGUE_CAPTIONS, caption_pairs,
                                               nearest_other_class)

WORDS = ("zero", "one", "two", "three")
TEMPLATES = ("a {w}", "the numeral {d}")
N = 400


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(WORDS), N)
    ink = rng.normal(size=N) + labels
    confusable = np.array([1, 0, 3, 2])
    return labels, ink, confusable


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_corrupts_the_fraction_and_labels_what_is_wrong(kind):
    labels, ink, conf = _inputs()
    cap = caption_pairs(labels, ink, conf, kind, 0.25, 3, WORDS, TEMPLATES)
    assert cap.corrupted.sum() == 100
    assert not (cap.misaligned & ~cap.corrupted).any()
    clean = ~cap.corrupted
    assert (cap.named_class[clean] == labels[clean]).all()
    bad = cap.misaligned
    if kind == "uniform":
        assert (cap.named_class[bad] != labels[bad]).all() and bad.sum() == 100
    elif kind == "systematic":
        assert (cap.named_class[bad] == (labels[bad] + 1) % 4).all()
    elif kind == "confusable":
        assert (cap.named_class[bad] == conf[labels[bad]]).all()
    elif kind == "vague":
        assert (cap.named_class[bad] == -1).all() and set(cap.text[bad]) <= set(VAGUE_CAPTIONS)
    elif kind == "attribute":
        assert (cap.named_class == labels).all()
        median = np.array([np.median(ink[labels == c]) for c in range(4)])
        true_attr = np.where(ink > median[labels], ATTRIBUTES[1], ATTRIBUTES[0])
        says = np.array([ATTRIBUTES[1] if f" {ATTRIBUTES[1]} " in f" {t} " else ATTRIBUTES[0] for t in cap.text])
        assert ((says != true_attr) == bad).all()
    elif kind == "duplicate":
        assert len(set(cap.text[cap.corrupted])) == 1
        c0 = cap.named_class[cap.corrupted][0]
        assert (bad == cap.corrupted & (labels != c0)).all() and bad.sum() < 100
    for t, c in zip(cap.text[clean], labels[clean]):
        assert WORDS[c] in t or str(c) in t


def test_seeded_and_refuses_bad_arguments():
    labels, ink, conf = _inputs()
    a = caption_pairs(labels, ink, conf, "uniform", 0.2, 7, WORDS, TEMPLATES)
    b = caption_pairs(labels, ink, conf, "uniform", 0.2, 7, WORDS, TEMPLATES)
    c = caption_pairs(labels, ink, conf, "uniform", 0.2, 8, WORDS, TEMPLATES)
    assert (a.text == b.text).all() and not (a.text == c.text).all()
    assert caption_pairs(labels, ink, conf, "uniform", 0.0, 7, WORDS, TEMPLATES).misaligned.sum() == 0
    with pytest.raises(ValueError, match="kind must be one of"):
        caption_pairs(labels, ink, conf, "typo", 0.2, 7, WORDS, TEMPLATES)
    with pytest.raises(ValueError, match="noise must be in"):
        caption_pairs(labels, ink, conf, "uniform", 1.0, 7, WORDS, TEMPLATES)


def test_nearest_other_class_from_centroids():
    feats = np.array([[0.0], [0.1], [1.0], [1.2], [5.0]])
    labels = np.array([0, 0, 1, 1, 2])
    assert nearest_other_class(feats, labels).tolist() == [1, 0, 1]
