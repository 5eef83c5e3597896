"""Plans that leave pairs out (``BatchPlan.without``, e.g. after removing pairs): every backend gives the
torch twin's answer — covered pairs as if the others did not exist, and for the pairs in no batch a row /
column log-sum-exp of ``-inf``, zero gradients, zero influence and a zero Gauss–Newton product."""
import pytest
import torch

from ecif_fast.kernels import ops
from ecif_fast.core.batches import resolve_batches

BACKENDS = ["torch", "cpp", "triton"]


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the Triton backend runs on CPU tensors in its interpreter
    monkeypatch.delenv("ECIF_FAST_BACKEND", raising=False)


def _problem(removed, dtype=torch.float64):
    g = torch.Generator().manual_seed(5)
    n, d, Q = 23, 6, 2
    U = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    V = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    dU = torch.randn(Q, n, d, generator=g, dtype=dtype)
    dV = torch.randn(Q, n, d, generator=g, dtype=dtype)
    ids = torch.arange(n) % 4
    return U, V, dU, dV, resolve_batches(ids, n).without(torch.tensor(removed, dtype=torch.int64))


def _close(a, b):
    assert a.shape == b.shape
    assert torch.equal(torch.isinf(a), torch.isinf(b))
    fin = torch.isfinite(b)
    assert torch.allclose(a[fin], b[fin], rtol=1e-9, atol=1e-11), float((a[fin] - b[fin]).abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("removed", [[0, 5, 22], [3], list(range(23))], ids=["some", "one", "all"])
def test_every_op_on_a_plan_with_pairs_left_out(backend, removed):
    U, V, dU, dV, plan = _problem(removed)
    gone = torch.tensor(removed)
    for name, call in {
        "lse": lambda b: ops.lse(U, V, 3.0, plan, backend=b),
        "infonce": lambda b: ops.infonce(U, V, 3.0, plan, with_scale=True, backend=b),
        "ecif_reductions": lambda b: ops.ecif_reductions(U, V, 3.0, plan, dU, dV, torch.tensor([0.5, -1.0]),
                                                         "exact", backend=b),
        "gauss_newton_product": lambda b: ops.gauss_newton_product(U, V, 3.0, plan, dU, dV, 0.3, backend=b),
    }.items():
        ours, ref = call(backend), call("torch")
        for a, b in zip(ours, ref):
            if a is None:
                assert b is None
                continue
            _close(a, b)
        if name == "lse":
            assert torch.isinf(ours[0][gone]).all() and torch.isinf(ours[1][gone]).all()
        elif name == "infonce":
            assert (ours[1][gone] == 0).all() and (ours[2][gone] == 0).all()
        elif name == "ecif_reductions":
            assert (ours[0][:, gone] == 0).all() and (ours[1][:, gone] == 0).all()
        else:
            assert (ours[0][:, gone] == 0).all() and (ours[1][:, gone] == 0).all()
