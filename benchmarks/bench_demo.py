"""Time `ecif-fast demo` stage by stage and the cleaning update against retraining, in one run.

    python benchmarks/bench_demo.py [--quick] [--seed 0]

Prints a markdown table for BENCHMARKS.md: wall time of each stage of the demo (from its summary.json)
and the ratio retraining / ECIF closed-form update, both measured in the same process.
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time

import torch


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only the 20 %% noise level")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from ecif_fast.demo import run_demo

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = run_demo(f"{tmp}/report", seed=args.seed, quick=args.quick, progress=False)
        wall = time.perf_counter() - t0
    t = summary["timings_s"]
    clean = summary["cleaning"]
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, python {platform.python_version()}")
    print("| stage | seconds |\n|---|---|")
    for name, secs in t.items():
        print(f"| {name} | {secs:.2f} |")
    print(f"| wall (incl. imports and report) | {wall:.2f} |")
    ratio = clean["time_s"]["retrain"] / max(clean["time_s"]["ecif_update"], 1e-9)
    acc = clean["zero_shot_accuracy"]
    print(f"\nretrain / ECIF update time: {ratio:.0f}x; zero-shot accuracy none / ECIF / retrain: "
          f"{acc['no removal']:.3f} / {acc['ECIF update']:.3f} / {acc['retrain']:.3f}")


if __name__ == "__main__":
    main()
