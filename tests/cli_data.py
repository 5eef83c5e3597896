"""The command line's test data: tiny synthetic feature files (120 pairs, 20 % shuffled captions) and the helpers
that run ``ecif-fast`` in process. The ``cli_data`` fixture of conftest.py builds them and trains ``heads.pt``.

Plain (unnormalised) heads with logit scale 0 are used: their training converges in a few Newton steps, so the
analysis runs at a true optimum.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

from PIL import Image  # noqa: E402

from ecif_fast.cli.main import main  # noqa: E402

N, DI, DT, LATENT, EMBED = 120, 6, 5, 3, 4
HEADS = ["--embed-dim", str(EMBED), "--no-normalize", "--logit-scale", "0"]


def _write_parquet(path: Path, arrays: dict) -> None:
    """image_features as a list column, text_features as a fixed-size list column, the rest plain."""
    cols = {}
    for name, a in arrays.items():
        if name == "text_features":
            cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(a.ravel()), a.shape[1])
        elif a.ndim == 2:
            cols[name] = pa.array(a.tolist(), type=pa.list_(pa.float64()))
        else:
            cols[name] = pa.array(a.tolist())
    pq.write_table(pa.table(cols), path)


def make_data(folder: Path) -> SimpleNamespace:
    """Train / validation / test pairs sharing a 3-d latent; 24 training captions shuffled among themselves."""
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(LATENT, DI)), rng.normal(size=(LATENT, DT))

    def pairs(m):
        Z = rng.normal(size=(m, LATENT))
        return Z @ A + 0.2 * rng.normal(size=(m, DI)), Z @ B + 0.2 * rng.normal(size=(m, DT))

    X, Y = pairs(N)
    bad = rng.choice(N, N // 5, replace=False)
    Y[bad] = Y[np.roll(bad, 1)]
    misaligned = np.zeros(N, bool)
    misaligned[bad] = True
    (folder / "img").mkdir()
    pixels = np.random.default_rng(1).integers(0, 256, (N, 8, 8), dtype=np.uint8)
    for i in range(N):                                     # tiny images, paths relative to the data folder
        Image.fromarray(pixels[i]).save(folder / "img" / f"{i}.png")
    train = {"image_features": X, "text_features": Y, "misaligned": misaligned,
             "pair_ids": np.arange(1000, 1000 + N), "batch_ids": np.arange(N) % 3,
             "captions": np.array([f"caption {i}" for i in range(N)]),
             "image_paths": np.array([f"img/{i}.png" for i in range(N)])}
    np.savez(folder / "train.npz", **train)
    _write_parquet(folder / "train.parquet", train)
    structured = np.zeros(N, dtype=[(k, v.dtype, v.shape[1:]) for k, v in train.items()])
    for k, v in train.items():
        structured[k] = v
    np.save(folder / "train_structured.npy", structured)
    Xv, Yv = pairs(60)
    np.savez(folder / "val.npz", image_features=Xv, text_features=Yv)
    np.savez(folder / "test.npz", image_features=Xv[:5], text_features=Yv[:5],
             captions=np.array([f"test caption {j}" for j in range(5)]))
    centers = 1.5 * np.eye(LATENT)
    labels = np.repeat(np.arange(LATENT), 4)
    Zt = centers[labels] + 0.9 * rng.normal(size=(labels.size, LATENT))
    np.savez(folder / "zs.npz", image_features=Zt @ A, text_features=Zt @ B, labels=labels)
    np.savez(folder / "classes.npz", text_features=centers @ B, class_names=np.array(["cat", "dog", "car"]))
    np.save(folder / "classes.npy", centers @ B)
    return SimpleNamespace(dir=folder, X=torch.tensor(X), Y=torch.tensor(Y), Xv=torch.tensor(Xv),
                           Yv=torch.tensor(Yv), misaligned=misaligned, train=folder / "train.npz",
                           parquet=folder / "train.parquet", val=folder / "val.npz", test=folder / "test.npz",
                           zs=folder / "zs.npz", classes=folder / "classes.npz",
                           classes_npy=folder / "classes.npy", model=folder / "heads.pt")


def run(capsys, *argv) -> tuple[int, str, str]:
    """``ecif-fast argv`` in process: ``(exit status, stdout, stderr)``."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def analysis(d, command: str, out: Path, *extra, train=None):
    """The argument list of an analysis ``command`` on the data ``d`` (its checkpoint and training file)."""
    return [command, "--train", train or d.train, "--model", d.model, "--out", out, *extra]
