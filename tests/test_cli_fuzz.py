"""Fuzzing the command line (hypothesis): random malformed files and option values for every subcommand.

Whatever the input, a run must end with status 0 or 2, print no traceback (status 2: exactly one
``ecif-fast: error:`` line), change no file outside its ``--out``, and leave nothing partial: no temporary
entries, and after a failure ``--out`` as it was before. The examples are derandomised (the same in every
run); ``ECIF_FAST_FUZZ_EXAMPLES`` raises their number and ``ECIF_FAST_FUZZ_RANDOM=1`` draws new ones,
for a longer local search; ``ECIF_FAST_FUZZ_SHOW=1`` prints every run's arguments and outcome.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pyarrow")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from ecif_fast.cli.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from ecif_fast.cli.main import main  # noqa: E402
from ecif_fast.report.output import MARKER, TMP_PREFIX  # noqa: E402

N, DI, DT = 24, 4, 3
HEADS = ["--embed-dim", "3", "--no-normalize", "--logit-scale", "0", "--max-iter", "30"]
EXAMPLES = int(os.environ.get("ECIF_FAST_FUZZ_EXAMPLES", "200"))
RANDOM = os.environ.get("ECIF_FAST_FUZZ_RANDOM", "") not in ("", "0")     # 1: new examples every run
STATS: dict = {}   # (command, exit status) -> examples, printed by test_fuzz_reached_every_outcome


def _pairs(rng, n):
    Z = rng.normal(size=(n, 2))
    return (Z @ rng.normal(size=(2, DI)) + 0.1 * rng.normal(size=(n, DI)),
            Z @ rng.normal(size=(2, DT)) + 0.1 * rng.normal(size=(n, DT)))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Valid inputs (train / val / test / classes / ids / checkpoint) to copy into each example's sandbox."""
    folder = tmp_path_factory.mktemp("fuzz_base")
    rng = np.random.default_rng(0)
    X, Y = _pairs(rng, N)
    np.savez(folder / "train.npz", image_features=X, text_features=Y, batch_ids=np.arange(N) % 2,
             pair_ids=np.arange(100, 100 + N), captions=np.array([f"=cmd|{i}" for i in range(N)]),
             misaligned=np.arange(N) % 5 == 0)
    Xv, Yv = _pairs(rng, 8)
    np.savez(folder / "val.npz", image_features=Xv, text_features=Yv, labels=np.arange(8) % 2)
    np.save(folder / "classes.npy", Yv[:2])
    (folder / "ids.txt").write_text("100\n101\n")
    with contextlib.chdir(folder):
        assert main(["train", "--train", "train.npz", "--out", "heads.pt", "--quiet", *HEADS]) == 0
    return folder


# --------------------------------------------------------------------------------- malformed files

def _npz(path, **arrays):
    with open(path, "wb") as f:      # np.savez on a name would append .npz to the other extensions
        np.savez(f, **arrays)


def _features(name, kind, rng):
    """A pairs file whose content is broken in one of many ways (or not at all)."""
    X, Y = _pairs(rng, N)
    extra = {}
    if kind == "nan":
        X[3, 1] = np.nan
    elif kind == "inf":
        Y[0, 0] = -np.inf
    elif kind == "huge":
        X, Y = X * 1e300, Y * 1e300
    elif kind == "tiny":
        X, Y = X * 1e-300, Y * 1e-300
    elif kind == "one_row":
        X, Y = X[:1], Y[:1]
    elif kind == "empty":
        X, Y = X[:0], Y[:0]
    elif kind == "rows":
        Y = Y[:-1]
    elif kind == "width":
        X = X[:, :2]
    elif kind == "1d":
        X = X[:, 0]
    elif kind == "3d":
        X = X[:, :, None]
    elif kind == "strings":
        X = X.astype(str)
    elif kind == "ints":
        X, Y = X.astype(np.int64), Y.astype(np.int64)
    elif kind == "constant":
        X, Y = np.ones_like(X), np.ones_like(Y)
    elif kind == "batch_float":
        extra["batch_ids"] = np.arange(N) / 2
    elif kind == "batch_alone":
        extra["batch_ids"] = np.arange(N)
    elif kind == "batch_short":
        extra["batch_ids"] = np.zeros(N - 1, dtype=np.int64)
    elif kind == "pair_dup":
        extra["pair_ids"] = np.zeros(N, dtype=np.int64)
    elif kind == "labels_negative":
        extra["labels"] = -np.ones(N, dtype=np.int64)
    elif kind == "labels_big":
        extra["labels"] = np.full(N, 10 ** 6, dtype=np.int64)
    elif kind == "misaligned_2":
        extra["misaligned"] = np.full(N, 2)
    elif kind == "formula_captions":
        extra["captions"] = np.array(["=HYPERLINK(\"x\")", "+1", "-2", "@a", "\tb", "\rc"] * (N // 6))
    if kind == "no_texts":
        _npz(name, image_features=X, **extra)
    elif kind == "object":
        _npz(name, image_features=X, text_features=Y, captions=np.array([None] * N, dtype=object))
    else:
        _npz(name, image_features=X, text_features=Y, **extra)


FEATURE_KINDS = ["valid", "nan", "inf", "huge", "tiny", "one_row", "empty", "rows", "width", "1d", "3d",
                 "strings", "ints", "constant", "batch_float", "batch_alone", "batch_short", "pair_dup",
                 "labels_negative", "labels_big", "misaligned_2", "formula_captions", "no_texts", "object"]
BYTE_KINDS = ["missing", "folder", "empty_file", "random_bytes", "truncated", "wrong_extension"]


def _write_input(folder: Path, base: Path, slot: str, kind: str, rng) -> str:
    """The path to pass for ``slot`` (train/val/test/classes/model/remove), written as ``kind``."""
    source = {"train": "train.npz", "val": "val.npz", "test": "val.npz", "classes": "classes.npy",
              "model": "heads.pt", "remove": "ids.txt"}[slot]
    name = folder / f"{slot}_in{Path(source).suffix}"
    if kind == "valid":
        shutil.copy(base / source, name)
    elif kind == "missing":
        return str(folder / f"missing{Path(source).suffix}")
    elif kind == "folder":
        name = folder / f"{slot}_dir{Path(source).suffix}"
        name.mkdir()
    elif kind == "empty_file":
        name.write_bytes(b"")
    elif kind == "random_bytes":
        name.write_bytes(rng.bytes(int(rng.integers(1, 400))))
    elif kind == "truncated":
        data = (base / source).read_bytes()
        name.write_bytes(data[: max(1, len(data) // 3)])
    elif kind == "wrong_extension":
        name = folder / f"{slot}_in.csv"
        shutil.copy(base / source, name)
    elif slot == "model":
        _checkpoint(base, name, kind)
    elif slot == "remove":
        name.write_text({"unknown": "99999\n", "all": "\n".join(str(100 + i) for i in range(N)),
                         "duplicate": "100\n100\n", "formula": "'=100\n", "blank": "\n \n"}.get(kind, "100\n"))
    else:
        _features(name, kind, rng)
    return str(name)


CHECKPOINT_KINDS = ["valid", "foreign", "nan_weights", "damping_text", "no_theta_ref", "other_dims"]
IDS_KINDS = ["valid", "unknown", "all", "duplicate", "formula", "blank"]


def _checkpoint(base: Path, path: Path, kind: str) -> None:
    model, training = load_checkpoint(base / "heads.pt")
    training = dict(training)
    if kind == "foreign":
        torch.save({"weights": torch.zeros(3)}, path)
        return
    if kind == "nan_weights":
        with torch.no_grad():
            model.text_proj.weight.fill_(float("nan"))
    elif kind == "damping_text":
        training["damping"] = "x"
    elif kind == "no_theta_ref":
        training.pop("theta_ref")
    elif kind == "other_dims":
        from ecif_fast import LinearHeads
        model = LinearHeads(DI + 1, DT, 3, normalize=False, logit_scale=0.0).double()
        training["theta_ref"] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    save_checkpoint(path, model, training)


# ----------------------------------------------------------------------------------- option values

NUMBERS = ["0", "-1", "1", "2", "3", "1e-300", "1e300", "nan", "inf", "-inf", "x", "", "1180591620717411303424"]
BAD_OPTIONS = {
    "--seed": NUMBERS, "--damping": NUMBERS, "--batch-size": NUMBERS + ["all", "5"], "--logit-scale": NUMBERS,
    "--embed-dim": ["1", "3", "0", "-2", "x"], "--max-iter": ["1", "0", "x", "5"], "--k": ["1", "0", "3", "100"],
    "--top-harmful": ["0.1", "0", "1", "0.99", "nan", "-0.5"],
    "--solver": ["exact", "cg", "lowrank", "newton"], "--curvature": ["hessian", "gauss-newton", "x"],
    "--backend": ["torch", "cpp", "triton", "cuda"], "--scoring": ["validation", "self", "combined", "x"],
    "--method": ["auto", "newton", "lbfgs", "sgd"], "--cg-tol": ["1e-6", "0", "1", "nan", "x"],
    "--cg-maxiter": ["1", "0", "5", "x"], "--rank": ["1", "0", "-2", "x", "40"],
}
BAD_FLAGS = ["--force", "--json", "--quiet", "--retrain", "--only-wrong", "--no-normalize", "--float32",
             "--train-scale", "--allow-data-mismatch", "--quick"]
ANALYSIS = {"--seed": ["0", "7"], "--solver": ["exact", "cg", "lowrank"], "--curvature": ["hessian", "gauss-newton"],
            "--damping": ["0.5", "2"], "--backend": ["torch", "cpp"], "--batch-size": ["all", "6"],
            "--cg-maxiter": ["3", "50"], "--cg-tol": ["1e-6"]}
GOOD_OPTIONS = {
    "train": {"--seed": ["0", "3"], "--damping": ["0.5", "2"], "--batch-size": ["all", "6", "12"],
              "--logit-scale": ["0", "1"], "--embed-dim": ["2", "3"], "--max-iter": ["5", "30"], "--rank": ["2", "3"],
              "--method": ["auto", "newton", "lbfgs"]},
    "value": ANALYSIS, "detect": {**ANALYSIS, "--scoring": ["validation", "self", "combined"]},
    "trace": {**ANALYSIS, "--k": ["1", "3", "100"]}, "clean": ANALYSIS, "demo": {"--seed": ["0"]},
}
GOOD_FLAGS = {"train": ["--float32", "--train-scale", "--json", "--quiet"],
              "value": ["--json", "--quiet"], "detect": ["--json", "--quiet"], "trace": ["--json", "--quiet"],
              "clean": ["--retrain", "--json", "--quiet"], "demo": ["--quick", "--quiet"]}
ACCEPTED = {  # the options each command takes (a one-fault example puts a bad value in one of these)
    "train": ["--seed", "--damping", "--batch-size", "--logit-scale", "--embed-dim", "--max-iter", "--method",
              "--rank"],
    "value": ["--seed", "--damping", "--batch-size", "--solver", "--curvature", "--backend", "--cg-tol",
              "--cg-maxiter"],
    "detect": ["--seed", "--damping", "--batch-size", "--solver", "--curvature", "--backend", "--cg-tol",
              "--cg-maxiter", "--scoring"],
    "trace": ["--seed", "--damping", "--batch-size", "--solver", "--curvature", "--backend", "--cg-tol",
              "--cg-maxiter", "--k"],
    "clean": ["--seed", "--damping", "--batch-size", "--solver", "--curvature", "--backend", "--cg-tol",
              "--cg-maxiter", "--top-harmful"],
    "demo": ["--seed", "--backend"],
}
SLOTS = {"train": ["train"], "value": ["train", "model", "val"], "detect": ["train", "model", "val"],
         "trace": ["train", "model", "test", "classes"], "clean": ["train", "model", "val", "remove"]}
GOOD_OUT = ["fresh", "nested", "marked_force"]
BAD_OUT = [".", "..", "", "cwd_abs", "input", "input_folder", "unmarked", "unmarked_force", "marked", "proc", "long",
           "under_file"]


def _out(folder: Path, kind: str, inputs: list[str]) -> str:
    """The ``--out`` value for ``kind`` (``*_force`` kinds are the same folder; the caller adds --force)."""
    kind = kind.removesuffix("_force")
    if kind == "fresh":
        return "result"
    if kind == "nested":
        return "a/b/result"
    if kind in (".", "..", ""):
        return kind
    if kind == "cwd_abs":
        return str(folder)
    if kind == "input":
        return inputs[0] if inputs else "result"
    if kind == "input_folder":
        return str(Path(inputs[0]).parent) if inputs else "result"
    if kind == "unmarked":
        (folder / "mine").mkdir(exist_ok=True)
        (folder / "mine" / "notes.txt").write_text("the user's file")
        return "mine"
    if kind == "marked":
        (folder / "earlier").mkdir(exist_ok=True)
        (folder / "earlier" / MARKER).write_text('{"tool": "ecif-fast", "command": "detect"}')
        (folder / "earlier" / "summary.json").write_text("{}")
        return "earlier"
    if kind == "proc":
        return "/proc/ecif-fast-out"
    if kind == "long":
        return "x" * 300
    return str(folder / "train_in.npz" / "sub")     # under_file


def _malformed(slot: str) -> list[str]:
    pool = CHECKPOINT_KINDS if slot == "model" else IDS_KINDS if slot == "remove" else FEATURE_KINDS
    return pool[1:] + BYTE_KINDS


@st.composite
def invocations(draw):
    """``(command, {slot: file kind}, {option: value}, flags, out kind, clean's remove/top, seed)``: a valid run
    (about a third), a valid run with one fault (a file, an option value or the output), or faults anywhere."""
    command = draw(st.sampled_from(["train", "value", "detect", "trace", "clean", "demo"]))
    mode = draw(st.sampled_from(["valid", "valid", "one_fault", "one_fault", "chaos", "chaos"]))
    slots = SLOTS.get(command, [])
    good = GOOD_OPTIONS[command]
    kinds = {slot: "valid" for slot in slots}
    values = {k: draw(st.sampled_from(good[k])) for k in draw(st.lists(st.sampled_from(sorted(good)), max_size=3,
                                                                        unique=True))}
    flags = draw(st.lists(st.sampled_from(GOOD_FLAGS[command]), max_size=2, unique=True))
    out = draw(st.sampled_from(GOOD_OUT))
    if mode == "one_fault":
        where = draw(st.sampled_from(["file", "option", "flag", "out"] if slots else ["option", "flag", "out"]))
        if where == "file":
            slot = draw(st.sampled_from(slots))
            kinds[slot] = draw(st.sampled_from(_malformed(slot)))
        elif where == "option":
            k = draw(st.sampled_from(ACCEPTED[command]))
            values[k] = draw(st.sampled_from(BAD_OPTIONS[k]))
        elif where == "flag":
            flags.append(draw(st.sampled_from([f for f in BAD_FLAGS if f not in flags])))
        else:
            out = draw(st.sampled_from(BAD_OUT))
    elif mode == "chaos":
        for slot in slots:
            if draw(st.booleans()):
                kinds[slot] = draw(st.sampled_from(_malformed(slot)))
        for k in draw(st.lists(st.sampled_from(sorted(BAD_OPTIONS)), max_size=3, unique=True)):
            values[k] = draw(st.sampled_from(BAD_OPTIONS[k]))
        flags = draw(st.lists(st.sampled_from(BAD_FLAGS), max_size=3, unique=True))
        out = draw(st.sampled_from(GOOD_OUT + BAD_OUT))
    if out.endswith("_force") and "--force" not in flags:
        flags.append("--force")
    remove_or_top = draw(st.sampled_from(["remove", "top"])) if command == "clean" else None
    return command, kinds, values, flags, out, remove_or_top, draw(st.integers(0, 2 ** 16))


def _snapshot(folder: Path, skip: Path | None) -> dict:
    """``relative path -> (size, mtime)`` (``"folder"`` for folders) of everything under ``folder`` except
    ``skip`` and what it holds."""
    found = {}
    for p in folder.rglob("*"):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        st_ = p.lstat()        # a folder's own times change when entries come and go: only files' count
        found[str(p.relative_to(folder))] = "folder" if p.is_dir() else (st_.st_size, st_.st_mtime_ns)
    return found


class DemoStopped(BaseException):
    """The demo's data loading, replaced in these tests: a valid demo run takes minutes (test_demo.py runs it)."""


@pytest.fixture
def demo_stub(monkeypatch):
    from ecif_fast.demo import pipeline

    def stop(*args, **kwargs):
        raise DemoStopped("the demo got past its option and --out checks")

    monkeypatch.setattr(pipeline, "load_digit_captions", stop)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=invocations())
def test_cli_fuzz(base, capsys, demo_stub, case):
    command, kinds, values, flags, out_kind, remove_or_top, seed = case
    rng = np.random.default_rng(seed)
    root = Path(tempfile.mkdtemp(prefix="fuzz-"))
    try:
        sandbox = root / "work"
        sandbox.mkdir()
        (root / "beside.txt").write_text("a file next to the working folder")
        inputs = {slot: _write_input(sandbox, base, slot, kind, rng) for slot, kind in kinds.items()}
        out = _out(sandbox, out_kind, list(inputs.values()))
        argv = [command]
        for slot, path in inputs.items():
            if slot == "remove" and remove_or_top == "top":
                argv += ["--top-harmful", "0.1"]
                continue
            argv += [f"--{slot}", path]
        argv += ["--out", out]
        for k, v in values.items():
            argv += [k, v]
        argv += flags
        if command == "train":
            argv[1:1] = HEADS               # small heads that train in a few steps; options drawn above win
        with contextlib.chdir(sandbox):
            target = Path(os.path.abspath(out)) if out.strip() else None
            before = _snapshot(root, None)
            inside_before = _snapshot(target, None) if target is not None and os.path.isdir(target) else None
            capsys.readouterr()
            try:
                rc = main(argv)
            except DemoStopped:
                rc = None
            stdout, err = capsys.readouterr()
        tag = f"argv={argv}\nstderr={err}"
        STATS[command, rc] = STATS.get((command, rc), 0) + 1
        if os.environ.get("ECIF_FAST_FUZZ_SHOW"):
            print(rc, argv[0], kinds, values, flags, out_kind, "|", err.strip().splitlines()[-1:] if err.strip() else "",
                  file=sys.__stderr__)
        if rc is None:                      # the stubbed demo: its checks passed, it wrote nothing yet
            assert command == "demo" and _snapshot(root, None) == before, tag
            return
        assert rc in (0, 2), tag
        assert "Traceback" not in err and "Traceback" not in stdout, tag
        if rc == 2:
            errors = [line for line in err.strip().splitlines() if re.match(r"ecif-fast( \w+)?: error: ", line)]
            assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], tag
        # nothing changed outside --out (after a failure: nothing changed at all)
        after = _snapshot(root, target if rc == 0 else None)
        kept = {k: v for k, v in before.items()
                if rc != 0 or target is None or not (root / k == target or target in (root / k).parents)}
        assert {k: v for k, v in after.items() if k in kept or rc != 0} == kept, tag
        # nothing partial: no temporary entries anywhere, --out complete or as it was
        assert not [p for p in root.rglob(f"{TMP_PREFIX}*")], tag
        if rc == 0:
            if command == "train":
                load_checkpoint(target)
            else:
                assert (target / MARKER).is_file() and (target / "summary.json").is_file(), tag
        elif inside_before is not None:
            assert _snapshot(target, None) == inside_before, tag
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_fuzz_reached_every_outcome():
    """The examples are not all refused at the first check: every analysis command also ran to the end."""
    if not STATS:
        pytest.skip("run together with test_cli_fuzz")
    print(sorted(STATS.items(), key=str))
    for command in ("train", "value", "detect", "trace", "clean"):
        assert STATS.get((command, 0), 0) >= 1, (command, STATS)
        assert STATS.get((command, 2), 0) >= 1, (command, STATS)
