"""Output folders that appear complete or not at all, and table files (CSV + Parquet)."""
from __future__ import annotations

import os
import secrets
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _non_empty(path: Path) -> bool:
    if path.is_dir() and not path.is_symlink():
        return any(path.iterdir())
    return path.exists() or path.is_symlink()


def _refuse(path: Path) -> FileExistsError:
    return FileExistsError(
        f"output folder {str(path)!r} exists and is not empty; pass --force (overwrite=True) to "
        "replace it, or choose another folder")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_output_dir(path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``path``; on success it replaces ``path``.

    The temporary folder is ``path.parent / ".{name}.tmp-XXXX"`` (same file system, so the final move
    is a rename). An existing ``path`` is removed only once the body has succeeded. On any exception
    (KeyboardInterrupt included) the temporary folder is deleted and the exception re-raised, so no
    half-written output is left and an existing ``path`` is untouched. Parent folders are created.

    Raises:
        FileExistsError: ``overwrite=False`` and ``path`` exists and is not an empty folder (checked
            before the body runs and again before the swap).
    """
    path = Path(os.path.abspath(path))          # "." or "a/.." must name a real folder
    if not overwrite and _non_empty(path):
        raise _refuse(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_dir(path.parent, f".{path.name}.tmp-")
    try:
        yield tmp
        if not overwrite and _non_empty(path):
            raise _refuse(path)
        _swap(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fresh_dir(parent: Path, prefix: str) -> Path:
    """A new folder ``parent/prefix + 8 hex digits`` (mode from the umask, unlike ``mkdtemp``'s 0o700)."""
    while True:
        candidate = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue


def _swap(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path``; an existing ``path`` is set aside first and restored if the move fails."""
    old = None
    if path.exists() or path.is_symlink():
        old = _fresh_dir(path.parent, f".{path.name}.old-") / "old"
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
            old.parent.rmdir()
        raise
    if old is not None:
        _remove(old.parent)


def write_table(df, folder, stem: str) -> list[Path]:
    """Write a pandas DataFrame as ``folder/stem.csv`` and ``folder/stem.parquet``.

    A non-default index (e.g. method names) is written as ordinary leading column(s). Parquet needs
    pyarrow; without it only the CSV is written and a warning says so. Returns the written paths.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not _default_index(df):
        df = df.reset_index()
    csv = folder / f"{stem}.csv"
    df.to_csv(csv, index=False)
    written = [csv]
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        warnings.warn(f"pyarrow is not installed: wrote {csv.name} only, no {stem}.parquet "
                      '(pip install "ecif-fast[report]")', stacklevel=2)
        return written
    parquet = folder / f"{stem}.parquet"
    # Parquet needs string column names.
    df.rename(columns=str).to_parquet(parquet, index=False, engine="pyarrow")
    written.append(parquet)
    return written


def _default_index(df) -> bool:
    """True for an unnamed 0..n-1 RangeIndex, which carries no information worth a column."""
    idx = df.index
    start, stop, step = (getattr(idx, a, None) for a in ("start", "stop", "step"))
    return idx.name is None and idx.nlevels == 1 and (start, step) == (0, 1) and stop == len(df)
