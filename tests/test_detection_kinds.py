"""The detection-by-kind evaluation (ecif_fast/evaluation/detection_kinds.py): its data, its methods against
their definitions, the bootstrap interval against scikit-learn, and the report it writes (hashed caption
features: no sentence encoder needed)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from ecif_fast.evaluation import detection_kinds as dk
from ecif_fast.evaluation.misalignment import KINDS
from ecif_fast.evaluation.sections import read_section


def test_kind_pairs_hold_the_kinds_labels_and_clean_validation_captions():
    X, Y, Xv, Yv, bad = dk.kind_pairs("systematic", 0.25, 3, n=80, n_val=20, setting="hashed")
    assert X.shape == (80, 64) and Y.shape == (80, 256) and Xv.shape == (20, 64) and Yv.shape == (20, 256)
    assert X.dtype == Y.dtype == torch.float64 and bad.shape == (80,) and bad.sum() == 20
    torch.testing.assert_close(Y.norm(dim=1), torch.ones(80, dtype=torch.float64))
    again = dk.kind_pairs("systematic", 0.25, 3, n=80, n_val=20, setting="hashed")
    assert torch.equal(again[1], Y) and np.array_equal(again[4], bad)          # seeded
    with pytest.raises(ValueError, match="setting"):
        dk.caption_features(["a"], "glove")


def test_auroc_interval_brackets_the_sklearn_value():
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.2
    s = rng.normal(size=300) + 1.2 * y
    value, (lo, hi) = dk.auroc_interval(s, y, n_boot=300)
    assert value == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert lo < value < hi and hi - lo < 0.2


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("kinds")
    res = dk.run(["hashed"], ["uniform", "duplicate"], [0.2], [0], n=160, n_val=40, out=str(out),
                 command="test", ranks=[3, 5], log=lambda *a: None)
    return res, out


def test_every_method_is_scored_and_the_run_is_written(small_run):
    res, out = small_run
    assert [(r["kind"], r["rate"], r["seed"]) for r in res["runs"]] == [("uniform", 0.2, 0), ("duplicate", 0.2, 0)]
    for r in res["runs"]:
        assert set(r["auroc"]) >= set(dk.NO_VAL) | set(dk.WITH_VAL)
        for m, (lo, hi) in r["interval"].items():
            assert 0 <= lo <= hi <= 1 and np.isfinite(r["auroc"][m])
        assert r["rank"] >= 1 and r["grad_norm"] < 1e-6
    assert (out / "detection_kinds.json").is_file()


def test_method_scores_follow_their_definitions():
    import ecif_fast as ef
    from ecif_fast.evaluation.methods import own_loss_gradients
    from ecif_fast.evaluation.problems import Problem

    X, Y, Xv, Yv, bad = dk.kind_pairs("uniform", 0.2, 1, n=120, n_val=30, setting="hashed")
    scores, info = dk.method_scores(X, Y, Xv, Yv, batch=40, ranks=[3, 5])
    ids = torch.arange(120) // 40
    from ecif_fast.rank_selection import choose_rank

    choice = choose_rank(X, Y, batches=ids, damping=10.0, ranks=[3, 5])
    assert info["rank"] == choice.rank
    ecif = ef.ECIF(choice.model, damping=10.0, batches=ids).fit(X, Y)
    G = own_loss_gradients(Problem("t", "", choice.model, X, Y, Xv, Yv, ids, 10.0, choice.theta_ref))
    np.testing.assert_allclose(scores["tracin_self"], (G * G).sum(1).numpy(), rtol=1e-10)
    H = ecif.solver.solve(G.T.contiguous())
    np.testing.assert_allclose(scores["positive_only_self"], (G * H.T).sum(1).numpy(), rtol=1e-8)
    np.testing.assert_allclose(scores["ecif_self"], ecif.self_influence().numpy(), rtol=1e-10)
    np.testing.assert_allclose(scores["held_out_loss"], ecif.held_out_fit()["loss_held_out"].numpy(), rtol=1e-10)
    from ecif_fast.apps import detect_misaligned      # the default detector's own scores
    np.testing.assert_allclose(scores["ecif_cleaned"], detect_misaligned(ecif).scores["ecif_cleaned"], rtol=1e-10)


def test_the_report_section_names_the_default_and_where_it_loses(small_run, tmp_path, monkeypatch):
    import json

    from ecif_fast.evaluation import report

    res, out = small_run
    text = dk.render(res)
    assert text.startswith(dk.HEADING) and "### hashed captions, 20% corrupted, seeds 0" in text
    assert "**ecif_cleaned** (default)" in text and "| uniform | duplicate | mean |" in text
    assert "Default mean" in text and "best one-line baseline" in text
    # --render puts it into EVALUATION.md as its own section; a re-render of the suite's report keeps it
    md = tmp_path / "EVALUATION.md"
    md.write_text("# Evaluation\n\n## 1. Something\n\ntext\n")
    (tmp_path / "r.json").write_text(json.dumps(res))
    dk.main(["--render", str(tmp_path / "r.json"), "--md", str(md)])
    assert read_section(dk.HEADING, str(md)) == text and "## 1. Something" in md.read_text()
    monkeypatch.setattr(report, "figures", lambda res, folder: {})
    monkeypatch.setattr(report, "render", lambda res, figs, folder: "# Evaluation\n\n## 1. Rerendered\n")
    report.write_report({}, str(md))
    assert "## 1. Rerendered" in md.read_text() and read_section(dk.HEADING, str(md)) == text
    assert set(KINDS) >= {r["kind"] for r in res["runs"]}
