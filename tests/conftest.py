"""Shared test set-up and fixtures. Plain helpers live in modules beside this file (``problems.py``,
``cli_data.py``, ``tiny_hf_clip.py``, ``chromium.py``, ``kernel_cases.py``); test modules never import one
another, nor anything under ``benchmarks/``."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # the helper modules

import pytest
import torch

import ecif_fast as ef
from problems import SPLIT_TEST, SPLIT_TRAIN, UNTRAINED_DAMPING, heads, small_split

# Test problems are tiny: one thread avoids OpenMP contention on a shared 2-core machine, which otherwise
# slows small torch ops down many times over. Kernel tests that exercise threading set it locally.
torch.set_num_threads(1)


# The fixtures below are module-scoped: every test module gets its own copy, so a test that changes one does
# not reach another module.

@pytest.fixture(scope="module")
def split():
    """``(X, Y, X_test, Y_test)``: the small float64 split of :func:`problems.small_split`."""
    return small_split(SPLIT_TRAIN, SPLIT_TEST)


def _fitted(split, normalize: bool):
    X, Y, _, _ = split
    return ef.ECIF(heads(normalize)[0], damping=UNTRAINED_DAMPING, batches=4, curvature="hessian").fit(X, Y)


@pytest.fixture(scope="module")
def fitted_plain(split):
    """ECIF fitted on ``split`` at untrained, unnormalised LinearHeads (batches of 4)."""
    return _fitted(split, normalize=False)


@pytest.fixture(scope="module")
def fitted_normalized(split):
    """ECIF fitted on ``split`` at untrained, L2-normalised LinearHeads (batches of 4)."""
    return _fitted(split, normalize=True)


@pytest.fixture(scope="module")
def cli_data(tmp_path_factory):
    """The command line's feature files (:func:`cli_data.make_data`) and ``heads.pt`` trained on them."""
    from cli_data import HEADS, make_data
    from ecif_fast.cli.main import main

    d = make_data(tmp_path_factory.mktemp("cli"))
    assert main(["train", "--train", str(d.train), "--out", str(d.model), "--quiet", *HEADS]) == 0
    return d


@pytest.fixture
def triton_interpreter(monkeypatch):
    """For the Triton kernel tests (``pytestmark = pytest.mark.usefixtures("triton_interpreter")``): Triton's CPU
    interpreter on (``TRITON_INTERPRET=1``, per test, so it does not leak into other modules), or off when
    ``ECIF_FAST_TEST_DEVICE=cuda`` runs the compiled kernels; no backend or fp32 dot precision forced by the
    environment; one torch thread."""
    from ecif_fast.kernels import registry
    from kernel_cases import ON_CUDA

    if ON_CUDA:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    monkeypatch.delenv("ECIF_FAST_TRITON_FP32_DOT", raising=False)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
