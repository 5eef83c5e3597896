"""The ``ecif-fast`` command line on the tiny synthetic feature files of ``cli_data.py`` (120 pairs, 20 % shuffled
captions; the ``cli_data`` fixture)."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pd = pytest.importorskip("pandas")
pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

import ecif_fast as ef  # noqa: E402
from cli_data import DI, DT, EMBED, HEADS, N, analysis, run  # noqa: E402
from ecif_fast.apps import trace_back, value_data, zero_shot_logits  # noqa: E402
from ecif_fast.cli import commands  # noqa: E402
from ecif_fast.cli.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from ecif_fast.cli.main import DEFAULT_TRAIN_DAMPING  # noqa: E402

# ------------------------------------------------------------------------------------------- train

def test_train_writes_checkpoint_that_loads_back(cli_data, tmp_path, capsys):
    model, training = load_checkpoint(cli_data.model)
    # what `train` does, by hand: whitened heads at the canonical correlation directions, decayed towards them
    ref_model = ef.LinearHeads.from_features(cli_data.X, cli_data.Y, EMBED, normalize=False, logit_scale=0.0).double()
    theta_ref = torch.cat([p.detach().reshape(-1) for p in ref_model.parameters() if p.requires_grad])
    ef.train(ref_model, cli_data.X, cli_data.Y, batches=torch.arange(N) % 3, damping=DEFAULT_TRAIN_DAMPING,
             theta_ref=theta_ref)
    for (name, p), q in zip(model.state_dict().items(), ref_model.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-10, msg=name)
    assert model.image_proj.weight.dtype == torch.float64
    assert training["damping"] == DEFAULT_TRAIN_DAMPING and training["grad_norm"] < 1e-9
    assert torch.equal(training["batch_ids"], torch.arange(N) % 3)       # the file's batch_ids column
    torch.testing.assert_close(training["theta_ref"], theta_ref)
    # save -> load is exact, and the file is not left half-written under a temp name
    path = save_checkpoint(tmp_path / "copy.pt", model, training)
    again, training2 = load_checkpoint(path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert torch.equal(training2["theta_ref"], training["theta_ref"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.pt"]
    # --json, --batch-size and --float32; an existing --out needs --force
    rc, out, err = run(capsys, "train", "--train", cli_data.train, "--out", path, "--batch-size", "40", "--float32",
                       "--max-iter", "3", "--json", "--force", *HEADS)
    summary = json.loads(out)["summary"]
    assert rc == 0 and summary["batches"] == "size 40" and summary["dtype"] == "float32"
    model32, training32 = load_checkpoint(path)
    assert model32.image_proj.weight.dtype == torch.float32 and training32["batch_size"] == 40
    rc, out, err = run(capsys, "train", "--train", cli_data.train, "--out", path, *HEADS)
    assert rc == 2 and str(path) in err and "--force" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------ value, detect

def test_value_table_equals_value_data(cli_data, tmp_path, capsys):
    out = tmp_path / "value"
    rc, _, err = run(capsys, *analysis(cli_data, "value", out, "--val", cli_data.val, "--solver", "exact",
                                       "--curvature", "hessian", "--quiet"))
    assert rc == 0 and err == ""
    assert sorted(p.name for p in out.iterdir()) == [".ecif-fast-output", "report.html", "scores.csv",
                                                       "scores.parquet", "summary.json"]
    model, training = load_checkpoint(cli_data.model)
    ecif = ef.ECIF(model, damping=training["damping"], batches=training["batch_ids"], solver="exact",
                   curvature="hessian").fit(cli_data.X, cli_data.Y)
    expected = value_data(ecif, cli_data.Xv, cli_data.Yv)
    got = pd.read_parquet(out / "scores.parquet")
    assert got["pair_id"].tolist() == list(range(1000, 1000 + N))
    for col in ("total", "positive", "negative"):
        np.testing.assert_allclose(got[col], expected[col], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(pd.read_csv(out / "scores.csv")["total"], expected["total"], rtol=1e-12)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["harmful_pairs"] == int((expected["total"] < 0).sum())
    assert summary["settings"]["solver"] == "exact" and summary["settings"]["curvature"] == "hessian"


def test_parquet_and_npz_inputs_give_identical_results(cli_data, tmp_path, capsys):
    tables = []
    for name, train in (("npz", cli_data.train), ("parquet", cli_data.parquet),
                        ("npy", cli_data.dir / "train_structured.npy")):
        assert run(capsys, *analysis(cli_data, "value", tmp_path / name, "--val", cli_data.val, "--quiet",
                                     train=train))[0] == 0
        tables.append(pd.read_parquet(tmp_path / name / "scores.parquet"))
    pd.testing.assert_frame_equal(tables[0], tables[1])
    pd.testing.assert_frame_equal(tables[0], tables[2])
    assert {"caption", "image_path", "misaligned"} <= set(tables[0].columns)


def test_detect_finds_shuffled_captions(cli_data, tmp_path, capsys):
    out = tmp_path / "detect"
    rc, stdout, err = run(capsys, *analysis(cli_data, "detect", out, "--val", cli_data.val, "--json"))
    assert rc == 0 and err == ""
    result = json.loads(stdout)                            # --json: one JSON object, nothing else
    assert result["command"] == "detect" and result["out"] == str(out)
    assert Path(result["files"]["report.html"]).is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scoring"] == "cleaned"               # the default; --val adds the validation influence
    assert set(summary["metrics"]["ecif_cleaned"]) >= {"auroc", "average_precision", "precision_at_k", "k"}
    assert summary["auroc"] == summary["metrics"]["ecif_cleaned"]["auroc"] > 0.8
    assert summary["metrics"]["ecif_cleaned"]["k"] == int(cli_data.misaligned.sum())
    assert "ecif" in summary["metrics"]
    table = pd.read_csv(out / "scores.csv")
    assert (table["score"] == table["score_ecif_cleaned"]).all() and "score_ecif" in table
    assert table["misaligned"].tolist() == cli_data.misaligned.tolist()
    assert table.sort_values("rank")["score"].is_monotonic_decreasing
    html = (out / "report.html").read_text()
    assert "Top flagged pairs" in html and "caption " in html and "<svg" in html
    assert html.count('src="data:image/png;base64,') == 24              # thumbnails from image_paths


def test_detect_without_val_and_warns_on_overrides(cli_data, tmp_path, capsys):
    out = tmp_path / "self"
    rc, stdout, err = run(capsys, *analysis(cli_data, "detect", out, "--damping", "2", "--batch-size", "40",
                                            "--json"))
    assert rc == 0
    summary = json.loads(stdout)["summary"]
    assert summary["scoring"] == "cleaned" and set(summary["metrics"]) == {"ecif_cleaned", "clip_score", "loss"}
    assert summary["settings"]["damping"] == 2.0 and summary["settings"]["batches"] == "size 40"
    assert "warning: --damping 2 overrides" in err and "warning: --batch-size 40 overrides" in err
    rc, _, err = run(capsys, *analysis(cli_data, "detect", tmp_path / "v", "--scoring", "validation"))
    assert rc == 2 and "--scoring validation needs trusted validation pairs" in err
    # the features differ from the checkpoint's training file: an error, unless --allow-data-mismatch
    np.savez(tmp_path / "other.npz", image_features=cli_data.X.numpy() + 0.01, text_features=cli_data.Y.numpy())
    rc, _, err = run(capsys, *analysis(cli_data, "detect", tmp_path / "o", "--quiet", train=tmp_path / "other.npz"))
    assert rc == 2 and "is not the file" in err and "--allow-data-mismatch" in err and not (tmp_path / "o").exists()
    rc, _, err = run(capsys, *analysis(cli_data, "detect", tmp_path / "o", "--quiet", "--allow-data-mismatch",
                                       train=tmp_path / "other.npz"))
    assert rc == 0 and "warning:" in err and "is not the file" in err


# ------------------------------------------------------------------------------------------- trace

def test_trace_per_test_pair(cli_data, tmp_path, capsys):
    out = tmp_path / "trace"
    rc, _, _ = run(capsys, *analysis(cli_data, "trace", out, "--test", cli_data.test, "--k", "3", "--quiet"))
    assert rc == 0
    table = pd.read_parquet(out / "traceback.parquet")
    assert len(table) == 5 * 3
    assert table["test_id"].tolist() == np.repeat(np.arange(5), 3).tolist()
    assert table["rank"].tolist() == [1, 2, 3] * 5
    assert table["test_caption"].tolist() == np.repeat([f"test caption {j}" for j in range(5)], 3).tolist()
    model, training = load_checkpoint(cli_data.model)
    ecif = ef.ECIF(model, damping=training["damping"], batches=training["batch_ids"],
                   curvature="gauss-newton").fit(cli_data.X, cli_data.Y)
    expected = trace_back(ecif, cli_data.Xv[:5], cli_data.Yv[:5], k=3)
    assert table["train_index"].tolist() == expected["train_index"].tolist()
    np.testing.assert_allclose(table["relative_influence"], expected["relative_influence"], rtol=1e-10)
    assert "test pair 4" in (out / "report.html").read_text()


def test_trace_zero_shot(cli_data, tmp_path, capsys):
    out = tmp_path / "zs"
    rc, stdout, _ = run(capsys, *analysis(cli_data, "trace", out, "--test", cli_data.zs, "--classes", cli_data.classes,
                                          "--k", "4", "--json"))
    assert rc == 0
    summary = json.loads(stdout)["summary"]
    table = pd.read_csv(out / "traceback.csv")
    m = 3 * 4
    assert summary["mode"] == "zero-shot" and len(table) == m * 4
    assert table.groupby("test_id").size().tolist() == [4] * m
    assert set(table["test_label"]) == {"cat", "dog", "car"}
    # which images are wrong, computed directly; --only-wrong traces exactly those (a plain .npy classes file)
    model, _ = load_checkpoint(cli_data.model)
    zs = np.load(cli_data.zs)
    with torch.no_grad():
        pred = zero_shot_logits(model, torch.tensor(zs["image_features"]),
                                torch.tensor(np.load(cli_data.classes_npy))).argmax(1).numpy()
    wrong = np.flatnonzero(pred != zs["labels"])
    assert 0 < wrong.size < m, "the data should give some but not all wrong zero-shot predictions"
    assert summary["accuracy"] == pytest.approx(1 - wrong.size / m)
    out2 = tmp_path / "wrong"
    rc, _, _ = run(capsys, *analysis(cli_data, "trace", out2, "--test", cli_data.zs, "--classes", cli_data.classes_npy,
                                     "--k", "2", "--only-wrong", "--quiet"))
    table = pd.read_csv(out2 / "traceback.csv")
    assert rc == 0 and len(table) == wrong.size * 2
    assert sorted(set(table["test_id"])) == wrong.tolist()
    assert (table["test_label"] != table["test_predicted"]).all()
    assert table["test_label"].str.startswith("class ").all()          # no names in a plain .npy


# ------------------------------------------------------------------------------------------- clean

def test_clean_remove_and_retrain(cli_data, tmp_path, capsys):
    ids = tmp_path / "remove.csv"
    ids.write_text("pair_id,note\n1003,a\n1010,b\n1077,c\n")
    out = tmp_path / "clean"
    rc, _, _ = run(capsys, *analysis(cli_data, "clean", out, "--remove", ids, "--retrain", "--eval", cli_data.zs,
                                     "--classes", cli_data.classes, "--curvature", "hessian", "--quiet"))
    assert rc == 0
    table = pd.read_csv(out / "cleaning.csv")
    assert table["setting"].tolist() == ["no removal", "ECIF update", "retrain"]
    assert {"eval_loss", "zero_shot_accuracy", "time_s"} <= set(table.columns)
    assert pd.read_csv(out / "removed.csv")["pair_id"].tolist() == [1003, 1010, 1077]
    original, _ = load_checkpoint(cli_data.model)
    cleaned, record = load_checkpoint(out / "cleaned.pt")
    retrained, record2 = load_checkpoint(out / "retrained.pt")
    assert record["n_train"] == record2["n_train"] == N - 3 and record["batch_ids"].numel() == N - 3
    assert record2["grad_norm"] < 1e-8                      # retrained to the optimum without the pairs
    # the Newton-step update moves the parameters most of the way to the retrained ones
    flat = lambda m: torch.cat([p.detach().reshape(-1) for p in m.parameters()])  # noqa: E731
    ratio = (flat(cleaned) - flat(retrained)).norm() / (flat(original) - flat(retrained)).norm()
    assert ratio < 0.2


def test_clean_top_harmful_json(cli_data, tmp_path, capsys):
    out = tmp_path / "top"
    rc, stdout, err = run(capsys, *analysis(cli_data, "clean", out, "--top-harmful", "0.05", "--val", cli_data.val,
                                            "--json"))
    assert rc == 0 and err == ""
    result = json.loads(stdout)
    assert result["summary"]["removed"] == 6
    assert set(result["files"]) == {"cleaned.pt", "cleaning.csv", "cleaning.parquet", "removed.csv",
                                    "removed.parquet", "report.html", "summary.json"}
    removed = pd.read_csv(out / "removed.csv")
    assert removed["influence"].is_monotonic_increasing and (removed["influence"] < 0).all()
    cleaning = result["summary"]["cleaning"]
    assert cleaning["ECIF update"]["eval_loss"] < cleaning["no removal"]["eval_loss"]


def test_failure_while_writing_leaves_no_output(cli_data, tmp_path, monkeypatch, capsys):
    def boom(path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(commands, "save_checkpoint", boom)      # fails after the report is written
    out = tmp_path / "clean"
    rc, _, err = run(capsys, *analysis(cli_data, "clean", out, "--top-harmful", "0.1", "--val", cli_data.val,
                                       "--quiet"))
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "No space left on device" in err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ errors

def _bad_files(d, tmp: Path) -> dict:
    """name -> (file, where it goes, expected words in the message)."""
    X, Y = d.Xv.numpy(), d.Yv.numpy()
    files = {}

    def npz(name, **arrays):
        np.savez(tmp / name, **arrays)
        return tmp / name

    files["missing"] = (tmp / "nope.npz", "--val", "no such file")
    (tmp / "val.csv").write_text("1,2\n")
    files["extension"] = (tmp / "val.csv", "--val", "unknown extension")
    files["no_texts"] = (npz("a.npz", image_features=X, captions=np.array(["c"] * 60)), "--val",
                         "found: captions, image_features")
    files["not_2d"] = (npz("b.npz", image_features=X[:, :, None], text_features=Y), "--val", "2-D")
    files["rows"] = (npz("c.npz", image_features=X, text_features=Y[:59]), "--val", "59 rows")
    Xn = X.copy()
    Xn[[3, 7], 1] = [np.nan, np.inf]
    files["nan"] = (npz("d.npz", image_features=Xn, text_features=Y), "--val", "2 of 60 rows")
    files["empty"] = (npz("e.npz", image_features=X[:0], text_features=Y[:0]), "--val", "empty")
    files["dtype"] = (npz("f.npz", image_features=X.astype(str), text_features=Y), "--val", "non-numeric")
    files["width"] = (npz("g.npz", image_features=X[:, :4], text_features=Y), "--val", "image_dim is 6")
    np.save(tmp / "h.npy", X)
    files["plain_npy"] = (tmp / "h.npy", "--val", "structured")
    ragged = pa.table({"image_features": pa.array([[1.0, 2.0], [1.0]]), "text_features": pa.array([[1.0], [2.0]])})
    pq.write_table(ragged, tmp / "i.parquet")
    files["ragged"] = (tmp / "i.parquet", "--val", "different lengths")
    (tmp / "j.pt").write_text("not a checkpoint")
    files["checkpoint"] = (tmp / "j.pt", "--model", "checkpoint")
    torch.save({"weights": torch.zeros(3)}, tmp / "k.pt")
    files["foreign_checkpoint"] = (tmp / "k.pt", "--model", "not an ecif-fast LinearHeads checkpoint")
    (tmp / "l.txt").write_text("1003 99999\n")
    files["unknown_id"] = (tmp / "l.txt", "--remove", "99999")
    (tmp / "m.txt").write_text("1003\n1003\n")
    files["duplicate_id"] = (tmp / "m.txt", "--remove", "duplicate")
    return files


BAD = ["missing", "extension", "no_texts", "not_2d", "rows", "nan", "empty", "dtype", "width", "plain_npy",
       "ragged", "checkpoint", "foreign_checkpoint", "unknown_id", "duplicate_id"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_file_exit_2_one_line_no_output(cli_data, tmp_path, capsys, case):
    path, flag, words = _bad_files(cli_data, tmp_path)[case]
    out = tmp_path / "out"
    if flag == "--remove":
        argv = analysis(cli_data, "clean", out, "--remove", path)
    else:
        argv = analysis(cli_data, "value", out, "--val", cli_data.val)
        argv[argv.index(flag) + 1] = path
    rc, stdout, err = run(capsys, *argv)
    assert rc == 2 and stdout == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ecif-fast: error: "), err
    assert str(path) in lines[0] and words in lines[0], lines[0]
    assert not out.exists()


def test_bad_options_exit_2(cli_data, tmp_path, capsys):
    out = tmp_path / "out"
    for extra, words in ((["--top-harmful", "1.5", "--val", cli_data.val], "--top-harmful must lie in (0, 1)"),
                         (["--top-harmful", "0.1"], "needs trusted validation pairs")):
        rc, _, err = run(capsys, *analysis(cli_data, "clean", out, *extra))
        assert rc == 2 and err.startswith("ecif-fast: error: ") and words in err and not out.exists()
    rc, _, err = run(capsys, *analysis(cli_data, "detect", out, "--scoring", "combined"))
    assert rc == 2 and "--val" in err and not out.exists()
    # a non-empty --out that ecif-fast did not write is refused, even with --force, and left as it was
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    for force in ([], ["--force"]):
        rc, _, err = run(capsys, *analysis(cli_data, "value", out, "--val", cli_data.val, *force))
        assert rc == 2 and str(out) in err and "--force" in err and len(err.strip().splitlines()) == 1
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # an earlier output is replaced with --force
    (out / "keep.txt").unlink()
    assert run(capsys, *analysis(cli_data, "value", out, "--val", cli_data.val, "--quiet"))[0] == 0
    rc, _, _ = run(capsys, *analysis(cli_data, "value", out, "--val", cli_data.val, "--force", "--quiet"))
    assert rc == 0 and (out / "scores.csv").exists()


def test_module_entry_point_in_subprocess(cli_data, tmp_path):
    out = tmp_path / "detect"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "ecif_fast.cli.main", *map(str, analysis(
        cli_data, "detect", out, "--scoring", "self", "--json"))], capture_output=True, text=True, env=env,
        timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert json.loads(proc.stdout)["summary"]["scoring"] == "self"
    assert (out / "report.html").is_file()


def test_train_whitens_by_default_and_no_whiten_keeps_raw_features(cli_data, tmp_path, capsys):
    model, training = load_checkpoint(cli_data.model)                    # the fixture's default train
    assert model.image_rank is not None and model.image_dim == DI and model.text_dim == DT
    raw_path = tmp_path / "raw.pt"
    rc, out, err = run(capsys, "train", "--train", cli_data.train, "--out", raw_path, "--no-whiten", "--json",
                       *HEADS)
    assert rc == 0 and json.loads(out)["summary"]["whitened"] is False
    raw, raw_training = load_checkpoint(raw_path)
    assert raw.image_rank is None and raw.image_proj.weight.shape == (EMBED, DI)
    torch.manual_seed(0)                                                 # --seed 0: the random start, by hand
    start = ef.LinearHeads(DI, DT, EMBED, normalize=False, logit_scale=0.0).double()
    torch.testing.assert_close(raw_training["theta_ref"],
                               torch.cat([p.detach().reshape(-1) for p in start.parameters() if p.requires_grad]))
    # --rank keeps that many whitened dimensions (the largest variance); with --no-whiten it is a usage error
    ranked = tmp_path / "rank3.pt"
    rc, out, err = run(capsys, "train", "--train", cli_data.train, "--out", ranked, "--rank", "3", "--quiet",
                       "--no-normalize", "--logit-scale", "0")
    r3, _ = load_checkpoint(ranked)
    assert rc == 0 and (r3.image_rank, r3.text_rank) == (3, 3) and r3.image_proj.weight.shape == (3, 3)
    rc, out, err = run(capsys, "train", "--train", cli_data.train, "--out", tmp_path / "x.pt", "--rank", "3",
                       "--no-whiten", *HEADS)
    assert rc == 2 and "--rank" in err and "--no-whiten" in err and not (tmp_path / "x.pt").exists()
    # a checkpoint written before whitened heads existed (no ranks in its config) still loads as raw heads
    obj = torch.load(raw_path, weights_only=True)
    for key in ("image_rank", "text_rank"):
        del obj["config"][key]
    old = tmp_path / "old.pt"
    torch.save(obj, old)
    again, _ = load_checkpoint(old)
    assert again.image_rank is None
    assert all(torch.equal(a, b) for a, b in zip(raw.state_dict().values(), again.state_dict().values()))
    # the default --rank auto: the ranks tried and their held-out losses are in the summary and the checkpoint,
    # the chosen one is the least; --rank full keeps every direction (here the ladder is the span alone: 6)
    rc, out, err = run(capsys, "train", "--train", cli_data.train, "--out", tmp_path / "auto.pt", "--json",
                       "--max-iter", "50", *HEADS)
    summary = json.loads(out)["summary"]
    tried = summary["rank_selection"]
    assert rc == 0 and [e["rank"] for e in tried] == [6] and summary["ranks"] == [6, 5]
    assert load_checkpoint(tmp_path / "auto.pt")[1]["rank_selection"][0]["held_out_loss"] == tried[0]["held_out_loss"]
    rc, out, err = run(capsys, "train", "--train", cli_data.train, "--out", tmp_path / "full.pt", "--json",
                       "--rank", "full", *HEADS)
    assert rc == 0 and "rank_selection" not in json.loads(out)["summary"]
    rc, out, err = run(capsys, "train", "--train", cli_data.train, "--out", tmp_path / "x.pt", "--rank", "most")
    assert rc == 2 and "--rank" in err
    # normalised heads are normalised softly by default (--soft-norm 0.1); the checkpoint keeps ε, an older one
    # without it loads with the exact normalisation, and --soft-norm 0 asks for that
    soft_path, exact_path = tmp_path / "soft.pt", tmp_path / "exact.pt"
    for path, extra in ((soft_path, []), (exact_path, ["--soft-norm", "0"])):
        rc, out, err = run(capsys, "train", "--train", cli_data.train, "--out", path, "--embed-dim", str(EMBED),
                           "--quiet", *extra)
        assert rc == 0, err
    soft, _ = load_checkpoint(soft_path)
    assert soft.normalize and soft.norm_eps > 0 and load_checkpoint(exact_path)[0].norm_eps == 0
    obj = torch.load(soft_path, weights_only=True)
    assert obj["config"]["norm_eps"] == soft.norm_eps
    del obj["config"]["norm_eps"]
    torch.save(obj, old)
    assert load_checkpoint(old)[0].norm_eps == 0
    # both kinds score a pairs file of the raw widths
    for path in (cli_data.model, raw_path):
        rc, out, err = run(capsys, "detect", "--train", cli_data.train, "--model", path, "--scoring", "self",
                           "--out", tmp_path / f"det_{path.stem}", "--quiet")
        assert rc == 0, err


def test_train_names_an_embedding_whose_norm_collapsed():
    from types import SimpleNamespace
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(12, 4, generator=g, dtype=torch.float64), torch.randn(12, 3, generator=g, dtype=torch.float64)
    model = ef.LinearHeads(4, 3, 2).double()
    data = SimpleNamespace(images=X, texts=Y)
    assert commands._collapsed_embedding(model, data, torch.float64) is None
    Y[5] *= 1e-6                       # pair 5's caption maps to almost zero before normalisation
    found = commands._collapsed_embedding(model, data, torch.float64)
    assert found is not None and "text embedding of pair 5" in found
    assert commands._collapsed_embedding(ef.LinearHeads(4, 3, 2, normalize=False).double(), data,
                                         torch.float64) is None
