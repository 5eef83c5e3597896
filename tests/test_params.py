"""``params=`` selection of the trained parameters, and models other than LinearHeads (the protocol)."""
import math

import pytest
import torch
from torch import nn

import ecif_fast as ef
from ecif_fast import ECIFInputError
from ecif_fast.models.params import select_params
from ecif_fast.oracle import brute_force_pair_gradients, dense_hessian
from problems import heads, paired_features

N, N_TEST = 12, 4
DAMPING = 300.0  # the models here are not trained: a large damping keeps H positive definite
BATCHES = torch.tensor([0, 1, 2, 1, 0, 2, 2, 1, 0, 0, 1, 2])  # ragged: 4, 4, 4 in scrambled order


def _rel(a, b):
    a, b = a.detach(), b.detach()  # see test_unselected_trainable_parameter_leaves_no_graph
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def data():
    X, Y = paired_features(N + N_TEST, seed=11)
    X, Y = 0.3 * X, 0.3 * Y  # moderate logits for the un-normalised heads
    return X[:N], Y[:N], X[N:], Y[N:]


# ---------------------------------------------------------------- selection
def test_default_is_requires_grad():
    fixed, _ = heads(True, train_scale=False)
    assert select_params(fixed).names == ("image_proj.weight", "text_proj.weight")
    trained, _ = heads(True, train_scale=True)
    assert set(select_params(trained).names) == {"logit_scale", "image_proj.weight", "text_proj.weight"}
    trained.text_proj.weight.requires_grad_(False)
    assert set(select_params(trained).names) == {"logit_scale", "image_proj.weight"}


def test_select_by_name_prefix_and_full_name():
    model, _ = heads(False)
    assert select_params(model, "image_proj").names == ("image_proj.weight",)
    assert select_params(model, "image_proj.weight").names == ("image_proj.weight",)
    assert select_params(model, ["text_proj", "image_proj"]).names == ("image_proj.weight", "text_proj.weight")
    # a name may pick a parameter with requires_grad=False (the fixed logit scale)
    assert select_params(model, ["logit_scale"]).names == ("logit_scale",)
    # a prefix matches whole name components only: "image" is not "image_proj"
    with pytest.raises(ECIFInputError, match=r"params \['image'\] match no parameter"):
        select_params(model, "image")


def test_select_by_predicate():
    model, _ = heads(False, train_scale=True)
    space = select_params(model, lambda name, p: p.dim() == 2)
    assert space.names == ("image_proj.weight", "text_proj.weight")
    assert space.size == 6 * 8 + 5 * 8
    assert select_params(model, lambda name, p: name.startswith("text")).names == ("text_proj.weight",)


def test_select_by_parameter_objects():
    model, _ = heads(False, train_scale=True)
    assert select_params(model, [model.text_proj.weight]).names == ("text_proj.weight",)
    assert select_params(model, model.logit_scale).names == ("logit_scale",)  # a single Parameter
    # order follows the model, not the argument
    assert select_params(model, [model.text_proj.weight, model.image_proj.weight]).names == \
        ("image_proj.weight", "text_proj.weight")


def test_unknown_name_lists_available():
    model, _ = heads(False)
    with pytest.raises(ECIFInputError, match=r"params \['vision'\] match no parameter of LinearHeads") as info:
        ef.ECIF(model, damping=DAMPING, params=["image_proj", "vision"], curvature="hessian")
    msg = str(info.value)
    for name in ("logit_scale", "image_proj.weight", "text_proj.weight"):
        assert name in msg
    assert "available:" in msg


def test_bad_selections():
    model, _ = heads(False)
    other, _ = heads(False, seed=1)
    with pytest.raises(ECIFInputError, match="not parameters of the model"):
        select_params(model, [other.image_proj.weight])
    with pytest.raises(ECIFInputError, match="no trained parameters selected in LinearHeads"):
        select_params(model, lambda name, p: False)
    frozen, _ = heads(False)
    frozen.requires_grad_(False)
    with pytest.raises(ECIFInputError, match="set requires_grad=True"):
        ef.ECIF(frozen, damping=DAMPING, curvature="hessian")
    with pytest.raises(TypeError, match="params must be None, names, parameters of the model, or a predicate"):
        select_params(model, [0, 1])
    with pytest.raises(TypeError, match="params must be"):
        select_params(model, ["image_proj", model.text_proj.weight])
    mixed, _ = heads(False)
    mixed.text_proj.float()
    with pytest.raises(ECIFInputError, match=r"mixed dtypes \['torch.float32', 'torch.float64'\]"):
        select_params(mixed)


def test_flat_unflatten_roundtrip():
    model, _ = heads(True, train_scale=True)
    space = select_params(model)
    theta = space.flat(model)
    parts = space.unflatten(theta)
    for name, p in model.named_parameters():
        assert torch.equal(parts[name], p.detach())
        assert torch.equal(theta[space.slices()[name]], p.detach().reshape(-1))
    clone, _ = heads(True, train_scale=True, seed=5)
    space.load_into(clone, theta)
    assert torch.equal(space.flat(clone), theta)


# ---------------------------------------------------------------- restricted influence == oracle
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("term", ["exact", "taylor"])
def test_image_proj_only_matches_oracle(data, normalize, term):
    X, Y, Xt, Yt = data
    model, _ = heads(normalize, train_scale=True, scale=3.0)
    engine = ef.ECIF(model, damping=DAMPING, batches=BATCHES, params="image_proj", negative_term=term, curvature="hessian").fit(X, Y)
    assert engine.space.names == ("image_proj.weight",) and engine.space.size == 6 * 8
    assert not engine.fm.scale_trained  # logit_scale requires grad but is not selected: fixed

    G, Gpos = brute_force_pair_gradients(model, X, Y, batches=BATCHES, params="image_proj", negative_term=term)
    assert G.shape == (N, 48)
    Hinv = torch.linalg.inv(dense_hessian(model, X, Y, batches=BATCHES, params="image_proj", damping=DAMPING))
    grad_F = engine._test_gradients(Xt, Yt, None, False)[0]
    # ∇F restricted to image_proj, by plain autograd on the model
    loss = ef.contrastive_loss(model.encode_image(Xt), model.encode_text(Yt), model.logit_scale.exp())
    assert _rel(grad_F, torch.autograd.grad(loss, model.image_proj.weight)[0].reshape(-1)) < 1e-12

    res = engine.influence(Xt, Yt)
    assert _rel(res.total, G @ Hinv @ grad_F) < 1e-10
    assert _rel(res.positive, Gpos @ Hinv @ grad_F) < 1e-10
    assert _rel(engine.pair_gradients(), G) < 1e-10
    assert _rel(engine.self_influence(), (G * (G @ Hinv)).sum(1)) < 1e-10

    # the restricted problem is not the full one
    full = ef.ECIF(model, damping=DAMPING, batches=BATCHES, negative_term=term, curvature="hessian").fit(X, Y).influence(Xt, Yt)
    assert _rel(full.total, res.total) > 1e-3


def test_restricted_removal_update_touches_only_selected(data):
    X, Y, _, _ = data
    model, _ = heads(False, train_scale=True, scale=3.0)
    engine = ef.ECIF(model, damping=DAMPING, batches=BATCHES, params=[model.image_proj.weight], curvature="hessian").fit(X, Y)
    removed = [2, 3, 9]
    state = engine.removal_update(removed)
    assert torch.equal(state["text_proj.weight"], model.text_proj.weight.detach())
    assert torch.equal(state["logit_scale"], model.logit_scale.detach())
    # θ̂ + H⁻¹ g(D*), with g(D*) the sum of the exact group gradient over image_proj only
    H = dense_hessian(model, X, Y, batches=BATCHES, params="image_proj", damping=DAMPING)
    step = torch.linalg.solve(H, engine.group_gradient(removed))
    expected = model.image_proj.weight.detach().reshape(-1) + step
    assert _rel(state["image_proj.weight"].reshape(-1), expected) < 1e-12
    assert not torch.equal(state["image_proj.weight"], model.image_proj.weight.detach())


def test_selection_styles_agree(data):
    X, Y, Xt, Yt = data
    model, _ = heads(True, train_scale=True, scale=3.0)
    runs = [ef.ECIF(model, damping=DAMPING, batches=4, params=p, curvature="hessian").fit(X, Y).influence(Xt, Yt).total
            for p in ("text_proj", ["text_proj.weight"], [model.text_proj.weight],
                      lambda name, p: name == "text_proj.weight")]
    for r in runs[1:]:
        assert torch.equal(r, runs[0])


# ---------------------------------------------------------------- a custom model (the protocol)
class TwoTowers(nn.Module):
    """Not LinearHeads: an MLP image tower, a linear text tower with bias, a plain-float logit scale."""

    def __init__(self, image_dim=6, text_dim=5, hidden=5, embed_dim=4, logit_scale=math.log(2.0)):
        super().__init__()
        self.vision = nn.Sequential(nn.Linear(image_dim, hidden), nn.Tanh(), nn.Linear(hidden, embed_dim))
        self.text = nn.Linear(text_dim, embed_dim)
        self.logit_scale = logit_scale  # a float: fixed, never a trained parameter

    def encode_image(self, x):
        return self.vision(x)

    def encode_text(self, y):
        return self.text(y)


def _two_towers():
    torch.manual_seed(0)
    return TwoTowers().double()


def test_custom_model_satisfies_protocol():
    model = _two_towers()
    assert isinstance(model, ef.ContrastiveModel)
    assert select_params(model).names == ("vision.0.weight", "vision.0.bias", "vision.2.weight", "vision.2.bias",
                                          "text.weight", "text.bias")


@pytest.mark.parametrize("params", [None, "vision", lambda name, p: name.endswith("bias")],
                         ids=["all", "vision", "biases"])
@pytest.mark.parametrize("batches", [None, BATCHES], ids=["all-negatives", "batches"])
def test_custom_model_matches_oracle(data, params, batches):
    X, Y, Xt, Yt = data
    model = _two_towers()
    engine = ef.ECIF(model, damping=DAMPING, batches=batches, params=params, curvature="hessian").fit(X, Y)
    G, Gpos = brute_force_pair_gradients(model, X, Y, batches=batches, params=params)
    Hinv = torch.linalg.inv(dense_hessian(model, X, Y, batches=batches, params=params, damping=DAMPING))

    # ∇F by plain autograd on the module, with the float scale
    loss = ef.contrastive_loss(model.encode_image(Xt), model.encode_text(Yt), math.exp(model.logit_scale))
    named = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, [named[n] for n in engine.space.names])
    grad_F = torch.cat([g.reshape(-1) for g in grads])
    assert _rel(engine._test_gradients(Xt, Yt, None, False)[0], grad_F) < 1e-12

    res = engine.influence(Xt, Yt)
    assert _rel(res.total, G @ Hinv @ grad_F) < 1e-10
    assert _rel(res.positive, Gpos @ Hinv @ grad_F) < 1e-10
    assert _rel(engine.self_influence(), (G * (G @ Hinv)).sum(1)) < 1e-10

    by_fn = engine.influence(fn=lambda m: ef.contrastive_loss(m.encode_image(Xt), m.encode_text(Yt),
                                                               math.exp(m.logit_scale)))
    assert _rel(by_fn.total, res.total) < 1e-12


def test_custom_model_end_to_end(data):
    """Train to the optimum, then influence, group influence and the cleaned model."""
    X, Y, Xt, Yt = data
    damping, removed = 10.0, [5]
    model = _two_towers()
    ref = select_params(model).flat(model)
    result = ef.train(model, X, Y, batches=4, damping=damping, theta_ref=ref)
    assert result.grad_norm < 1e-9
    engine = ef.ECIF(model, damping=damping, batches=4, curvature="hessian").fit(X, Y)
    res = engine.influence(Xt, Yt)
    assert res.total.shape == (N,) and bool(torch.isfinite(res.total).all())
    group = engine.group_influence(removed, Xt, Yt)
    assert float(group.total) == pytest.approx(float(res.total[5]), rel=1e-10)
    cleaned = engine.cleaned_model(removed)
    assert isinstance(cleaned, TwoTowers) and cleaned.logit_scale == model.logit_scale
    # the Newton step is the one of the dense Hessian of R
    H = dense_hessian(model, X, Y, batches=4, damping=damping)
    step = torch.linalg.solve(H, engine.group_gradient(removed))
    moved = select_params(cleaned).flat(cleaned) - engine.theta
    assert _rel(moved, step) < 1e-10
    # and points where retraining without the pair goes (n = 12 is small: one removal is not tiny, so
    # only the direction is checked; docs/math.md §6)
    keep = torch.ones(N, dtype=torch.bool)
    keep[removed] = False
    retrained = _two_towers()
    select_params(retrained).load_into(retrained, engine.theta)
    ef.train(retrained, X[keep], Y[keep], batches=(torch.arange(N) // 4)[keep], damping=damping, theta_ref=ref)
    actual = select_params(retrained).flat(retrained) - engine.theta
    assert float(moved @ actual / (moved.norm() * actual.norm())) > 0.9


def test_float_logit_scale_keeps_float64_precision(data):
    """A float ``logit_scale`` on a float64 model: t = exp(s) must not be rounded through float32."""
    X, Y, Xt, Yt = data
    model = TwoTowers(logit_scale=math.log(1 / 0.07)).double()  # exp(float32(s)) != exp(s) in float64
    engine = ef.ECIF(model, damping=DAMPING, batches=4, curvature="hessian").fit(X, Y)
    loss = ef.contrastive_loss(model.encode_image(Xt), model.encode_text(Yt), math.exp(model.logit_scale))
    grad_F = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])
    assert _rel(engine._test_gradients(Xt, Yt, None, False)[0], grad_F) < 1e-12


def test_unselected_trainable_parameter_leaves_no_graph(data):
    """Results are plain tensors even when a parameter outside ``params=`` requires grad (LoRA-style use)."""
    X, Y, Xt, Yt = data
    model, _ = heads(False, train_scale=True, scale=3.0)  # logit_scale requires grad but is not selected
    engine = ef.ECIF(model, damping=DAMPING, batches=4, params="image_proj", curvature="hessian").fit(X, Y)
    outputs = [engine.influence(Xt, Yt).total, engine.self_influence(), engine.group_influence([1], Xt, Yt).total]
    assert not any(t.requires_grad for t in outputs)
