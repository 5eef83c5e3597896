"""Newton training: the Hessian built a block of columns at a time equals the one-call Hessian, and a problem
whose dense matrices would not fit is refused before any work (it used to be killed for memory)."""
import pytest
import torch

import ecif_fast as ef
from ecif_fast import training


def _problem(seed=0, n=24, di=5, dt=4, d=3, normalize=True):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, di, generator=g, dtype=torch.float64)
    Y = X[:, :dt] + 0.3 * torch.randn(n, dt, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    model = ef.LinearHeads(di, dt, d, normalize=normalize, logit_scale=1.0).double()
    ref = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad]).clone()
    return model, X, Y, ref


@pytest.mark.parametrize("normalize", [True, False])
def test_blocked_hessian_matches_one_call(normalize):
    model, X, Y, _ = _problem(normalize=normalize)
    R, theta, *_ = training._objective(model, X, Y, 8, 0.5, None, None)
    grad_R = torch.func.grad(R)
    whole = training._dense_hessian(grad_R, theta, theta.numel())
    for block in (1, 5, theta.numel() - 1):
        torch.testing.assert_close(training._dense_hessian(grad_R, theta, block), whole, rtol=1e-12, atol=1e-12)


def test_newton_with_small_blocks_reaches_the_same_optimum(monkeypatch):
    a, X, Y, ref = _problem()
    b, *_ = _problem()
    ra = ef.train(a, X, Y, batches=8, damping=0.5, theta_ref=ref, method="newton")
    monkeypatch.setattr(training, "HESSIAN_BLOCK_MEMORY", 1)  # one column per jacfwd call
    rb = ef.train(b, X, Y, batches=8, damping=0.5, theta_ref=ref, method="newton")
    assert ra.grad_norm < 1e-9 and rb.grad_norm < 1e-9
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-9, atol=1e-10)


def test_newton_refuses_a_hessian_that_does_not_fit(monkeypatch):
    model, X, Y, ref = _problem()
    before = [p.detach().clone() for p in model.parameters()]
    P = ref.numel()
    monkeypatch.setattr(training, "NEWTON_MEMORY_LIMIT", training.newton_bytes(P, torch.float64) - 1)
    with pytest.raises(ef.ECIFInputError, match=r"dense Hessian of all P = \d+.*method='lbfgs'"):
        ef.train(model, X, Y, batches=8, damping=0.5, theta_ref=ref, method="newton")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # nothing was trained
    # the automatic choice never picks Newton above its size limit, and L-BFGS still runs
    monkeypatch.setattr(training, "AUTO_NEWTON_MAX_P", P - 1)
    res = ef.train(model, X, Y, batches=8, damping=0.5, theta_ref=ref, max_iter=50)
    assert res.iterations > 0


def test_newton_bytes_counts_three_dense_matrices():
    assert training.newton_bytes(1000, torch.float64) == 3 * 1000 * 1000 * 8
    assert training.newton_bytes(1000, torch.float32) == 3 * 1000 * 1000 * 4
    # 64 + 384 inputs, float64: embed 16 (P = 7168) fits in about 1.1 GiB, embed 64 (P = 28672) would need 18 GiB
    assert training.newton_bytes(16 * (64 + 384), torch.float64) <= training.NEWTON_MEMORY_LIMIT
    assert training.newton_bytes(64 * (64 + 384), torch.float64) > training.NEWTON_MEMORY_LIMIT


def test_newton_stops_at_the_float32_precision_floor():
    """float32 cannot reach tol = 1e-10: Newton stops once steps no longer lower R nor max|∇R| (it used to spend all
    max_iter iterations there), at the same point float64 reaches, to float32's precision."""
    model, X, Y, ref = _problem()
    m32 = model.float()
    r32 = ef.train(m32, X.float(), Y.float(), batches=8, damping=0.5, theta_ref=ref.float(), method="newton",
                   max_iter=200)
    assert r32.iterations < 60 and r32.grad_norm < 1e-3
    m64, *_ = _problem()
    r64 = ef.train(m64, X, Y, batches=8, damping=0.5, theta_ref=ref, method="newton")
    assert r64.grad_norm < 1e-9
    for a, b in zip(m32.parameters(), m64.parameters()):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-4)
