"""Peak memory of ``ECIF.fit(loader)`` + ``influence`` + ``self_influence``, measured in a process of its own.

``python tests/loader_memory.py MODE OUT [N]``: MODE ``loader`` fits on a DataLoader over a dataset that
generates its rows lazily (nothing holds the raw inputs); MODE ``tensors`` collects the same loader into tensors
first (``engine_inputs.collect_pairs``, what ``fit(loader)`` used to do) and fits on them. Prints one JSON line:
the raw inputs' size and the rise of the process's peak resident memory over the fit and the queries (the peak
is reset just before them through ``/proc/self/clear_refs``, else measured from the resident size then, which can
only overstate the rise); saves the results to OUT for comparison (tests/test_loader_streaming.py).
"""
from __future__ import annotations

import json
import re
import sys

import torch
from torch.utils.data import DataLoader, Dataset

import ecif_fast as ef

DX = DY = 1024            # input features per image / text (float64): 16 KiB per pair
BATCH = 64                # the loader's batches (= chunk_size): 1 MiB of inputs
SETTINGS = dict(damping=1e-2, batches=64, solver="lowrank", rank=8, chunk_size=BATCH, tangent_chunk=32)


class LazyBatches(Dataset):
    """``n`` pairs in batches of ``BATCH``: batch ``b`` is drawn from a generator seeded by ``b`` when it is read
    (the same every pass, never stored). A DataLoader with ``batch_size=None`` yields these batches."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed = n, seed

    def __len__(self):
        return -(-self.n // BATCH)

    def __getitem__(self, b):
        rows = min(BATCH, self.n - b * BATCH)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + b)
        return (torch.randn(rows, DX, generator=g, dtype=torch.float64),
                torch.randn(rows, DY, generator=g, dtype=torch.float64))


def lazy_loader(n: int, seed: int = 0) -> DataLoader:
    return DataLoader(LazyBatches(n, seed), batch_size=None, shuffle=False)


def _status() -> dict[str, int]:
    text = open("/proc/self/status").read()
    return {k: int(re.search(k + r":\s+(\d+)", text).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")      # resets VmHWM to the current resident size (Linux >= 4.0)
        return True
    except OSError:
        return False


def main(mode: str, out: str, n: int = 8192) -> dict:
    torch.set_num_threads(1)   # the same reduction order in both processes
    torch.manual_seed(0)
    model = ef.LinearHeads(DX, DY, 2, logit_scale=2.0).double()
    test = LazyBatches(8, seed=1)[0]
    # warm-up: imports, kernels and the allocator's pools, on a small loader
    ef.ECIF(model, **SETTINGS).fit(lazy_loader(2 * BATCH, seed=2)).self_influence()
    loader = lazy_loader(n)
    before = _status()["VmRSS"]
    reset = _reset_peak()
    if mode == "loader":
        ecif = ef.ECIF(model, **SETTINGS).fit(loader)
    elif mode == "tensors":
        from ecif_fast.engine_inputs import collect_pairs

        ecif = ef.ECIF(model, **SETTINGS).fit(*collect_pairs(loader, None))
    else:
        raise SystemExit(f"mode must be loader or tensors, got {mode!r}")
    result = {"influence": ecif.influence(*test).total, "self_influence": ecif.self_influence(),
              "self_influence_solve": ecif.self_influence(method="solve")}
    peak = _status()["VmHWM"]
    torch.save(result, out)
    report = {"mode": mode, "n": n, "raw_input_bytes": n * (DX + DY) * 8, "peak_rise_bytes": peak - before,
              "peak_reset": reset, "streamed": bool(ecif.source.streamed)}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:]))
