"""Small, well-posed float64 test problems shared by the tests (docs/math.md §6 practical notes)."""
from __future__ import annotations

import copy
import math

import torch

import ecif_fast as ef
from ecif_fast.models.params import select_params
from ecif_fast.evaluation.problems import paired_features  # noqa: F401  (shared with the evaluation suite)

#: training and test pairs of the shared small split (the ``split`` fixture of conftest.py)
SPLIT_TRAIN, SPLIT_TEST = 12, 4
#: damping for models at their random initialisation: large enough to keep H positive definite
UNTRAINED_DAMPING = 300.0


#: token pairs for the tiny CLIP towers of the model-family tests: vocabulary, sequence length, image side, and
#: the end-of-text id (the largest, since open_clip pools the text at the argmax token id)
VOCAB, SEQ, IMG, EOS = 40, 5, 8, 39


def token_pairs(n: int, seed: int = 0):
    """``(pixel values (n, 3, IMG, IMG), token ids (n, SEQ))`` in float64: BOS ... EOS, fixed length, no padding."""
    g = torch.Generator().manual_seed(seed)
    px = torch.randn(n, 3, IMG, IMG, generator=g, dtype=torch.float64)
    ids = torch.randint(2, EOS, (n, SEQ), generator=g)
    ids[:, 0], ids[:, -1] = 0, EOS
    return px, ids


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.double() - a.double().mean()
    b = b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def small_split(n: int = 12, n_test: int = 4, *, seed: int = 5, scale: float = 0.3):
    """``(X, Y, X_test, Y_test)``: ``n`` training and ``n_test`` test pairs of :func:`paired_features`, scaled."""
    X, Y = paired_features(n + n_test, seed=seed)
    X, Y = scale * X, scale * Y
    return X[:n], Y[:n], X[n:], Y[n:]


def heads(normalize: bool, *, train_scale: bool = False, scale: float | None = None, image_dim: int = 6,
          text_dim: int = 5, embed_dim: int = 8, seed: int = 0, norm_eps: float = 0.0):
    """Float64 LinearHeads initialised at a random reference point θ_ref (returned too); ``norm_eps``: a soft
    normalisation."""
    torch.manual_seed(seed)
    if scale is None:
        scale = 5.0 if normalize else 1.0
    m = ef.LinearHeads(image_dim, text_dim, embed_dim, normalize=normalize, logit_scale=math.log(scale),
                       train_scale=train_scale, norm_eps=norm_eps).double()
    space = select_params(m)
    g = torch.Generator().manual_seed(seed + 1)
    ref = torch.randn(space.size, generator=g, dtype=torch.float64)
    if train_scale:
        ref[space.slices()["logit_scale"]] = math.log(scale)
    space.load_into(m, ref)
    return m, ref


def assert_cleaned_copy_updates_only_lora(ecif, model, removed):
    """``cleaned_model(removed)`` is a copy holding ``θ̂ + H⁻¹ g(D*)``, in which only LoRA weights changed;
    the original model is untouched."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cleaned = ecif.cleaned_model(removed)
    after = cleaned.state_dict()
    expect = ecif.theta + ecif.solver.solve(ecif.group_gradient(removed))
    assert torch.equal(ecif.space.flat(cleaned), expect)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # original untouched


def retrained_without(model, X, Y, ids, k: int, damping: float, theta_ref):
    """A copy of ``model`` retrained to the optimum without pair ``k`` (the other pairs keep their batches ``ids``);
    asserts that training reached max|∇R| < 1e-9."""
    mk = copy.deepcopy(model)
    keep = torch.ones(X.shape[0], dtype=torch.bool)
    keep[k] = False
    res = ef.train(mk, X[keep], Y[keep], batches=ids[keep], damping=damping, theta_ref=theta_ref)
    assert res.grad_norm < 1e-9, res
    return mk
