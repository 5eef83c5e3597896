import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
# the evaluation suite (benchmarks/evaluate.py, benchmarks/evaluation/) is tested from here too
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import torch

# Test problems are tiny: one thread avoids OpenMP contention on a shared 2-core machine, which
# otherwise makes small torch ops 10-100x slower. Kernel tests that exercise threading set it locally.
torch.set_num_threads(1)
