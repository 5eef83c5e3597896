"""LinearHeads checkpoints: ``torch.save`` of a plain dict, written atomically, loaded with ``weights_only``.

Layout (version 1)::

    {"format": "ecif_fast.LinearHeads", "version": 1,
     "config": {image_dim, text_dim, embed_dim, normalize, logit_scale, train_scale, dtype,
                image_rank, text_rank,    # the ranks: whitened heads (None or absent: raw features)
                norm_eps},                # soft normalisation (absent: 0, exact)
     "state_dict": {...},
     "training": {"damping", "batch_size" | "batch_ids", "theta_ref", "loss", "grad_norm", "iterations",
                  "method", "max_iter", "n_train", "fingerprint"}}

``training`` records the objective the heads were fitted to, so that the analysis commands build the
same curvature ``H`` (same batches, same damping) and retraining uses the same ``θ_ref``.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import torch

from ..models.linear_heads import LinearHeads
from ..options import TRAINING_METHODS
from ..report.output import atomic_output_file

FORMAT = "ecif_fast.LinearHeads"
VERSION = 1
CONFIG_KEYS = ("image_dim", "text_dim", "embed_dim", "normalize", "logit_scale", "train_scale", "dtype")
DTYPES = {"float64": torch.float64, "float32": torch.float32}


class CheckpointError(ValueError):
    """A file is not a usable ecif-fast LinearHeads checkpoint; one line naming the file and the fix."""


def model_config(model: LinearHeads) -> dict:
    """The constructor arguments (and dtype) that rebuild ``model``."""
    dtype = model.image_proj.weight.dtype
    return {"image_dim": model.image_dim, "text_dim": model.text_dim,
            "embed_dim": model.image_proj.out_features, "normalize": bool(model.normalize),
            "logit_scale": float(model.logit_scale.detach()), "train_scale": bool(model.logit_scale.requires_grad),
            "dtype": next(k for k, v in DTYPES.items() if v == dtype),
            "image_rank": model.image_rank, "text_rank": model.text_rank, "norm_eps": float(model.norm_eps)}


def build_model(config: dict) -> LinearHeads:
    """A LinearHeads with ``config``'s shape and dtype (weights as initialised, whitening buffers zero)."""
    ranks = [config.get(k) for k in ("image_rank", "text_rank")]
    model = LinearHeads(int(config["image_dim"]), int(config["text_dim"]), int(config["embed_dim"]),
                        normalize=bool(config["normalize"]), logit_scale=float(config["logit_scale"]),
                        train_scale=bool(config["train_scale"]),
                        image_rank=None if ranks[0] is None else int(ranks[0]),
                        text_rank=None if ranks[1] is None else int(ranks[1]),
                        norm_eps=float(config.get("norm_eps", 0.0)))
    return model.to(DTYPES[config["dtype"]])


def trained_vector(model: LinearHeads) -> torch.Tensor:
    """``(P,)`` the trained parameters (those with ``requires_grad``), flattened in module order."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def save_checkpoint(path, model: LinearHeads, training: dict) -> Path:
    """Write ``model`` and its ``training`` record to ``path`` (temp file + ``os.replace``, safe with
    concurrent writers). An existing ``path`` is replaced only when it is an ecif-fast checkpoint
    (:func:`is_checkpoint`); anything else raises FileExistsError and is left as it was."""
    path = Path(os.path.abspath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {"format": FORMAT, "version": VERSION, "config": model_config(model),
           "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
           "training": dict(training)}
    with atomic_output_file(path, replaceable=is_checkpoint) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)          # to a file object: torch derives no archive name from the temporary name
    return path


def is_checkpoint(path) -> bool:
    """True when ``path`` is a regular file written by :func:`save_checkpoint`: a torch zip archive whose
    top-level dict has our ``format`` entry. Cheap and safe: a zip directory check first, then ``torch.load``
    with ``weights_only`` (no code runs) and ``mmap`` (tensor data is not read)."""
    p = Path(path)
    if p.is_symlink() or not p.is_file() or not zipfile.is_zipfile(p):
        return False
    try:
        with zipfile.ZipFile(p) as z:
            if not any(name.endswith("/data.pkl") for name in z.namelist()):
                return False
        obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # BadZipFile, UnpicklingError, RuntimeError, OSError, ...
        return False
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def load_checkpoint(path) -> tuple[LinearHeads, dict]:
    """``(model, training)`` from a checkpoint written by :func:`save_checkpoint`."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file; create one with `ecif-fast train`")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (not a zip), EOFError, ...
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({msg[:200]}); create one with "
                              "`ecif-fast train`") from None

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: not an ecif-fast LinearHeads checkpoint ({why}); create one with "
                               "`ecif-fast train`")

    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise bad("no 'format': 'ecif_fast.LinearHeads' entry")
    if not isinstance(obj.get("version"), int) or obj["version"] > VERSION:
        raise bad(f"version {obj.get('version')!r}; this ecif-fast reads version <= {VERSION}")
    config, state, training = obj.get("config"), obj.get("state_dict"), obj.get("training")
    if not isinstance(config, dict) or any(k not in config for k in CONFIG_KEYS):
        raise bad(f"config must have {list(CONFIG_KEYS)}")
    if config["dtype"] not in DTYPES:
        raise bad(f"dtype {config['dtype']!r} is not one of {list(DTYPES)}")
    if not isinstance(state, dict) or not isinstance(training, dict) or "damping" not in training:
        raise bad("missing state_dict or training record")
    try:
        model = build_model(config)
        model.load_state_dict(state)
    except (RuntimeError, ValueError, TypeError, KeyError) as e:
        raise bad((str(e).strip().splitlines() or ["bad state_dict"])[0][:200]) from None
    for name, value in model.state_dict().items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{path}: the model's {name} has NaN or Inf values (training diverged, or the "
                                  "file was damaged); train the model again with `ecif-fast train`")
    problem = _training_problem(training, trained_vector(model).numel())
    if problem:
        raise bad(f"its training record {problem}")
    return model, training


def _training_problem(training: dict, n_params: int) -> str | None:
    """What is wrong with a checkpoint's training record, or None. The analysis commands rebuild the
    training objective from it (damping, batches, θ_ref), so every field they use is checked here,
    before any computation."""
    damping = training.get("damping")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not (0 < damping < float("inf")):
        return f"has damping {damping!r}; it must be a positive number"
    ref = training.get("theta_ref")
    if not torch.is_tensor(ref) or ref.numel() != n_params or not ref.is_floating_point():
        shape = tuple(ref.shape) if torch.is_tensor(ref) else type(ref).__name__
        return f"has theta_ref {shape}; it must be a float tensor of the {n_params} trained parameters"
    if not bool(torch.isfinite(ref).all()):
        return "has NaN or Inf values in theta_ref"
    ids, size = training.get("batch_ids"), training.get("batch_size")
    if ids is not None:
        if not torch.is_tensor(ids) or ids.dim() != 1 or ids.is_floating_point() or ids.is_complex():
            return "has batch_ids that are not a 1-D integer tensor"
    elif size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 2):
        return f"has batch_size {size!r}; it must be an integer >= 2, or None for one batch"
    for key in ("method", "max_iter"):
        if key in training and not isinstance(training[key], (str if key == "method" else int)):
            return f"has {key} {training[key]!r}"
    if training.get("method", "auto") not in TRAINING_METHODS:
        return f"has method {training['method']!r}; it must be one of {list(TRAINING_METHODS)}"
    if isinstance(training.get("max_iter"), int) and training["max_iter"] < 1:
        return f"has max_iter {training['max_iter']!r}; it must be >= 1"
    if not isinstance(training.get("fingerprint", ""), (str, type(None))):
        return "has a fingerprint that is not a string"
    return None
