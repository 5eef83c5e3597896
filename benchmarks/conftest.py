"""Benchmark-only pytest config: one torch thread, and a speedup summary at the end of the run."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # import ecif_fast from the checkout
torch.set_num_threads(1)  # same setting as the script mode; stated in BENCHMARKS.md


def pytest_terminal_summary(terminalreporter):
    mod = sys.modules.get("bench_engine_vs_oracle")
    if mod is None or not mod.RESULTS:
        return
    terminalreporter.section("ECIF engine vs brute force (brute force: shared part + per-pair part scaled by n/subset)")
    terminalreporter.write_line(mod.speedup_table(mod.RESULTS))
