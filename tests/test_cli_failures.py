"""The command line on bad option values, degenerate inputs, damaged checkpoints, internal errors and Ctrl-C:
every failure is one line on stderr with exit status 2 (130 for Ctrl-C), found before any computation,
and nothing is written."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from ecif_fast import ECIF
from ecif_fast.cli import commands
from ecif_fast.cli.checkpoint import load_checkpoint, save_checkpoint
from ecif_fast.cli.main import main
from test_cli import HEADS, analysis, make_data, run


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = make_data(tmp_path_factory.mktemp("cli_failures"))
    assert main(["train", "--train", str(d.train), "--out", str(d.model), "--quiet", *HEADS]) == 0
    return d


@pytest.fixture
def no_fit(monkeypatch):
    """Fail the test if an analysis gets as far as fitting ECIF: its inputs must be refused before."""
    def fit(self, *a, **k):
        raise AssertionError("ECIF.fit was called: the bad input was not found before the computation")

    monkeypatch.setattr(ECIF, "fit", fit)


def one_line_error(rc, stdout, err, *words):
    lines = err.strip().splitlines()
    assert rc == 2 and stdout == "", (rc, err)
    assert len(lines) == 1 and lines[0].startswith("ecif-fast: error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------ option values

@pytest.mark.parametrize("value,words", [("1180591620717411303424", "[0, 2**63)"), ("-1", "[0, 2**63)"),
                                         ("2**70", "whole number")])
def test_seed_out_of_range(data, tmp_path, capsys, value, words):
    rc, out, err = run(capsys, "train", "--train", data.train, "--out", tmp_path / "h.pt", "--seed", value)
    assert rc == 2 and "--seed" in err and words in err and not (tmp_path / "h.pt").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e4", "89", "x"])
def test_logit_scale_not_finite_or_overflowing(data, tmp_path, capsys, value):
    rc, out, err = run(capsys, "train", "--train", data.train, "--out", tmp_path / "h.pt", "--logit-scale", value)
    assert rc == 2 and "--logit-scale" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "h.pt").exists()


# ---------------------------------------------------------------------------------- degenerate data

def test_one_pair_validation_or_test_set(data, tmp_path, capsys, no_fit):
    one = tmp_path / "one.npz"
    np.savez(one, image_features=data.Xv[:1].numpy(), text_features=data.Yv[:1].numpy())
    for argv in (analysis(data, "value", tmp_path / "o", "--val", one),
                 analysis(data, "detect", tmp_path / "o", "--val", one),
                 analysis(data, "trace", tmp_path / "o", "--test", one),
                 analysis(data, "clean", tmp_path / "o", "--top-harmful", "0.1", "--val", one)):
        one_line_error(*run(capsys, *argv), str(one), "1 pair", "at least 2")
    assert not (tmp_path / "o").exists()
    # one test *image* against class prompts is a well-posed zero-shot loss, but one class is not
    classes = tmp_path / "one_class.npy"
    np.save(classes, np.load(data.classes)["text_features"][:1])
    one_line_error(*run(capsys, *analysis(data, "trace", tmp_path / "o", "--test", data.zs, "--classes", classes)),
                   str(classes), "at least 2 class")


def test_batches_without_negatives(data, tmp_path, capsys, no_fit):
    ckpt = tmp_path / "h.pt"
    one_line_error(*run(capsys, "train", "--train", data.train, "--out", ckpt, "--batch-size", "1", *HEADS),
                   "--batch-size", "at least 2")
    single = tmp_path / "single.npz"
    np.savez(single, image_features=data.X[:1].numpy(), text_features=data.Y[:1].numpy())
    one_line_error(*run(capsys, "train", "--train", single, "--out", ckpt, *HEADS), str(single), "at least 2 pairs")
    alone = tmp_path / "alone.npz"
    np.savez(alone, image_features=data.X.numpy(), text_features=data.Y.numpy(), batch_ids=np.arange(len(data.X)))
    one_line_error(*run(capsys, "train", "--train", alone, "--out", ckpt, *HEADS), str(alone), "alone")
    assert not ckpt.exists()
    one_line_error(*run(capsys, *analysis(data, "detect", tmp_path / "o", "--batch-size", "1")),
                   "--batch-size", "negatives")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------- checkpoints

def _edited(data, tmp_path, edit) -> str:
    model, training = load_checkpoint(data.model)
    training = dict(training)
    edit(model, training)
    path = tmp_path / "edited.pt"
    save_checkpoint(path, model, training)
    return str(path)


def _nan_weight(model, training):
    with torch.no_grad():
        model.image_proj.weight[0, 0] = float("nan")


CHECKPOINT_EDITS = {
    "damping_text": (lambda m, t: t.update(damping="x"), "damping 'x'"),
    "damping_negative": (lambda m, t: t.update(damping=-1.0), "damping -1.0"),
    "no_theta_ref": (lambda m, t: t.pop("theta_ref"), "theta_ref"),
    "short_theta_ref": (lambda m, t: t.update(theta_ref=t["theta_ref"][:3]), "theta_ref"),
    "nan_theta_ref": (lambda m, t: t["theta_ref"].__setitem__(0, float("nan")), "theta_ref"),
    "batch_size_one": (lambda m, t: (t.pop("batch_ids"), t.update(batch_size=1)), "batch_size 1"),
    "float_batch_ids": (lambda m, t: t.update(batch_ids=t["batch_ids"].double()), "batch_ids"),
    "method": (lambda m, t: t.update(method="adam"), "method 'adam'"),
    "nan_weights": (_nan_weight, "NaN or Inf"),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_EDITS))
def test_hand_edited_checkpoint(data, tmp_path, capsys, no_fit, case):
    edit, words = CHECKPOINT_EDITS[case]
    path = _edited(data, tmp_path, edit)
    for argv in (analysis(data, "clean", tmp_path / "o", "--remove", data.dir / "ids.txt"),
                 analysis(data, "value", tmp_path / "o", "--val", data.val)):
        (data.dir / "ids.txt").write_text("1003\n")
        argv[argv.index("--model") + 1] = path
        rc, out, err = run(capsys, *argv)
        one_line_error(rc, out, err, path, words)
        if case == "nan_weights":   # the model's weights are broken, not the data
            assert "drop" not in err and "train the model again" in err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------- unexpected errors

def test_unexpected_error_is_one_line_and_debug_shows_it(data, tmp_path, capsys, monkeypatch):
    def broken(args, con):
        raise ZeroDivisionError("a bug")

    monkeypatch.setitem(commands.COMMANDS, "value", broken)
    argv = analysis(data, "value", tmp_path / "o", "--val", data.val)
    one_line_error(*run(capsys, *argv), "unexpected ZeroDivisionError: a bug", "ECIF_FAST_DEBUG=1")
    monkeypatch.setenv("ECIF_FAST_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main([str(a) for a in argv])


def test_keyboard_interrupt_in_process_is_130(data, tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ECIF, "fit", interrupted)
    rc, out, err = run(capsys, *analysis(data, "value", tmp_path / "o", "--val", data.val))
    assert rc == 130 and err.strip() == "ecif-fast: interrupted" and not (tmp_path / "o").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler     # main() restores the handler


# -------------------------------------------------------------------------------------------- Ctrl-C

@pytest.mark.parametrize("delay", [0.3, 1.0, 2.0, 3.5])
def test_sigint_at_any_moment_is_130_without_traceback(data, tmp_path, delay):
    """SIGINT during start-up (torch still loading), loading, fitting or writing: status 130, one line,
    no traceback, no output folder and no temporary files beside it."""
    out = tmp_path / "res" / "detect"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ecif_fast", *map(str, analysis(
        data, "detect", out, "--scoring", "self", "--solver", "cg", "--curvature", "hessian"))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    stdout, err = proc.communicate(timeout=120)
    if proc.returncode == 0:      # finished before the signal: nothing to check but a clean run
        assert "Traceback" not in err
        return
    assert proc.returncode == 130, (proc.returncode, err)
    assert err.strip().splitlines()[-1] == "ecif-fast: interrupted" and "Traceback" not in err, err
    assert not out.exists()
    assert not (tmp_path / "res").exists() or list((tmp_path / "res").iterdir()) == []
