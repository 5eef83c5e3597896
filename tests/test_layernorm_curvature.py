"""Exact curvature through LayerNorm whose weight is trained (as in every transformer tower).

``torch.func.hessian`` (``jacfwd(jacrev)``) gets the second derivatives through ``layer_norm`` wrong when
both its input and its weight depend on θ; the dense Hessian (also used by Newton training,
``jacfwd(grad)`` there too) and the engine's influence must not inherit that. The oracle is ``torch.autograd.functional.hessian`` (double backward, no vmap).
"""
from __future__ import annotations

import torch
from torch import nn

import ecif_fast as ef
from ecif_fast import oracle
from ecif_fast.models.functional import FunctionalModel
from ecif_fast.models.params import select_params
from ecif_fast.solvers.curvature import Curvature
from problems import paired_features


class LayerNormHeads(nn.Module):
    """Linear heads followed by a trained LayerNorm per tower, L2-normalised (transformer-like)."""

    def __init__(self, image_dim=6, text_dim=5, embed_dim=4):
        super().__init__()
        self.image_proj = nn.Linear(image_dim, embed_dim)
        self.text_proj = nn.Linear(text_dim, embed_dim)
        self.image_norm = nn.LayerNorm(embed_dim)
        self.text_norm = nn.LayerNorm(embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(1.0), requires_grad=False)

    def encode_image(self, x):
        return nn.functional.normalize(self.image_norm(self.image_proj(x)), dim=-1)

    def encode_text(self, y):
        return nn.functional.normalize(self.text_norm(self.text_proj(y)), dim=-1)


def _model(seed=0):
    torch.manual_seed(seed)
    m = LayerNormHeads().double()
    with torch.no_grad():  # non-trivial LayerNorm weights, so the weight-input coupling matters
        for ln in (m.image_norm, m.text_norm):
            ln.weight.copy_(1 + 0.5 * torch.randn_like(ln.weight))
            ln.bias.copy_(0.3 * torch.randn_like(ln.bias))
    return m


def test_dense_hessian_through_layer_norm_matches_double_backward():
    X, Y = paired_features(24, seed=1)
    m = _model()
    space = select_params(m)
    plan = ef.resolve_batches(8, 24)
    C = Curvature(FunctionalModel(m, space), space.flat(m), X, Y, plan, "hessian").dense()
    H = oracle.dense_hessian(m, X, Y, batches=8, damping=0.0)
    assert float((C - H).abs().max() / H.abs().max()) < 1e-12


def test_influence_through_layer_norm_equals_the_oracle():
    X, Y = paired_features(30, seed=2)
    Xv, Yv = X[24:], Y[24:]
    X, Y = X[:24], Y[:24]
    m = _model(1)
    damping = 3000.0  # untrained model: enough damping for a positive definite H
    ecif = ef.ECIF(m, damping=damping, batches=8, solver="exact", curvature="hessian").fit(X, Y)
    got = ecif.influence(Xv, Yv).total
    gF = torch.func.grad(lambda th: ecif.fm.call(th, lambda mm: ef.contrastive_loss(
        mm.encode_image(Xv), mm.encode_text(Yv), mm.logit_scale.exp())))(ecif.theta)
    want, _ = oracle.brute_force_influence(m, X, Y, gF, batches=8, damping=damping)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-10

