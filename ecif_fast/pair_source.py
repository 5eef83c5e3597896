"""The training pairs as :class:`~ecif_fast.ECIF` reads them: held in memory (:class:`TensorPairs`), or read
again from a DataLoader, one chunk at a time, for every pass that needs the encoders (:class:`LoaderPairs`).

Both share one interface, which the engine, the curvature (``ecif_fast/solvers/curvature.py``), the state
(``ecif_fast/state.py``) and the apps use instead of raw ``(n, ...)`` tensors:

- ``n``, ``streamed``; ``like()``: tensors with the training inputs' shapes and dtypes (for
  :func:`~ecif_fast.validation.check_like_training` and messages); ``describe()``;
- ``everything(desc)``: all pairs as ``(X, Y)``: the tensors, or ``(Rows, None)`` read piece by piece;
- ``serve(groups, whole=False)``: for each index tensor of ``groups`` in turn, its inputs ``(X (k, ...),
  Y (k, ...))``, or ``(Rows, None)`` for a group too big to gather (never with ``whole=True``);
- ``take(idx)``, ``head(k)``, ``tensors()``: gathered rows; ``fingerprint()``: the SHA-256 of the inputs
  (:func:`ecif_fast.state.data_fingerprint` of the tensors ``fit`` would hold), ``shapes()``.

A :class:`Rows` is consumed through its ``pieces(chunk_pairs)`` (``(slice, X, Y)``, consecutive slices of
``chunk_pairs`` rows, exactly ``row_slices(k, chunk_pairs)``); :func:`ecif_fast.models.functional.chunked_jvp`,
:class:`~ecif_fast.models.functional.ChunkedVJP` and the engine's embedding pass take one in place of ``X``
(with ``Y=None``). Pieces have the boundaries a tensor of the same rows would be cut at, so the encoder calls,
and the numbers, are the same as from tensors.
"""
from __future__ import annotations

import collections.abc
import hashlib
import json
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from .errors import ECIFInputError
from .validation import cast_inputs, check_pairs


def is_loader(data, texts) -> bool:
    """True when ``fit(data, texts)`` was given an iterable of ``(images, texts)`` batches (a DataLoader)."""
    return texts is None and data is not None and not torch.is_tensor(data)


def _pad_texts(ys: Sequence[torch.Tensor], pad_token_id) -> list[torch.Tensor]:
    """Token-id batches right-padded to the longest (as :func:`ecif_fast.data.pad_right`); others unchanged."""
    if len({y.shape[1:] for y in ys}) > 1 and all(y.dim() == 2 and not y.is_floating_point() for y in ys):
        from .data import pad_right

        return pad_right(ys, pad_token_id)
    return list(ys)


def _cat_rows(xs, ys, pad_token_id):
    """Row blocks joined (a single block is returned as it is, no copy)."""
    if len(xs) == 1:
        return xs[0], ys[0]
    return torch.cat(xs), torch.cat(_pad_texts(ys, pad_token_id))


class TensorPairs:
    """Training inputs held in memory: ``X (n, ...)``, ``Y (n, ...)``, checked and cast as ``fit`` uses them."""

    streamed = False

    def __init__(self, X: torch.Tensor, Y: torch.Tensor):
        self.X, self.Y = X, Y
        self.n = X.shape[0]

    def like(self):
        return self.X, self.Y

    def describe(self) -> str:
        return f"{tuple(self.X.shape)} {self.X.dtype} and {tuple(self.Y.shape)} {self.Y.dtype}"

    def shapes(self) -> dict:
        return {"images": {"shape": list(self.X.shape), "dtype": str(self.X.dtype)},
                "texts": {"shape": list(self.Y.shape), "dtype": str(self.Y.dtype)}}

    def everything(self, desc: str | None = None):
        return self.X, self.Y

    def serve(self, groups, whole: bool = False):
        for g in groups:
            yield self.X[g], self.Y[g]

    def take(self, idx):
        return self.X[idx], self.Y[idx]

    def head(self, k: int):
        return self.X[:k], self.Y[:k]

    def tensors(self):
        return self.X, self.Y

    def fingerprint(self) -> str:
        from .state import data_fingerprint

        return data_fingerprint(self.X, self.Y)


class Rows:
    """The rows ``index`` (ascending; None: all) of a :class:`LoaderPairs`, not held: every iteration of
    :meth:`pieces` reads the loader again from its start (up to the last row needed)."""

    def __init__(self, source: "LoaderPairs", index: torch.Tensor | None, desc: str | None = None):
        self.source, self.index, self.desc = source, index, desc

    @property
    def n(self) -> int:
        return self.source.n if self.index is None else int(self.index.numel())

    def pieces(self, chunk_pairs: int) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
        """``(slice, X, Y)``: consecutive ``chunk_pairs`` rows (the last may be fewer), in order, gathered from
        the loader's batches (at most one batch and one piece of inputs alive)."""
        xs, ys, have, done = [], [], 0, 0
        idx = self.index
        stop = None if idx is None else int(idx[-1]) + 1
        batches = self.source._batches(self.desc)
        try:
            for start, X, Y in batches:
                end = start + X.shape[0]
                if idx is None:
                    lo, hi = 0, X.shape[0]
                    take = None
                else:
                    a, b = (int(v) for v in torch.searchsorted(idx, torch.tensor([start, end])))
                    if b <= a:
                        if end >= stop:
                            break
                        continue
                    lo, hi = 0, b - a
                    rel = idx[a:b] - start
                    contiguous = int(rel[-1]) - int(rel[0]) == b - a - 1
                    take = slice(int(rel[0]), int(rel[-1]) + 1) if contiguous else rel
                    X, Y = X[take], Y[take]
                while lo < hi:
                    step = min(hi - lo, chunk_pairs - have)
                    xs.append(X[lo:lo + step])
                    ys.append(Y[lo:lo + step])
                    have, lo = have + step, lo + step
                    if have == chunk_pairs:
                        yield (slice(done, done + have), *_cat_rows(xs, ys, self.source.pad_token_id))
                        xs, ys, done, have = [], [], done + have, 0
                if stop is not None and end >= stop:
                    break
        finally:
            batches.close()
        if have:
            yield (slice(done, done + have), *_cat_rows(xs, ys, self.source.pad_token_id))
            done += have
        expected = self.n if (idx is not None or self.source.scanned) else done
        if done != expected:
            raise self.source._changed(f"it yielded {done} of the {expected} pairs needed")


class _Layout:
    """What the first full pass over a loader saw: batch shapes, the first batch's checksum, dtypes."""

    def __init__(self):
        self.shapes: list[tuple[tuple, tuple]] = []
        self.checksum: str | None = None
        self.image_dtype = self.text_dtype = None
        self.n = 0


class LoaderPairs:
    """Training pairs read from a DataLoader (any re-iterable of ``(images, texts)`` batches), never held.

    Every pass reads the loader again, in its own batches; floating inputs are cast to ``dtype``. The first full
    pass (``fit``'s embedding pass) records the batches' shapes and a SHA-256 of the first batch; every later
    pass is checked against them (:class:`~ecif_fast.ECIFInputError` if the loader changed: shuffled, random
    augmentation, a different length). Token-id batches may be padded to different lengths (each batch is encoded
    as it is; rows gathered from several batches are right-padded with the collate function's
    ``pad_token_id``).

    Memory: a training batch (``serve``) of up to ``limit = max(loader batch, chunk_size)`` pairs is gathered
    whole; a bigger one is a :class:`Rows`, read piece by piece (``chunk_pairs`` rows at a time) once per use.
    Groups that are ascending and follow each other in loader order (``batches=int``, ``None``, ids sorted by
    position) are served in one ordered pass; other groups in waves of about ``limit`` pairs, one pass per wave.
    The pass of the last ordered read is kept (with its current batch or two) and goes on when the next read starts
    at or after it, so walking the plan in order over several ``serve`` calls still reads the loader once.
    """

    streamed = True

    def __init__(self, loader, dtype: torch.dtype, *, chunk_size: int = 1, progress: bool = False):
        if not isinstance(loader, collections.abc.Iterable):
            raise ECIFInputError(f"fit takes tensors (train_images, train_texts) or a DataLoader of (images, texts) "
                                 f"batches, got a {type(loader).__name__} and no train_texts")
        if isinstance(loader, collections.abc.Iterator):
            raise ECIFInputError("fit got an iterator (or generator) of batches, which can be read only once; ECIF "
                                 "reads the training pairs again for every encoder pass: pass a DataLoader (or "
                                 "another re-iterable of (images, texts) batches) or the tensors")
        if getattr(loader, "persistent_workers", False) and getattr(loader, "num_workers", 0) > 0:
            raise ECIFInputError("the DataLoader passed to fit has persistent_workers=True, which shares one "
                                 "iterator between the passes ECIF may interleave; pass persistent_workers=False")
        self.loader, self.dtype = loader, dtype
        self.chunk_size, self.progress = chunk_size, progress
        self.pad_token_id = getattr(getattr(loader, "collate_fn", None), "pad_token_id", None)
        self.layout: _Layout | None = None   # set by the first full pass
        self._parked: _Cursor | None = None  # the pass of the last ordered read, to go on from (see _resume)

    # ------------------------------------------------------------------ passes
    @property
    def scanned(self) -> bool:
        return self.layout is not None

    @property
    def n(self) -> int:
        return self._layout().n

    @property
    def limit(self) -> int:
        """Rows of a group gathered whole (:meth:`serve`): the loader's biggest batch or ``chunk_size``."""
        return max(self.chunk_size, max(s[0][0] for s in self._layout().shapes))

    def _layout(self) -> _Layout:
        if self.layout is None:
            for _ in self._batches():
                pass
        return self.layout

    def _changed(self, what: str) -> ECIFInputError:
        return ECIFInputError(
            f"the DataLoader passed to fit changed between passes ({what}): ECIF reads the training pairs again, "
            "batch by batch, for every encoder pass (JVPs, curvature products, per-pair gradients), so the loader "
            "must yield the same batches in the same order every time: use shuffle=False, no random "
            "augmentation or sampling, and a dataset that does not change (or pass the inputs as tensors)")

    def _batch(self, item, k: int):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ECIFInputError("a DataLoader passed to fit must yield (images, texts) pairs")
        X, Y = check_pairs(torch.as_tensor(item[0]), torch.as_tensor(item[1]), what="train")
        return cast_inputs(X, self.dtype), cast_inputs(Y, self.dtype)

    @staticmethod
    def _checksum(X, Y) -> str:
        h = hashlib.sha256()
        for t in (X, Y):
            h.update(json.dumps([str(t.dtype), list(t.shape)]).encode())
            if t.numel():
                h.update(memoryview(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()))
        return h.hexdigest()

    def _batches(self, desc: str | None = None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(start, X, Y)`` per batch of the loader, checked and cast; the first full pass records the layout,
        later passes are checked against it."""
        first = self.layout is None
        layout = _Layout() if first else self.layout
        start = k = 0
        items = self.loader
        if self.progress and desc is not None:
            total = None if first else len(layout.shapes)
            if first:
                try:
                    total = len(self.loader)
                except TypeError:
                    pass
            items = tqdm(self.loader, desc=desc, total=total, leave=False)
        for k, item in enumerate(items):
            X, Y = self._batch(item, k)
            shape = (tuple(X.shape), tuple(Y.shape))
            if first:
                if k == 0:
                    layout.checksum = self._checksum(X, Y)
                    layout.image_dtype, layout.text_dtype = X.dtype, Y.dtype
                else:
                    self._same_kind(layout, X, Y, k)
                layout.shapes.append(shape)
            else:
                if k >= len(layout.shapes):
                    raise self._changed(f"it yielded more than the {len(layout.shapes)} batches of the first pass")
                if shape != layout.shapes[k]:
                    raise self._changed(f"batch {k} has shapes {shape[0]} and {shape[1]}, not {layout.shapes[k][0]} "
                                        f"and {layout.shapes[k][1]} as on the first pass")
                if k == 0 and self._checksum(X, Y) != layout.checksum:
                    raise self._changed("its first batch holds different pairs or values than on the first pass")
            yield start, X, Y
            start += X.shape[0]
        if first:
            if not layout.shapes:
                raise ECIFInputError("empty data: the DataLoader yielded no pairs")
            if len({s[1][1:] for s in layout.shapes}) > 1 and self.pad_token_id is None:
                raise ECIFInputError("token batches have different lengths and the tokenizer's pad id is unknown; "
                                     "pad every batch to one length in the tokenizer")
            layout.n = start
            self.layout = layout
        elif k + 1 != len(layout.shapes) or start != layout.n:
            raise self._changed(f"it yielded {start} pairs in {k + 1} batches, not {layout.n} in "
                                f"{len(layout.shapes)} as on the first pass")

    def _same_kind(self, layout: _Layout, X, Y, k: int) -> None:
        """Batch ``k`` must fit the encoders like batch 0 (token ids may differ in length only)."""
        x0, y0 = layout.shapes[0]
        if X.shape[1:] != x0[1:]:
            raise ECIFInputError(f"the DataLoader passed to fit yielded images of shape {tuple(X.shape)} in batch "
                                 f"{k} but {x0} in batch 0: every batch must hold inputs of one shape")
        tokens = Y.dim() == 2 and not Y.is_floating_point() and len(y0) == 2 and not layout.text_dtype.is_floating_point
        if Y.shape[1:] != y0[1:] and not tokens:
            raise ECIFInputError(f"the DataLoader passed to fit yielded texts of shape {tuple(Y.shape)} in batch {k} "
                                 f"but {y0} in batch 0: every batch must hold inputs of one shape (token ids may "
                                 "differ in length)")
        layout.image_dtype = torch.promote_types(layout.image_dtype, X.dtype)
        layout.text_dtype = torch.promote_types(layout.text_dtype, Y.dtype)

    # ------------------------------------------------------------------ the interface
    def shapes(self) -> dict:
        """Shapes and dtypes of the inputs ``fit`` would hold (token ids padded to the longest batch)."""
        layout = self._layout()
        x0, y0 = layout.shapes[0]
        text_shape = (layout.n, *y0[1:])
        if len(y0) == 2 and len({s[1][1] for s in layout.shapes}) > 1:
            text_shape = (layout.n, max(s[1][1] for s in layout.shapes))
        return {"images": {"shape": [layout.n, *x0[1:]], "dtype": str(layout.image_dtype)},
                "texts": {"shape": list(text_shape), "dtype": str(layout.text_dtype)}}

    def like(self):
        """Empty ``meta`` tensors of the training inputs' shapes and dtypes (no memory)."""
        s, layout = self.shapes(), self._layout()
        return (torch.empty(s["images"]["shape"], dtype=layout.image_dtype, device="meta"),
                torch.empty(s["texts"]["shape"], dtype=layout.text_dtype, device="meta"))

    def describe(self) -> str:
        s = self.shapes()
        return (f"{tuple(s['images']['shape'])} {s['images']['dtype']} and {tuple(s['texts']['shape'])} "
                f"{s['texts']['dtype']} (from a DataLoader)")

    def everything(self, desc: str | None = None):
        return Rows(self, None, desc), None

    def serve(self, groups, whole: bool = False):
        """``(X, Y)`` of each group of ``groups`` in turn (see the class docstring for the passes); a group of more
        than :attr:`limit` pairs is ``(Rows, None)`` unless ``whole`` (then gathered: memory of that group)."""
        groups = [torch.as_tensor(g, dtype=torch.int64) for g in groups]
        if not groups:
            return
        limit = self.limit
        ascending = [g.numel() < 2 or bool((g[1:] > g[:-1]).all()) for g in groups]
        ordered = all(ascending) and all(int(a[-1]) < int(b[0]) for a, b in zip(groups, groups[1:]) if a.numel()
                                         and b.numel())
        if ordered:
            yield from self._serve_ordered(groups, whole, limit)
            return
        wave: list[torch.Tensor] = []
        for g, up in zip(groups, ascending):
            if not whole and up and g.numel() > limit:
                yield from self._wave(wave)
                wave = []
                yield Rows(self, g), None
                continue
            wave.append(g)
            if sum(w.numel() for w in wave) >= limit:
                yield from self._wave(wave)
                wave = []
        yield from self._wave(wave)

    def _serve_ordered(self, groups, whole: bool, limit: int):
        cursor = self._resume(int(groups[0][0]))
        try:
            for g in groups:
                if not whole and g.numel() > limit:
                    if cursor is not None:     # no loader pass stays open while the group is read
                        cursor.close()
                        cursor = None
                    yield Rows(self, g), None
                    continue
                if cursor is None:
                    cursor = _Cursor(self)
                yield cursor.gather(g)
        except GeneratorExit:                  # the caller stopped (e.g. zip): the pass can go on later
            self._park(cursor)
            raise
        except BaseException:
            if cursor is not None:
                cursor.close()
            raise
        self._park(cursor)

    def _resume(self, first: int) -> "_Cursor | None":
        """The parked pass of the previous ordered read when it can still serve rows from ``first`` on, else
        None (and it is closed): reading a plan chunk by chunk, in order, costs one pass however it is split."""
        cursor, self._parked = getattr(self, "_parked", None), None
        if cursor is not None and cursor.start <= first:
            return cursor
        if cursor is not None:
            cursor.close()
        return None

    def _park(self, cursor: "_Cursor | None") -> None:
        if cursor is None:
            return
        old = getattr(self, "_parked", None)
        if old is not None and old is not cursor:
            old.close()
        self._parked = cursor

    def _wave(self, wave: list[torch.Tensor]):
        if not wave:
            return
        union = torch.unique(torch.cat(wave))
        X, Y = self._gather_sorted(union)
        for g in wave:
            pos = torch.searchsorted(union, g)
            yield X[pos], Y[pos]

    def _gather_sorted(self, idx: torch.Tensor):
        cursor = self._resume(int(idx[0])) or _Cursor(self)
        try:
            out = cursor.gather(idx)
        except BaseException:
            cursor.close()
            raise
        self._park(cursor)
        return out

    def take(self, idx):
        """``(X (k, ...), Y (k, ...))`` of the pairs ``idx`` (ints, any order, or an ``(n,)`` bool mask): one pass."""
        idx = torch.as_tensor(idx)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        idx = idx.to(torch.int64).flatten()
        if idx.numel() == 0:
            x, y = self.like()
            return (torch.empty((0, *x.shape[1:]), dtype=x.dtype), torch.empty((0, *y.shape[1:]), dtype=y.dtype))
        union, inverse = torch.unique(idx, return_inverse=True)
        X, Y = self._gather_sorted(union)
        return X[inverse], Y[inverse]

    def head(self, k: int):
        """The first ``k`` pairs (reads the loader's first batches only)."""
        return self._gather_sorted(torch.arange(min(k, self.n)))

    def tensors(self):
        """All inputs gathered in memory, as ``fit`` with tensors would hold them (token ids padded to one
        length): one pass, the whole dataset's memory."""
        X, Y = self.take(torch.arange(self.n))
        return X, Y

    def fingerprint(self) -> str:
        """:func:`ecif_fast.state.data_fingerprint` of :meth:`tensors`, streamed: two passes (images, then texts),
        one batch in memory."""
        s, layout = self.shapes(), self._layout()
        h = hashlib.sha256()
        for name, which, dtype in (("images", 0, layout.image_dtype), ("texts", 1, layout.text_dtype)):
            h.update(json.dumps([name, str(dtype), s[name]["shape"]]).encode())
            width = s["texts"]["shape"][1] if which == 1 and len(s["texts"]["shape"]) == 2 else None
            for _, X, Y in self._batches():
                t = (X, Y)[which].to(dtype)
                if which == 1 and width is not None and t.shape[1] != width and not t.is_floating_point():
                    t = _pad_texts([t, torch.zeros(0, width, dtype=t.dtype)], self.pad_token_id)[0]
                if t.numel():
                    h.update(memoryview(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()))
        return h.hexdigest()


class _Cursor:
    """One pass over a :class:`LoaderPairs`, read forward as far as needed: gathers ascending row sets."""

    def __init__(self, source: LoaderPairs):
        self.source = source
        self.batches = source._batches()
        self.buffer: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.read = 0   # rows read so far

    @property
    def start(self) -> int:
        """The first row this pass can still gather (buffered, or not read yet)."""
        return self.buffer[0][0] if self.buffer else self.read

    def gather(self, idx: torch.Tensor):
        """``(X, Y)`` of the ascending rows ``idx``, none before :attr:`start`."""
        hi = int(idx[-1]) + 1
        lo = int(idx[0])
        self.buffer = [b for b in self.buffer if b[0] + b[1].shape[0] > lo]
        while self.read < hi:
            try:
                start, X, Y = next(self.batches)
            except StopIteration:
                raise self.source._changed(f"it ended after {self.read} pairs, before pair {hi - 1}") from None
            self.read = start + X.shape[0]
            if self.read > lo:
                self.buffer.append((start, X, Y))
        xs, ys = [], []
        for start, X, Y in self.buffer:
            end = start + X.shape[0]
            a, b = (int(v) for v in torch.searchsorted(idx, torch.tensor([start, end])))
            if b > a:
                rel = idx[a:b] - start
                if int(rel[-1]) - int(rel[0]) == b - a - 1:
                    xs.append(X[int(rel[0]):int(rel[-1]) + 1])
                    ys.append(Y[int(rel[0]):int(rel[-1]) + 1])
                else:
                    xs.append(X[rel])
                    ys.append(Y[rel])
        return _cat_rows(xs, ys, self.source.pad_token_id)

    def close(self):
        self.batches.close()
