"""Output locations that are safe to write, outputs that appear complete or not at all, and table files.

The rules, shared by :func:`atomic_output_dir`, :func:`atomic_output_file` and the command line's ``--out``:

- An output never replaces the working folder or a folder above it, an input file, or a folder that holds
  an input file: replacing them would delete what the tool did not create.
- An existing folder is replaced only when it is empty or holds the marker file ``.ecif-fast-output`` that
  every output folder written here gets; any other non-empty folder is refused, whatever ``overwrite``.
- The location is checked before any work: names within the file system's limits, and a probe entry created
  and removed in the nearest existing folder.
- Concurrent writers of the same output take an exclusive ``flock`` on the parent folder for the final swap
  (on Linux an atomic ``renameat2(RENAME_EXCHANGE)``); the last complete writer wins and nothing is left over.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import re
import secrets
import shutil
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

try:
    import fcntl
except ImportError:         # Windows: no locking, no clean-up of stale temporary folders
    fcntl = None

MARKER = ".ecif-fast-output"
TOOL = "ecif-fast"
TMP_PREFIX = ".ecif-tmp-"     # + 16 hex digits: short, so that a long output name leaves room for its siblings
PATH_SLACK = 64               # room for the names written inside an output folder
_FORMULA = re.compile(r"'*[=+\-@\t\r]")       # cells a spreadsheet would run (after any quotes we added)
_QUOTED = re.compile(r"'+[=+\-@\t\r]")


class OutputLocationError(ValueError):
    """An output location that must not or cannot be written; one line naming the path and the fix."""


# ------------------------------------------------------------------------------------------ checks

def check_output_location(path, inputs=()) -> Path:
    """The absolute ``path``, after refusing an empty name, the working folder or a folder above it, an
    input file (``inputs``) and a folder that holds one: writing there would delete what is not ours.

    Raises:
        OutputLocationError: with the path and what to do instead.
    """
    if not str(path).strip():
        raise OutputLocationError("the output path is empty; name a new folder or file, e.g. --out results")
    target = Path(os.path.abspath(path))
    if _holds(target, Path.cwd()):
        raise OutputLocationError(f"{path}: is the working folder or a folder above it, which is never replaced; "
                                  "name a new folder for the output, e.g. --out results")
    for item in inputs:
        if _holds(target, Path(item), parents=False):
            raise OutputLocationError(f"{path}: is the input file {item}, which is never overwritten; choose "
                                      "another output path")
        if _holds(target, Path(item)):
            raise OutputLocationError(f"{path}: holds the input file {item}, which replacing it would delete; "
                                      "choose an output folder that holds none of the inputs")
    return target


def _holds(folder: Path, item: Path, *, parents: bool = True) -> bool:
    """True when ``item`` is ``folder`` or (``parents``) lies under it, by the path as given or with symlinks
    resolved; compared by device and inode, so hard links and case-insensitive names count too."""
    try:
        st = os.stat(folder)
    except OSError:
        return False                                  # nothing there yet: it holds nothing
    for p in {Path(os.path.abspath(item)), Path(os.path.realpath(item))}:
        for q in (p, *p.parents) if parents else (p,):
            try:
                if os.path.samestat(st, os.stat(q)):
                    return True
            except OSError:
                continue
    return False


def check_writable(path, *, is_file: bool = False) -> None:
    """Refuse ``path`` unless it can be created: every new name within the file system's ``NAME_MAX``, the path
    within ``PATH_MAX`` (with room for the files inside an output folder), and the nearest existing folder above
    it one in which an entry can be created (probed by creating and removing one).

    Raises:
        OutputLocationError: with the path, the reason and what to do.
    """
    target = Path(os.path.abspath(path))
    base = target.parent
    while not os.path.lexists(base):
        base = base.parent
    if not os.path.isdir(base):
        raise OutputLocationError(f"{path}: {base} is not a folder; choose another output path")
    name_max = _pathconf(base, "PC_NAME_MAX", 255)
    for part in target.relative_to(base).parts:
        if len(os.fsencode(part)) > name_max:
            raise OutputLocationError(f"{path}: the name {part[:40]}... is {len(os.fsencode(part))} bytes long; "
                                      f"this file system allows {name_max}: choose a shorter name")
    path_max = _pathconf(base, "PC_PATH_MAX", 4096)
    if len(os.fsencode(str(target))) + PATH_SLACK > path_max:
        raise OutputLocationError(f"{path}: the path is too long for this file system (at most {path_max} bytes, "
                                  "with room for the files inside): choose a shorter path")
    probe = None
    try:
        probe = _fresh(base, _make_file if is_file else os.mkdir)
    except OSError as e:
        raise OutputLocationError(f"{path}: cannot write in {base} ({e.strerror or e}); choose a writable "
                                  "location") from None
    finally:
        if probe is not None:                          # also on KeyboardInterrupt
            (os.unlink if is_file else os.rmdir)(probe)


def _pathconf(folder: Path, name: str, default: int) -> int:
    try:
        value = os.pathconf(folder, name)
    except (OSError, ValueError, AttributeError):   # AttributeError: no os.pathconf (Windows)
        return default
    return value if value and value > 0 else default


def is_output_dir(path) -> bool:
    """True when the folder ``path`` holds this tool's marker file (a small JSON object naming the tool)."""
    marker = Path(path) / MARKER
    try:
        if marker.is_symlink() or not marker.is_file() or marker.stat().st_size > 4096:
            return False
        content = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and content.get("tool") == TOOL


def check_replaceable_dir(path, *, overwrite: bool) -> None:
    """Refuse an existing ``path`` that may not be replaced. A missing path or an empty folder is fine; a folder
    with the marker (an earlier output) only with ``overwrite``; a file, a link or a non-empty folder without the
    marker never, since it may hold anything.

    Raises:
        FileExistsError: with the path, why and what to do.
    """
    path = Path(path)
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        raise FileExistsError(f"output folder {path} exists and is not a folder (a file or a link), which is never "
                              "replaced; choose another folder")
    if not any(path.iterdir()):
        return
    if not is_output_dir(path):
        raise FileExistsError(f"output folder {path} is not empty and was not written by ecif-fast (it has no "
                              f"{MARKER} file), so it is never replaced, even with --force; choose a new or empty "
                              "folder")
    if not overwrite:
        raise FileExistsError(f"output folder {path} holds an earlier ecif-fast output; pass --force "
                              "(overwrite=True) to replace it, or choose another folder")


def check_output_dir(path, *, overwrite: bool, inputs=()) -> Path:
    """All checks of an output folder before any work (:func:`check_output_location`,
    :func:`check_replaceable_dir`, :func:`check_writable`); returns its absolute path."""
    target = check_output_location(path, inputs)
    with _locked(target.parent):     # a concurrent writer's swap is never seen half-done
        check_replaceable_dir(target, overwrite=overwrite)
    check_writable(target)
    return target


def check_output_file(path, *, overwrite: bool, inputs=(), replaceable: Callable[[Path], bool],
                      what: str = "an earlier output") -> Path:
    """All checks of an output file before any work; returns its absolute path. An existing file is replaced
    only when ``replaceable(path)`` (e.g. it is an earlier output of the tool, ``what``) and ``overwrite``; a
    folder, a link or any other file never.

    Raises:
        OutputLocationError, FileExistsError: with the path, why and what to do.
    """
    target = check_output_location(path, inputs)
    if os.path.lexists(target):
        if target.is_symlink() or target.is_dir():
            raise FileExistsError(f"{path}: is a {'link' if target.is_symlink() else 'folder'}, which is never "
                                  "replaced; name a file for the output")
        if not replaceable(target):
            raise FileExistsError(f"{path}: exists and is not {what}, so it is never overwritten, even with "
                                  "--force; choose another file name")
        if not overwrite:
            raise FileExistsError(f"{path}: exists; pass --force to overwrite it, or choose another file name")
    check_writable(target, is_file=True)
    return target


# ----------------------------------------------------------------------------------------- writers

@contextmanager
def atomic_output_dir(path, *, overwrite: bool = True, command: str = "report", inputs=()) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``path``; when the body succeeds it replaces ``path``.

    The temporary folder ``path.parent / ".ecif-tmp-XXXX"`` (same file system, so the final move is a rename)
    holds the marker file from the start (``{"tool": "ecif-fast", "command": command}``). An existing ``path``
    is replaced only once the body has succeeded, and only when it is an empty folder or an earlier output of
    this tool (its marker) with ``overwrite``. On any exception (KeyboardInterrupt included) the temporary
    folder is deleted and the exception re-raised, so no half-written output is left and an existing ``path``
    is untouched. Parent folders are created. Concurrent writers of ``path`` are safe: the swap runs under an
    exclusive lock on the parent folder, the last complete writer wins, and temporary folders of writers that
    were killed are deleted then.

    Raises:
        OutputLocationError: ``path`` is refused by :func:`check_output_location` (``inputs``: paths the
            output must not replace) or is not writable (checked before the body runs).
        FileExistsError: ``path`` may not be replaced (:func:`check_replaceable_dir`; checked before the body
            runs and again before the swap).
    """
    path = check_output_dir(path, overwrite=overwrite, inputs=inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _temp_dir(path.parent, command) as tmp:
        yield tmp
        with _locked(path.parent):
            _remove_stale(path.parent)
            check_replaceable_dir(path, overwrite=overwrite)
            _install(tmp, path)


@contextmanager
def atomic_output_file(path, *, replaceable: Callable[[Path], bool] = lambda p: False) -> Iterator[Path]:
    """Yield a temporary file path next to ``path``; when the body has written it, it replaces ``path`` in one
    rename (under an exclusive lock on the parent folder). An existing ``path`` is replaced only when
    ``replaceable(path)`` (checked under the lock), never a folder or a link. On any exception the temporary
    file is deleted and ``path`` is untouched.

    Raises:
        FileExistsError: ``path`` exists and may not be replaced.
    """
    path = Path(os.path.abspath(path))
    tmp = _fresh(path.parent, _make_file)
    try:
        yield tmp
        with _locked(path.parent):
            if os.path.lexists(path) and (path.is_symlink() or path.is_dir() or not replaceable(path)):
                raise FileExistsError(f"{path}: exists and was not written by ecif-fast, so it is never "
                                      "overwritten; choose another file name")
            os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def _make_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def _fresh(parent: Path, make: Callable) -> Path:
    """A new entry ``parent/.ecif-tmp-`` + 16 hex digits made by ``make`` (``os.mkdir``: mode from the umask,
    unlike ``mkdtemp``'s 0o700)."""
    while True:
        candidate = parent / f"{TMP_PREFIX}{secrets.token_hex(8)}"
        try:
            make(candidate)
            return candidate
        except FileExistsError:
            continue


@contextmanager
def _temp_dir(parent: Path, command: str) -> Iterator[Path]:
    """A new temporary folder in ``parent`` with the marker, deleted on exit unless it was moved into place.

    The marker file stays locked while this writer lives, so that no other writer takes the folder for a
    stale one. (The marker, not the folder: a writer inside the body, e.g. :func:`atomic_output_file`, locks
    the folder itself, and two locks of one process on one file would wait for each other.)"""
    tmp = _fresh(parent, os.mkdir)
    fd = None
    try:
        # locked before it has content: a marker that reads as ours is never unlocked while we live
        fd = os.open(tmp / MARKER, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:                           # a file system without locks
                pass
        os.write(fd, (json.dumps({"tool": TOOL, "command": command}) + "\n").encode())
        yield tmp
    finally:
        try:
            if os.path.lexists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            if fd is not None:
                os.close(fd)


def _lock(path: Path, *, wait: bool = True) -> int | None:
    """An open descriptor holding an exclusive ``flock`` on ``path`` (opened read-only, also a folder: no lock
    file is created); None without ``fcntl``, where the file system cannot lock, or (``wait=False``) when
    taken."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:
        os.close(fd)
        return None
    return fd


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (where locking works) for the body; released on any exit."""
    fd = _lock(folder)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _remove_stale(parent: Path) -> None:
    """Delete the temporary folders that killed writers left in ``parent``: named ``.ecif-tmp-*``, holding the
    marker and the marker not locked by a live writer. Runs under the parent's lock."""
    if fcntl is None:
        return
    for entry in os.scandir(parent):
        if not entry.name.startswith(TMP_PREFIX) or not entry.is_dir(follow_symlinks=False):
            continue
        marker = Path(entry.path) / MARKER
        fd = _lock(marker, wait=False) if marker.is_file() and not marker.is_symlink() else None
        if fd is None:
            continue                                  # a live writer's folder, or not ours
        try:
            if is_output_dir(entry.path):
                _remove_output(Path(entry.path))
        except OSError:
            pass
        finally:
            os.close(fd)


def _install(tmp: Path, path: Path) -> None:
    """Move the finished ``tmp`` to ``path`` and delete what ``path`` held before (already checked to be
    replaceable). Runs under the parent's lock."""
    if not os.path.lexists(path):
        os.rename(tmp, path)
    elif _exchange(tmp, path):                  # atomic: ``path`` is never missing
        _remove_output(tmp)
    else:
        old = path.parent / f"{TMP_PREFIX}{secrets.token_hex(8)}"
        os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            os.rename(old, path)
            raise
        _remove_output(old)


def _remove_output(folder: Path) -> None:
    """Delete an output folder, its marker last, so that a deletion cut short leaves a folder still known as ours."""
    for entry in os.scandir(folder):
        if entry.name != MARKER:
            _remove(Path(entry.path))
    shutil.rmtree(folder)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


@functools.lru_cache(maxsize=1)
def _renameat2():
    """libc's ``renameat2`` (Linux, glibc >= 2.28), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` atomically (``RENAME_EXCHANGE``); False where the system or file system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


# ------------------------------------------------------------------------------------------- tables

def write_table(df, folder, stem: str) -> list[Path]:
    """Write a pandas DataFrame as ``folder/stem.csv`` and ``folder/stem.parquet``.

    A non-default index (e.g. method names) is written as ordinary leading column(s). In the CSV, text
    cells that a spreadsheet would run as a formula are quoted (:func:`csv_quote`); numbers and the Parquet
    file keep the raw values. Parquet needs pyarrow; without it only the CSV is written and a warning says
    so. Returns the written paths.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not _default_index(df):
        df = df.reset_index()
    csv = folder / f"{stem}.csv"
    # CRLF rows (RFC 4180): the csv module then also quotes cells that contain a lone "\r"
    _csv_safe(df).to_csv(csv, index=False, lineterminator="\r\n")
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


def csv_quote(value):
    """A text cell that starts with ``=``, ``+``, ``-``, ``@``, tab or carriage return (after any quotes)
    with a ``'`` in front, so that spreadsheets show it as text instead of running it as a formula (OWASP
    CSV injection); anything else as it is. :func:`csv_unquote` undoes it."""
    return "'" + value if isinstance(value, str) and _FORMULA.match(value) else value


def csv_unquote(text: str) -> str:
    """The cell value :func:`csv_quote` was given: one leading ``'`` removed before a formula character."""
    return text[1:] if _QUOTED.match(text) else text


def _csv_safe(df):
    """``df`` with :func:`csv_quote` applied to the text cells and column names (numeric columns untouched)."""
    text = [i for i, dtype in enumerate(df.dtypes) if dtype.kind == "O"]     # object, string, category
    if not text and not any(isinstance(c, str) and _FORMULA.match(c) for c in df.columns):
        return df
    df = df.copy()
    for i in text:
        df.isetitem(i, df.iloc[:, i].map(csv_quote))
    return df.rename(columns=csv_quote)


def _default_index(df) -> bool:
    """True for an unnamed 0..n-1 RangeIndex, which carries no information worth a column."""
    idx = df.index
    start, stop, step = (getattr(idx, a, None) for a in ("start", "stop", "step"))
    return idx.name is None and idx.nlevels == 1 and (start, step) == (0, 1) and stop == len(df)
