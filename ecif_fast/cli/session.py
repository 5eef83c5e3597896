"""What every ``ecif-fast`` subcommand shares: the console (results, warnings, progress bars), the
``--out`` check, the analysis set-up (checkpoint, training pairs, batches, damping, solver) and the
atomic writing of the output folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import ECIF, LinearHeads, contrastive_loss
from ..errors import ECIFInputError
from ..report import write_report
from ..report.output import MARKER, OutputLocationError, check_output_dir, check_output_file, check_writable
from ..core.heads_curvature import has_closed_form
from ..solvers.registry import default_solver, solver_class
from .checkpoint import is_checkpoint, load_checkpoint, model_config, trained_vector
from .data_files import DataFileError, PairsData, check_width, load_classes, load_pairs


class UsageError(ValueError):
    """An option value or combination that cannot work; one line with the fix."""


@dataclass
class Console:
    """Where messages go: results on stdout (by ``main``), warnings and progress bars on stderr."""

    quiet: bool = False
    json: bool = False

    @property
    def verbose(self) -> bool:
        """Messages about the steps of a run (not with --quiet or --json)."""
        return not (self.quiet or self.json)

    @property
    def progress(self) -> bool:
        """Progress bars: on a terminal only (a log or a pipe gets no carriage-return updates)."""
        return self.verbose and sys.stderr.isatty()

    def warn(self, message: str) -> None:
        print(f"ecif-fast: warning: {message}", file=sys.stderr)

    def steps(self, total: int) -> "Steps":
        return Steps(total, self.progress)


class Steps:
    """A tqdm bar over the steps of a command (``step("fitting")`` starts the next one)."""

    def __init__(self, total: int, enabled: bool):
        # disable=None: shown on a terminal only, so logs and pipes get no control characters
        self.bar = tqdm(total=total, file=sys.stderr, disable=None if enabled else True, leave=False,
                        bar_format="{desc}: step {n_fmt}/{total_fmt} [{elapsed}]")
        self.started = False

    def __call__(self, name: str) -> None:
        if self.started:
            self.bar.update()
        self.started = True
        self.bar.set_description_str(name)

    def describe(self, text: str) -> None:
        """Change the current step's description without starting the next one."""
        self.bar.set_description_str(text)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()


# ============================================================================================ shared

INPUT_OPTIONS = ("train", "model", "val", "test", "classes", "remove", "eval")


def input_files(args) -> list[str]:
    """The files the command reads (its file options that are set): ``--out`` must never replace them."""
    return [str(getattr(args, name)) for name in INPUT_OPTIONS if getattr(args, name, None) is not None]


def check_out(args, *, is_file: bool = False) -> None:
    """Check ``--out`` before any work (a checkpoint file for ``train``, else a folder): refused are ``""``,
    the working folder or a folder above it, an input file or a folder that holds one (whatever ``--force``),
    a location that cannot be written or whose names are too long, an existing non-empty folder without the
    ``.ecif-fast-output`` marker or a file that is not an ecif-fast checkpoint (whatever ``--force``: they
    may hold anything), and an earlier ecif-fast output without ``--force``."""
    if is_file:
        check_output_file(args.out, overwrite=args.force, inputs=input_files(args), replaceable=is_checkpoint,
                          what="an ecif-fast checkpoint")
    else:
        check_output_dir(args.out, overwrite=args.force, inputs=input_files(args))


@dataclass
class Setup:
    """Checkpoint, training pairs and the curvature settings of an analysis command."""

    args: object
    model: LinearHeads
    training: dict
    train: PairsData
    batches: object
    damping: float
    solver: str
    settings: dict = field(default_factory=dict)
    cache: "FitCache | None" = None       # --cache: where the fitted state is loaded from / saved to

    @property
    def dtype(self) -> torch.dtype:
        return self.model.image_proj.weight.dtype

    def t(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """Features in the model's dtype."""
        return None if x is None else x.to(self.dtype)

    def pairs(self, path, *, need_texts: bool = True, hint: str = "") -> PairsData:
        """Load another pairs file and check its widths against the checkpoint. Image-text pairs
        (``need_texts``) are scored by their contrastive loss, which needs at least 2 of them."""
        data = load_pairs(path, need_texts=need_texts, hint=hint)
        check_width(data.images, self.model.image_dim, "image_features", path)
        check_width(data.texts, self.model.text_dim, "text_features", path)
        if need_texts and data.n < 2:
            raise DataFileError(f"{path}: has 1 pair; the contrastive loss of a single pair is constant (it has "
                                "no negatives), so every influence on it would be 0: give at least 2 pairs")
        return data

    def classes(self, path) -> PairsData:
        data = load_classes(path)
        check_width(data.texts, self.model.text_dim, "text_features", path)
        if data.n < 2:
            raise DataFileError(f"{path}: has 1 class; zero-shot prediction needs at least 2 class rows")
        return data

    def fit(self, con: Console) -> ECIF:
        """The fitted ECIF: loaded from the ``--cache`` folder when an entry for exactly this checkpoint,
        training data and these options is there, else fitted (and then saved there)."""
        torch.manual_seed(self.args.seed)
        ecif = ECIF(self.model, damping=self.damping, batches=self.batches, solver=self.solver,
                    curvature=self.args.curvature, backend=self.args.backend, progress=con.progress,
                    seed=self.args.seed, cg_tol=self.args.cg_tol, cg_maxiter=self.args.cg_maxiter,
                    precondition=not self.args.no_precondition)
        X, Y = self.t(self.train.images), self.t(self.train.texts)
        self.cache = FitCache.open(self.args, ecif, X, Y, model_config(self.model))
        t0 = time.perf_counter()
        loaded = self.cache.load(ecif, X, Y, con) if self.cache else None
        if loaded is not None:
            ecif = loaded
        else:
            ecif.fit(X, Y)
            if self.cache:
                self.cache.save(ecif, con)
        if self.cache:
            self.cache.info["seconds"] = time.perf_counter() - t0
            self.settings["cache"] = self.cache.info
        measured = ecif.solver.summary()   # e.g. what a low-rank factorisation keeps
        if measured:
            self.settings[self.solver] = measured
        return ecif

    def finish(self, ecif: ECIF, con: Console) -> None:
        """After the analysis: update the cache entry when it computed something worth keeping (the all-pairs
        self-influence)."""
        if self.cache:
            self.cache.update(ecif, con)


class FitCache:
    """``--cache DIR``: fitted ECIF states (:meth:`ECIF.save`, without the training inputs, which come from
    ``--train``) in ``DIR/ecif-state-<key>``, the key a SHA-256 of the checkpoint (its trained parameters,
    frozen parameters and configuration), the training inputs (bytes, shapes, dtypes) and every option the fit
    depends on (damping, batches, solver and its options, curvature, seed, backend): an entry is used only for
    exactly these, and loading checks the fingerprints again. Entries are never deleted automatically."""

    PREFIX = "ecif-state-"

    def __init__(self, folder: Path, key: str):
        self.folder = folder
        self.entry = folder / f"{self.PREFIX}{key[:32]}"
        self.stored: set[str] = set()      # all-pairs self-influence methods in the entry
        self.info = {"dir": str(folder), "entry": str(self.entry), "status": "miss"}

    @classmethod
    def open(cls, args, ecif: ECIF, X, Y, config: dict) -> "FitCache | None":
        folder = cache_dir(args)
        if folder is None:
            return None
        from ..state import fit_key

        key = hashlib.sha256(json.dumps({"fit": fit_key(ecif, X, Y), "config": config},
                                        sort_keys=True).encode()).hexdigest()
        return cls(folder, key)

    def load(self, ecif: ECIF, X, Y, con: Console) -> ECIF | None:
        """The entry's ECIF when it exists and matches; None (a miss, or a stale entry, reported) otherwise."""
        from ..state import is_state, settings_of

        if not os.path.lexists(self.entry):
            return None
        why = None
        if not is_state(self.entry):
            why = "not an ecif-fast state"
        else:
            try:
                loaded = ECIF.load(self.entry, ecif.model, X, Y, progress=ecif.progress)
            except (ECIFInputError, NotImplementedError) as err:
                why = str(err)
            else:
                if settings_of(loaded) == settings_of(ecif):
                    self.info["status"] = "hit"
                    self.stored = set(loaded._self_influence) if isinstance(loaded._self_influence, dict) else set()
                    if con.verbose:
                        print(f"ecif-fast: reusing the fitted ECIF state {self.entry} (--cache)", file=sys.stderr)
                    return loaded
                why = "its settings differ"
        self.info["status"] = "stale"
        con.warn(f"the cache entry {self.entry} cannot be used ({' '.join(why.split())[:300]}); fitting again")
        return None

    def save(self, ecif: ECIF, con: Console) -> None:
        try:
            ecif.save(self.entry, include_inputs=False)
        except (OSError, ValueError) as err:       # FileExistsError, OutputLocationError, a full disk, ...
            con.warn(f"could not write the cache entry {self.entry} ({' '.join(str(err).split())[:300]}); "
                     "the results are not affected")
            return
        self.stored = set(ecif._self_influence) if isinstance(ecif._self_influence, dict) else set()
        self.info["saved"] = True

    def update(self, ecif: ECIF, con: Console) -> None:
        computed = set(ecif._self_influence) if isinstance(ecif._self_influence, dict) else set()
        if computed - self.stored:
            self.save(ecif, con)


def cache_dir(args) -> Path | None:
    """The ``--cache`` folder (absolute), or None when off (no ``--cache``, or ``--no-cache``)."""
    value = getattr(args, "cache", None)
    if value is None or getattr(args, "no_cache", False):
        return None
    return Path(os.path.abspath(value))


def check_cache(args) -> None:
    """Check ``--cache`` before any work: a folder (or a new path) outside ``--out`` where entries can be
    created."""
    if getattr(args, "cache", None) is None or getattr(args, "no_cache", False):
        return
    if not str(args.cache).strip():
        raise UsageError("--cache: the path is empty; name a folder for the fitted states, e.g. --cache .ecif-cache")
    folder = cache_dir(args)
    if os.path.lexists(folder) and not folder.is_dir():
        raise UsageError(f"--cache {args.cache}: is a file, not a folder; name a folder for the fitted states")
    out = Path(os.path.abspath(args.out))
    if folder == out or out in folder.parents:
        raise UsageError(f"--cache {args.cache}: lies inside --out {args.out}, which every run replaces; put the "
                         "cache outside the output folder")
    try:
        check_writable(folder / "entry")
    except OutputLocationError as err:
        raise UsageError(f"--cache {args.cache}: {' '.join(str(err).split())}") from None


def setup(args, con: Console) -> Setup:
    """Check ``--out`` (and ``--cache``), load the checkpoint and the training file, pick batches, damping and
    solver."""
    check_out(args)
    check_cache(args)
    model, training = load_checkpoint(args.model)
    data = load_pairs(args.train)
    check_width(data.images, model.image_dim, "image_features", args.train)
    check_width(data.texts, model.text_dim, "text_features", args.train)
    if training.get("fingerprint") not in (None, data.fingerprint()):
        why = (f"{args.train} is not the file {args.model} was trained on (its features differ); influence "
               "assumes the heads are at the optimum for these pairs")
        if not getattr(args, "allow_data_mismatch", False):
            raise DataFileError(f"{why}: pass the checkpoint's training file, retrain with `ecif-fast train`, or "
                                "pass --allow-data-mismatch to analyse anyway")
        con.warn(f"{why} (--allow-data-mismatch)")
    batches, desc = _checkpoint_batches(args, training, data, con)
    check_negatives(batches, data.n, str(args.model))
    damping = float(training["damping"])
    if args.damping is not None and args.damping != damping:
        con.warn(f"--damping {args.damping:g} overrides the checkpoint's {damping:g}; H is no longer the "
                 "curvature of the training objective")
        damping = float(args.damping)
    n_params = int(trained_vector(model).numel())
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    solver = args.solver or default_solver(n_params, has_closed_form(model, names, args.curvature))
    settings = {"train": str(args.train), "model": str(args.model), "n_train": data.n, "parameters": n_params,
                "damping": damping, "batches": desc, "solver": solver, "curvature": args.curvature,
                "backend": args.backend or "auto", "dtype": model_config(model)["dtype"], "seed": args.seed}
    # the options the solver reads (--cg-tol, --cg-maxiter for cg), as given
    settings.update({name: getattr(args, name) for name in solver_class(solver).option_names if hasattr(args, name)})
    return Setup(args, model, training, data, batches, damping, solver, settings)


def _checkpoint_batches(args, training: dict, data: PairsData, con: Console):
    """The training batches (batch ids or size) and a description; ``--batch-size`` overrides with a warning."""
    if args.batch_size is not None:
        check_negatives(batch_arg(args.batch_size), data.n, "--batch-size")
        con.warn(f"--batch-size {args.batch_size} overrides the checkpoint's batches; H is no longer the "
                 "curvature of the training objective")
        return batch_arg(args.batch_size), f"size {args.batch_size}"
    if training.get("batch_ids") is not None:
        ids = torch.as_tensor(training["batch_ids"]).to(torch.int64)
        if ids.numel() != data.n:
            raise DataFileError(f"{args.train}: has {data.n} pairs but {args.model} was trained on {ids.numel()}; "
                                "pass the training file of this checkpoint")
        return ids, f"{int(ids.unique().numel())} batches (batch_ids)"
    size = training.get("batch_size")
    return size, ("all (one batch)" if size is None else f"size {size}")


def batch_arg(value: str):
    return None if value == "all" else int(value)


def check_negatives(batches, n: int, source: str) -> None:
    """Refuse batches in which every pair is alone: the contrastive loss of a lone pair is constant (no
    negatives), so nothing would be learned and every influence would be 0. ``batches``: None (one
    batch), a batch size or ``(n,)`` batch ids; ``source`` names where they come from."""
    if n < 2:
        raise DataFileError(f"{source}: has {n} pair; contrastive training needs at least 2 pairs (a pair's "
                            "negatives are the other pairs of its batch)")
    if isinstance(batches, int) and batches < 2:
        raise UsageError(f"{source}: batches of {batches} pair leave every pair without negatives (its loss is "
                         "constant); use a batch size of at least 2, or all")
    if torch.is_tensor(batches) and int(torch.unique(batches, return_counts=True)[1].max()) < 2:
        raise DataFileError(f"{source}: every batch id is different, so every pair is alone in its batch "
                            "without negatives; give pairs of the same batch the same id")


def pairs_loss(model, images, texts) -> float:
    """docs/math.md §2 loss of the pairs as one batch (summed over pairs), as the validation ``F`` of value/detect."""
    with torch.no_grad():
        return float(contrastive_loss(model.encode_image(images), model.encode_text(texts), model.logit_scale.exp()))


def image_ref(path, data_file) -> str | None:
    """An image path as given, or relative to the data file's folder when that is where it exists."""
    if path is None or path == "":
        return None
    p = Path(path)
    if p.is_absolute() or p.exists():
        return str(p)
    beside = Path(data_file).parent / p
    return str(beside) if beside.exists() else str(p)


def write_outputs(args, report: dict, tables: dict, extra: dict | None = None) -> dict[str, str]:
    """Write ``--out`` atomically: the report, summary.json, the tables, and ``extra`` files
    (``name -> writer(path)``). Returns ``{file name: absolute path}``."""
    out = Path(os.path.abspath(args.out))
    write_report(out, report, tables, overwrite=args.force, extra_files=extra, command=args.command,
                 inputs=input_files(args))
    return {p.name: str(out / p.name) for p in sorted(out.iterdir()) if p.name != MARKER}


def command_result(command: str, args, summary: dict, files: dict, text: list[str]) -> dict:
    out = str(Path(os.path.abspath(args.out)))
    return {"command": command, "out": out, "files": files, "summary": summary,
            "text": text + [f"wrote {out}/ ({', '.join(files)})"]}


def plain_ids(values) -> list:
    return [v.item() if hasattr(v, "item") else v for v in values]


