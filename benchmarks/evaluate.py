"""Evaluation suite: fidelity to retraining, misalignment detection, cleaning, ablations, runtime (see
EVALUATION.md for what each experiment measures and the numbers of the last full run).

    python benchmarks/evaluate.py --quick --out DIR                     # CI size, a few minutes on 2 cores
    python benchmarks/evaluate.py --full --out DIR --md EVALUATION.md   # the full run (~20 min on 2 cores)
    python benchmarks/evaluate.py --render DIR/results.json --md EVALUATION.md   # the report again, no rerun

Writes ``DIR/results.json`` (and with ``--md`` the report and its figures under ``docs/evaluation/``). Seeds
are fixed: the same command gives the same numbers (timings aside).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # ecif_fast from the checkout
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _write_json(obj, path):
    """Write ``obj`` atomically (a temp file in the same folder, then rename): never a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, default=float)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _benchmarks_section(results):
    """A full run's runtime ratios also go to BENCHMARKS.md (where the project's speed claims live)."""
    if results["mode"] != "full":
        return
    from evaluation.report import BENCH_HEADING, benchmarks_section
    from sections import write_section

    write_section(BENCH_HEADING, benchmarks_section(results))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
        from evaluation.report import write_report

        with open(args.render) as f:
            results = json.load(f)
        print(f"report written to {write_report(results, args.md)}")
        _benchmarks_section(results)
        return results
    if not args.out:
        ap.error("--out DIR is required with --quick / --full")

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from evaluation.suite import MODES, run

    os.makedirs(args.out, exist_ok=True)
    results = run(MODES["quick" if args.quick else "full"], progress=not args.no_progress)
    results["command"] = "python benchmarks/evaluate.py " + " ".join(argv if argv is not None else sys.argv[1:])
    _write_json(results, os.path.join(args.out, "results.json"))
    if args.md:
        from evaluation.report import write_report

        write_report(results, args.md)
        _benchmarks_section(results)
    print(f"results written to {os.path.join(args.out, 'results.json')}")
    return results


if __name__ == "__main__":
    main()
