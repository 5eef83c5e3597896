"""Output locations: ``--out`` never removes or overwrites what ecif-fast did not create, unusable locations
are refused before any work, concurrent writers of one output are safe, and CSV cells are not run by
spreadsheets. Through the command line (``main``, in process) and through the writers themselves."""
from __future__ import annotations

import csv
import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pd = pytest.importorskip("pandas")
pytest.importorskip("pyarrow")

from ecif_fast.cli import commands, session  # noqa: E402
from ecif_fast.cli.checkpoint import is_checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from ecif_fast.cli.data_files import load_ids  # noqa: E402
from ecif_fast.report import output  # noqa: E402
from ecif_fast.report.output import (MARKER, TMP_PREFIX, OutputLocationError, atomic_output_dir,  # noqa: E402
                                     atomic_output_file, check_writable, csv_quote, write_table)
from cli_data import HEADS, run  # noqa: E402

LINUX = sys.platform.startswith("linux")


class Computed(BaseException):
    """Raised by the guards below: a BaseException, so that no error handling of the CLI swallows it."""


@pytest.fixture
def no_computation(monkeypatch):
    """Fail the test if a command gets as far as loading inputs or computing anything."""
    def guard(*args, **kwargs):
        raise Computed("the command loaded or computed something before refusing --out")

    for module, name in ((session, "load_checkpoint"), (session, "load_pairs"), (commands, "load_pairs"),
                         (commands, "train_heads"), (session.ECIF, "fit")):
        monkeypatch.setattr(module, name, guard)


def detect(d, out, *extra):
    return ["detect", "--train", d.train, "--model", d.model, "--scoring", "self", "--out", out, "--quiet", *extra]


def train(d, out, *extra):
    return ["train", "--train", d.train, "--out", out, "--quiet", *HEADS, *extra]


def snapshot(folder: Path) -> dict:
    """Every entry under ``folder`` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in folder.rglob("*")}


def refused(rc, out, err, *words) -> None:
    lines = err.strip().splitlines()
    assert rc == 2 and out == "" and len(lines) == 1 and lines[0].startswith("ecif-fast: error: "), err
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture
def work(tmp_path, monkeypatch):
    """The working folder ``tmp_path/home/work`` holding an unrelated file, the cwd of the test."""
    w = tmp_path / "home" / "work"
    w.mkdir(parents=True)
    (w / "notes.txt").write_text("mine")
    monkeypatch.chdir(w)
    return w


# ------------------------------------------------------------------------------ never our files

@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("where", [".", "..", "", "cwd", "ancestor", "root"])
def test_working_folder_and_above_are_refused(cli_data, work, capsys, no_computation, where, force):
    out = {"cwd": str(work), "ancestor": str(work.parent.parent), "root": "/"}.get(where, where)
    before = snapshot(work.parent.parent)
    rc, stdout, err = run(capsys, *detect(cli_data, out, *(["--force"] if force else [])))
    refused(rc, stdout, err, "empty" if where == "" else "working folder")
    assert snapshot(work.parent.parent) == before


def test_folder_holding_an_input_is_refused(cli_data, tmp_path, capsys, no_computation):
    before = snapshot(cli_data.dir)
    rc, stdout, err = run(capsys, *detect(cli_data, cli_data.dir, "--force"))
    refused(rc, stdout, err, str(cli_data.dir), "holds the input file")
    (tmp_path / "link").symlink_to(cli_data.dir)                       # the same folder through a link
    rc, stdout, err = run(capsys, *detect(cli_data, tmp_path / "link", "--force"))
    refused(rc, stdout, err, "holds the input file")
    rc, stdout, err = run(capsys, *detect(cli_data, cli_data.dir.parent, "--force"))
    refused(rc, stdout, err, "holds the input file")
    assert snapshot(cli_data.dir) == before


def test_input_file_is_refused_as_out(cli_data, tmp_path, capsys, no_computation):
    before = snapshot(cli_data.dir)
    rc, stdout, err = run(capsys, *detect(cli_data, cli_data.model, "--force"))          # --out = --model
    refused(rc, stdout, err, str(cli_data.model), "is the input file")
    rc, stdout, err = run(capsys, *train(cli_data, cli_data.train, "--force"))           # train --out = --train
    refused(rc, stdout, err, str(cli_data.train), "is the input file")
    os.link(cli_data.train, tmp_path / "same.npz")                                   # a hard link to --train
    rc, stdout, err = run(capsys, *train(cli_data, tmp_path / "same.npz", "--force"))
    refused(rc, stdout, err, "is the input file")
    assert snapshot(cli_data.dir) == before


def test_unmarked_non_empty_folder_is_refused_even_with_force(cli_data, tmp_path, capsys, no_computation):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    for force in ([], ["--force"]):
        rc, stdout, err = run(capsys, *detect(cli_data, out, *force))
        refused(rc, stdout, err, str(out), "not written by ecif-fast", MARKER, "new or empty folder")
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]
    (tmp_path / "file").write_text("x")                                          # a file where a folder goes
    rc, stdout, err = run(capsys, *detect(cli_data, tmp_path / "file", "--force"))
    refused(rc, stdout, err, "not a folder")
    assert (tmp_path / "file").read_text() == "x"


def test_earlier_output_is_replaced_with_force_and_empty_folder_is_fine(cli_data, tmp_path, capsys):
    out = tmp_path / "detect"
    out.mkdir()                                                                  # empty: no --force needed
    rc, stdout, _ = run(capsys, *detect(cli_data, out, "--json"))
    assert rc == 0 and MARKER not in json.loads(stdout)["files"]
    assert json.loads((out / MARKER).read_text()) == {"tool": "ecif-fast", "command": "detect"}
    first = (out / "scores.csv").stat().st_mtime_ns
    rc, stdout, err = run(capsys, *detect(cli_data, out))                             # an earlier output: --force
    refused(rc, stdout, err, str(out), "--force")
    rc, _, _ = run(capsys, *detect(cli_data, out, "--force"))
    assert rc == 0 and (out / "scores.csv").stat().st_mtime_ns != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["detect"]             # nothing left beside it


def test_train_overwrites_only_an_ecif_fast_checkpoint(cli_data, tmp_path, capsys, no_computation):
    foreign = tmp_path / "weights.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    for path in (foreign, text):
        before = path.read_bytes()
        rc, stdout, err = run(capsys, *train(cli_data, path, "--force"))
        refused(rc, stdout, err, str(path), "not an ecif-fast checkpoint")
        assert path.read_bytes() == before
    rc, stdout, err = run(capsys, *train(cli_data, tmp_path, "--force"))               # a folder
    refused(rc, stdout, err, "is a folder")


def test_train_replaces_its_own_checkpoint_with_force(cli_data, tmp_path, capsys):
    path = tmp_path / "heads.pt"
    path.write_bytes(cli_data.model.read_bytes())
    rc, _, err = run(capsys, *train(cli_data, path))
    refused(rc, "", err, str(path), "--force")
    rc, _, _ = run(capsys, *train(cli_data, path, "--force", "--max-iter", "2"))
    assert rc == 0 and load_checkpoint(path)[1]["max_iter"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heads.pt"]


# ------------------------------------------------------------------- checked before any work

@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_proc_is_refused_before_training(cli_data, capsys, no_computation):
    t0 = time.perf_counter()
    rc, stdout, err = run(capsys, *train(cli_data, "/proc/x.pt"))
    refused(rc, stdout, err, "/proc/x.pt", "cannot write")
    rc, stdout, err = run(capsys, *detect(cli_data, "/proc/x"))
    refused(rc, stdout, err, "/proc/x", "cannot write")
    assert time.perf_counter() - t0 < 5


def test_read_only_folder_is_refused_before_any_work(cli_data, tmp_path, capsys, monkeypatch, no_computation):
    ro = tmp_path / "ro"
    ro.mkdir()
    mkdir, open_ = os.mkdir, os.open

    def read_only(call):
        def patched(path, *args, **kwargs):
            if str(path).startswith(str(ro)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return call(path, *args, **kwargs)
        return patched

    monkeypatch.setattr(os, "mkdir", read_only(mkdir))      # as root, permission bits do not stop writes
    monkeypatch.setattr(os, "open", read_only(open_))
    rc, stdout, err = run(capsys, *detect(cli_data, ro / "a" / "b"))
    refused(rc, stdout, err, str(ro / "a" / "b"), "cannot write in", "Read-only file system")
    rc, stdout, err = run(capsys, *train(cli_data, ro / "heads.pt"))
    refused(rc, stdout, err, "Read-only file system")
    assert list(ro.iterdir()) == []


def test_names_too_long_are_refused_before_any_work(cli_data, tmp_path, capsys, no_computation):
    rc, stdout, err = run(capsys, *detect(cli_data, tmp_path / ("a" * 300)))
    refused(rc, stdout, err, "300 bytes", "shorter name")
    rc, stdout, err = run(capsys, *train(cli_data, tmp_path / ("b" * 300 + ".pt")))
    refused(rc, stdout, err, "303 bytes")
    deep = tmp_path / "/".join(["d" * 200] * 25)                                  # > PATH_MAX
    rc, stdout, err = run(capsys, *detect(cli_data, deep))
    refused(rc, stdout, err, "too long")
    assert list(tmp_path.iterdir()) == []


def test_long_but_valid_names_work(cli_data, tmp_path, capsys):
    out = tmp_path / ("a" * 255)                       # the temporary siblings have short names
    rc, _, _ = run(capsys, *detect(cli_data, out))
    assert rc == 0 and (out / "report.html").is_file()
    model = torch.load(cli_data.model, weights_only=True)
    path = save_checkpoint(tmp_path / ("b" * 252 + ".pt"), *load_checkpoint(cli_data.model))
    assert is_checkpoint(path) and model["format"] == "ecif_fast.LinearHeads"
    assert sorted(len(p.name) for p in tmp_path.iterdir()) == [255, 255]


# ---------------------------------------------------------------------------------- the writers

@pytest.mark.parametrize("where", [".", "..", "", "cwd", "ancestor"])
def test_writer_refuses_working_folder_and_above(work, where):
    path = {"cwd": work, "ancestor": work.parent}.get(where, where)
    before = snapshot(work.parent.parent)
    ran = []
    with pytest.raises(OutputLocationError, match="empty" if where == "" else "working folder"):
        with atomic_output_dir(path):
            ran.append(True)
    assert not ran and snapshot(work.parent.parent) == before


def test_writer_refuses_inputs_and_foreign_folders(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.npz").write_text("x")
    with pytest.raises(OutputLocationError, match="holds the input file"):
        with atomic_output_dir(data, inputs=[data / "train.npz"]):
            pass
    with pytest.raises(FileExistsError, match="not written by ecif-fast"):
        with atomic_output_dir(data):                                      # overwrite=True by default
            pass
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError, match="not a folder"):
        with atomic_output_dir(tmp_path / "link"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "link"]


def test_writer_interrupted_leaves_previous_output(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "v1.txt").write_text("1")
    before = snapshot(out)
    for exc in (KeyboardInterrupt, RuntimeError):
        with pytest.raises(exc):
            with atomic_output_dir(out) as tmp:
                (tmp / "half.txt").write_text("half")
                raise exc("stop")
        assert snapshot(out) == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_cli_interrupted_while_writing_keeps_earlier_output(cli_data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "detect"
    assert run(capsys, *detect(cli_data, out))[0] == 0
    before = snapshot(out)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("ecif_fast.report.html.write_table", interrupt)
    rc, _, err = run(capsys, *detect(cli_data, out, "--force"))
    assert rc == 130 and "interrupted" in err
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["detect"]


def test_writer_without_rename_exchange(tmp_path, monkeypatch):
    monkeypatch.setattr(output, "_exchange", lambda a, b: False)          # e.g. not Linux
    out = tmp_path / "out"
    for version in ("1", "2"):
        with atomic_output_dir(out) as tmp:
            (tmp / "v.txt").write_text(version)
    assert (out / "v.txt").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.skipif(output.fcntl is None, reason="needs fcntl.flock")
def test_stale_temporary_folders_of_killed_writers_are_removed(tmp_path):
    stale = tmp_path / f"{TMP_PREFIX}{'0' * 16}"                 # a killed writer's folder, with the marker
    stale.mkdir()
    (stale / MARKER).write_text(json.dumps({"tool": "ecif-fast", "command": "detect"}))
    (stale / "half.csv").write_text("x")
    foreign = tmp_path / f"{TMP_PREFIX}{'1' * 16}"               # same prefix, not ours: kept
    foreign.mkdir()
    (foreign / "data.txt").write_text("x")
    with atomic_output_dir(tmp_path / "a") as tmp:
        live = tmp                                                  # a live writer's folder is kept
        with atomic_output_dir(tmp_path / "b"):
            pass
        assert live.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a", "b", foreign.name])


def test_atomic_output_file_replaces_only_what_it_may(tmp_path):
    path = tmp_path / "model.bin"
    path.write_text("user's file")
    with pytest.raises(FileExistsError, match="never overwritten"):
        with atomic_output_file(path) as tmp:
            tmp.write_text("new")
    assert path.read_text() == "user's file"
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_file(path, replaceable=lambda p: True) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    with atomic_output_file(path, replaceable=lambda p: True) as tmp:
        tmp.write_text("new")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]


def test_save_checkpoint_never_overwrites_other_files(cli_data, tmp_path):
    model, training = load_checkpoint(cli_data.model)
    np.savez(tmp_path / "t.npz", a=np.zeros(3))
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    for name in ("t.npz", "other.pt"):
        before = (tmp_path / name).read_bytes()
        assert not is_checkpoint(tmp_path / name)
        with pytest.raises(FileExistsError):
            save_checkpoint(tmp_path / name, model, training)
        assert (tmp_path / name).read_bytes() == before
    path = save_checkpoint(tmp_path / "heads.pt", model, training)
    assert is_checkpoint(path) and save_checkpoint(path, model, training) == path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heads.pt", "other.pt", "t.npz"]


def test_check_writable_names(tmp_path):
    check_writable(tmp_path / "x" / ("a" * 255))
    with pytest.raises(OutputLocationError, match="256 bytes"):
        check_writable(tmp_path / ("a" * 256))
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputLocationError, match="is not a folder"):
        check_writable(tmp_path / "f" / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]                 # the probe is gone


# ------------------------------------------------------------------------------------ concurrency

WRITER = """
import sys
from ecif_fast.report import output
out, writer, rounds, mode, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
if mode == "rename":
    output._exchange = lambda a, b: False
import os, time
while not os.path.exists(go):
    time.sleep(0.005)
for i in range(rounds):
    if mode == "file":
        with output.atomic_output_file(out, replaceable=lambda p: True) as tmp:
            tmp.write_text(f"{writer} {i}")
        continue
    with output.atomic_output_dir(out, command="test") as tmp:
        for name in ("a.txt", "b.txt", "c.txt"):
            (tmp / name).write_text(f"{writer} {i}")
"""


@pytest.mark.parametrize("mode", ["exchange", "rename", "file"])
def test_concurrent_writers_of_one_output(tmp_path, mode):
    parent, go, rounds = tmp_path / "parent", tmp_path / "go", 25
    parent.mkdir()
    out = parent / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent),
                                                        os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(w), str(rounds), mode, str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for w in range(4)]
    time.sleep(0.5)
    go.write_text("")                                        # all start writing together
    results = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0 and err == "", err
    if mode == "file":
        contents = {out.read_text()}
    else:
        assert sorted(p.name for p in out.iterdir()) == [MARKER, "a.txt", "b.txt", "c.txt"]
        contents = {(out / n).read_text() for n in ("a.txt", "b.txt", "c.txt")}
    assert len(contents) == 1                                # complete, and from exactly one writer
    assert contents.pop().split()[1] == str(rounds - 1)      # the last complete write wins
    assert [p.name for p in parent.iterdir()] == ["out"]     # no temporary or old entries left


# ------------------------------------------------------------------------------------------ CSV

DANGEROUS = ["=1+1", "+41", "-7", "@SUM(A1)", "\tx", "\rx", "'=already", "''-2", "plain", "a=b", "'quoted"]


def test_csv_formula_cells_are_quoted_numbers_stay(tmp_path):
    df = pd.DataFrame({"pair_id": DANGEROUS, "total": np.linspace(-1.5, 1, len(DANGEROUS)),
                       "count": -np.arange(len(DANGEROUS)), "note": pd.Categorical(["=x"] * len(DANGEROUS))})
    paths = write_table(df, tmp_path, "t")
    with open(paths[0], newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    cells = [r[0] for r in rows[1:]]
    assert cells == ["'=1+1", "'+41", "'-7", "'@SUM(A1)", "'\tx", "'\rx", "''=already", "'''-2", "plain", "a=b",
                     "'quoted"]
    assert all(r[3] == "'=x" for r in rows[1:])
    assert rows[1][1] == "-1.5" and rows[2][2] == "-1"            # numbers are written as numbers
    back = pd.read_csv(paths[0])
    assert back["total"].tolist() == df["total"].tolist() and back["count"].tolist() == df["count"].tolist()
    pd.testing.assert_frame_equal(pd.read_parquet(paths[1]), df)  # Parquet keeps the raw values
    assert [csv_quote(v) for v in (-7, 1.5, None)] == [-7, 1.5, None]


def test_load_ids_reads_quoted_cells_back(tmp_path):
    write_table(pd.DataFrame({"score": np.ones(len(DANGEROUS)), "pair_id": DANGEROUS}), tmp_path, "ids")
    ids = load_ids(tmp_path / "ids.csv")
    assert ids == DANGEROUS


def test_cli_scores_round_trip_through_remove(tmp_path, capsys):
    """detect writes formula-like pair ids quoted; feeding rows of its CSV to clean --remove finds them."""
    rng = np.random.default_rng(0)
    Z = rng.normal(size=(40, 3))
    ids = np.array([f"{c}{i}" for i, c in zip(range(40), "=+-@x" * 8)])
    np.savez(tmp_path / "t.npz", image_features=Z @ rng.normal(size=(3, 6)),
             text_features=Z @ rng.normal(size=(3, 5)), pair_ids=ids, batch_ids=np.arange(40) % 2)
    argv = ["--train", tmp_path / "t.npz", "--quiet"]
    assert run(capsys, "train", *argv, "--out", tmp_path / "h.pt", *HEADS)[0] == 0
    assert run(capsys, "detect", *argv, "--model", tmp_path / "h.pt", "--out", tmp_path / "d")[0] == 0
    lines = (tmp_path / "d" / "scores.csv").read_text(encoding="utf-8").splitlines()
    (tmp_path / "ids.csv").write_text("\n".join(lines[:6]) + "\n", encoding="utf-8")
    expected = pd.read_parquet(tmp_path / "d" / "scores.parquet")["pair_id"].tolist()[:5]
    assert any(e[0] in "=+-@" for e in expected)
    rc, stdout, _ = run(capsys, "clean", *argv, "--model", tmp_path / "h.pt", "--remove", tmp_path / "ids.csv",
                        "--out", tmp_path / "c", "--json")
    assert rc == 0 and json.loads(stdout)["summary"]["removed_pair_ids"] == expected
