"""How :class:`~ecif_fast.ECIF` reads its arguments and inputs: training pairs from tensors or a DataLoader
(collected; ``fit`` streams a DataLoader through :mod:`ecif_fast.pair_source`),
the solver and ``hessian_batches`` arguments, chunk sizes by model size, and which encoder rejects an input."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .errors import ECIFInputError
from .solvers.registry import check_solver, default_solver
from .validation import check_int


def collect_pairs(data, texts):
    """Tensors ``(images, texts)`` from two tensors or from an iterable (DataLoader) of pairs, all in memory.

    :meth:`ECIF.fit` no longer collects a DataLoader (it streams it: :mod:`ecif_fast.pair_source`); this is what
    :func:`ecif_fast.state.prepared_inputs` and callers that want the tensors use."""
    if texts is not None or torch.is_tensor(data):
        return data, texts
    xs, ys = [], []
    for item in data:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ECIFInputError("a DataLoader passed to fit must yield (images, texts) pairs")
        xs.append(torch.as_tensor(item[0]))
        ys.append(torch.as_tensor(item[1]))
    if not xs:
        raise ECIFInputError("empty data: the DataLoader yielded no pairs")
    if len({y.shape[1:] for y in ys}) > 1 and all(y.dim() == 2 and not y.is_floating_point() for y in ys):
        from .data import pad_right  # token batches padded to their own longest caption (ecif_fast.data)

        ys = pad_right(ys, getattr(getattr(data, "collate_fn", None), "pad_token_id", None))
    return torch.cat(xs), torch.cat(ys)


def hessian_batches_arg(value):
    """``hessian_batches`` as a list of ints (the range is checked against the batches in :meth:`ECIF.fit`)."""
    if value is None:
        return None
    if torch.is_tensor(value):
        if value.dtype.is_floating_point or value.dtype == torch.bool or value.dim() != 1:
            raise ECIFInputError(f"hessian_batches must be a 1-d integer tensor or a list of batch numbers, got "
                                 f"a {value.dtype} tensor of shape {tuple(value.shape)}")
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ECIFInputError(f"hessian_batches must be None or a list of batch numbers (ints), got {value!r}")
    return [check_int(b, "each entry of hessian_batches") for b in value]


def solver_arg(solver, hessian) -> str | None:
    """The solver name from ``solver=`` and its deprecated alias ``hessian=`` (which named the solver, not the
    curvature); None: chosen by the number of parameters (:func:`pick_solver`)."""
    if hessian is not None:
        warnings.warn("ECIF(hessian=...) is deprecated: it picks the solver, so it is now called solver= "
                      f"(pass solver={hessian!r}; the curvature matrix is curvature=)", DeprecationWarning,
                      stacklevel=3)
        if solver is not None and solver != hessian:
            raise ECIFInputError(f"solver={solver!r} and its deprecated alias hessian={hessian!r} disagree; "
                                 "pass solver= only")
        solver = hessian
    return None if solver is None else check_solver(solver)


def pick_solver(name: str | None, n_params: int, closed_form: bool = False) -> str:
    """``name``, or when None the default for ``n_params`` trained parameters (:func:`default_solver`;
    ``closed_form``: the dense curvature has a closed form)."""
    return default_solver(n_params, closed_form) if name is None else name


def cg_tol_arg(value, dtype: torch.dtype) -> float:
    """``cg_tol``, or when None the default for the parameters' dtype: ``1e-10`` in float64, ``1e-4`` in float32
    (the relative residual a float32 CG reaches on a system of condition number up to ``1/sqrt(eps)``)."""
    if value is not None:
        return value
    return 1e-10 if dtype == torch.float64 else 1e-4


def default_chunks(model: nn.Module) -> tuple[int, int]:
    """``(chunk_size, tangent_chunk)`` for a model: ``(4096, 256)`` under 2 million parameters (embedding
    heads: activations are tiny, bigger calls amortise overhead), else ``(64, 8)`` (transformer towers: one
    chunk of 64 pairs already holds gigabytes of activations in a ViT-B/32)."""
    size = sum(p.numel() for p in model.parameters()) if isinstance(model, nn.Module) else 0
    return (4096, 256) if size < 2_000_000 else (64, 8)


def encodes(encode, x) -> bool:
    try:
        with torch.no_grad():
            encode(x)
        return True
    except Exception:  # noqa: BLE001 - any failure means this input is the culprit
        return False
