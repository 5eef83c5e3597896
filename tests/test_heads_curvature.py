"""The closed-form dense Gauss–Newton matrix of LinearHeads (docs/math.md §4.2) against the same matrix built from
``P`` Jacobian columns (``Curvature._dense_gauss_newton``), and the default solver it enables."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

import ecif_fast as ef
from ecif_fast.core.heads_curvature import has_closed_form, heads_gauss_newton
from ecif_fast.solvers import CLOSED_FORM_EXACT_MAX_PARAMS, EXACT_MAX_PARAMS, Curvature, ExactSolver
from problems import heads

N = 29  # batches of 8: the last holds 5 pairs; with batches=[...] below one batch holds a single pair

PARAMS = {"both": None, "image": ["image_proj.weight"], "text": ["text_proj.weight"],
          "text+image": ["text_proj.weight", "image_proj.weight"]}


def _model(normalize, scale: bool, whiten: bool, dtype=torch.float64):
    """``normalize``: False, True or ``"soft"`` (raw heads only: ``norm_eps`` of the order of the norms)."""
    g = torch.Generator().manual_seed(7)
    X = torch.randn(N, 6, generator=g, dtype=torch.float64)
    Y = X @ torch.randn(6, 5, generator=g, dtype=torch.float64) + 0.5 * torch.randn(N, 5, generator=g,
                                                                                     dtype=torch.float64)
    if whiten:
        m = ef.LinearHeads.from_features(X, Y, 4, normalize=normalize, logit_scale=math.log(3.0),
                                         train_scale=scale).double()
        with torch.no_grad():  # away from the canonical start (its extra rows are zero)
            for p in (m.image_proj.weight, m.text_proj.weight):
                p.add_(0.4 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    else:
        m = heads(bool(normalize), train_scale=scale, scale=3.0, image_dim=6, text_dim=5, embed_dim=4,
                  norm_eps=5.0 if normalize == "soft" else 0.0)[0]
    return m.to(dtype), X.to(dtype), Y.to(dtype)


def _curvature(model, X, Y, params, batches=8, subsample=None):
    engine = ef.ECIF(model, damping=1.0, batches=batches, solver="cg", params=params, precondition=False,
                     hessian_batches=subsample).fit(X, Y)
    return engine.curvature


@pytest.mark.parametrize("normalize,scale,whiten,params", [
    *itertools.product([True, False], [False, True], [False, True], ["both"]),
    (True, False, False, "image"), (True, True, True, "text"), (False, False, True, "image"),
    ("soft", False, False, "both"), ("soft", True, False, "both"), ("soft", False, False, "text"),
    (True, True, False, "text+image")])
def test_closed_form_equals_jacobian_columns(normalize, scale, whiten, params):
    model, X, Y = _model(normalize, scale, whiten)
    names = PARAMS[params]
    if scale and names is not None:
        names = [*names, "logit_scale"]
    C = _curvature(model, X, Y, names)
    closed = C._dense_heads()
    assert closed is not None
    ref = C._dense_gauss_newton()
    # both are sums of the same O(n·B) products in float64
    assert torch.allclose(closed, ref, rtol=0, atol=1e-12 * float(ref.abs().max()))
    assert torch.allclose(closed, closed.T, rtol=0, atol=1e-12 * float(ref.abs().max()))


def test_closed_form_with_ragged_batches_and_subsampling():
    model, X, Y = _model(True, False, True)
    batches = torch.tensor([0] * 1 + [1] * 11 + [2] * 8 + [3] * (N - 20))   # a one-pair batch adds nothing
    C = _curvature(model, X, Y, None, batches=batches, subsample=[0, 2, 3])
    assert C.factor == pytest.approx(4 / 3)
    ref = C._dense_gauss_newton()
    assert torch.allclose(C._dense_heads(), ref, rtol=0, atol=1e-12 * float(ref.abs().max()))


def test_closed_form_in_float32():
    model, X, Y = _model(True, False, True, torch.float32)
    C = _curvature(model, X, Y, None)
    closed, ref = C._dense_heads(), C._dense_gauss_newton()
    assert closed.dtype == torch.float32
    eps = torch.finfo(torch.float32).eps
    assert torch.allclose(closed, ref, rtol=0, atol=100 * eps * float(ref.abs().max()))


def test_dense_uses_the_closed_form_only_where_it_holds(monkeypatch):
    model, X, Y = _model(True, False, False)

    def refuse(self):
        raise AssertionError("formed by Jacobian columns")

    monkeypatch.setattr(Curvature, "_dense_gauss_newton", refuse)
    C = _curvature(model, X, Y, None)
    dense = C.dense()
    assert torch.equal(dense, dense.T)
    monkeypatch.undo()

    class Shifted(ef.LinearHeads):          # an overridden encoder: no closed form, Jacobian columns
        def encode_image(self, x):
            return super().encode_image(x + 1.0)

    other = Shifted(6, 5, 4).double()
    other.load_state_dict(model.state_dict())
    C2 = _curvature(other, X, Y, None)
    assert C2._dense_heads() is None
    assert not has_closed_form(other, ["image_proj.weight"], "gauss-newton")
    assert has_closed_form(model, ["image_proj.weight"], "gauss-newton")
    assert not has_closed_form(model, ["image_proj.weight"], "hessian")
    assert not has_closed_form(model, ["logit_scale"], "gauss-newton")
    assert torch.allclose(C2.dense(), C2._dense_gauss_newton())


def test_heads_gauss_newton_refuses_no_block():
    with pytest.raises(ValueError, match="image or the text block"):
        heads_gauss_newton(torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(3, 2), torch.zeros(3, 2), 0.0,
                           [torch.arange(4)], normalize=True, image=False, text=False)


def test_default_solver_is_exact_up_to_the_closed_form_limit():
    big = ef.LinearHeads(40, 40, 64)                 # P = 64·80 = 5,120 > EXACT_MAX_PARAMS
    assert EXACT_MAX_PARAMS < 5120 <= CLOSED_FORM_EXACT_MAX_PARAMS
    assert ef.ECIF(big).solver_name == "exact"
    assert ef.ECIF(big, curvature="hessian").solver_name == "cg"
    huge = ef.LinearHeads(100, 100, 64)              # P = 12,800
    assert ef.ECIF(huge).solver_name == "cg"


def test_exact_quadratic_matches_solve():
    model, X, Y = _model(True, False, True)
    engine = ef.ECIF(model, damping=0.5, batches=8, solver="exact").fit(X, Y)
    assert isinstance(engine.solver, ExactSolver)
    G = engine.pair_gradients()
    ref = (G * engine.solver.solve(G.T.contiguous()).T).sum(1)
    got = engine.solver.quadratic(G)
    assert torch.allclose(got, ref, rtol=1e-12, atol=0)
    assert torch.allclose(engine.self_influence(), ref, rtol=1e-12, atol=0)
    # a matrix handed in by the caller is not damped in place
    C = engine.curvature.dense()
    before = C.clone()
    ExactSolver(engine.curvature, 0.5, C)
    assert torch.equal(C, before)
