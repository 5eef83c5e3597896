"""The command line on bad option values, degenerate inputs, damaged checkpoints, internal errors and Ctrl-C:
every failure is one line on stderr with exit status 2 (130 for Ctrl-C), found before any computation,
and nothing is written."""
from __future__ import annotations

import json
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
from cli_data import HEADS, analysis, run


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
                                         ("2**70", "whole number in [0, 2**63)")])
def test_seed_out_of_range(cli_data, tmp_path, capsys, value, words):
    rc, out, err = run(capsys, "train", "--train", cli_data.train, "--out", tmp_path / "h.pt", "--seed", value)
    assert rc == 2 and "--seed" in err and words in err and not (tmp_path / "h.pt").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e4", "89", "x"])
def test_logit_scale_not_finite_or_overflowing(cli_data, tmp_path, capsys, value):
    rc, out, err = run(capsys, "train", "--train", cli_data.train, "--out", tmp_path / "h.pt", "--logit-scale", value)
    assert rc == 2 and "--logit-scale" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "h.pt").exists()


# ---------------------------------------------------------------------------------- degenerate data

def test_one_pair_validation_or_test_set(cli_data, tmp_path, capsys, no_fit):
    one = tmp_path / "one.npz"
    np.savez(one, image_features=cli_data.Xv[:1].numpy(), text_features=cli_data.Yv[:1].numpy())
    for argv in (analysis(cli_data, "value", tmp_path / "o", "--val", one),
                 analysis(cli_data, "detect", tmp_path / "o", "--val", one),
                 analysis(cli_data, "trace", tmp_path / "o", "--test", one),
                 analysis(cli_data, "clean", tmp_path / "o", "--top-harmful", "0.1", "--val", one)):
        one_line_error(*run(capsys, *argv), str(one), "1 pair", "at least 2")
    assert not (tmp_path / "o").exists()
    # one test *image* against class prompts is a well-posed zero-shot loss, but one class is not
    classes = tmp_path / "one_class.npy"
    np.save(classes, np.load(cli_data.classes)["text_features"][:1])
    argv = analysis(cli_data, "trace", tmp_path / "o", "--test", cli_data.zs, "--classes", classes)
    one_line_error(*run(capsys, *argv), str(classes), "at least 2 class")


def test_batches_without_negatives(cli_data, tmp_path, capsys, no_fit):
    ckpt = tmp_path / "h.pt"
    one_line_error(*run(capsys, "train", "--train", cli_data.train, "--out", ckpt, "--batch-size", "1", *HEADS),
                   "--batch-size", "at least 2")
    single = tmp_path / "single.npz"
    np.savez(single, image_features=cli_data.X[:1].numpy(), text_features=cli_data.Y[:1].numpy())
    one_line_error(*run(capsys, "train", "--train", single, "--out", ckpt, *HEADS), str(single), "at least 2 pairs")
    alone = tmp_path / "alone.npz"
    np.savez(alone, image_features=cli_data.X.numpy(), text_features=cli_data.Y.numpy(),
             batch_ids=np.arange(len(cli_data.X)))
    one_line_error(*run(capsys, "train", "--train", alone, "--out", ckpt, *HEADS), str(alone), "alone")
    assert not ckpt.exists()
    one_line_error(*run(capsys, *analysis(cli_data, "detect", tmp_path / "o", "--batch-size", "1")),
                   "--batch-size", "negatives")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------- checkpoints

def _edited(cli_data, tmp_path, edit) -> str:
    model, training = load_checkpoint(cli_data.model)
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
def test_hand_edited_checkpoint(cli_data, tmp_path, capsys, no_fit, case):
    edit, words = CHECKPOINT_EDITS[case]
    path = _edited(cli_data, tmp_path, edit)
    for argv in (analysis(cli_data, "clean", tmp_path / "o", "--remove", cli_data.dir / "ids.txt"),
                 analysis(cli_data, "value", tmp_path / "o", "--val", cli_data.val)):
        (cli_data.dir / "ids.txt").write_text("1003\n")
        argv[argv.index("--model") + 1] = path
        rc, out, err = run(capsys, *argv)
        one_line_error(rc, out, err, path, words)
        if case == "nan_weights":   # the model's weights are broken, not the data
            assert "drop" not in err and "train the model again" in err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------- unexpected errors

def test_unexpected_error_is_one_line_and_debug_shows_it(cli_data, tmp_path, capsys, monkeypatch):
    def broken(args, con):
        raise ZeroDivisionError("a bug")

    monkeypatch.setitem(commands.COMMANDS, "value", broken)
    argv = analysis(cli_data, "value", tmp_path / "o", "--val", cli_data.val)
    one_line_error(*run(capsys, *argv), "unexpected ZeroDivisionError: a bug", "ECIF_FAST_DEBUG=1")
    monkeypatch.setenv("ECIF_FAST_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main([str(a) for a in argv])


def test_keyboard_interrupt_in_process_is_130(cli_data, tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ECIF, "fit", interrupted)
    rc, out, err = run(capsys, *analysis(cli_data, "value", tmp_path / "o", "--val", cli_data.val))
    assert rc == 130 and err.strip() == "ecif-fast: interrupted" and not (tmp_path / "o").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler     # main() restores the handler


# -------------------------------------------------------------------------------------------- Ctrl-C

@pytest.mark.parametrize("delay", [0.3, 1.0, 2.0, 3.5])
def test_sigint_at_any_moment_is_130_without_traceback(cli_data, tmp_path, delay):
    """SIGINT during start-up (torch still loading), loading, fitting or writing: status 130, one line,
    no traceback, no output folder and no temporary files beside it."""
    out = tmp_path / "res" / "detect"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ecif_fast", *map(str, analysis(
        cli_data, "detect", out, "--scoring", "self", "--solver", "cg", "--curvature", "hessian"))],
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


# ------------------------------------------------------------------------------------------ warnings

@pytest.mark.parametrize("curvature", ["gauss-newton", "hessian"])
def test_lowrank_reports_what_it_keeps(cli_data, tmp_path, capsys, curvature):
    """--solver lowrank: the summary says what the factorisation keeps; below the significant spectrum (the
    exact Hessian here: full rank; the plain heads' Gauss–Newton matrix has rank < 64) a one-line warning says
    by how much H⁻¹ is off in the dropped directions."""
    ckpt = tmp_path / "wide.pt"
    assert main(["train", "--train", str(cli_data.train), "--out", str(ckpt), "--quiet", "--embed-dim", "12",
                 "--no-normalize", "--logit-scale", "0"]) == 0          # P = (6 + 5)·12 = 132 > rank 64
    argv = analysis(cli_data, "detect", tmp_path / "o", "--scoring", "self", "--solver", "lowrank", "--json",
                    "--curvature", curvature)
    argv[argv.index("--model") + 1] = ckpt
    rc, out, err = run(capsys, *argv)
    low = json.loads(out)["summary"]["settings"]["lowrank"]
    assert rc == 0 and low["rank"] == 64 and 0 < low["captured"] <= 1
    warned = [line for line in err.splitlines() if "low-rank solver" in line]
    assert (low["dropped_error"] > 0.05) == bool(warned) == (curvature == "hessian"), (low, err)
    assert all(line.startswith("ecif-fast: warning: ") for line in err.strip().splitlines()), err


def test_cg_not_converging_warns_once_per_command(cli_data, tmp_path, capsys):
    """--cg-maxiter 2 stops every CG solve early: one warning line for the whole command (the held-out fits, two
    removal updates and the validation solve of detect_misaligned), the results still written; a --cg-tol outside
    (0, 1) is refused."""
    argv = analysis(cli_data, "detect", tmp_path / "o", "--val", cli_data.val, "--solver", "cg", "--no-precondition",
                    "--cg-maxiter", "2", "--json")
    rc, out, err = run(capsys, *argv)
    warned = [line for line in err.splitlines() if "CG did not converge" in line]
    assert rc == 0 and len(warned) == 1 and warned[0].startswith("ecif-fast: warning: "), err
    assert warned[0].startswith("ecif-fast: warning: detect_misaligned: CG did not converge for ")
    assert json.loads(out)["summary"]["settings"]["cg_maxiter"] == 2
    for bad in ("0", "1", "-1e-3", "nan"):
        rc, out, err = run(capsys, *analysis(cli_data, "detect", tmp_path / "p", "--solver", "cg", "--cg-tol", bad))
        assert rc == 2 and "--cg-tol" in err and not (tmp_path / "p").exists()


def test_ctrl_c_after_a_finished_run_cannot_kill_it():
    """The console script blocks SIGINT once the run is over: interpreter finalisation puts back the default
    action (terminate), and a Ctrl-C in that window used to end a finished run with -SIGINT instead of 0."""
    code = ("import os, signal, sys\nfrom ecif_fast.cli.main import run\nsys.argv = ['ecif-fast', '--help']\n"
            "rc = run()\nsignal.signal(signal.SIGINT, signal.SIG_DFL)  # as finalisation does\n"
            "os.kill(os.getpid(), signal.SIGINT)\nsys.stdout.flush()\nos._exit(rc)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
