"""`ecif-fast demo` end to end on the embedded real data (quick mode: the 20 % noise level only), through
the command line, plus the rendered report in headless Chromium."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from chromium import run_chromium


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "report"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "ecif_fast", "demo", "--quick", "--json", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(proc.stdout)


def test_demo_writes_the_report_folder(demo):
    out, printed = demo
    names = {p.name for p in out.iterdir()}
    assert {"report.html", "summary.json", "scores.csv", "scores.parquet", "cleaning.csv"} <= names
    assert json.loads((out / ".ecif-fast-output").read_text()) == {"tool": "ecif-fast", "command": "demo"}
    summary = json.loads((out / "summary.json").read_text())
    assert printed["summary"]["detection"] == summary["detection"]
    for method in ("ecif", "ecif_self", "clip_score", "loss", "positive_only"):
        assert set(summary["detection"][method]) >= {"auroc", "average_precision", "precision_at_k"}
    assert {"cleaning", "timings_s"} <= set(summary)
    scores = pd.read_parquet(out / "scores.parquet")
    assert len(scores) == summary["data"]["n_train"]
    assert scores["misaligned"].mean() == pytest.approx(0.2)
    assert {"caption", "total", "positive", "negative", "self_influence", "rank"} <= set(scores.columns)


def test_demo_detection_quality(demo):
    """The measured ordering on the real digits: ECIF self-influence finds the misaligned captions
    (AUROC >= 0.95) and beats classical positive-only influence by a wide margin."""
    det = demo[1]["summary"]["detection"]
    assert det["ecif_self"]["auroc"] >= 0.95
    assert det["ecif_self"]["average_precision"] > det["positive_only"]["average_precision"] + 0.15
    assert det["ecif_self"]["auroc"] > det["ecif"]["auroc"]


def test_demo_cleaning_update_tracks_retraining(demo):
    cleaning = demo[1]["summary"]["cleaning"]
    acc = cleaning["zero_shot_accuracy"]
    assert abs(acc["ECIF update"] - acc["retrain"]) <= 0.03
    assert cleaning["removed_misaligned"] >= 0.8 * cleaning["removed"]  # the removed pairs were mostly bad
    assert cleaning["time_s"]["ecif_update"] < cleaning["time_s"]["retrain"]


def test_demo_report_renders(demo, tmp_path):
    dom = run_chromium(tmp_path, "--dump-dom", (demo[0] / "report.html").resolve().as_uri()).stdout
    assert "Top flagged pairs" in dom and "Trace-back" in dom and "Cleaning" in dom
    assert dom.count("<img") >= 12 and dom.count("<svg") >= 3
