"""Bad input gives a clear exception naming the problem; DataLoader input, determinism, no side effects."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ecif_fast as ef
from ecif_fast import ECIFInputError
from problems import SPLIT_TRAIN as N, UNTRAINED_DAMPING as DAMPING, heads, paired_features


def _model():
    return heads(False)[0]


# ---------------------------------------------------------------- data
def test_mismatched_train_lengths(split):
    X, Y, _, _ = split
    with pytest.raises(ECIFInputError, match="mismatched lengths: train_images has 12 rows but train_texts has 11"):
        ef.ECIF(_model(), damping=DAMPING, curvature="hessian").fit(X, Y[:-1])


def test_mismatched_test_lengths(fitted_plain, split):
    _, _, Xt, Yt = split
    with pytest.raises(ECIFInputError, match="mismatched lengths: test_images has 4 rows but test_texts has 3"):
        fitted_plain.influence(Xt, Yt[:-1])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["images", "texts"])
def test_non_finite_train_features(split, bad, where):
    X, Y, _, _ = split
    X, Y = X.clone(), Y.clone()
    (X if where == "images" else Y)[3, 1] = bad
    with pytest.raises(ECIFInputError, match=rf"train_{where} contains NaN or Inf values in 1 row"):
        ef.ECIF(_model(), damping=DAMPING, curvature="hessian").fit(X, Y)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["images", "texts"])
def test_non_finite_test_features(fitted_plain, split, bad, where):
    _, _, Xt, Yt = split
    Xt, Yt = Xt.clone(), Yt.clone()
    (Xt if where == "images" else Yt)[0, 0] = bad
    with pytest.raises(ECIFInputError, match=rf"test_{where} contains NaN or Inf"):
        fitted_plain.influence(Xt, Yt)


def test_empty_tensors(split):
    X, Y, _, _ = split
    with pytest.raises(ECIFInputError, match="empty data: train_images has 0 rows"):
        ef.ECIF(_model(), damping=DAMPING, curvature="hessian").fit(X[:0], Y[:0])


def test_empty_test_tensors(fitted_plain, split):
    _, _, Xt, Yt = split
    with pytest.raises(ECIFInputError, match="empty data: test_images has 0 rows"):
        fitted_plain.influence(Xt[:0], Yt[:0])


def test_empty_dataloader(split):
    X, Y, _, _ = split
    loader = DataLoader(TensorDataset(X[:0], Y[:0]), batch_size=5)
    with pytest.raises(ECIFInputError, match="empty data: the DataLoader yielded no pairs"):
        ef.ECIF(_model(), damping=DAMPING, curvature="hessian").fit(loader)


def test_dataloader_of_non_pairs(split):
    X, _, _, _ = split
    with pytest.raises(ECIFInputError, match=r"must yield \(images, texts\) pairs"):
        ef.ECIF(_model(), damping=DAMPING, curvature="hessian").fit(DataLoader(TensorDataset(X), batch_size=5))


def test_non_tensor_features(split):
    X, Y, _, _ = split
    with pytest.raises(ECIFInputError, match="train_images must be a torch.Tensor, got list"):
        ef.ECIF(_model(), damping=DAMPING, curvature="hessian").fit(X.tolist(), Y)


# ---------------------------------------------------------------- batches
def test_batch_ids_wrong_length(split):
    X, Y, _, _ = split
    ids = torch.zeros(N - 2, dtype=torch.int64)
    with pytest.raises(ECIFInputError, match=r"one entry per pair: expected shape \(12,\), got \(10,\)"):
        ef.ECIF(_model(), damping=DAMPING, batches=ids, curvature="hessian").fit(X, Y)


def test_float_batch_ids(split):
    X, Y, _, _ = split
    with pytest.raises(ECIFInputError, match="batch ids must be an integer tensor, got dtype torch.float"):
        ef.ECIF(_model(), damping=DAMPING, batches=torch.arange(N) / 4.0, curvature="hessian").fit(X, Y)


@pytest.mark.parametrize("size", [0, -3])
def test_batch_size_not_positive(split, size):
    X, Y, _, _ = split
    with pytest.raises(ECIFInputError, match=f"batch size must be >= 1, got {size}"):
        ef.ECIF(_model(), damping=DAMPING, batches=size, curvature="hessian").fit(X, Y)


def test_bool_batches(split):
    X, Y, _, _ = split
    with pytest.raises(ECIFInputError, match="got a bool"):
        ef.ECIF(_model(), damping=DAMPING, batches=True, curvature="hessian").fit(X, Y)


# ---------------------------------------------------------------- options
@pytest.mark.parametrize("damping", [0, 0.0, -1.0, float("nan"), float("inf")])
def test_damping_not_positive_finite(damping):
    with pytest.raises(ECIFInputError, match="damping must be > 0 and finite"):
        ef.ECIF(_model(), damping=damping, curvature="hessian")


@pytest.mark.parametrize("damping", ["big", "Auto", None, [1.0]])
def test_damping_bad_value(damping):
    with pytest.raises(ECIFInputError, match="damping must be a positive number or 'auto'"):
        ef.ECIF(_model(), damping=damping, curvature="hessian")


@pytest.mark.parametrize("option,value,choices", [
    ("negative_term", "first-order", "['exact', 'taylor']"),
    ("solver", "kfac", "['exact', 'cg', 'lowrank']"),
    ("curvature", "fisher", "['hessian', 'gauss-newton']"),
])
def test_unknown_option(option, value, choices):
    with pytest.raises(ECIFInputError, match=rf"{option} must be one of {__import__('re').escape(choices)}, got '{value}'"):
        ef.ECIF(_model(), damping=DAMPING, **{option: value})


def test_chunk_size_not_positive():
    with pytest.raises(ECIFInputError, match="chunk_size must be an int >= 1"):
        ef.ECIF(_model(), damping=DAMPING, chunk_size=0, curvature="hessian")


class _ImageOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.image_proj = nn.Linear(6, 8, bias=False)
        self.logit_scale = 0.0

    def encode_image(self, x):
        return self.image_proj(x)


def test_model_lacking_encode_text():
    with pytest.raises(TypeError, match="lacks encode_text"):
        ef.ECIF(_ImageOnly().double(), damping=DAMPING, curvature="hessian")


def test_model_not_a_module():
    class Plain:
        logit_scale = 0.0

        def encode_image(self, x):
            return x

        def encode_text(self, y):
            return y

    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got Plain"):
        ef.ECIF(Plain(), damping=DAMPING, curvature="hessian")


# ---------------------------------------------------------------- call order and test functions
def test_influence_before_fit(split):
    _, _, Xt, Yt = split
    engine = ef.ECIF(_model(), damping=DAMPING, curvature="hessian")
    with pytest.raises(RuntimeError, match=r"call \.fit\(train_images, train_texts\) before"):
        engine.influence(Xt, Yt)
    for method in (engine.self_influence, engine.pair_gradients):
        with pytest.raises(RuntimeError, match=r"call \.fit"):
            method()
    for call in (lambda: engine.group_influence([0], Xt, Yt), lambda: engine.group_gradient([0]),
                 lambda: engine.relative_influence(Xt, Yt), lambda: engine.removal_update([0]),
                 lambda: engine.cleaned_model([0])):
        with pytest.raises(RuntimeError, match=r"call \.fit"):
            call()


def test_both_test_pairs_and_fn(fitted_plain, split):
    _, _, Xt, Yt = split
    with pytest.raises(ECIFInputError, match="pass either test pairs or fn=, not both"):
        fitted_plain.influence(Xt, Yt, fn=lambda m: m.logit_scale)


def test_neither_test_pairs_nor_fn(fitted_plain, split):
    _, _, Xt, _ = split
    with pytest.raises(ECIFInputError, match="give test_images and test_texts"):
        fitted_plain.influence(Xt)


def test_fn_returning_non_scalar(fitted_plain, split):
    _, _, Xt, _ = split
    with pytest.raises(ECIFInputError, match="fn\\(model\\) must return a scalar tensor"):
        fitted_plain.influence(fn=lambda m: m.encode_image(Xt))
    with pytest.raises(ECIFInputError, match="must return a scalar tensor"):
        fitted_plain.influence(fn=lambda m: 1.0)


def test_fn_not_callable(fitted_plain):
    with pytest.raises(ECIFInputError, match="fn must be a callable"):
        fitted_plain.influence(fn=[])
    with pytest.raises(ECIFInputError, match="fn must be a callable"):
        fitted_plain.influence(fn=[lambda m: m.logit_scale, 3])


# ---------------------------------------------------------------- removal indices
BAD_INDICES = [
    ([N], ECIFInputError, r"indices must lie in \[0, 12\), got min 12, max 12"),
    ([-1, 2], ECIFInputError, r"indices must lie in \[0, 12\), got min -1"),
    ([1, 3, 1], ECIFInputError, "indices contains duplicates"),
    ([], ECIFInputError, "indices is empty"),
    (torch.tensor([], dtype=torch.int64), ECIFInputError, "indices is empty"),
    (torch.zeros(N, dtype=torch.bool), ECIFInputError, "indices is empty"),
    ([0.0, 1.0], ECIFInputError, "indices must be integers, got dtype torch.float"),
    (torch.tensor([1.0, 2.0], dtype=torch.float64), ECIFInputError, "indices must be integers, got dtype torch.float64"),
    (torch.ones(N - 1, dtype=torch.bool), ECIFInputError, "boolean index mask must have 12 entries, got 11"),
]


@pytest.mark.parametrize("indices,exc,msg", BAD_INDICES)
def test_group_influence_bad_indices(fitted_plain, split, indices, exc, msg):
    _, _, Xt, Yt = split
    with pytest.raises(exc, match=msg):
        fitted_plain.group_influence(indices, Xt, Yt)


@pytest.mark.parametrize("indices,exc,msg", BAD_INDICES)
def test_removal_update_bad_indices(fitted_plain, indices, exc, msg):
    with pytest.raises(exc, match=msg):
        fitted_plain.removal_update(indices)


def test_bool_mask_indices_accepted(fitted_plain):
    mask = torch.zeros(N, dtype=torch.bool)
    mask[[2, 5]] = True
    a, b = fitted_plain.removal_update(mask), fitted_plain.removal_update([2, 5])
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- contrastive_loss
@pytest.mark.parametrize("shapes", [((5, 4), (5, 3)), ((5, 4), (4, 4)), ((5, 4), (5, 4, 1)), ((4,), (4,))])
def test_contrastive_loss_shape_mismatch(shapes):
    U = torch.randn(*shapes[0], dtype=torch.float64)
    V = torch.randn(*shapes[1], dtype=torch.float64)
    with pytest.raises(ECIFInputError, match=r"U and V must both be \(n, d\) with the same shape"):
        ef.contrastive_loss(U, V, 2.0)


def test_contrastive_loss_non_finite():
    U = torch.randn(5, 4, dtype=torch.float64)
    U[2, 0] = float("nan")
    with pytest.raises(ECIFInputError, match="U contains NaN or Inf"):
        ef.contrastive_loss(U, torch.randn(5, 4, dtype=torch.float64), 2.0)


# ---------------------------------------------------------------- DataLoader, determinism, side effects
def _all_outputs(engine, Xt, Yt):
    res = engine.influence(Xt, Yt)
    return [res.total, res.positive, res.negative, engine.self_influence([0, 4]),
            engine.group_influence([1, 6, 7], Xt, Yt).total,
            *engine.removal_update([1, 6, 7]).values()]


@pytest.mark.parametrize("normalize", [False, True])
def test_dataloader_equals_tensors(split, normalize):
    X, Y, Xt, Yt = split
    model, _ = heads(normalize, scale=3.0)
    from_tensors = ef.ECIF(model, damping=DAMPING, batches=4, curvature="hessian").fit(X, Y)
    loader = DataLoader(TensorDataset(X, Y), batch_size=5)  # ragged: 5 + 5 + 2, unlike the training batches
    from_loader = ef.ECIF(model, damping=DAMPING, batches=4, curvature="hessian").fit(loader)
    assert from_loader.source.streamed                    # not held: read again batch by batch
    assert torch.equal(from_loader.X, X) and torch.equal(from_loader.Y, Y)   # gathered on request
    for a, b in zip(_all_outputs(from_tensors, Xt, Yt), _all_outputs(from_loader, Xt, Yt)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("hessian", ["exact", "cg", "lowrank"])
def test_deterministic(hessian):
    # small P so that CG and the randomized low-rank path (rank + oversample < P) stay fast
    X, Y = paired_features(10, image_dim=3, text_dim=3, latent=2, seed=7)
    Xt, Yt = X[:3] + 0.1, Y[:3] - 0.1
    runs = []
    for _ in range(2):
        model, _ = heads(True, train_scale=True, scale=3.0, image_dim=3, text_dim=3, embed_dim=3)
        engine = ef.ECIF(model, damping=DAMPING, batches=None, solver=hessian, rank=3, curvature="hessian").fit(X, Y)
        if hessian == "lowrank":
            assert engine.solver.rank + 10 < engine.space.size  # the seeded subspace iteration is used
        runs.append(_all_outputs(engine, Xt, Yt))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_model_parameters_untouched(split):
    X, Y, Xt, Yt = split
    model, _ = heads(True, train_scale=True, scale=3.0)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    engine = ef.ECIF(model, damping=DAMPING, batches=4, curvature="hessian").fit(X, Y)
    engine.influence(Xt, Yt)
    engine.influence(fn=lambda m: ef.contrastive_loss(m.encode_image(Xt), m.encode_text(Yt), m.logit_scale.exp()))
    engine.self_influence()
    engine.relative_influence(Xt, Yt)
    engine.group_influence([0, 3], Xt, Yt)
    update = engine.removal_update([0, 3])
    cleaned = engine.cleaned_model([0, 3])
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    # the update is a copy: it differs from θ̂ and does not alias the model's storage
    assert not torch.equal(update["image_proj.weight"], before["image_proj.weight"])
    assert update["image_proj.weight"].data_ptr() != model.image_proj.weight.data_ptr()
    assert cleaned is not model
    assert torch.equal(cleaned.image_proj.weight, update["image_proj.weight"])
