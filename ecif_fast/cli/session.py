"""What every ``ecif-fast`` subcommand shares: the console (results, warnings, progress bars), the
``--out`` check, the analysis set-up (checkpoint, training pairs, batches, damping, solver) and the
atomic writing of the output folder.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import ECIF, LinearHeads, contrastive_loss
from ..report import write_report
from .checkpoint import load_checkpoint, model_config, trained_vector
from .data_files import DataFileError, PairsData, check_width, load_classes, load_pairs

EXACT_MAX_PARAMS = 4096   # default solver: dense Cholesky up to this many parameters, else CG


class UsageError(ValueError):
    """An option value or combination that cannot work; one line with the fix."""


@dataclass
class Console:
    """Where messages go: results on stdout (by ``main``), warnings and progress bars on stderr."""

    quiet: bool = False
    json: bool = False

    @property
    def progress(self) -> bool:
        return not (self.quiet or self.json)

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

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()


# ============================================================================================ shared

def check_out(path, force: bool, *, is_file: bool = False) -> None:
    """Refuse to overwrite a non-empty ``--out`` (a file for ``train``) unless ``--force``."""
    p = Path(path)
    if is_file and p.is_dir():
        raise UsageError(f"{path}: is a folder; give a checkpoint file name for --out, e.g. heads.pt")
    if force or not (p.exists() or p.is_symlink()):
        return
    if is_file:
        raise UsageError(f"{path}: exists; pass --force to overwrite it, or choose another --out")
    if not p.is_dir() or any(p.iterdir()):
        raise UsageError(f"output folder {path} exists and is not empty; pass --force to replace it, or "
                         "choose another --out")


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

    @property
    def dtype(self) -> torch.dtype:
        return self.model.image_proj.weight.dtype

    def t(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """Features in the model's dtype."""
        return None if x is None else x.to(self.dtype)

    def pairs(self, path, *, need_texts: bool = True, hint: str = "") -> PairsData:
        """Load another pairs file and check its widths against the checkpoint."""
        data = load_pairs(path, need_texts=need_texts, hint=hint)
        check_width(data.images, self.model.image_proj.in_features, "image_features", path)
        check_width(data.texts, self.model.text_proj.in_features, "text_features", path)
        return data

    def classes(self, path) -> PairsData:
        data = load_classes(path)
        check_width(data.texts, self.model.text_proj.in_features, "text_features", path)
        return data

    def fit(self, con: Console) -> ECIF:
        torch.manual_seed(self.args.seed)
        ecif = ECIF(self.model, damping=self.damping, batches=self.batches, hessian=self.solver,
                    curvature=self.args.curvature, backend=self.args.backend, progress=con.progress,
                    seed=self.args.seed)
        return ecif.fit(self.t(self.train.images), self.t(self.train.texts))


def setup(args, con: Console) -> Setup:
    """Check ``--out``, load the checkpoint and the training file, pick batches, damping and solver."""
    check_out(args.out, args.force)
    model, training = load_checkpoint(args.model)
    data = load_pairs(args.train)
    check_width(data.images, model.image_proj.in_features, "image_features", args.train)
    check_width(data.texts, model.text_proj.in_features, "text_features", args.train)
    if training.get("fingerprint") not in (None, data.fingerprint()):
        con.warn(f"{args.train} is not the file {args.model} was trained on (its features differ); influence "
                 "assumes the heads are at the optimum for these pairs: retrain with `ecif-fast train`")
    batches, desc = _checkpoint_batches(args, training, data, con)
    damping = float(training["damping"])
    if args.damping is not None and args.damping != damping:
        con.warn(f"--damping {args.damping:g} overrides the checkpoint's {damping:g}; H is no longer the "
                 "curvature of the training objective")
        damping = float(args.damping)
    n_params = int(trained_vector(model).numel())
    solver = args.solver or ("exact" if n_params <= EXACT_MAX_PARAMS else "cg")
    settings = {"train": str(args.train), "model": str(args.model), "n_train": data.n, "parameters": n_params,
                "damping": damping, "batches": desc, "solver": solver, "curvature": args.curvature,
                "backend": args.backend or "auto", "dtype": model_config(model)["dtype"], "seed": args.seed}
    return Setup(args, model, training, data, batches, damping, solver, settings)


def _checkpoint_batches(args, training: dict, data: PairsData, con: Console):
    """The training batches (batch ids or size) and a description; ``--batch-size`` overrides with a warning."""
    if args.batch_size is not None:
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


def pairs_loss(model, images, texts) -> float:
    """SPEC §2 loss of the pairs as one batch (summed over pairs), as the validation ``F`` of value/detect."""
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
    write_report(out, report, tables, overwrite=args.force, extra_files=extra)
    return {p.name: str(out / p.name) for p in sorted(out.iterdir())}


def command_result(command: str, args, summary: dict, files: dict, text: list[str]) -> dict:
    out = str(Path(os.path.abspath(args.out)))
    return {"command": command, "out": out, "files": files, "summary": summary,
            "text": text + [f"wrote {out}/ ({', '.join(files)})"]}


def plain_ids(values) -> list:
    return [v.item() if hasattr(v, "item") else v for v in values]


