"""Feature files of the command line (.npz, .parquet, .npy) and pair-id lists, read into checked arrays.

A pairs file holds ``image_features`` ``(n, Di)`` and ``text_features`` ``(n, Dt)`` plus optional
per-pair fields ``captions``, ``image_paths``, ``batch_ids``, ``pair_ids``, ``misaligned`` and ``labels``,
and optionally ``class_names`` (the names of the label values, any length). A classes file holds one
``text_features`` row per class and optional ``class_names``, or is a plain 2-D ``.npy`` array.
Every problem raises :class:`DataFileError` with one line naming the file and the fix.
"""
from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..apps.pairs import PairInfo

FEATURES = ("image_features", "text_features")
PER_PAIR = ("captions", "image_paths", "batch_ids", "pair_ids", "misaligned", "labels")
EXTENSIONS = (".npz", ".parquet", ".npy")


class DataFileError(ValueError):
    """A data file cannot be used; the message is one line naming the file and the fix."""


@dataclass
class PairsData:
    """The contents of a pairs file (``n`` rows); optional fields are None when the file lacks them."""

    path: str
    images: torch.Tensor | None              # (n, Di) float64 (None only in a classes file)
    texts: torch.Tensor | None               # (n, Dt) float64
    captions: np.ndarray | None = None
    image_paths: np.ndarray | None = None
    batch_ids: np.ndarray | None = None      # int64
    pair_ids: np.ndarray | None = None       # unique
    misaligned: np.ndarray | None = None     # bool
    labels: np.ndarray | None = None         # int64, >= 0
    class_names: np.ndarray | None = None    # str, names of the label values

    @property
    def n(self) -> int:
        return int((self.images if self.images is not None else self.texts).shape[0])

    def ids(self) -> np.ndarray:
        """The pair ids (``0..n-1`` when the file has none)."""
        return np.arange(self.n) if self.pair_ids is None else self.pair_ids

    def info(self, *, with_misaligned: bool = True) -> PairInfo:
        """Metadata for result tables (``misaligned`` as an extra column when present and wanted)."""
        extra = {"misaligned": self.misaligned} if with_misaligned and self.misaligned is not None else {}
        return PairInfo(self.pair_ids, self.captions, self.image_paths, extra)

    def fingerprint(self) -> str:
        """SHA-256 of the feature values (float64), to recognise the training file of a checkpoint."""
        h = hashlib.sha256()
        for x in (self.images, self.texts):
            if x is not None:
                h.update(str(tuple(x.shape)).encode())
                h.update(x.double().contiguous().numpy().tobytes())
        return h.hexdigest()


def load_pairs(path, *, need_texts: bool = True, hint: str = "") -> PairsData:
    """Read a pairs file. ``need_texts=False``: ``text_features`` may be absent (zero-shot test images).

    ``hint`` is appended to the "missing text_features" message (e.g. how to run without texts).
    """
    arrays = _read(path, matrix_ok=False)
    _require(arrays, path, "image_features")
    if need_texts:
        _require(arrays, path, "text_features", hint)
    return _pairs(arrays, path, class_names_per_row=False)


def load_classes(path) -> PairsData:
    """Read a classes file: one text feature row per class (``texts``), optional ``class_names``."""
    arrays = _read(path, matrix_ok=True)
    if "_matrix" in arrays:
        arrays = {"text_features": arrays.pop("_matrix")}
    _require(arrays, path, "text_features", " (one text feature row per class)")
    arrays.pop("image_features", None)
    return _pairs(arrays, path, class_names_per_row=True)


def check_width(features: torch.Tensor | None, expected: int, what: str, path) -> None:
    """``features`` must have ``expected`` columns (the checkpoint's image_dim / text_dim)."""
    if features is not None and features.shape[1] != expected:
        kind = what.split("_")[0]
        raise DataFileError(f"{path}: {what} has {features.shape[1]} columns but the checkpoint's {kind}_dim is "
                            f"{expected}; use the same feature extractor the model was trained on")


def load_ids(path) -> list[str]:
    """Pair ids from a ``.csv`` (column ``pair_id``, else the first column), ``.txt`` or 1-D ``.npy`` file.

    CSV cells written by ecif-fast's tables with a ``'`` in front (a formula guard for spreadsheets, e.g.
    ``'-7`` for the id ``-7``) are read back as the ids they were."""
    from ..report.output import csv_unquote

    p = _existing(path)
    suffix = p.suffix.lower()
    if suffix == ".npy":
        a = _load_npy(p, path)
        if a.ndim != 1 or a.dtype.names:
            raise DataFileError(f"{path}: pair ids must be a 1-D array, got shape {a.shape}")
        if a.dtype.kind == "f" and np.isfinite(a).all() and (a == np.round(a)).all():
            a = a.astype(np.int64)
        ids = [str(v) for v in a.tolist()]
    elif suffix == ".csv":
        with open(p, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
        col = 0
        if rows and "pair_id" in [c.strip().lower() for c in rows[0]]:
            col = [c.strip().lower() for c in rows[0]].index("pair_id")
            rows = rows[1:]
        if any(len(r) <= col for r in rows):
            raise DataFileError(f"{path}: some rows have no value in the pair_id column")
        ids = [csv_unquote(r[col].strip()) for r in rows]
    elif suffix == ".txt":
        ids = p.read_text(encoding="utf-8").replace(",", " ").split()
    else:
        raise DataFileError(f"{path}: unknown extension {suffix or '(none)'!r} for pair ids; use .csv "
                            "(column pair_id), .txt (one id per line) or .npy (1-D array)")
    if not ids:
        raise DataFileError(f"{path}: contains no pair ids; list at least one pair to remove")
    return ids


def ids_to_indices(ids: list[str], data: PairsData, path) -> np.ndarray:
    """Row indices of ``ids`` in ``data`` (matched to its ``pair_ids``, else to ``0..n-1``)."""
    known = {str(v): i for i, v in enumerate(data.ids().tolist())}
    unknown = [i for i in ids if i not in known]
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        what = "pair_ids of" if data.pair_ids is not None else "row numbers 0..n-1 of"
        raise DataFileError(f"{path}: {len(unknown)} id(s) are not {what} {data.path}: {shown}; "
                            "list ids of training pairs")
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise DataFileError(f"{path}: duplicate pair ids {dup}; list each pair once")
    if len(ids) >= data.n:
        raise DataFileError(f"{path}: lists all {data.n} training pairs; at least one must remain")
    return np.array([known[i] for i in ids], dtype=np.int64)


# ----------------------------------------------------------------------------------------- reading

def _existing(path) -> Path:
    p = Path(path)
    if not p.exists():
        raise DataFileError(f"{path}: no such file; check the path")
    if not p.is_file():
        raise DataFileError(f"{path}: is not a file")
    return p


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _load_npy(p: Path, path) -> np.ndarray:
    """The array in a ``.npy`` file (no pickle)."""
    try:
        a = np.load(p, allow_pickle=False)
    except Exception as e:  # OSError, ValueError, EOFError, ...
        raise DataFileError(f"{path}: not a readable .npy file ({_first_line(e)})") from None
    if not isinstance(a, np.ndarray):       # np.load opens a .npz archive whatever its name
        a.close()
        raise DataFileError(f"{path}: is a .npz archive, not a single .npy array; rename it to .npz")
    return a


def _read(path, *, matrix_ok: bool) -> dict[str, np.ndarray]:
    """The named arrays of a file; a plain 2-D ``.npy`` becomes ``{"_matrix": a}`` when ``matrix_ok``."""
    p = _existing(path)
    suffix = p.suffix.lower()
    if suffix == ".npz":
        try:
            z = np.load(p, allow_pickle=False)
        except Exception as e:  # zipfile.BadZipFile, OSError, EOFError, ValueError
            raise DataFileError(f"{path}: not a readable .npz file ({_first_line(e)})") from None
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise DataFileError(f"{path}: is a single .npy array, not a .npz archive; rename it to .npy, or save "
                                "named arrays with np.savez")
        try:
            with z:
                return {k: z[k] for k in z.files}
        except ValueError as e:
            if "pickle" in str(e):
                raise DataFileError(f"{path}: holds object arrays, which are not read (no pickle); save strings "
                                    "as fixed-width arrays, e.g. np.array(list_of_str)") from None
            raise DataFileError(f"{path}: not a readable .npz file ({_first_line(e)})") from None
        except Exception as e:  # zipfile.BadZipFile, OSError, EOFError
            raise DataFileError(f"{path}: not a readable .npz file ({_first_line(e)})") from None
    if suffix == ".parquet":
        return _read_parquet(p, path)
    if suffix == ".npy":
        a = _load_npy(p, path)
        if a.dtype.names:
            return {name: a[name] for name in a.dtype.names}
        if matrix_ok:
            return {"_matrix": a}
        raise DataFileError(f"{path}: a plain .npy array holds one feature matrix, but image-text pairs are "
                            "needed; save a .npz with image_features and text_features (np.savez) or a "
                            "structured .npy array with those fields")
    raise DataFileError(f"{path}: unknown extension {suffix or '(none)'!r}; use .npz, .parquet or .npy")


def _read_parquet(p: Path, path) -> dict[str, np.ndarray]:
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError:
        raise DataFileError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow), or give a .npz") \
            from None
    try:
        table = pq.read_table(p)
    except Exception as e:  # pyarrow.ArrowInvalid and friends
        raise DataFileError(f"{path}: not a readable .parquet file ({_first_line(e)})") from None
    out = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        t = col.type
        if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
            out[name] = col.to_numpy(zero_copy_only=False)
            continue
        if col.null_count:
            raise DataFileError(f"{path}: column {name!r} has {col.null_count} null row(s); every row needs a "
                                "feature vector")
        lengths = np.asarray(pc.list_value_length(col).to_numpy(zero_copy_only=False))
        if lengths.size and (lengths != lengths[0]).any():
            raise DataFileError(f"{path}: column {name!r} has rows of different lengths "
                                f"({lengths.min()}..{lengths.max()}); every row needs the same feature width")
        values = col.flatten()
        if not (pa.types.is_floating(values.type) or pa.types.is_integer(values.type)):
            raise DataFileError(f"{path}: column {name!r} holds {values.type} values; feature columns must "
                                "hold numbers (lists of floats)")
        width = int(lengths[0]) if lengths.size else 0
        out[name] = values.to_numpy(zero_copy_only=False).astype(np.float64).reshape(len(col), width)
    return out


# ------------------------------------------------------------------------------------------ checks

def _require(arrays: dict, path, name: str, hint: str = "") -> None:
    if name not in arrays:
        found = ", ".join(sorted(k for k in arrays if not k.startswith("_"))) or "nothing"
        raise DataFileError(f"{path}: no {name!r} array (found: {found}); save the features under that "
                            f"name{hint}")


def _features(a: np.ndarray, name: str, path) -> torch.Tensor:
    a = np.asarray(a)
    if a.dtype.kind not in "fiu":
        raise DataFileError(f"{path}: {name} has non-numeric dtype {a.dtype}; features must be numbers")
    if a.ndim != 2:
        raise DataFileError(f"{path}: {name} must be 2-D (rows, features), got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise DataFileError(f"{path}: {name} is empty (shape {a.shape}); need at least one row and column")
    bad = ~np.isfinite(a).all(axis=1) if a.dtype.kind == "f" else np.zeros(a.shape[0], bool)
    if bad.any():
        raise DataFileError(f"{path}: {name} has NaN or Inf values in {int(bad.sum())} of {a.shape[0]} rows; "
                            "drop or fix those rows")
    return torch.from_numpy(np.require(a, np.float64, ["C", "W"]))


def _vector(a: np.ndarray, name: str, path) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 1:
        raise DataFileError(f"{path}: {name} must be 1-D (one entry per row), got shape {a.shape}")
    return a


def _integers(a: np.ndarray, name: str, path) -> np.ndarray:
    if a.dtype.kind not in "iu":
        raise DataFileError(f"{path}: {name} must hold integers, got dtype {a.dtype}")
    return a.astype(np.int64)


def _pairs(arrays: dict, path, *, class_names_per_row: bool) -> PairsData:
    data = {}
    rows = {}
    for name in FEATURES:
        if name in arrays:
            data[name] = _features(arrays[name], name, path)
            rows[name] = data[name].shape[0]
    for name in PER_PAIR + ("class_names",):
        if name in arrays:
            data[name] = _vector(arrays[name], name, path)
            if name != "class_names" or class_names_per_row:
                rows[name] = data[name].shape[0]
    first = next(iter(rows))
    for name, count in rows.items():
        if count != rows[first]:
            raise DataFileError(f"{path}: {name} has {count} rows but {first} has {rows[first]}; every column "
                                "needs one row per pair")
    for name in ("batch_ids", "labels"):
        if name in data:
            data[name] = _integers(data[name], name, path)
    if "labels" in data and (data["labels"] < 0).any():
        raise DataFileError(f"{path}: labels must be class indices >= 0")
    if "misaligned" in data:
        m = data["misaligned"]
        if m.dtype != bool and not (m.dtype.kind in "iu" and np.isin(m, (0, 1)).all()):
            raise DataFileError(f"{path}: misaligned must be boolean (or 0/1), got dtype {m.dtype}")
        data["misaligned"] = m.astype(bool)
    if "pair_ids" in data:
        ids = data["pair_ids"]
        if len({str(v) for v in ids.tolist()}) != ids.shape[0]:
            raise DataFileError(f"{path}: pair_ids are not unique; give every pair its own id")
    for name in ("captions", "image_paths", "class_names"):
        if name in data:
            data[name] = data[name].astype(str)
    return PairsData(str(path), data.get("image_features"), data.get("text_features"),
                     **{k: data.get(k) for k in PER_PAIR + ("class_names",)})
