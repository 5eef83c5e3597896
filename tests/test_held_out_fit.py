"""``ECIF.held_out_fit`` (docs/math.md §3.1): each pair's cosine and loss predicted with the pair left out of
training, against autograd + a dense solve, and against leave-one-out retraining."""
from __future__ import annotations


import pytest
import torch
from torch.func import functional_call, grad

import ecif_fast as ef
from ecif_fast.core.loss import per_pair_loss
from ecif_fast.models.params import select_params
from ecif_fast.training import train
from problems import heads, paired_features, pearson, retrained_without

N, BATCH, DAMPING, N_LOO = 60, 15, 0.3, 12


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "normalized"])
def fitted(request):
    X, Y = paired_features(N, seed=2)
    model, ref = heads(request.param, seed=1)
    res = train(model, X, Y, batches=BATCH, damping=DAMPING, theta_ref=ref)
    assert res.grad_norm < 1e-9, res
    return model, ref, X, Y


def _own_fits(model, theta, X, Y, ids):
    """``(cos (n,), loss (n,))`` of every pair at ``theta`` by plain torch (the loss within its batch)."""
    space = select_params(model)
    U, V, s = functional_call(model, space.unflatten(theta), (X, Y))
    s = torch.as_tensor(s, dtype=theta.dtype)
    cos = (U * V).sum(1) / (U.norm(dim=1) * V.norm(dim=1))
    loss = torch.empty(X.shape[0], dtype=theta.dtype)
    for b in ids.unique():
        g = (ids == b).nonzero().flatten()
        loss[g] = per_pair_loss(s.exp() * (U[g] @ V[g].T))
    return cos, loss


def test_held_out_fit_equals_autograd_and_a_dense_solve(fitted):
    model, _, X, Y = fitted
    ecif = ef.ECIF(model, damping=DAMPING, batches=BATCH, solver="exact").fit(X, Y)
    got = ecif.held_out_fit()
    ids = ef.resolve_batches(BATCH, N).batch_ids()
    space = select_params(model)
    theta = space.flat(model)
    C = ecif.curvature.dense()
    H = C + DAMPING * torch.eye(C.shape[0], dtype=C.dtype)
    Z = torch.linalg.solve(H, ecif.pair_gradients().T)          # (P, n): H⁻¹ g_k
    cos, loss = _own_fits(model, theta, X, Y, ids)
    assert torch.allclose(got["cos"], cos, rtol=0, atol=1e-12)
    assert torch.allclose(got["loss"], loss, rtol=1e-12, atol=0)
    for k in range(0, N, 7):
        gc = grad(lambda th: _own_fits(model, th, X, Y, ids)[0][k])(theta)
        gl = grad(lambda th: _own_fits(model, th, X, Y, ids)[1][k])(theta)
        assert float(got["cos_held_out"][k]) == pytest.approx(float(cos[k] + gc @ Z[:, k]), rel=1e-10, abs=1e-12)
        assert float(got["loss_held_out"][k]) == pytest.approx(float(loss[k] + gl @ Z[:, k]), rel=1e-10)
    # the same through CG, for a subset in any order
    cg = ef.ECIF(model, damping=DAMPING, batches=BATCH, solver="cg", cg_tol=1e-13).fit(X, Y)
    some = torch.tensor([5, 3, 40])
    part = cg.held_out_fit(some)
    for key in got:
        assert torch.allclose(part[key], got[key][some], rtol=1e-8, atol=1e-10), key


def test_held_out_fit_predicts_leave_one_out_retraining(fitted):
    """First order in the removal: the predicted change of each pair's own cosine and loss follows the change
    measured by retraining without it (Pearson over the pairs, and a bound on the error of the change)."""
    model, ref, X, Y = fitted
    ecif = ef.ECIF(model, damping=DAMPING, batches=BATCH, curvature="hessian", solver="exact").fit(X, Y)
    pred = ecif.held_out_fit()
    ids = ef.resolve_batches(BATCH, N).batch_ids()
    pairs = torch.randperm(N, generator=torch.Generator().manual_seed(0))[:N_LOO]
    space = select_params(model)
    d_cos, d_loss = torch.empty(N_LOO, dtype=torch.float64), torch.empty(N_LOO, dtype=torch.float64)
    for j, k in enumerate(pairs.tolist()):
        mk = retrained_without(model, X, Y, ids, k, DAMPING, ref)
        cos, loss = _own_fits(mk, space.flat(mk), X, Y, ids)   # pair k scored in its original batch
        d_cos[j] = cos[k] - pred["cos"][k]
        d_loss[j] = loss[k] - pred["loss"][k]
    p_cos = (pred["cos_held_out"] - pred["cos"])[pairs]
    p_loss = (pred["loss_held_out"] - pred["loss"])[pairs]
    assert pearson(p_cos, d_cos) >= 0.95 and pearson(p_loss, d_loss) >= 0.95
    # removing a pair lowers its own fit: its cosine falls and its loss rises
    assert (p_loss > 0).float().mean() >= 0.9 and (d_loss > 0).float().mean() >= 0.9
