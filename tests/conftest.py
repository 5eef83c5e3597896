import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch

# Test problems are tiny: one thread avoids OpenMP contention on a shared 2-core machine, which
# otherwise makes small torch ops 10-100x slower. Kernel tests that exercise threading set it locally.
torch.set_num_threads(1)
