"""The detection / cleaning setting: real digit images (PCA of the pixels) with MiniLM caption embeddings, a
fraction of the training captions swapped to another digit, CLIP-style linear heads trained with batch negatives
(``ecif_fast.demo`` pipeline: unnormalised heads, fixed scale, δ of training = δ of ECIF)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ecif_fast import train

from ecif_fast.demo.pipeline import DemoConfig, fit_heads, zero_shot_accuracy

from .problems import Problem, digit_features


@dataclass(frozen=True)
class DigitSetting:
    n_train: int = 1200
    n_val: int = 200
    batch_size: int = 64
    damping: float = 10.0
    image_dim: int = 16
    text_dim: int = 16
    embed_dim: int = 16

    def demo_config(self) -> DemoConfig:
        return DemoConfig(image_dim=self.image_dim, text_dim=self.text_dim, embed_dim=self.embed_dim,
                          damping=self.damping, batch_size=self.batch_size, n_train=self.n_train, n_val=self.n_val)


@dataclass
class DigitRun:
    """One trained model at one noise level and seed: the :class:`Problem`, its split and test accuracy."""

    problem: Problem
    split: object
    data: object
    train_seconds: float

    def accuracy(self, model=None) -> float:
        """Zero-shot accuracy on the held-out test digits (class prompts, docs/math.md §3 zero-shot use)."""
        return zero_shot_accuracy(self.problem.model if model is None else model, self.data, self.split.test)


def digit_run(data, setting: DigitSetting, noise: float, seed: int, kind: str = "uniform") -> DigitRun:
    """Train the heads with ``noise`` of the captions swapped (``kind``: see :func:`problems.digit_features`)."""
    cfg = setting.demo_config()
    X, Y, Xv, Yv, misaligned, split = digit_features(data, setting.n_train, setting.n_val, noise, seed, kind)
    model, ref, secs = fit_heads(data, split, cfg, seed)  # L-BFGS to max|∇R| ~ 1e-6, then Newton to 1e-9
    ids = torch.arange(setting.n_train) // setting.batch_size
    t0 = time.perf_counter()
    res = train(model, X, Y, batches=ids, damping=setting.damping, theta_ref=ref, method="newton", tol=1e-9)
    secs += time.perf_counter() - t0
    if not res.grad_norm < 1e-8:
        raise RuntimeError(f"digits (noise {noise}, seed {seed}): training did not reach the optimum ({res})")
    # retraining (cleaning): L-BFGS from θ̂; a dense Newton solve per retrain costs far more here and changes
    # no accuracy (max|∇R| < 1e-4 against a loss of ~5e3)
    problem = Problem("digits", f"digits + MiniLM, {noise:.0%} {kind} swapped captions, seed {seed}", model, X, Y,
                      Xv, Yv, ids, setting.damping, ref,
                      train_kwargs={"method": "lbfgs", "max_iter": cfg.max_iter, "tol": 1e-6},
                      misaligned=misaligned, tol=1e-5)
    return DigitRun(problem, split, data, secs)
