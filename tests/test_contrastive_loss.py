"""The public loss ``ecif_fast.contrastive_loss`` (docs/math.md §2): the fused streaming op under its own autograd,
held to autograd of the materialising twin (``core/loss.py``) on every backend, and the twin wherever second
derivatives or forward mode are needed (double backward, ``torch.func`` transforms, forward-AD dual tensors)."""
from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import forward_ad

import ecif_fast as ef
from ecif_fast.core.batches import BatchPlan, resolve_batches
from ecif_fast.core.loss import contrastive_loss as twin
from ecif_fast.errors import ECIFInputError
from ecif_fast.kernels import registry

N, D = 70, 9


def _backends():
    """Every backend that loads here and runs ``infonce`` on CPU tensors (Triton through its interpreter)."""
    return [name for name, ok in registry.available_backends().items() if ok is True]


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the Triton backend runs on CPU tensors in its interpreter
    monkeypatch.delenv("ECIF_FAST_BACKEND", raising=False)


def _problem(dtype=torch.float64, seed=0, n=N, d=D):
    g = torch.Generator().manual_seed(seed)
    U = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    V = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return U.to(dtype), V.to(dtype)


def _batches(kind, n=N):
    if kind == "all":
        return None
    if kind == "batch":
        return 16
    return torch.tensor([(7 * i) % 5 for i in range(n)]) * (torch.arange(n) % 3 > 0)  # ragged sizes


def _grads(loss_fn, U, V, t, **kw):
    """Loss and gradients with respect to U, V and the scale t (a tensor)."""
    U, V = U.clone().requires_grad_(True), V.clone().requires_grad_(True)
    t = torch.tensor(t, dtype=torch.float64, requires_grad=True)
    L = loss_fn(U, V, t, **kw)
    return (L.detach(),) + torch.autograd.grad(L, (U, V, t))


def _twin(U, V, t, batches):
    return twin(U, V, t, resolve_batches(batches, U.shape[0]))


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("kind", ["all", "batch", "ragged"])
def test_float64_gradients_match_autograd_of_the_twin(backend, kind):
    U, V = _problem()
    b = _batches(kind)
    ours = _grads(ef.contrastive_loss, U, V, 7.0, batches=b, backend=backend)
    ref = _grads(_twin, U, V, 7.0, batches=b)
    for a, r in zip(ours, ref):
        assert a.dtype == torch.float64
        assert float((a - r).abs().max()) <= 1e-10 * max(float(r.abs().max()), 1.0)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("kind", ["all", "batch", "ragged"])
def test_float32_within_rounding_of_the_twin(backend, kind):
    """float32 against the float64 twin on the same rounded inputs: a line of B weights sums with an error of
    about √B·eps per unit of what it weights, the scores carry eps·t·|u||v| (docs/math.md §9); 8× margin."""
    U, V = _problem(torch.float32, seed=1)
    b, t = _batches(kind), 7.0
    B = N if b is None else int(resolve_batches(b, N).sizes.max())
    tol = 8 * math.sqrt(B) * torch.finfo(torch.float32).eps * (1 + t)
    ours = _grads(ef.contrastive_loss, U, V, t, batches=b, backend=backend)
    ref = _grads(_twin, U.double(), V.double(), t, batches=b)
    assert ours[0].dtype == ours[1].dtype == torch.float32
    for a, r in zip(ours, ref):
        assert float((a.double() - r).abs().max()) <= tol * max(float(r.abs().max()), 1.0)


def test_what_runs_where():
    U, V = _problem()
    Ug = U.clone().requires_grad_(True)
    assert type(ef.contrastive_loss(Ug, V, 5.0).grad_fn).__name__ == "InfoNCEBackward"   # fused
    assert type(ef.contrastive_loss(Ug, V, 5.0, fused=False).grad_fn).__name__ != "InfoNCEBackward"  # twin
    with torch.no_grad():  # forward only: the streaming log-sum-exps
        value = ef.contrastive_loss(Ug, V, 5.0, 16)
    assert value.grad_fn is None
    assert float(value) == pytest.approx(float(_twin(U, V, 5.0, 16)), rel=1e-13)


@pytest.mark.parametrize("backend", _backends())
def test_double_backward_recomputes_the_twin(backend):
    """``create_graph=True`` then differentiating the gradient: a Hessian-vector product in U, V and t."""
    U, V = _problem(seed=2)
    b = _batches("ragged")
    g = torch.Generator().manual_seed(3)
    vU, vV = torch.randn(N, D, generator=g, dtype=torch.float64), torch.randn(N, D, generator=g, dtype=torch.float64)

    def hvp(loss_fn, **kw):
        Ua, Va = U.clone().requires_grad_(True), V.clone().requires_grad_(True)
        s = torch.tensor(math.log(6.0), dtype=torch.float64, requires_grad=True)
        gU, gV, gs = torch.autograd.grad(loss_fn(Ua, Va, s.exp(), batches=b, **kw), (Ua, Va, s), create_graph=True)
        return torch.autograd.grad((gU * vU).sum() + (gV * vV).sum() + gs, (Ua, Va, s))

    for a, r in zip(hvp(ef.contrastive_loss, backend=backend), hvp(_twin)):
        assert float((a - r).abs().max()) <= 1e-10 * max(float(r.abs().max()), 1.0)


def test_torch_func_transforms_use_the_twin():
    U, V = _problem(seed=4, n=20, d=4)
    f = lambda u: ef.contrastive_loss(u, V, 3.0, 8)  # noqa: E731
    f_twin = lambda u: _twin(u, V, 3.0, 8)  # noqa: E731
    tangent = torch.ones_like(U)
    pairs = [
        (torch.func.grad(f)(U), torch.func.grad(f_twin)(U)),
        (torch.func.jacrev(f)(U), torch.func.jacrev(f_twin)(U)),
        (torch.func.hessian(f)(U), torch.func.hessian(f_twin)(U)),
        (torch.func.jacfwd(torch.func.grad(f))(U), torch.func.jacfwd(torch.func.grad(f_twin))(U)),
        (torch.func.jvp(f, (U,), (tangent,))[1], torch.func.jvp(f_twin, (U,), (tangent,))[1]),
        (torch.func.vmap(f)(torch.stack([U, V])), torch.func.vmap(f_twin)(torch.stack([U, V]))),
    ]
    for a, r in pairs:
        assert torch.allclose(a, r, rtol=1e-12, atol=1e-12)


def test_forward_ad_dual_tensors_use_the_twin():
    U, V = _problem(seed=5, n=20, d=4)
    tangent = torch.randn(U.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    with forward_ad.dual_level():
        ours = forward_ad.unpack_dual(ef.contrastive_loss(forward_ad.make_dual(U, tangent), V, 3.0)).tangent
    ref = torch.func.jvp(lambda u: _twin(u, V, 3.0, None), (U,), (tangent,))[1]
    assert ours is not None and torch.allclose(ours, ref, rtol=1e-12, atol=1e-12)


def test_checks_and_refused_plans():
    U, V = _problem(n=6, d=3)
    with pytest.raises(ECIFInputError, match="scale must be finite"):
        ef.contrastive_loss(U, V, float("nan"))
    partial = BatchPlan(6, torch.arange(4), torch.tensor([0, 4]))  # pairs 4 and 5 in no batch
    with pytest.raises(ECIFInputError, match="each of its 6 pairs in one batch"):
        ef.contrastive_loss(U, V, 2.0, partial)


@pytest.mark.parametrize("batches", [None, 128])
def test_lbfgs_with_the_fused_loss_reaches_newtons_optimum(batches, monkeypatch):
    """L-BFGS trains with the fused loss once a batch holds ``FUSED_MIN_BATCH`` pairs and gets as close to the
    optimum Newton (twin, second derivatives) finds as torch's L-BFGS gets with the twin (max|∇R| ~ 4e-5 on this
    problem, either way). θ itself is not unique (a rotation of the embedding space changes neither the loss
    nor ||θ||²), so the scores U Vᵀ and R are compared."""
    from ecif_fast import training
    from ecif_fast.kernels import infonce_function

    calls = []
    real = infonce_function.InfoNCE.apply
    monkeypatch.setattr(infonce_function.InfoNCE, "apply", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(7)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    Z = randn(256, 3)
    X = Z @ randn(3, 6) + 0.3 * randn(256, 6)
    Y = Z @ randn(3, 5) + 0.3 * randn(256, 5)
    out = {}
    for method in ("newton", "lbfgs"):
        model = ef.LinearHeads(6, 5, 4, normalize=False, logit_scale=0.0).double()
        torch.manual_seed(0)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.3)
        res = ef.train(model, X, Y, batches=batches, damping=10.0, method=method, tol=1e-8, max_iter=300)
        assert res.grad_norm < (1e-8 if method == "newton" else 1e-4), res
        with torch.no_grad():
            out[method] = res.loss, model.encode_image(X) @ model.encode_text(Y).T
    assert calls and 128 >= training.FUSED_MIN_BATCH
    assert out["lbfgs"][0] == pytest.approx(out["newton"][0], rel=1e-10)
    assert torch.allclose(out["lbfgs"][1], out["newton"][1], rtol=0, atol=1e-5)
