"""Degenerate inputs to the library API give an ECIFInputError naming the argument and the fix, never a silent
degenerate answer (all-zero influences, a 0-iteration "optimum") or a raw torch error."""
import math
import re
import warnings

import pytest
import torch
from torch import nn

import ecif_fast as ef
from ecif_fast import ECIFInputError, NotPositiveDefiniteError
from ecif_fast.solvers import CGSolver, Curvature, ExactSolver, LowRankSolver
from problems import SPLIT_TEST as N_TEST, SPLIT_TRAIN as N, UNTRAINED_DAMPING as DAMPING, heads


def _model(normalize=True, **kw):
    return heads(normalize, **kw)[0]


class Towers(nn.Module):
    """A generic dual encoder that does not cast its inputs (unlike LinearHeads)."""

    def __init__(self, image_dim=6, text_dim=5, embed_dim=8, logit_scale=1.0):
        super().__init__()
        self.image_proj = nn.Linear(image_dim, embed_dim, bias=False)
        self.text_proj = nn.Linear(text_dim, embed_dim, bias=False)
        self.logit_scale = logit_scale

    def encode_image(self, x):
        return nn.functional.normalize(self.image_proj(x), dim=-1)

    def encode_text(self, y):
        return nn.functional.normalize(self.text_proj(y), dim=-1)


class TokenTowers(nn.Module):
    """Images as features, texts as integer token ids (mean of token embeddings; padding id 0 is skipped)."""

    def __init__(self, vocab=10, image_dim=6, embed_dim=4):
        super().__init__()
        self.image_proj = nn.Linear(image_dim, embed_dim, bias=False)
        self.tokens = nn.Embedding(vocab, embed_dim, padding_idx=0)
        self.logit_scale = 1.0

    def encode_image(self, x):
        return self.image_proj(x)

    def encode_text(self, ids):
        mask = (ids != 0).unsqueeze(-1).to(self.tokens.weight.dtype)
        return (self.tokens(ids) * mask).sum(1) / mask.sum(1)


def _tokens(n, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 10, (n, length), generator=g)


# ---------------------------------------------------------------- one test pair
def test_one_test_pair_is_refused_everywhere(fitted_normalized, split):
    _, _, Xt, Yt = split
    calls = {
        "influence": lambda: fitted_normalized.influence(Xt[:1], Yt[:1]),
        "per_test": lambda: fitted_normalized.influence(Xt[:1], Yt[:1], per_test=True),
        "relative": lambda: fitted_normalized.relative_influence(Xt[:1], Yt[:1]),
        "group": lambda: fitted_normalized.group_influence([0, 1], Xt[:1], Yt[:1]),
    }
    for name, call in calls.items():
        with pytest.raises(ECIFInputError, match=r"test_images and test_texts hold 1 pair.*at least 2 test pairs.*fn="):
            call()


def test_one_test_image_through_fn_is_fine(fitted_normalized, split):
    _, _, Xt, Yt = split

    def zero_shot(m):  # one image against two class prompts: not constant
        return ef.contrastive_loss(m.encode_image(Xt[:1]).expand(2, -1), m.encode_text(Yt[:2]), 5.0)

    res = fitted_normalized.influence(fn=zero_shot)
    assert res.total.shape == (N,) and bool(res.total.abs().max() > 0)


# ---------------------------------------------------------------- batches of one pair
@pytest.mark.parametrize("batches", [1, torch.arange(N)], ids=["size-1", "distinct-ids"])
def test_no_batch_with_two_pairs_is_refused(split, batches):
    X, Y, _, _ = split
    with pytest.raises(ECIFInputError, match=r"no batch has 2 or more pairs \(batches gives 12 batch\(es\) of 1 pair\)"
                                             r".*batches of at least 2 pairs"):
        ef.ECIF(_model(), damping=DAMPING, batches=batches, curvature="hessian").fit(X, Y)
    with pytest.raises(ECIFInputError, match="no batch has 2 or more pairs"):
        ef.train(_model(), X, Y, batches=batches, damping=1.0)


def test_one_training_pair_is_refused(split):
    X, Y, _, _ = split
    with pytest.raises(ECIFInputError, match="no batch has 2 or more pairs"):
        ef.ECIF(_model(), damping=DAMPING, curvature="hessian").fit(X[:1], Y[:1])
    with pytest.raises(ECIFInputError, match="no batch has 2 or more pairs"):
        ef.train(_model(), X[:1], Y[:1], damping=1.0)


def test_pairs_alone_in_a_batch_warn_once_and_have_zero_influence(split):
    X, Y, Xt, Yt = split
    with pytest.warns(UserWarning, match=r"1 training pair\(s\) sit alone in a batch of 1") as record:
        engine = ef.ECIF(_model(), damping=DAMPING, batches=11, curvature="hessian").fit(X, Y)  # 11 + 1
    assert len([w for w in record if "alone" in str(w.message)]) == 1
    assert engine.influence(Xt, Yt).total[11] == 0 and engine.self_influence([11])[0] == 0
    with pytest.warns(UserWarning, match="sit alone in a batch of 1") as record:
        ef.train(_model(), X, Y, batches=11, damping=1.0, max_iter=2)
    assert len([w for w in record if "alone" in str(w.message)]) == 1


def test_hessian_batches_of_one_pair_are_refused(split):
    X, Y, _, _ = split
    with pytest.warns(UserWarning, match="alone"):
        with pytest.raises(ECIFInputError, match="hessian_batches .* selects only batches of 1 pair"):
            ef.ECIF(_model(), damping=DAMPING, batches=11, hessian_batches=[1], curvature="hessian").fit(X, Y)


# ---------------------------------------------------------------- embeddings that overflow or vanish
@pytest.mark.parametrize("factor", [1e300, 1e-170], ids=["overflow", "underflow"])
def test_normalised_embeddings_lost_to_norm_overflow(split, factor):
    X, Y, _, _ = split
    msg = r"embeddings of train_images have norm .* instead of 1 in 12 of 12 rows .*rescale or standardise the features"
    with pytest.raises(ECIFInputError, match=msg):
        ef.ECIF(_model(), damping=DAMPING, batches=4, curvature="hessian").fit(X * factor, Y)
    with pytest.raises(ECIFInputError, match=msg):
        ef.train(_model(), X * factor, Y, batches=4, damping=1.0)


def test_some_rows_zero_in_a_normalising_model(split):
    X, Y, _, _ = split
    Y = Y.clone()
    Y[[2, 7]] *= 1e300
    with pytest.raises(ECIFInputError, match=r"embeddings of train_texts have norm 0 instead of 1 in 2 of 12 rows \(first: row 2\)"):
        ef.ECIF(_model(), damping=DAMPING, batches=4, curvature="hessian").fit(X, Y)


def test_generic_normalising_model_with_zero_rows(split):
    X, Y, _, _ = split
    torch.manual_seed(0)
    with pytest.raises(ECIFInputError, match=r"embeddings of train_images have norm 0 instead of 1 in 1 of 12 rows"):
        ef.ECIF(Towers().double(), damping=DAMPING, batches=4, curvature="hessian").fit(torch.cat([X[:11], 1e300 * X[11:]]), Y)


def test_zero_rows_in_a_model_that_does_not_normalise_are_fine(split):
    X, Y, Xt, Yt = split
    X = X.clone()
    X[3] = 0
    ef.ECIF(_model(False), damping=DAMPING, batches=4, curvature="hessian").fit(X, Y).influence(Xt, Yt)


def test_unnormalised_embeddings_that_overflow_the_logits(split):
    X, Y, _, _ = split
    with pytest.raises(ECIFInputError, match=r"logits t·<u, v> of train_images and train_texts reach inf"):
        ef.ECIF(_model(False), damping=DAMPING, batches=4, curvature="hessian").fit(X * 1e300, Y)


def test_non_finite_embeddings(split):
    X, Y, Xt, Yt = split

    class NaNText(Towers):
        def encode_text(self, y):
            return super().encode_text(y) * torch.where(y[:, :1] > 10, float("nan"), 1.0)

    model = NaNText().double()
    with pytest.raises(ECIFInputError, match=r"embeddings of train_texts are NaN or Inf in 1 of 12 rows \(first: row 4\)"):
        ef.ECIF(model, damping=DAMPING, batches=4, curvature="hessian").fit(X, torch.cat([Y[:4], Y[4:5] + 20, Y[5:]]))
    engine = ef.ECIF(model, damping=DAMPING, batches=4, curvature="hessian").fit(X, Y)
    with pytest.raises(ECIFInputError, match="embeddings of test_texts are NaN or Inf"):
        engine.influence(Xt, Yt + 20)


# ---------------------------------------------------------------- logit scale
@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), 1e4])
def test_linear_heads_refuses_bad_logit_scale(scale):
    with pytest.raises(ECIFInputError, match=r"logit_scale = .* must be finite and at most 88.7 so that t fits float32"):
        ef.LinearHeads(6, 5, 8, logit_scale=scale)


@pytest.mark.parametrize("scale", [float("nan"), 1e4])
def test_model_with_bad_logit_scale_is_refused(split, scale):
    X, Y, _, _ = split
    model = _model()
    with torch.no_grad():
        model.logit_scale.fill_(scale)  # set after construction
    with pytest.raises(ECIFInputError, match="logit_scale = .* must be finite and at most 709.8 so that t fits float64"):
        ef.ECIF(model, damping=DAMPING, curvature="hessian")
    with pytest.raises(ECIFInputError, match="logit_scale = "):
        ef.train(model, X, Y, batches=4, damping=1.0)
    # a plain float scale too, and a trained scale that became NaN after the constructor
    with pytest.raises(ECIFInputError, match="logit_scale = "):
        ef.ECIF(Towers(logit_scale=scale).double(), damping=DAMPING, curvature="hessian")
    trained = _model(train_scale=True)
    engine = ef.ECIF(trained, damping=DAMPING, batches=4, curvature="hessian")
    with torch.no_grad():
        trained.logit_scale.fill_(scale)
    with pytest.raises(ECIFInputError, match="logit_scale"):
        engine.fit(X, Y)


def test_huge_finite_scale_is_a_clear_error(split):
    X, Y, _, _ = split
    model = ef.LinearHeads(6, 5, 8, logit_scale=50.0).double()  # t = 5e21: S has no precision left
    with pytest.raises(ECIFInputError, match=r"logits t·<u, v> .* reach 5.18e\+21 .*lower the logit scale"):
        ef.train(model, X, Y, batches=4, damping=1e-3)
    with pytest.raises(ECIFInputError, match="lower the logit scale"):
        ef.ECIF(model, damping=DAMPING, batches=4, curvature="hessian").fit(X, Y)


def test_newton_linalg_failure_is_a_clear_error(split, monkeypatch):
    X, Y, _, _ = split

    def fail(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigvalsh", fail)
    with pytest.raises(ECIFInputError, match=r"training failed at Newton step 1: the Newton system could not be solved"
                                             r".*logit scale t = exp\(logit_scale\) = 5.*lower logit_scale"):
        ef.train(_model(), X, Y, batches=4, damping=1.0, method="newton")


def test_training_that_turns_non_finite_is_a_clear_error(split, monkeypatch):
    X, Y, _, _ = split
    model = _model()
    real = torch.func.jacfwd

    def nan_hessian(f):
        return lambda th: real(f)(th) * float("nan")

    monkeypatch.setattr(torch.func, "jacfwd", nan_hessian)
    with pytest.raises(ECIFInputError, match="training failed at Newton step 1: the Hessian is NaN or Inf"):
        ef.train(model, X, Y, batches=4, damping=1.0, method="newton")


# ---------------------------------------------------------------- parameters
def test_nan_parameter_is_named(split):
    X, Y, _, _ = split
    model = _model()
    with torch.no_grad():
        model.text_proj.weight[1, 2] = float("nan")
    with pytest.raises(ECIFInputError, match=r"model parameter 'text_proj.weight' has 1 NaN or Inf entry"):
        ef.ECIF(model, damping=DAMPING, curvature="hessian")
    with pytest.raises(ECIFInputError, match="'text_proj.weight' has 1 NaN"):
        ef.train(model, X, Y, batches=4, damping=1.0)
    model = _model()
    engine = ef.ECIF(model, damping=DAMPING, batches=4, curvature="hessian")
    with torch.no_grad():
        model.image_proj.weight.fill_(float("inf"))
    with pytest.raises(ECIFInputError, match="'image_proj.weight' has 48 NaN or Inf entries"):
        engine.fit(X, Y)


def test_exact_solver_never_raises_a_raw_linalg_error(fitted_normalized, monkeypatch):
    C = fitted_normalized.curvature.dense()
    bad = C.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ECIFInputError, match="the hessian matrix has NaN or Inf entries"):
        ExactSolver(fitted_normalized.curvature, 1.0, bad)

    def fail(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigvalsh", fail)
    with pytest.raises(NotPositiveDefiniteError, match="eigendecomposition of the hessian matrix failed.*increase damping"):
        ExactSolver(fitted_normalized.curvature, -1e9, C)  # Cholesky fails, then the eigenvalue for the message too


# ---------------------------------------------------------------- meta tensors, half precision, dtypes
def test_meta_inputs_and_parameters(split, fitted_normalized):
    X, Y, Xt, Yt = split
    with pytest.raises(ECIFInputError, match="train_images is on the 'meta' device"):
        ef.ECIF(_model(), damping=DAMPING, batches=4, curvature="hessian").fit(X.to("meta"), Y)
    with pytest.raises(ECIFInputError, match="test_texts is on the 'meta' device"):
        fitted_normalized.influence(Xt, Yt.to("meta"))
    with pytest.raises(ECIFInputError, match="train_texts is on the 'meta' device"):
        ef.train(_model(), X, Y.to("meta"), damping=1.0)
    meta = _model().to("meta")
    with pytest.raises(ECIFInputError, match=r"model parameter\(s\) \['logit_scale', 'image_proj.weight'.* are on the "
                                             r"'meta' device.*load_state_dict"):
        ef.ECIF(meta, damping=DAMPING, curvature="hessian")
    with pytest.raises(ECIFInputError, match="'meta' device"):
        ef.train(meta, X, Y, damping=1.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_is_refused(split, dtype):
    X, Y, _, _ = split
    model = _model().to(dtype)
    name = str(dtype).replace("torch.", "")
    with pytest.raises(ECIFInputError, match=rf"the model has torch.{name} parameters.*model.float\(\).*model.double\(\)"):
        ef.ECIF(model, damping=DAMPING, curvature="hessian")
    with pytest.raises(ECIFInputError, match=rf"torch.{name} parameters"):
        ef.train(model, X, Y, damping=1.0)


def test_floating_inputs_are_cast_to_the_parameter_dtype(split):
    X, Y, Xt, Yt = split
    torch.manual_seed(0)
    model = Towers().double()
    ref = ef.ECIF(model, damping=DAMPING, batches=4, curvature="hessian").fit(X, Y)
    low = ef.ECIF(model, damping=DAMPING, batches=4, curvature="hessian").fit(X.float(), Y.float())  # was a raw matmul dtype error
    assert low.X.dtype == torch.float64
    exact32 = ef.ECIF(model, damping=DAMPING, batches=4, curvature="hessian").fit(X.float().double(), Y.float().double())
    assert torch.equal(low.influence(Xt.float(), Yt.float()).total, exact32.influence(Xt.float().double(),
                                                                                        Yt.float().double()).total)
    assert ref.influence(Xt, Yt).total.dtype == torch.float64
    ef.train(Towers().double(), X.float(), Y.float(), batches=4, damping=1.0, max_iter=2)


# ---------------------------------------------------------------- test inputs shaped unlike the training inputs
def test_test_feature_width_mismatch(fitted_normalized, split):
    _, _, Xt, Yt = split
    msg = (r"test_images has shape \(4, 5\) but the training inputs have shape \(12, 6\): every row after the first "
           r"axis must match \(6,\); use the same feature extractor")
    e = fitted_normalized
    for call in (lambda: e.influence(Xt[:, :5], Yt), lambda: e.relative_influence(Xt[:, :5], Yt),
                 lambda: e.group_influence([1], Xt[:, :5], Yt)):
        with pytest.raises(ECIFInputError, match=msg):
            call()
    with pytest.raises(ECIFInputError, match=r"test_texts has shape \(4, 7\) but the training inputs have shape \(12, 5\)"):
        fitted_normalized.influence(Xt, torch.cat([Yt, Yt[:, :2]], 1))


def test_token_inputs_may_differ_in_length_not_in_dims(split):
    X, _, Xt, _ = split
    torch.manual_seed(0)
    model = TokenTowers().double()
    engine = ef.ECIF(model, damping=DAMPING, batches=4, curvature="hessian").fit(X, _tokens(N, 5))
    padded = torch.cat([_tokens(N_TEST, 3, seed=1), torch.zeros(N_TEST, 4, dtype=torch.int64)], 1)
    a = engine.influence(Xt, padded).total
    b = engine.influence(Xt, padded[:, :3]).total
    assert torch.allclose(a, b, rtol=1e-12, atol=0)  # padding changes nothing
    with pytest.raises(ECIFInputError, match=r"test_texts has shape \(4,\) \(1 dims\) but the training inputs have "
                                             r"shape \(12, 5\) \(2 dims\)"):
        engine.influence(Xt, padded[:, 0])
    with pytest.raises(ECIFInputError, match=r"test_texts has dtype torch.float64 but the training inputs have dtype "
                                             r"torch.int64"):
        engine.influence(Xt, padded.double())


def test_encoder_failure_on_test_data_names_the_argument(split):
    X, _, Xt, _ = split
    torch.manual_seed(0)
    model = TokenTowers().double()
    engine = ef.ECIF(model, damping=DAMPING, batches=4, curvature="hessian").fit(X, _tokens(N, 5))
    bad = _tokens(N_TEST, 5, seed=2)
    bad[1, 2] = 99  # outside the vocabulary
    with pytest.raises(ECIFInputError, match=r"the model failed to encode test_texts \(.*the training inputs were "
                                             r"\(12, 6\) torch.float64 and \(12, 5\) torch.int64\): IndexError"):
        engine.influence(Xt, bad)


# ---------------------------------------------------------------- indices
@pytest.mark.parametrize("indices", ["3", None, ["a"], [[0, "b"]], object()], ids=["str", "None", "list-str", "nested", "object"])
def test_non_integer_indices(fitted_normalized, split, indices):
    _, _, Xt, Yt = split
    msg = r"indices must be (training-pair positions|integers in \[0, 12\))"
    e = fitted_normalized
    for call in (lambda: e.group_influence(indices, Xt, Yt), lambda: e.cleaned_model(indices),
                 lambda: e.removal_update(indices), lambda: e.group_gradient(indices)):
        with pytest.raises(ECIFInputError, match=msg):
            call()
    if indices is not None:  # None means "all pairs" there
        for call in (lambda: e.pair_gradients(indices), lambda: e.self_influence(indices=indices)):
            with pytest.raises(ECIFInputError, match=msg):
                call()


def test_set_of_indices_is_accepted(fitted_normalized):
    a, b = fitted_normalized.removal_update({5, 2}), fitted_normalized.removal_update([2, 5])
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("everything", [list(range(N)), torch.ones(N, dtype=torch.bool)], ids=["list", "mask"])
def test_removing_every_pair_is_refused(fitted_normalized, split, everything):
    _, _, Xt, Yt = split
    msg = "indices removes all 12 training pairs: at least one pair must remain"
    e = fitted_normalized
    for call in (lambda: e.group_influence(everything, Xt, Yt), lambda: e.group_gradient(everything),
                 lambda: e.removal_update(everything), lambda: e.cleaned_model(everything)):
        with pytest.raises(ECIFInputError, match=msg):
            call()
    e.removal_update(list(range(N - 1)))  # one pair left is fine


# ---------------------------------------------------------------- solver options
@pytest.mark.parametrize("option,value,msg", [
    ("cg_maxiter", 0, "cg_maxiter must be >= 1 or None, got 0"),
    ("cg_maxiter", -5, "cg_maxiter must be >= 1 or None, got -5"),
    ("cg_maxiter", 2.5, "cg_maxiter must be an int >= 1 or None, got float 2.5"),
    ("cg_maxiter", "10", "cg_maxiter must be an int >= 1 or None, got str '10'"),
    ("cg_tol", -1, r"cg_tol must be a number in \(0, 1\)"),
    ("cg_tol", 0, r"cg_tol must be a number in \(0, 1\)"),
    ("cg_tol", 1.0, r"cg_tol must be a number in \(0, 1\)"),
    ("cg_tol", float("nan"), r"cg_tol must be a number in \(0, 1\)"),
    ("cg_tol", "1e-8", r"cg_tol must be a number in \(0, 1\)"),
    ("rank", 0, "rank must be >= 1, got 0"),
    ("rank", 2.5, "rank must be an int >= 1, got float 2.5"),
    ("rank", True, "rank must be an int >= 1, got bool True"),
    ("seed", "0", "seed must be an int, got str '0'"),
    ("seed", 1.5, "seed must be an int, got float 1.5"),
    ("hessian_batches", "0", "hessian_batches must be None or a list of batch numbers"),
    ("hessian_batches", 3, "hessian_batches must be None or a list of batch numbers"),
    ("hessian_batches", [0.5], "each entry of hessian_batches must be an int, got float 0.5"),
    ("hessian_batches", [True], "each entry of hessian_batches must be an int, got bool True"),
    ("hessian_batches", torch.tensor([0.0]), "hessian_batches must be a 1-d integer tensor"),
])
def test_solver_options_are_validated(option, value, msg):
    with pytest.raises(ECIFInputError, match=msg):
        ef.ECIF(_model(), damping=DAMPING, solver="cg", **{option: value})


def test_valid_solver_options_are_kept(split):
    X, Y, _, _ = split
    engine = ef.ECIF(_model(), damping=DAMPING, batches=4, solver="cg", cg_maxiter=7, cg_tol=1e-6,
                     hessian_batches=torch.tensor([0, 2]), curvature="hessian").fit(X, Y)
    assert engine.solver.maxiter == 7 and engine.solver.tol == 1e-6 and engine.hessian_batches == [0, 2]
    assert ef.ECIF(_model(), damping=DAMPING, solver="cg", curvature="hessian").fit(X, Y).solver.maxiter == max(100, 2 * engine.space.size)


def test_solver_constructors_validate(fitted_normalized):
    curv = fitted_normalized.curvature
    with pytest.raises(ECIFInputError, match="maxiter must be >= 1 or None, got 0"):
        CGSolver(curv, 1.0, maxiter=0)
    with pytest.raises(ECIFInputError, match=r"tol must be a number in \(0, 1\) .* got -1"):
        CGSolver(curv, 1.0, tol=-1)
    with pytest.raises(ECIFInputError, match="rank must be an int >= 1, got str '4'"):
        LowRankSolver(curv, 1.0, rank="4")
    with pytest.raises(ECIFInputError, match="seed must be an int"):
        LowRankSolver(curv, 1.0, rank=4, seed=None)
    assert isinstance(curv, Curvature)


def test_valid_inputs_give_no_warning(split):
    X, Y, Xt, Yt = split
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine = ef.ECIF(_model(), damping=DAMPING, batches=4, curvature="hessian").fit(X, Y)
        engine.influence(Xt, Yt)
        engine.group_influence([0, 3], Xt, Yt)
        engine.cleaned_model([0, 3])
        assert math.isfinite(float(engine.self_influence().sum()))
    assert re  # noqa: used in match patterns above
