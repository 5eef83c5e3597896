"""LinearHeads checkpoints: ``torch.save`` of a plain dict, written atomically, loaded with ``weights_only``.

Layout (version 1)::

    {"format": "ecif_fast.LinearHeads", "version": 1,
     "config": {image_dim, text_dim, embed_dim, normalize, logit_scale, train_scale, dtype},
     "state_dict": {...},
     "training": {"damping", "batch_size" | "batch_ids", "theta_ref", "loss", "grad_norm", "iterations",
                  "method", "max_iter", "n_train", "fingerprint"}}

``training`` records the objective the heads were fitted to, so that the analysis commands build the
same curvature ``H`` (same batches, same damping) and retraining uses the same ``θ_ref``.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path

import torch

from ..models.linear_heads import LinearHeads

FORMAT = "ecif_fast.LinearHeads"
VERSION = 1
CONFIG_KEYS = ("image_dim", "text_dim", "embed_dim", "normalize", "logit_scale", "train_scale", "dtype")
DTYPES = {"float64": torch.float64, "float32": torch.float32}


class CheckpointError(ValueError):
    """A file is not a usable ecif-fast LinearHeads checkpoint; one line naming the file and the fix."""


def model_config(model: LinearHeads) -> dict:
    """The constructor arguments (and dtype) that rebuild ``model``."""
    dtype = model.image_proj.weight.dtype
    return {"image_dim": model.image_proj.in_features, "text_dim": model.text_proj.in_features,
            "embed_dim": model.image_proj.out_features, "normalize": bool(model.normalize),
            "logit_scale": float(model.logit_scale), "train_scale": bool(model.logit_scale.requires_grad),
            "dtype": next(k for k, v in DTYPES.items() if v == dtype)}


def build_model(config: dict) -> LinearHeads:
    """A LinearHeads with ``config``'s shape and dtype (weights as initialised)."""
    model = LinearHeads(int(config["image_dim"]), int(config["text_dim"]), int(config["embed_dim"]),
                        normalize=bool(config["normalize"]), logit_scale=float(config["logit_scale"]),
                        train_scale=bool(config["train_scale"]))
    return model.to(DTYPES[config["dtype"]])


def trained_vector(model: LinearHeads) -> torch.Tensor:
    """``(P,)`` the trained parameters (those with ``requires_grad``), flattened in module order."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def save_checkpoint(path, model: LinearHeads, training: dict) -> Path:
    """Write ``model`` and its ``training`` record to ``path`` (temp file + ``os.replace``)."""
    path = Path(os.path.abspath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {"format": FORMAT, "version": VERSION, "config": model_config(model),
           "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
           "training": dict(training)}
    tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


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
    except (RuntimeError, ValueError, TypeError) as e:
        raise bad((str(e).strip().splitlines() or ["bad state_dict"])[0][:200]) from None
    return model, training
