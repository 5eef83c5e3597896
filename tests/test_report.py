"""HTML report writer: atomic output folders, tables, thumbnails, plots, rendering, headless Chromium."""
from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import shutil
import sys

import numpy as np
import pytest

try:  # fail, not skip: the report is part of the package (its extra is "report")
    import matplotlib  # noqa: F401
    import pandas as pd
    from PIL import Image  # Pillow ships with matplotlib
except ImportError as e:
    pytest.fail(f'the report tests need matplotlib and pandas: pip install "ecif-fast[report]" ({e})',
                pytrace=False)

from chromium import run_chromium  # noqa: E402
from ecif_fast.report import (atomic_output_dir, precision_curve, render_report, roc_curve,  # noqa: E402
                              roc_plot, to_png_data_uri, write_report, write_table)
from ecif_fast.report.output import MARKER, TMP_PREFIX  # noqa: E402


# ------------------------------------------------------------------------------------------- output

def test_atomic_output_dir_replaces_existing_folder(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:                                   # an earlier output
        (tmp / "old.txt").write_text("old")
    with atomic_output_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(TMP_PREFIX) and tmp.is_dir()
        assert (out / "old.txt").exists()            # the old output survives until success
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]          # no temp or backup left


def test_atomic_output_dir_exception_leaves_nothing(tmp_path):
    out = tmp_path / "a" / "b" / "out"                                    # parents are created
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output_dir(out) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert not out.exists()
    assert list(out.parent.iterdir()) == []
    # an existing output is left untouched by a failed run
    with atomic_output_dir(out) as tmp:
        (tmp / "keep.txt").write_text("keep")
    with pytest.raises(KeyError):
        with atomic_output_dir(out) as tmp:
            raise KeyError("x")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "keep.txt"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_atomic_output_dir_overwrite_false_refuses_non_empty(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with atomic_output_dir(out, overwrite=False) as tmp:                  # empty folder: fine
        (tmp / "a.txt").write_text("a")
    assert (out / "a.txt").exists()
    ran = []
    with pytest.raises(FileExistsError, match=r"--force.*overwrite=True") as info:
        with atomic_output_dir(out, overwrite=False):
            ran.append(True)
    assert str(out) in str(info.value) and not ran
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_write_table_csv_and_parquet(tmp_path):
    df = pd.DataFrame({"AUROC": [0.9, 0.7], "n": [3, 4]}, index=pd.Index(["ecif", "if"], name="method"))
    paths = write_table(df, tmp_path / "t", "metrics")
    assert [p.name for p in paths] == ["metrics.csv", "metrics.parquet"]
    expected = df.reset_index()
    pd.testing.assert_frame_equal(pd.read_csv(paths[0]), expected)
    pd.testing.assert_frame_equal(pd.read_parquet(paths[1]), expected)


def test_write_table_without_pyarrow_writes_csv_and_warns(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)                    # makes `import pyarrow` fail
    with pytest.warns(UserWarning, match="pyarrow"):
        paths = write_table(pd.DataFrame({"a": [1, 2]}), tmp_path, "t")
    assert [p.name for p in paths] == ["t.csv"] and not (tmp_path / "t.parquet").exists()


# ------------------------------------------------------------------------------------------- images

def _decode(uri: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(uri[len(prefix):])))


def test_png_data_uri_grey_ramp_nearest_upscale():
    ramp = np.arange(64, dtype=np.float64).reshape(8, 8) * 0.25 - 3.0          # any range
    im = _decode(to_png_data_uri(ramp, size=64))
    assert im.size == (64, 64) and im.mode == "L"
    px = np.asarray(im)
    expected = np.rint(np.arange(64).reshape(8, 8) * 255 / 63).astype(np.uint8)
    np.testing.assert_array_equal(px, np.kron(expected, np.ones((8, 8), np.uint8)))


def test_png_data_uri_shapes_constant_and_files(tmp_path):
    rgb = np.random.default_rng(0).random((2, 4, 3))                           # (H, W, 3): wide
    im = _decode(to_png_data_uri(rgb, size=64))
    assert im.size == (64, 32) and im.mode == "RGB"
    assert np.asarray(im).min() == 0 and np.asarray(im).max() == 255
    assert set(np.asarray(_decode(to_png_data_uri(np.full((3, 3), 7.0)))).ravel()) == {128}
    path = tmp_path / "x.png"
    Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4) * 16).save(path)
    im = _decode(to_png_data_uri(str(path), size=16))
    assert im.size == (16, 16) and np.asarray(im)[0, 4] == 16
    (tmp_path / "bad.png").write_text("not an image")
    assert to_png_data_uri(tmp_path / "missing.png") is None
    assert to_png_data_uri(tmp_path / "bad.png") is None
    assert to_png_data_uri(None) is None
    with pytest.raises(ValueError, match="shape"):
        to_png_data_uri(np.zeros((2, 2, 2)))


# -------------------------------------------------------------------------------------- metrics

def test_roc_curve_auroc_is_mann_whitney_with_ties():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 5, 60).astype(float)                            # many ties
    labels = rng.random(60) < 0.3
    _, _, auc = roc_curve(scores, labels)
    pos, neg = scores[labels], scores[~labels]
    mw = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (pos.size * neg.size)
    assert auc == pytest.approx(mw, abs=1e-12)
    assert roc_curve([1.0, 2.0, 3.0], [False, False, True])[2] == 1.0
    assert math.isnan(roc_curve([1.0, 2.0], [True, True])[2])


def test_missing_matplotlib_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r'pip install "ecif-fast\[report\]"'):
        roc_plot({"m": (np.arange(4.0), np.array([0, 1, 0, 1], bool))})


def test_precision_at_k():
    prec = precision_curve([0.1, 0.9, np.nan, 0.5], [True, True, True, False])
    np.testing.assert_allclose(prec, [1.0, 0.5, 2 / 3, 3 / 4])                # NaN ranks last


# --------------------------------------------------------------------------------------- render

def _digit(d: int) -> np.ndarray:
    return (np.add.outer(np.arange(8), np.arange(8)) * (d + 1)) % 17.0


def _report() -> dict:
    rng = np.random.default_rng(0)
    n = 60
    labels = rng.random(n) < 0.25
    pos = rng.normal(size=n) + 1.5 * labels
    neg = 0.5 * rng.normal(size=n) - 0.5 * labels
    gallery = [
        {"pair_id": 7, "image": _digit(7), "caption": "a photo of the digit 1 <script>alert(1)</script>",
         "true_class": "7", "misaligned": True, "scores": {"total": 2.5, "negative": -0.4}},
        {"pair_id": 3, "image": _digit(3), "caption": "a photo of the digit three", "true_class": "3",
         "misaligned": False, "scores": {"total": 1.25, "negative": 0.2}},
        {"pair_id": "x9", "image": None, "caption": "caption & no image", "true_class": None,
         "misaligned": None, "scores": {"total": float("nan")}},
    ]
    return {
        "title": "Test report <b>",
        "subtitle": "digits, 8×8 images",
        "summary": {"n": n, "auroc": {"ecif": 0.123456789, "if": float("nan")}, "arr": np.arange(3),
                    "flag": np.bool_(True)},
        "headline": [("AUROC ECIF", "0.912"), ("pairs", "60")],
        "notes": ["Scores: higher = more suspicious <i>x</i>."],
        "detection": {"25% misaligned": {
            "curves": {"ECIF": (pos + neg, labels), "classical IF": (pos, labels)},
            "metrics": pd.DataFrame({"AUROC": [0.9123456, 0.7]},
                                    index=pd.Index(["ECIF", "IF"], name="method")),
            "positive": pos, "negative": neg, "labels": labels, "gallery": gallery}},
        "traceback": [{"title": "test image 17: true 3, predicted 8", "image": _digit(3),
                       "caption": "a photo of the digit 3",
                       "top": [{"pair_id": 11, "image": _digit(8), "caption": "a photo of the digit eight",
                                "true_class": "3", "misaligned": True, "relative_influence": 0.8,
                                "influence": -0.02}]}],
        "tables": {"Cleaning results": pd.DataFrame({"removed": [0, 10], "val loss": [1.23456, 1.1]})},
    }


# <img>: 2 gallery thumbnails (the third has no image) + trace-back query + 1 trace-back pair.
# <svg>: ROC + precision@k + influence histogram.
N_IMG, N_SVG = 4, 3
SECTION_TITLES = ["Notes", "Detection: 25% misaligned", "Trace-back", "Cleaning results", "Summary"]


@pytest.fixture(scope="module")
def report_html() -> str:
    return render_report(_report())


def test_render_escapes_and_is_self_contained(report_html):
    html = report_html
    assert "<script" not in html.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "Test report &lt;b&gt;" in html and "&lt;i&gt;x&lt;/i&gt;" in html
    assert "caption &amp; no image" in html
    without_ns = re.sub(r'xmlns(:\w+)?="[^"]*"', "", html)
    assert "http://" not in without_ns and "https://" not in without_ns
    assert html.count("xmlns=\"http://www.w3.org/2000/svg\"") == N_SVG
    ids = re.findall(r'\bid="([^"]+)"', html)
    assert len(ids) == len(set(ids)), "element ids must be unique across the inline SVGs"


def test_render_content(report_html):
    html = report_html
    for title in SECTION_TITLES:
        assert title in html
    assert html.count('<figure class="item bad">') == 2 and html.count('<figure class="item good">') == 1
    assert html.count('class="tag bad">misaligned<') == 2
    assert html.count("<img ") == N_IMG and html.count("<svg ") == N_SVG
    assert ">auroc.ecif</td><td class=\"num\">0.1235<" in html                # flattened, 4 digits
    assert ">auroc.if</td><td class=\"num\">–<" in html
    assert "<td>ECIF</td><td class=\"num\">0.9123</td>" in html               # index becomes a column
    # score bars: scaled by max |value| per name within the gallery; negative values in another colour
    assert 'class="fill" style="left:50.00%;width:50.00%"' in html             # total 2.5 (the max)
    assert 'class="fill" style="left:50.00%;width:25.00%"' in html             # total 1.25
    assert 'class="fill neg" style="left:0.00%;width:50.00%"' in html          # negative -0.4 (max |.|)


def test_render_is_deterministic(report_html):
    assert render_report(_report()) == report_html


def test_render_minimal_and_partial_reports():
    html = render_report({"title": "only a title", "summary": {}})
    assert "<h1>only a title</h1>" in html and "<svg" not in html and "<img" not in html
    parts = np.random.default_rng(2).normal(size=(2, 30))
    html = render_report({"title": "t", "summary": {"a": 1},
                          "detection": {"s": {"positive": parts[0], "negative": parts[1]}}})
    assert html.count("<svg ") == 1 and "Detection: s" in html and "Top flagged pairs" not in html


# ---------------------------------------------------------------------------------------- write

def test_write_report_files(tmp_path):
    rep = {"title": "t", "summary": {"a": 1.5, "b": {"c": float("nan"), "d": np.float32(2.0)},
                                     "e": [np.int64(1), float("inf")]}}
    df = pd.DataFrame({"x": [1, 2], "y": [0.5, np.nan]})
    out = tmp_path / "run"
    path = write_report(out, rep, {"scores": df})
    assert path == out / "report.html" and path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "report.html", "scores.csv", "scores.parquet",
                                                     "summary.json"]
    text = (out / "summary.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": 1.5, "b": {"c": None, "d": 2.0}, "e": [1, None]}
    pd.testing.assert_frame_equal(pd.read_csv(out / "scores.csv"), df)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "scores.parquet"), df)
    assert 'href="scores.csv"' in path.read_text(encoding="utf-8")
    with pytest.raises(FileExistsError, match="--force"):
        write_report(out, rep, overwrite=False)
    write_report(out, rep)                                                   # overwrite drops the tables
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "report.html", "summary.json"]
    with pytest.raises(ValueError, match="file stem"):
        write_report(tmp_path / "bad", rep, {"../x": df})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# ------------------------------------------------------------------------------- headless browser

def test_report_in_headless_chromium(tmp_path):
    path = write_report(tmp_path / "report", _report())
    url = path.resolve().as_uri()
    dom = run_chromium(tmp_path, "--dump-dom", url).stdout
    assert dom.count("<img ") == N_IMG and dom.count("<svg ") == N_SVG
    assert "<script" not in dom.lower()
    for text in SECTION_TITLES + ["a photo of the digit three", "caption &amp; no image",
                                  "a photo of the digit eight", "test image 17: true 3, predicted 8",
                                  "&lt;script&gt;alert(1)&lt;/script&gt;"]:
        assert text in dom, text
    shot = tmp_path / "shot.png"
    run_chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", "--hide-scrollbars", url)
    assert shot.exists()
    px = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert px.shape == (2000, 1280, 3)
    assert px.var() > 100, "the screenshot is (nearly) a single colour"
    assert len(np.unique(px.reshape(-1, 3), axis=0)) > 50
    if os.environ.get("ECIF_REPORT_SHOT"):                                  # keep a copy to look at
        shutil.copy(shot, os.environ["ECIF_REPORT_SHOT"])


def test_write_report_extra_files_are_atomic_and_linked(tmp_path):
    out = tmp_path / "run"
    rep = {"title": "t", "summary": {"a": 1}}
    write_report(out, rep, extra_files={"model.pt": lambda p: p.write_bytes(b"weights")})
    assert (out / "model.pt").read_bytes() == b"weights"
    assert 'href="model.pt"' in (out / "report.html").read_text(encoding="utf-8")

    def boom(path):
        path.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_report(tmp_path / "failed", rep, extra_files={"model.pt": boom})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]            # nothing half-written left
    with pytest.raises(ValueError, match="extra file name"):
        write_report(tmp_path / "bad", rep, extra_files={"../x.pt": boom})
