"""The evaluation problems: a model trained to the optimum of R, its training and validation pairs, and the
retraining that gives the ground truth (docs/math.md §6.1).

(a) ``linear_plain``: unnormalised LinearHeads on synthetic paired features (a shared latent factor);
(b) ``linear_normalized``: L2-normalised LinearHeads on real digit images (PCA of the pixels) and MiniLM caption
    embeddings, some captions describing another digit;
(c) ``clip_lora`` (``lora_problem.py``): a tiny Hugging Face CLIP fine-tuned with a peft LoRA.
Everything is float64 and trained with ``ecif_fast.train`` until ``max|∇R| < tol``.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

import ecif_fast as ef
from ecif_fast.models.params import select_params


@dataclass
class Problem:
    """A trained contrastive model and everything needed to retrain it without some pairs.

    Attributes:
        name: key in ``results.json``. description: one line for the report.
        model: the trained model (θ̂). X, Y: ``(n, ...)`` training pairs. Xv, Yv: ``(m, ...)`` validation pairs.
        batch_ids: ``(n,)`` fixed batch of every pair (kept when pairs are removed, docs/math.md §3).
        damping: δ of R. theta_ref: ``(P,)`` reference point of R.
        train_kwargs: extra arguments of ``ecif_fast.train`` for retraining (method, max_iter, tol); a list of such
            dicts trains in stages, one ``ecif_fast.train`` call each, in order (e.g. L-BFGS, then Newton).
        params: the trained parameters (``ECIF(params=)``), None = all.
        misaligned: optional ``(n,)`` bool, pairs whose caption was swapped.
        tol: retraining runs to ``max|∇R| < tol`` and fails above ``10 tol``.
    """

    name: str
    description: str
    model: nn.Module
    X: torch.Tensor
    Y: torch.Tensor
    Xv: torch.Tensor
    Yv: torch.Tensor
    batch_ids: torch.Tensor
    damping: float
    theta_ref: torch.Tensor
    train_kwargs: dict | list[dict] = field(default_factory=dict)
    params: object = None
    misaligned: torch.Tensor | None = None
    tol: float = 1e-9

    @property
    def n(self) -> int:
        return self.X.shape[0]

    def ecif(self, **kwargs) -> ef.ECIF:
        """A fitted :class:`ecif_fast.ECIF` on this problem (keyword arguments override the defaults)."""
        args = {"damping": self.damping, "batches": self.batch_ids, "params": self.params, "curvature": "hessian",
                **kwargs}
        return ef.ECIF(self.model, **args).fit(self.X, self.Y)

    def F(self, model: nn.Module | None = None) -> float:
        """The test function: docs/math.md §2 contrastive loss of the validation pairs as one batch."""
        m = self.model if model is None else model
        with torch.no_grad():
            return float(ef.contrastive_loss(m.encode_image(self.Xv), m.encode_text(self.Yv), m.logit_scale.exp()))

    def retrain(self, keep: torch.Tensor) -> nn.Module:
        """A copy of θ̂ retrained to the optimum on the pairs ``keep`` (bool ``(n,)``), same batches."""
        m = copy.deepcopy(self.model)
        stages = self.train_kwargs if isinstance(self.train_kwargs, (list, tuple)) else [self.train_kwargs]
        for kwargs in stages:
            res = ef.train(m, self.X[keep], self.Y[keep], batches=self.batch_ids[keep], damping=self.damping,
                           theta_ref=self.theta_ref, params=self.params, **{"tol": self.tol, **kwargs})
        if not res.grad_norm < self.tol * 10:
            raise RuntimeError(f"{self.name}: retraining did not reach the optimum ({res})")
        return m


def batch_ids(n: int, batch: int) -> torch.Tensor:
    return ef.resolve_batches(batch, n).batch_ids()


def paired_features(n: int, image_dim: int = 6, text_dim: int = 5, latent: int = 4, noise: float = 0.5, seed: int = 0):
    """Image and text features sharing a latent factor (genuinely aligned pairs)."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, latent, generator=g, dtype=torch.float64)
    A = torch.randn(latent, image_dim, generator=g, dtype=torch.float64)
    B = torch.randn(latent, text_dim, generator=g, dtype=torch.float64)
    X = Z @ A + noise * torch.randn(n, image_dim, generator=g, dtype=torch.float64)
    Y = Z @ B + noise * torch.randn(n, text_dim, generator=g, dtype=torch.float64)
    return X, Y


def _heads_at_reference(image_dim, text_dim, embed_dim, normalize, scale, seed):
    torch.manual_seed(seed)
    m = ef.LinearHeads(image_dim, text_dim, embed_dim, normalize=normalize, logit_scale=math.log(scale)).double()
    space = select_params(m)
    ref = torch.randn(space.size, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    space.load_into(m, ref)
    return m, ref


def _trained(name, description, model, ref, X, Y, Xv, Yv, batch, damping, misaligned=None) -> Problem:
    ids = batch_ids(X.shape[0], batch)
    res = ef.train(model, X, Y, batches=ids, damping=damping, theta_ref=ref, method="newton", tol=1e-10)
    if not res.grad_norm < 1e-9:
        raise RuntimeError(f"{name}: training did not reach the optimum ({res})")
    return Problem(name, description, model, X, Y, Xv, Yv, ids, damping, ref,
                   train_kwargs={"method": "newton"}, misaligned=misaligned)


def linear_plain(n_train: int = 100, n_val: int = 40, batch: int = 25, damping: float = 0.1, seed: int = 0) -> Problem:
    """(a) Unnormalised LinearHeads(6, 5, 8), scale 1, synthetic aligned features (as ``tests/test_loo.py``)."""
    X, Y = paired_features(n_train + n_val, seed=seed)
    model, ref = _heads_at_reference(6, 5, 8, False, 1.0, seed)
    return _trained("linear_plain", f"LinearHeads(6, 5, 8), no normalisation, synthetic latent-factor pairs, "
                    f"n={n_train}, batches of {batch}, δ={damping}", model, ref,
                    X[:n_train], Y[:n_train], X[n_train:], Y[n_train:], batch, damping)


NOISE_KINDS = ("uniform", "next_digit")


def digit_features(data, n_train: int, n_val: int, noise: float, seed: int, kind: str = "uniform"):
    """Real digit-image features and MiniLM caption features: ``(X, Y, Xv, Yv, misaligned, split)``.

    ``data`` is :func:`ecif_fast.demo.data.load_digit_captions`; a fraction ``noise`` of the training captions
    describe another digit: ``"uniform"`` (a random other digit) or ``"next_digit"`` (systematically digit
    ``(c + 1) mod 10``: a consistent confusion that hurts zero-shot accuracy far more); validation captions are
    correct.
    """
    from ecif_fast.demo.pipeline import DemoConfig, make_split

    if kind not in NOISE_KINDS:
        raise ValueError(f"kind must be one of {NOISE_KINDS}, got {kind!r}")
    split = make_split(data, DemoConfig(n_train=n_train, n_val=n_val), noise, seed)
    if kind == "next_digit":
        split.caption_class[split.misaligned] = (data.labels[split.train][split.misaligned] + 1) % 10
    X = data.image_features[split.train]
    Y = data.caption_features[split.caption_class, split.template]
    vt = torch.randint(0, data.caption_features.shape[1], (n_val,), generator=torch.Generator().manual_seed(seed + 1))
    Xv = data.image_features[split.val]
    Yv = data.caption_features[data.labels[split.val], vt]
    return X, Y, Xv, Yv, split.misaligned, split


def linear_normalized(data, n_train: int = 120, n_val: int = 60, batch: int = 30, damping: float = 0.3,
                      noise: float = 0.1, seed: int = 0) -> Problem:
    """(b) L2-normalised LinearHeads(d_img, d_txt, 12), scale 5, on real digits + MiniLM captions."""
    X, Y, Xv, Yv, mis, _ = digit_features(data, n_train, n_val, noise, seed)
    model, ref = _heads_at_reference(X.shape[1], Y.shape[1], 12, True, 5.0, seed)
    return _trained("linear_normalized", f"LinearHeads({X.shape[1]}, {Y.shape[1]}, 12), L2-normalised, scale 5, "
                    f"real digits (PCA) + MiniLM captions ({noise:.0%} swapped), n={n_train}, batches of {batch}, "
                    f"δ={damping}", model, ref, X, Y, Xv, Yv, batch, damping, mis)


BUILDERS: dict[str, Callable[..., Problem]] = {"linear_plain": linear_plain, "linear_normalized": linear_normalized}
