"""A fitted :class:`~ecif_fast.ECIF` saved and loaded again without refitting: safetensors + JSON, no pickle.

A state is a folder (written atomically, like every ecif-fast output, by
:func:`ecif_fast.report.output.atomic_output_dir`)::

    PATH/
      .ecif-fast-output      the ecif-fast marker: {"tool": "ecif-fast", "command": "state"}
      state.json             format name and version, the ECIF settings (damping used, batches, negative term,
                             solver name and its scalar state, curvature, hessian_batches, selected parameter
                             names and shapes, chunk sizes, backend), the fingerprints of the model and of the
                             training inputs, the index of the tensors and the SHA-256 of tensors.safetensors
      tensors.safetensors    theta (P,), U (n, d), V (n, d), log_scale (), plan.perm (n,), plan.offsets (B+1,),
                             solver.* (the solver's tensors: exact "L" (P, P); lowrank "lam" (r,), "vecs" (P, r);
                             cg its preconditioner's), factor.* (a separately built spectral factor),
                             self_influence.<method> (n,) (the all-pairs cache), batches.ids (n,) (when the batches
                             were given as ids) and, unless left out, inputs.images (n, ...), inputs.texts (n, ...)
                             (never for an ECIF fitted from a DataLoader, which does not hold them)

Nothing is pickled: the JSON holds numbers and strings only, the tensors are plain safetensors. Loading reads
both, checks the format version, the tensor file's checksum and the fingerprints, rebuilds the curvature object
from the settings (no product is computed: CG and later queries use it lazily) and the solver from its saved
state (:meth:`ecif_fast.solvers.Solver.from_state_dict`): no factorisation, no embedding pass (except the optional
check of a few pairs' embeddings). Queries on the loaded object give bit-identical numbers to the original one
(same machine, backend and thread count).

Fingerprints (SHA-256): ``model.parameters`` over the selected parameters' names, shapes, dtypes and bytes and
the logit scale; ``model.frozen`` over the rest of the model's ``state_dict`` (frozen parameters and buffers,
which the embeddings also depend on); ``data`` over the training inputs' shapes, dtypes and bytes (as cast to the
parameters' dtype, as :meth:`ECIF.fit` uses them).

Size: the inputs dominate a state unless left out (``include_inputs=False``; then :func:`load_state` must be given
them again and checks them against the fingerprint). Otherwise ``(2·n·d + P + P²)`` numbers for the exact solver,
``P·rank`` for low-rank / CG.

Fitted from a DataLoader (:class:`ecif_fast.pair_source.LoaderPairs`), an ECIF holds no inputs, so none are saved
(whatever ``include_inputs``): the fingerprint is streamed from the loader (two passes, one batch in memory; the
same SHA-256 as of the tensors ``fit`` would have collected), and :func:`load_state` must be given the loader (or the
tensors) again; a loaded ECIF given a loader reads it again for its encoder passes, like the fitted one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import os
from pathlib import Path

import torch

from . import __version__
from .core.batches import BatchPlan
from .errors import ECIFInputError
from .pair_source import TensorPairs
from .report.output import MARKER, TOOL, atomic_output_dir

FORMAT = "ecif-fast state"
#: The format version written; :func:`load_state` reads versions up to this one.
VERSION = 1
STATE_JSON = "state.json"
TENSORS = "tensors.safetensors"
MARKER_COMMAND = "state"
#: pairs re-embedded by the load-time check (``check=True``), compared with the saved embeddings
CHECK_PAIRS = 4
_CHUNK = 1 << 24
_ALIGN = 64


# ============================================================================================= fingerprints

def _hash_tensor(h, name: str, t: torch.Tensor) -> None:
    t = t.detach()
    h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
    if t.numel():
        flat = t.to("cpu").contiguous().reshape(-1)
        h.update(memoryview(flat.view(torch.uint8).numpy()))


def tensors_fingerprint(named) -> str:
    """SHA-256 (hex) over ``(name, dtype, shape, bytes)`` of the ``(name, tensor)`` items, in order."""
    h = hashlib.sha256()
    for name, t in named:
        _hash_tensor(h, name, t)
    return h.hexdigest()


def data_fingerprint(images: torch.Tensor, texts: torch.Tensor) -> str:
    """Fingerprint of training inputs ``images (n, ...)``, ``texts (n, ...)``: shapes, dtypes and bytes."""
    return tensors_fingerprint([("images", images), ("texts", texts)])


def model_fingerprint(model: torch.nn.Module, space) -> dict:
    """``{"parameters", "frozen"}``: fingerprints of the selected parameters (names, shapes, bytes, in the
    selection's order) with the logit scale, and of the rest of the model's ``state_dict`` (frozen parameters and
    buffers). Cost: one pass over the model's bytes."""
    named = dict(model.named_parameters())
    scale = model.logit_scale
    scale = scale.detach() if torch.is_tensor(scale) else torch.tensor(float(scale), dtype=torch.float64)
    selected = tensors_fingerprint([*((n, named[n]) for n in space.names), ("logit_scale", scale)])
    chosen = set(space.names)
    frozen = tensors_fingerprint((k, v) for k, v in model.state_dict().items()
                                 if k not in chosen and torch.is_tensor(v))
    return {"parameters": selected, "frozen": frozen}


def _model_class(model) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"


# ================================================================================================ settings

def _batches_setting(arg):
    """A JSON description of ``ECIF(batches=)`` and, for ids, the tensor to save."""
    if arg is None:
        return "all", None
    if isinstance(arg, bool):
        return repr(arg), None
    if isinstance(arg, int):
        return arg, None
    if isinstance(arg, BatchPlan):
        return {"plan": tensors_fingerprint([("perm", arg.perm), ("offsets", arg.offsets)])}, None
    ids = torch.as_tensor(arg)
    return {"ids": tensors_fingerprint([("ids", ids)])}, ids


def settings_of(ecif) -> dict:
    """The settings of ``ecif`` that a fit depends on, as JSON values (what :func:`fit_key` hashes and a state
    records): damping as given (``"auto"`` or a number), batches, negative term, solver and its options,
    curvature, ``hessian_batches``, selected parameters, chunk sizes, backend and dtype."""
    damping = ecif.damping_arg
    return {
        "damping": damping if isinstance(damping, str) else float(damping),
        "batches": _batches_setting(ecif.batches_arg)[0],
        "negative_term": ecif.negative_term,
        "solver": ecif.solver_name,
        "curvature": ecif.curvature_kind,
        "rank": getattr(ecif, "rank", None),
        "precondition": getattr(ecif, "precondition", None),
        "cg_tol": getattr(ecif, "cg_tol", None),
        "cg_maxiter": getattr(ecif, "cg_maxiter", None),
        "seed": getattr(ecif, "seed", None),
        "hessian_batches": None if ecif.hessian_batches is None else [int(b) for b in ecif.hessian_batches],
        "params": list(ecif.space.names),
        "shapes": [list(s) for s in ecif.space.shapes],
        "chunk_size": ecif.chunk_size,
        "tangent_chunk": ecif.tangent_chunk,
        "backend": ecif.backend,
        "dtype": str(ecif.dtype).replace("torch.", ""),
    }


def prepared_inputs(ecif, train_images, train_texts=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The training inputs as :meth:`ECIF.fit` with tensors uses them: collected from a DataLoader if needed
    (all in memory), checked, and floating inputs cast to the parameters' dtype."""
    from .engine_inputs import collect_pairs
    from .validation import cast_inputs, check_pairs

    X, Y = check_pairs(*collect_pairs(train_images, train_texts), what="train")
    return cast_inputs(X, ecif.dtype), cast_inputs(Y, ecif.dtype)


def training_source(ecif, train_images, train_texts=None):
    """The training pairs as :meth:`ECIF.fit` reads them: a :class:`~ecif_fast.pair_source.TensorPairs` of the
    checked, cast tensors, or a :class:`~ecif_fast.pair_source.LoaderPairs` of a DataLoader (not read yet)."""
    from .pair_source import LoaderPairs, TensorPairs, is_loader

    if is_loader(train_images, train_texts):
        return LoaderPairs(train_images, ecif.dtype, chunk_size=ecif.chunk_size, progress=ecif.progress)
    return TensorPairs(*prepared_inputs(ecif, train_images, train_texts))


def fit_key(ecif, train_images, train_texts=None) -> str:
    """SHA-256 (hex) of everything ``ecif.fit(train_images, train_texts)`` depends on: the format version, the
    settings (:func:`settings_of`), the model's class and fingerprints and the training inputs' fingerprint
    (a DataLoader is streamed, not collected). Two fits with the same key give the same state; a cache keyed by
    it never serves a stale one."""
    data = training_source(ecif, train_images, train_texts).fingerprint()
    what = {"format": FORMAT, "version": VERSION, "settings": settings_of(ecif),
            "model_class": _model_class(ecif.model), "model": model_fingerprint(ecif.model, ecif.space),
            "data": data}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


# ================================================================================================== saving

def is_state(path) -> bool:
    """True when ``path`` is a folder written by :func:`save_state` (its marker names the ``state`` command).
    Cheap: reads the small marker file only."""
    p = Path(path)
    marker = p / MARKER
    try:
        if p.is_symlink() or not p.is_dir() or marker.is_symlink() or marker.stat().st_size > 4096:
            return False
        content = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and content.get("tool") == TOOL and content.get("command") == MARKER_COMMAND


def _solver_split(state: dict, prefix: str, tensors: dict) -> dict:
    """Tensors of a solver state into ``tensors`` (keys ``prefix + key``), the rest returned as JSON scalars."""
    scalars = {}
    for key, value in state.items():
        if torch.is_tensor(value):
            tensors[prefix + key] = value
        elif value is None or isinstance(value, (bool, int, float, str)):
            scalars[key] = value
        else:
            raise TypeError(f"solver state entry {key!r} is a {type(value).__name__}; a state_dict() holds tensors "
                            "and plain numbers or strings only")
    return scalars


def _owned(tensors: dict) -> dict:
    """Tensors safetensors accepts: contiguous, on the CPU, each with its own storage (views and tensors that
    share memory, e.g. inputs sliced from one array, are copied)."""
    out, seen = {}, set()
    for key, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def save_state(ecif, path, *, include_inputs: bool = True, overwrite: bool = True) -> Path:
    """Write the fitted ``ecif`` to the folder ``path`` (layout: module docstring); returns its absolute path.

    Args:
        include_inputs: save the training inputs ``(n, ...)`` (default; they are usually the largest part). With
            False, :func:`load_state` must be given them again (checked against the saved fingerprint). An ECIF
            fitted from a DataLoader holds no inputs: they are never saved, and ``load_state`` needs the loader
            again (its fingerprint is streamed from the loader: two more passes over it).
        overwrite: replace an existing state at ``path``.

    Atomic: written into a temporary sibling folder, then renamed into place; on any failure nothing is left
    and an existing ``path`` is untouched. An existing ``path`` is replaced only when it is an ecif-fast state
    (with ``overwrite``) or an empty folder; any other file or folder is refused (FileExistsError), and the
    locations every ecif-fast output refuses (the working folder or one above it, ...) raise
    :class:`~ecif_fast.report.output.OutputLocationError`.

    Raises:
        RuntimeError: ``ecif`` is not fitted. NotImplementedError: its solver cannot be saved.
    """
    from safetensors.torch import save_file

    ecif._require_fit()
    target = Path(os.path.abspath(path))
    if os.path.lexists(target):
        if target.is_symlink() or not target.is_dir() or (any(target.iterdir()) and not is_state(target)):
            raise FileExistsError(f"{path}: exists and is not an ecif-fast state (a state is a folder with a "
                                  f"{MARKER} marker naming the 'state' command), so it is never overwritten; "
                                  "choose another path")
        if is_state(target) and not overwrite:
            raise FileExistsError(f"{path}: holds an ecif-fast state; pass overwrite=True to replace it")

    tensors = {"theta": ecif.theta, "U": ecif.U, "V": ecif.V, "log_scale": ecif.log_scale,
               "plan.perm": ecif.plan.perm, "plan.offsets": ecif.plan.offsets}
    batches, ids = _batches_setting(ecif.batches_arg)
    if ids is not None:
        tensors["batches.ids"] = ids
    source = ecif.source
    included = bool(include_inputs) and not source.streamed   # a DataLoader's inputs are not held
    if included:
        tensors["inputs.images"], tensors["inputs.texts"] = source.tensors()
    solver = {"name": ecif.solver.name, "scalars": _solver_split(ecif.solver.state_dict(), "solver.", tensors)}
    factor = getattr(ecif, "_factor", None)
    if factor is None or factor is ecif.solver or factor is getattr(ecif.solver, "preconditioner", None):
        factor_entry = None        # none built, or the solver's own: the property finds it again after loading
    else:
        factor_entry = {"name": factor.name, "scalars": _solver_split(factor.state_dict(), "factor.", tensors)}
    cache = getattr(ecif, "_self_influence", None)
    cache = cache if isinstance(cache, dict) else {}
    for method, values in cache.items():
        tensors[f"self_influence.{method}"] = values
    head = {
        "format": FORMAT, "version": VERSION, "ecif_fast": __version__,
        "settings": settings_of(ecif), "damping": float(ecif.damping), "batches": batches, "n": int(ecif.n),
        "model": {"class": _model_class(ecif.model), **model_fingerprint(ecif.model, ecif.space)},
        "data": {"fingerprint": source.fingerprint(), "included": included, **source.shapes(),
                 "from_loader": bool(source.streamed)},
        "solver": solver, "factor": factor_entry, "self_influence": sorted(cache),
    }
    tensors = _owned(tensors)
    with atomic_output_dir(target, overwrite=True, command=MARKER_COMMAND) as tmp:
        save_file(tensors, str(tmp / TENSORS), metadata={"format": FORMAT, "version": str(VERSION)})
        head["tensors"] = {"file": TENSORS, "sha256": _sha256_file(tmp / TENSORS),
                           "keys": sorted(tensors)}
        # allow_nan: a solver diagnostic may be inf; Python's json reads it back exactly
        (tmp / STATE_JSON).write_text(json.dumps(head, indent=1) + "\n", encoding="utf-8")
    return target


# ================================================================================================= loading

def _refit_hint() -> str:
    return "fit again with ECIF(model, ...).fit(train_images, train_texts) and save it with .save(path)"


def read_state(path) -> dict:
    """The parsed ``state.json`` of the state at ``path`` (format and version checked).

    Raises:
        ECIFInputError: no state there, an unreadable or damaged ``state.json``, or a format version newer than
            this ecif-fast reads.
    """
    p = Path(path)
    if not p.exists():
        raise ECIFInputError(f"{path}: no such ecif-fast state; save one with ECIF.save(path)")
    if not p.is_dir() or not (p / STATE_JSON).is_file():
        raise ECIFInputError(f"{path}: is not an ecif-fast state (a folder written by ECIF.save with a {STATE_JSON} "
                             f"inside); pass the folder ECIF.save wrote, or {_refit_hint()}")
    try:
        head = json.loads((p / STATE_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ECIFInputError(f"{path}: its {STATE_JSON} is damaged or truncated ({type(err).__name__}: "
                             f"{str(err)[:120]}); {_refit_hint()}") from None
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        raise ECIFInputError(f"{path}: its {STATE_JSON} is not an ecif-fast state (no 'format': {FORMAT!r}); "
                             f"{_refit_hint()}")
    version = head.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ECIFInputError(f"{path}: its {STATE_JSON} has format version {version!r}; {_refit_hint()}")
    if version > VERSION:
        raise ECIFInputError(f"{path}: was written by a newer ecif-fast ({head.get('ecif_fast')}, state format "
                             f"version {version}); this one ({__version__}) reads versions up to {VERSION}: upgrade "
                             f"ecif-fast, or {_refit_hint()}")
    for key in ("settings", "model", "data", "solver", "tensors"):
        if not isinstance(head.get(key), dict):
            raise ECIFInputError(f"{path}: its {STATE_JSON} has no {key!r} section; {_refit_hint()}")
    return head


def _read_tensors(path: Path, head: dict, verify: bool) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = path / TENSORS
    if not file.is_file():
        raise ECIFInputError(f"{path}: {TENSORS} is missing; {_refit_hint()}")
    if verify and _sha256_file(file) != head["tensors"].get("sha256"):
        raise ECIFInputError(f"{path}: {TENSORS} is damaged or truncated (its SHA-256 differs from the one "
                             f"recorded in {STATE_JSON}); {_refit_hint()}")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ECIFInputError(f"{path}: {TENSORS} is damaged or truncated ({type(err).__name__}: "
                             f"{str(err)[:120]}); {_refit_hint()}") from None
    missing = [k for k in head["tensors"].get("keys", []) if k not in tensors]
    if missing:
        raise ECIFInputError(f"{path}: {TENSORS} lacks {missing[:4]}; {_refit_hint()}")
    # safetensors places a tensor at any byte offset of its buffer; BLAS kernels pick their code path by
    # alignment, so a tensor not on torch's own 64-byte boundary is copied: bit-identical results need it
    return {k: t.clone() if t.numel() and t.data_ptr() % _ALIGN else t for k, t in tensors.items()}


def _solver_state(tensors: dict, prefix: str, scalars: dict) -> dict:
    state = dict(scalars)
    state.update({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    return state


def _registered(name, path) -> type:
    from .solvers.registry import solver_class, solver_names

    if not isinstance(name, str) or name not in solver_names():
        raise ECIFInputError(f"{path}: the state was fitted with solver {name!r}, which is not registered here "
                             f"(registered: {list(solver_names())}); register it with "
                             f"ecif_fast.solvers.register_solver before loading, or {_refit_hint()}")
    return solver_class(name)


def _solver_options(ecif):
    """The :class:`SolverOptions` :meth:`ECIF.fit` builds (only the fields the dataclass has)."""
    from .solvers.registry import SolverOptions

    try:
        from .engine_inputs import cg_tol_arg

        cg_tol = cg_tol_arg(ecif.cg_tol, ecif.theta.dtype)
    except ImportError:
        cg_tol = ecif.cg_tol
    values = {"rank": ecif.rank, "seed": ecif.seed, "cg_tol": cg_tol, "cg_maxiter": ecif.cg_maxiter,
              "precondition": getattr(ecif, "precondition", True)}
    return SolverOptions(**{f.name: values[f.name] for f in dataclasses.fields(SolverOptions) if f.name in values})


def _model_differs(path, what: str) -> ECIFInputError:
    return ECIFInputError(f"{path}: the model's parameters differ from those the state was fitted with ({what}); "
                          "refit with ECIF(...).fit, or pass the model the state was saved from")


def load_state(path, model, train_images=None, train_texts=None, *, progress: bool = False, check: bool = True,
               cls=None):
    """The fitted :class:`~ecif_fast.ECIF` saved at ``path`` by :func:`save_state`, on ``model``, without
    refitting (no curvature product, no factorisation, no embedding pass).

    Args:
        model: the model the state was fitted with (same selected parameters, bit for bit; same frozen
            parameters and buffers).
        train_images, train_texts: the training inputs ``(n, ...)`` (or a DataLoader as ``train_images``);
            required when the state was saved with ``include_inputs=False`` or fitted from a DataLoader, optional
            otherwise. Given, they are checked against the state's fingerprint (cast to the parameters' dtype
            first, as ``fit`` does). A DataLoader is not collected: it is streamed for the fingerprint (three
            passes: layout, images, texts) and read again by the loaded ECIF's encoder passes.
        progress: progress bars for later queries.
        check: also compare the frozen parameters and buffers with their fingerprint, verify the tensor file's
            SHA-256, and re-embed the first few (``CHECK_PAIRS``) training pairs and compare them with the saved
            embeddings (a model whose code differs, e.g. normalisation switched, is caught there). Cheap.
        cls: the class to build (default :class:`~ecif_fast.ECIF`; ``ECIF.load`` passes its own class).

    Raises:
        ECIFInputError: a missing, damaged or truncated state; a format version newer than this ecif-fast; a model
            whose parameters (or, with ``check``, frozen parameters, buffers or embeddings) differ from the
            fitted one; training inputs that differ, or none when the state holds none; a solver name not
            registered here.
    """
    if cls is None:
        from .engine import ECIF as cls
    path = Path(path)
    head = read_state(path)
    try:
        return _load(path, head, model, train_images, train_texts, progress, check, cls)
    except ECIFInputError:
        raise
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as err:   # a JSON edited or damaged
        raise ECIFInputError(f"{path}: the state is inconsistent ({type(err).__name__}: {str(err)[:160]}); "
                             f"{_refit_hint()}") from None


def _load(path: Path, head: dict, model, train_images, train_texts, progress: bool, check: bool, cls):
    settings, mhead, dhead = head["settings"], head["model"], head["data"]
    if mhead.get("class") != _model_class(model):
        raise ECIFInputError(f"{path}: the state was fitted with a {mhead.get('class')} model, got "
                             f"{_model_class(model)}; pass the model the state was saved from, or refit with "
                             "ECIF(...).fit")
    solver_type = _registered(head["solver"].get("name"), path)
    names = settings.get("params")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ECIFInputError(f"{path}: its {STATE_JSON} has no list of selected parameters; {_refit_hint()}")
    named = dict(model.named_parameters())
    absent = [n for n in names if n not in named]
    if absent:
        raise _model_differs(path, f"it has no parameter {absent[0]!r}")
    if [list(named[n].shape) for n in names] != settings.get("shapes"):
        raise _model_differs(path, "their shapes differ")

    # the engine, built as ECIF(...) with the saved settings: model checks only, no computation
    damping = head.get("damping")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not (0 < damping < math.inf):
        raise ECIFInputError(f"{path}: its {STATE_JSON} has damping {damping!r}; {_refit_hint()}")
    kwargs = {k: settings[k] for k in ("negative_term", "solver", "curvature", "rank", "precondition", "cg_tol",
                                        "cg_maxiter", "hessian_batches", "chunk_size", "tangent_chunk", "seed",
                                        "backend") if k in settings}
    kwargs.update(damping=float(damping), params=list(names), progress=progress)
    accepted = inspect.signature(cls.__init__).parameters
    ecif = cls(model, **{k: v for k, v in kwargs.items() if k in accepted})
    if list(ecif.space.names) != names:
        from .models.functional import FunctionalModel
        from .models.params import ParamSpace

        ecif.space = ParamSpace(tuple(names), tuple(named[n].shape for n in names))
        ecif.fm = FunctionalModel(model, ecif.space)
    prints = model_fingerprint(model, ecif.space)
    if prints["parameters"] != mhead.get("parameters"):
        raise _model_differs(path, "the selected parameters or the logit scale")
    if check and prints["frozen"] != mhead.get("frozen"):
        raise _model_differs(path, "its frozen parameters or buffers, which the embeddings depend on")

    tensors = _read_tensors(path, head, verify=check)
    try:
        n = int(head["n"])
        if dhead.get("included"):
            X, Y = tensors["inputs.images"], tensors["inputs.texts"]
        if train_images is not None or train_texts is not None:
            source = training_source(ecif, train_images, train_texts)
            if source.fingerprint() != dhead.get("fingerprint"):
                g = source.shapes()
                got = (f"{tuple(g['images']['shape'])} {g['images']['dtype']} and "
                       f"{tuple(g['texts']['shape'])} {g['texts']['dtype']}")
                want = (f"{tuple(dhead['images']['shape'])} {dhead['images']['dtype']} and "
                        f"{tuple(dhead['texts']['shape'])} {dhead['texts']['dtype']}")
                raise ECIFInputError(f"{path}: the training inputs differ from those the state was fitted with "
                                     f"(got {got}, fitted on {want}; their bytes differ): pass the same "
                                     "train_images and train_texts, or refit with ECIF(...).fit")
        elif dhead.get("from_loader"):
            raise ECIFInputError(f"{path}: the state was fitted from a DataLoader, whose inputs are not saved: pass "
                                 "the same loader again, ECIF.load(path, model, loader) (or the tensors, "
                                 "ECIF.load(path, model, train_images, train_texts))")
        elif not dhead.get("included"):
            raise ECIFInputError(f"{path}: the state was saved without its training inputs "
                                 "(include_inputs=False): pass them, ECIF.load(path, model, train_images, "
                                 "train_texts)")
        elif check and data_fingerprint(X, Y) != dhead.get("fingerprint"):
            raise ECIFInputError(f"{path}: its saved training inputs do not match their fingerprint; {_refit_hint()}")
        else:
            source = TensorPairs(X, Y)
        plan = BatchPlan(n, tensors["plan.perm"], tensors["plan.offsets"])
        U, V, log_scale = tensors["U"], tensors["V"], tensors["log_scale"]
    except KeyError as err:
        raise ECIFInputError(f"{path}: {TENSORS} lacks {err.args[0]!r}; {_refit_hint()}") from None
    if source.n != n or U.shape[0] != n or plan.perm.numel() != n:
        raise ECIFInputError(f"{path}: its tensors disagree on the number of pairs ({n}); {_refit_hint()}")

    _restore(ecif, head, tensors, source, plan, U, V, log_scale, solver_type, path)
    if check:
        _check_embeddings(ecif, path)
    return ecif


def _restore(ecif, head, tensors, source, plan, U, V, log_scale, solver_type, path) -> None:
    """Set what :meth:`ECIF.fit` sets, from the state (``source``: the training pairs, see
    :mod:`ecif_fast.pair_source`)."""
    from .solvers import Curvature

    batches = head.get("batches")
    if batches == "all":
        ecif.batches_arg = None
    elif isinstance(batches, int) and not isinstance(batches, bool):
        ecif.batches_arg = batches
    elif isinstance(batches, dict) and "ids" in batches and "batches.ids" in tensors:
        ecif.batches_arg = tensors["batches.ids"]
    else:
        ecif.batches_arg = plan
    damping_arg = head["settings"].get("damping")
    ecif.damping_arg = damping_arg if isinstance(damping_arg, str) else float(damping_arg)
    ecif.source, ecif.n, ecif.plan = source, source.n, plan
    ecif.theta = ecif.space.flat(ecif.model)
    ecif.U, ecif.V, ecif.log_scale = U, V, log_scale
    ecif.curvature = Curvature(ecif.fm, ecif.theta, source, None, plan, ecif.curvature_kind, ecif.hessian_batches,
                               backend=ecif.backend, chunk_pairs=ecif.chunk_size, tangent_chunk=ecif.tangent_chunk)
    ecif.damping = float(head["damping"])
    options = _solver_options(ecif)
    ecif.solver = solver_type.from_state_dict(ecif.curvature, ecif.damping,
                                              _solver_state(tensors, "solver.", head["solver"].get("scalars", {})),
                                              options)
    ecif._factor = None
    factor = head.get("factor")
    if isinstance(factor, dict):
        ecif._factor = _registered(factor.get("name"), path).from_state_dict(
            ecif.curvature, ecif.damping, _solver_state(tensors, "factor.", factor.get("scalars", {})), options)
    cache = {m: tensors[f"self_influence.{m}"] for m in head.get("self_influence", [])
             if f"self_influence.{m}" in tensors}
    if isinstance(getattr(ecif, "_self_influence", None), dict):
        ecif._self_influence = cache
    ecif._fitted = True


def _check_embeddings(ecif, path) -> None:
    """Re-embed the first ``CHECK_PAIRS`` training pairs and compare them with the saved ``U``, ``V``."""
    k = min(CHECK_PAIRS, ecif.n)
    X, Y = ecif.source.head(k)   # from a DataLoader: its first batch(es) only
    with torch.no_grad():
        U, V, s = ecif._embed(ecif.theta, X, Y)
    scale = 1.0 + max(float(ecif.U[:k].abs().max()), float(ecif.V[:k].abs().max()))
    tol = 1e3 * torch.finfo(ecif.U.dtype).eps * scale
    worst = max(float((U - ecif.U[:k]).abs().max()), float((V - ecif.V[:k]).abs().max()),
                float((s.detach().reshape(()) - ecif.log_scale.reshape(())).abs()))
    if not worst <= tol:
        raise ECIFInputError(f"{path}: the model embeds the training pairs differently from the fitted one (by up "
                             f"to {worst:.3g}; its code or configuration differs, e.g. normalisation); pass the "
                             "model the state was saved from, or refit with ECIF(...).fit")
