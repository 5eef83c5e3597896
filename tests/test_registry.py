"""Backend registry and the dispatching ``lse`` op: forcing, fallback, input validation."""
from __future__ import annotations

import sys
import types

import pytest
import torch

import ecif_fast
from ecif_fast.errors import BackendUnavailableError, ECIFInputError
from ecif_fast.kernels import cpp_backend, registry
from ecif_fast.kernels.ops import lse

CPP = cpp_backend.available()
needs_cpp = pytest.mark.skipif(not CPP, reason="C++ extension not built")


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(registry.ENV_VAR, raising=False)


@pytest.fixture
def fake_backend():
    """Register throw-away backends backed by in-memory modules; unregister afterwards."""
    names = []

    def make(name, devices, priority, available=True, **ops):
        mod = types.ModuleType(f"_ecif_fake_{name}")
        mod.available = lambda: available
        mod.unavailable_reason = lambda: None if available else f"{name} is switched off"
        for op, fn in ops.items():
            setattr(mod, op, fn)
        sys.modules[mod.__name__] = mod
        registry.register_backend(name, mod.__name__, devices, priority=priority)
        names.append(name)
        return mod

    yield make
    for name in names:
        registry.unregister_backend(name)
        sys.modules.pop(f"_ecif_fake_{name}", None)


def test_available_backends():
    av = registry.available_backends()
    assert av["torch"] is True
    assert av["cpp"] is True if CPP else isinstance(av["cpp"], str)
    # the Triton module does not exist (yet) or cannot run here: a reason, not an exception
    assert av["triton"] is True or ("triton" in av["triton"])
    assert ecif_fast.backends() == av


@needs_cpp
def test_automatic_choice_prefers_cpp_on_cpu():
    assert registry.resolve("lse", "cpu")[0] == "cpp"
    assert registry.resolve("lse", torch.device("cpu"), backend="auto")[0] == "cpp"


def test_automatic_choice_on_cuda_falls_back_to_torch_without_triton(monkeypatch):
    # resolution only looks at the device type: no GPU needed; triton is switched off for this test
    monkeypatch.setitem(registry._LOADED, "triton", (None, "triton switched off for this test"))
    assert registry.resolve("lse", "cuda:0")[0] == "torch"


def test_automatic_choice_on_cuda_prefers_triton_when_it_loads():
    assert registry.available_backends()["triton"] is True  # triton is a dev dependency
    assert registry.resolve("lse", "cuda:0")[0] == "triton"


@needs_cpp
@pytest.mark.parametrize("value, expected", [("torch", "torch"), ("cpp", "cpp"), (" CPP ", "cpp"),
                                             ("auto", "cpp"), ("", "cpp")])
def test_env_var_forces_backend(monkeypatch, value, expected):
    monkeypatch.setenv(registry.ENV_VAR, value)
    assert registry.resolve("lse", "cpu")[0] == expected


@needs_cpp
def test_explicit_argument_beats_env_var(monkeypatch):
    monkeypatch.setenv(registry.ENV_VAR, "torch")
    assert registry.resolve("lse", "cpu", backend="cpp")[0] == "cpp"
    monkeypatch.setenv(registry.ENV_VAR, "cpp")
    assert registry.resolve("lse", "cpu", backend="torch")[0] == "torch"


def test_forced_backend_that_cannot_run_raises(monkeypatch):
    with pytest.raises(BackendUnavailableError, match="triton"):
        registry.get_op("lse", "cpu", backend="triton")
    monkeypatch.setenv(registry.ENV_VAR, "triton")
    with pytest.raises(BackendUnavailableError, match="ECIF_FAST_BACKEND"):
        registry.get_op("lse", "cpu")
    U = torch.randn(4, 3)
    with pytest.raises(BackendUnavailableError, match="triton"):
        lse(U, U, 1.0)


@needs_cpp
def test_forced_backend_on_unserved_device_raises():
    with pytest.raises(BackendUnavailableError, match=r"'cpp'.*device type 'cuda'"):
        registry.get_op("lse", "cuda", backend="cpp")


def test_unknown_backend_raises():
    with pytest.raises(BackendUnavailableError, match="unknown backend 'fortran'.*torch"):
        registry.get_op("lse", "cpu", backend="fortran")
    with pytest.raises(ECIFInputError):
        registry.get_op("lse", "cpu", backend=3)


def test_partial_backend_falls_back_automatically_but_not_when_forced(fake_backend):
    sentinel = object()
    fake_backend("partial", {"cpu"}, priority=0, only_here=lambda: sentinel)
    # op the fake lacks: automatic choice moves on to the next backend
    name, _ = registry.resolve("lse", "cpu")
    assert name in ("cpp", "torch") and name != "partial"
    # op only the fake has: it is chosen
    assert registry.get_op("only_here", "cpu")() is sentinel
    with pytest.raises(BackendUnavailableError, match="does not implement op 'lse'"):
        registry.get_op("lse", "cpu", backend="partial")


def test_unavailable_backend_is_skipped_automatically_but_raises_when_forced(fake_backend):
    fake_backend("off", {"cpu"}, priority=0, available=False, lse=lambda *a: None)
    assert registry.resolve("lse", "cpu")[0] != "off"
    assert "switched off" in registry.available_backends()["off"]
    with pytest.raises(BackendUnavailableError, match="switched off"):
        registry.get_op("lse", "cpu", backend="off")


def test_no_backend_for_op_raises():
    with pytest.raises(BackendUnavailableError, match="no_such_op"):
        registry.get_op("no_such_op", "cpu")


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_cpp)])
def test_lse_op_dtypes_and_values(backend):
    g = torch.Generator().manual_seed(0)
    U, V = torch.randn(10, 4, generator=g), torch.randn(10, 4, generator=g)
    ref_row, ref_col = (torch.logsumexp(2.0 * U.double() @ V.double().T, d) for d in (1, 0))
    for dt, out in [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                    (torch.float32, torch.float32), (torch.float64, torch.float64)]:
        row, col = lse(U.to(dt), V.to(dt), 2.0, backend=backend)
        assert row.dtype == col.dtype == out
        tol = 0.1 if dt in (torch.float16, torch.bfloat16) else 1e-4
        assert torch.allclose(row.double(), ref_row, atol=tol) and torch.allclose(col.double(), ref_col, atol=tol)
    row, _ = lse(U, V, torch.tensor(2.0), batches=torch.arange(10) % 3, backend=backend)
    assert row.shape == (10,)


U4 = torch.randn(4, 3)


@pytest.mark.parametrize("args, kwargs, match", [
    (([[1.0, 2.0]], U4, 1.0), {}, "torch.Tensor"),
    ((torch.randn(4), U4, 1.0), {}, "2-D"),
    ((U4, torch.randn(5, 3), 1.0), {}, "mismatched lengths"),
    ((U4, torch.randn(4, 2), 1.0), {}, "embedding dimension"),
    ((torch.ones(4, 3, dtype=torch.int64), U4, 1.0), {}, "float16, bfloat16, float32 or float64"),
    ((torch.tensor([[1.0, float("nan"), 0.0]] * 4), U4, 1.0), {}, "NaN or Inf"),
    ((U4, torch.tensor([[1.0, float("inf"), 0.0]] * 4), 1.0), {}, "NaN or Inf"),
    ((torch.empty(0, 3), torch.empty(0, 3), 1.0), {}, "empty"),
    ((torch.empty(4, 0), torch.empty(4, 0), 1.0), {}, "dimension 0"),
    ((U4, U4, float("nan")), {}, "finite"),
    ((U4, U4, "big"), {}, "real number"),
    ((U4, U4, True), {}, "bool"),
    ((U4, U4, torch.ones(2)), {}, "one-element"),
    ((U4, U4, 1.0), {"batches": torch.zeros(3, dtype=torch.int64)}, "one entry per pair"),
    ((U4, U4, 1.0), {"batches": 0}, "batch size"),
])
def test_lse_bad_inputs(args, kwargs, match):
    with pytest.raises(ECIFInputError, match=match):
        lse(*args, **kwargs)
