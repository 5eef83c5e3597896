"""Partition of training pairs into the fixed batches of the contrastive loss (docs/math.md §2).

A :class:`BatchPlan` is the one representation every kernel receives: ``perm`` lists the pair
indices batch by batch, ``offsets`` delimits the batches inside ``perm`` (CSR-style), so batch ``b``
holds pairs ``perm[offsets[b]:offsets[b+1]]``. "All" negatives is the plan with a single batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch

from ..errors import ECIFInputError

BatchesArg = Union[None, int, torch.Tensor, Sequence[int], "BatchPlan"]


@dataclass(frozen=True)
class BatchPlan:
    """Fixed batches over ``n`` pairs; every pair is in exactly one batch (:func:`resolve_batches` checks a plan
    it is given, the C++ backend checks ``perm`` is a permutation).

    Attributes:
        n: number of pairs.
        perm: ``(n,)`` int64, pair indices grouped batch by batch (order inside a batch = index order).
        offsets: ``(num_batches + 1,)`` int64, batch ``b`` is ``perm[offsets[b]:offsets[b+1]]``.
    """

    n: int
    perm: torch.Tensor
    offsets: torch.Tensor

    @property
    def num_batches(self) -> int:
        return int(self.offsets.numel()) - 1

    @property
    def is_single(self) -> bool:
        """True when one batch holds every pair ("all" negatives)."""
        return self.num_batches == 1

    @property
    def sizes(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def groups(self) -> list[torch.Tensor]:
        """Index tensors of the batches, in batch order."""
        off = self.offsets.tolist()
        return [self.perm[off[b]:off[b + 1]] for b in range(self.num_batches)]

    def batch_ids(self) -> torch.Tensor:
        """``(n,)`` int64 batch number (0..num_batches-1) of every pair."""
        ids = torch.empty(self.n, dtype=torch.int64)
        ids[self.perm] = torch.repeat_interleave(torch.arange(self.num_batches), self.sizes)
        return ids


def resolve_batches(batches: BatchesArg, n: int) -> BatchPlan:
    """Turn the user's ``batches`` argument into a :class:`BatchPlan`.

    Args:
        batches: ``None`` (one batch of all ``n`` pairs, "all" negatives); an ``int`` batch size
            (consecutive chunks, the last one may be smaller); an ``(n,)`` integer tensor / sequence of
            batch ids (pairs sharing an id form a batch; batches are ordered by id); or a ``BatchPlan``.
        n: number of pairs.
    """
    if n <= 0:
        raise ECIFInputError("empty data: need at least one image-text pair, got 0")
    if isinstance(batches, BatchPlan):
        if batches.n != n:
            raise ECIFInputError(f"BatchPlan covers {batches.n} pairs but the data has {n}")
        if batches.perm.numel() != n or int(batches.offsets[-1]) != n:
            raise ECIFInputError(f"BatchPlan must put each of its {n} pairs in one batch, but its batches hold "
                                 f"{int(batches.offsets[-1])} pairs")
        return batches
    if batches is None:
        return BatchPlan(n, torch.arange(n, dtype=torch.int64), torch.tensor([0, n], dtype=torch.int64))
    if isinstance(batches, bool):
        raise ECIFInputError("batches must be None, an int batch size or (n,) integer batch ids, got a bool")
    if isinstance(batches, int):
        if batches < 1:
            raise ECIFInputError(f"batch size must be >= 1, got {batches}")
        offsets = torch.arange(0, n, batches, dtype=torch.int64)
        offsets = torch.cat([offsets, torch.tensor([n], dtype=torch.int64)])
        return BatchPlan(n, torch.arange(n, dtype=torch.int64), offsets)
    ids = torch.as_tensor(batches)
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ECIFInputError(f"batch ids must be an integer tensor, got dtype {ids.dtype}; "
                             "pass e.g. torch.arange(n) // batch_size")
    if ids.dim() != 1 or ids.numel() != n:
        raise ECIFInputError(
            f"batch ids must have one entry per pair: expected shape ({n},), got {tuple(ids.shape)}; "
            "every pair must belong to a batch")
    ids = ids.to("cpu", torch.int64)
    sorted_ids, perm = torch.sort(ids, stable=True)
    _, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    return BatchPlan(n, perm, offsets)


def pack_batches(groups: list[torch.Tensor], chunk_pairs: int) -> list[tuple[torch.Tensor, BatchPlan]]:
    """Consecutive batches packed into chunks of at most ``chunk_pairs`` pairs (a bigger batch is a chunk
    of its own): ``[(pair indices, the chunk's BatchPlan over them), ...]``."""
    out, cur, size = [], [], 0

    def flush():
        if cur:
            sizes = torch.tensor([len(g) for g in cur], dtype=torch.int64)
            offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
            total = int(offsets[-1])
            out.append((torch.cat(cur), BatchPlan(total, torch.arange(total), offsets)))

    for g in groups:
        if cur and size + len(g) > chunk_pairs:
            flush()
            cur, size = [], 0
        cur.append(g)
        size += len(g)
    flush()
    return out
