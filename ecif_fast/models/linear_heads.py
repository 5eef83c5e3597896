"""A CLIP head model on precomputed features: two linear projections and a logit scale."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..validation import check_logit_scale


class LinearHeads(nn.Module):
    """CLIP-style linear heads on frozen image and text features.

    ``u = normalize(W_img x)``, ``v = normalize(W_txt y)`` (normalisation optional), ``t = exp(logit_scale)``.

    Args:
        image_dim, text_dim: input feature sizes. embed_dim: shared embedding size.
        normalize: L2-normalise the embeddings (CLIP does).
        logit_scale: initial ``s = log t`` (CLIP's ``log(1/0.07)``); must be finite with ``exp(s)`` finite
            in the default dtype (float32: ``s <= 88.7``), else :class:`~ecif_fast.ECIFInputError`.
        train_scale: make ``logit_scale`` a trained parameter (``requires_grad=True``).
    """

    def __init__(self, image_dim: int, text_dim: int, embed_dim: int, *, normalize: bool = True,
                 logit_scale: float = math.log(1 / 0.07), train_scale: bool = False):
        super().__init__()
        for name, val in (("image_dim", image_dim), ("text_dim", text_dim), ("embed_dim", embed_dim)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        logit_scale = check_logit_scale(logit_scale, torch.get_default_dtype())
        self.image_proj = nn.Linear(image_dim, embed_dim, bias=False)
        self.text_proj = nn.Linear(text_dim, embed_dim, bias=False)
        self.normalize = normalize
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)), requires_grad=train_scale)

    def _embed(self, proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        z = proj(x.to(proj.weight.dtype))
        return nn.functional.normalize(z, dim=-1) if self.normalize else z

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """``x (n, image_dim) -> (n, embed_dim)``."""
        return self._embed(self.image_proj, x)

    def encode_text(self, y: torch.Tensor) -> torch.Tensor:
        """``y (n, text_dim) -> (n, embed_dim)``."""
        return self._embed(self.text_proj, y)

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        return self.encode_image(x), self.encode_text(y), self.logit_scale
