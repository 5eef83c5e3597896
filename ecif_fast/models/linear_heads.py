"""A CLIP head model on precomputed features: two linear projections and a logit scale."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ECIFInputError
from ..core.normalization import embedding_norm
from ..options import DEFAULT_SOFT_NORM
from ..validation import check_logit_scale


class LinearHeads(nn.Module):
    """CLIP-style linear heads on frozen image and text features.

    ``u = normalize(W_img x)``, ``v = normalize(W_txt y)`` (normalisation optional), ``t = exp(logit_scale)``.
    With ``norm_eps = ε > 0`` the normalisation is soft: ``u = z / sqrt(|z|² + ε²)`` (docs/math.md §2.3), so an
    embedding near zero norm carries a small vector instead of an arbitrary direction.
    With ``image_rank`` / ``text_rank`` the heads act on whitened features instead: ``u = normalize(W_img
    Mᵀ(x − μ))`` with a fixed (not trained) shift ``μ (image_dim,)`` and map ``M (image_dim, image_rank)``
    held as buffers; :meth:`from_features` fits them (docs/math.md §2.1).

    Args:
        image_dim, text_dim: input feature sizes. embed_dim: shared embedding size.
        normalize: L2-normalise the embeddings (CLIP does).
        norm_eps: ``ε >= 0`` of the soft normalisation (0: exact L2 normalisation); only with ``normalize``.
        logit_scale: initial ``s = log t`` (CLIP's ``log(1/0.07)``); must be finite with ``exp(s)`` finite
            in the default dtype (float32: ``s <= 88.7``), else :class:`~ecif_fast.ECIFInputError`.
        train_scale: make ``logit_scale`` a trained parameter (``requires_grad=True``).
        image_rank, text_rank: whitened input sizes (``W_img`` is then ``(embed_dim, image_rank)``); the
            buffers start as zeros and are set by :meth:`from_features` or ``load_state_dict``.
    """

    def __init__(self, image_dim: int, text_dim: int, embed_dim: int, *, normalize: bool = True,
                 logit_scale: float = math.log(1 / 0.07), train_scale: bool = False,
                 image_rank: int | None = None, text_rank: int | None = None, norm_eps: float = 0.0):
        super().__init__()
        for name, val in (("image_dim", image_dim), ("text_dim", text_dim), ("embed_dim", embed_dim),
                          ("image_rank", image_rank), ("text_rank", text_rank)):
            if val is None and name.endswith("rank"):
                continue
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        logit_scale = check_logit_scale(logit_scale, torch.get_default_dtype())
        self.image_dim, self.text_dim = image_dim, text_dim
        self.image_rank, self.text_rank = image_rank, text_rank
        for side, dim, rank in (("image", image_dim, image_rank), ("text", text_dim, text_rank)):
            if rank is not None:
                self.register_buffer(f"{side}_shift", torch.zeros(dim))
                self.register_buffer(f"{side}_map", torch.zeros(dim, rank))
        self.image_proj = nn.Linear(image_rank or image_dim, embed_dim, bias=False)
        self.text_proj = nn.Linear(text_rank or text_dim, embed_dim, bias=False)
        norm_eps = float(norm_eps)
        if not math.isfinite(norm_eps) or norm_eps < 0 or (norm_eps > 0 and not normalize):
            raise ValueError(f"norm_eps must be a finite float >= 0 (and 0 without normalize), got {norm_eps!r}")
        self.normalize = normalize
        self.norm_eps = norm_eps
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)), requires_grad=train_scale)

    @classmethod
    def from_features(cls, images: torch.Tensor, texts: torch.Tensor, embed_dim: int, *, normalize: bool = True,
                      logit_scale: float = math.log(1 / 0.07), train_scale: bool = False,
                      rel_tol: float = 1e-6, max_rank: int | None = None,
                      soft_norm: float = DEFAULT_SOFT_NORM) -> "LinearHeads":
        """Heads on whitened features, started at the canonical correlation directions (docs/math.md §2.1).

        Each side is centred and whitened on the span of its features: ``M = Q Λ^{-1/2}`` over the
        eigenvalues of the features' covariance above ``rel_tol`` × the largest (the rank of that side), so
        the whitened features have identity covariance and the trained weights act on the data's span
        only. The weights start at the canonical correlation analysis of the two whitened sides: row ``i``
        of ``W_img`` / ``W_txt`` is the ``i``-th pair of canonical directions (rows past the number of
        canonical pairs are zero). That start already aligns the pairs, so weight decay towards it (the
        command line's ``θ_ref``) keeps the optimum at embeddings of order one, where the normalisation is
        smooth.

        Args:
            images ``(n, image_dim)``, texts ``(n, text_dim)``: the training pairs' features (n ≥ 2).
            embed_dim: embedding size. max_rank: keep at most this many whitened directions per side, those of
                largest variance (default: the whole span).
            soft_norm: with ``normalize``, ``norm_eps`` as this fraction of the median norm of the starting
                embeddings (both sides; docs/math.md §2.3); 0 keeps the exact L2 normalisation.
            The remaining arguments as in :class:`LinearHeads`.
        Returns:
            LinearHeads in the features' dtype (float32 or float64), with ``image_rank`` / ``text_rank`` set.
        """
        X = torch.as_tensor(images)
        Y = torch.as_tensor(texts)
        if X.dim() != 2 or Y.dim() != 2 or X.shape[0] != Y.shape[0] or X.shape[0] < 2:
            raise ECIFInputError(f"images and texts must be (n, dim) with the same n >= 2, got {tuple(X.shape)} and "
                             f"{tuple(Y.shape)}")
        dtype = X.dtype if X.dtype in (torch.float32, torch.float64) else torch.get_default_dtype()
        if max_rank is not None and (not isinstance(max_rank, int) or isinstance(max_rank, bool) or max_rank < 1):
            raise ValueError(f"max_rank must be a positive int or None, got {max_rank!r}")
        if isinstance(soft_norm, bool) or not isinstance(soft_norm, (int, float)) or not 0 <= soft_norm < 1:
            raise ValueError(f"soft_norm must be a float in [0, 1), got {soft_norm!r}")
        maps = [_whitening(Z.to(torch.float64), rel_tol, side, max_rank) for Z, side in ((X, "image"), (Y, "text"))]
        Xw, Yw = ((Z.to(torch.float64) - mu) @ M for Z, (mu, M) in zip((X, Y), maps))
        U, _, Vh = torch.linalg.svd(Xw.T @ Yw / X.shape[0], full_matrices=False)
        k = min(embed_dim, U.shape[1])
        model = cls(X.shape[1], Y.shape[1], embed_dim, normalize=normalize, logit_scale=logit_scale,
                    train_scale=train_scale, image_rank=maps[0][1].shape[1], text_rank=maps[1][1].shape[1])
        model = model.to(torch.float64)
        with torch.no_grad():
            for side, (mu, M), W in (("image", maps[0], U[:, :k].T), ("text", maps[1], Vh[:k])):
                getattr(model, f"{side}_shift").copy_(mu)
                getattr(model, f"{side}_map").copy_(M)
                proj = getattr(model, f"{side}_proj").weight
                proj.zero_()
                proj[:k] = W
            if normalize and soft_norm > 0:
                start = torch.cat([(Xw @ U[:, :k]).norm(dim=1), (Yw @ Vh[:k].T).norm(dim=1)])
                model.norm_eps = float(soft_norm * start.median())
        return model.to(dtype)

    def proj_input(self, x: torch.Tensor, side: str) -> torch.Tensor:
        """What ``side``'s (``"image"`` / ``"text"``) projection multiplies: ``x (n, dim)`` itself, or whitened
        ``(x − μ) M (n, rank)``; in the projection's dtype."""
        proj = self.image_proj if side == "image" else self.text_proj
        x = x.to(proj.weight.dtype)
        if getattr(self, f"{side}_rank") is not None:
            x = (x - getattr(self, f"{side}_shift")) @ getattr(self, f"{side}_map")
        return x

    @property
    def scale_invariant(self) -> bool:
        """Whether each embedding is exactly L2-normalised, so that a positive scale of a head changes nothing."""
        return bool(self.normalize) and self.norm_eps == 0

    def _embed(self, proj: nn.Linear, x: torch.Tensor, side: str) -> torch.Tensor:
        z = proj(self.proj_input(x, side))
        if not self.normalize:
            return z
        if self.norm_eps > 0:
            return z / embedding_norm(z, self.norm_eps)
        return nn.functional.normalize(z, dim=-1)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """``x (n, image_dim) -> (n, embed_dim)``."""
        return self._embed(self.image_proj, x, "image")

    def encode_text(self, y: torch.Tensor) -> torch.Tensor:
        """``y (n, text_dim) -> (n, embed_dim)``."""
        return self._embed(self.text_proj, y, "text")

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        return self.encode_image(x), self.encode_text(y), self.logit_scale


def _whitening(Z: torch.Tensor, rel_tol: float, side: str,
               max_rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(μ (dim,), M (dim, r))``: ``(Z − μ) M`` has identity covariance on the ``r`` directions whose variance
    passes ``rel_tol`` × the largest, the ``max_rank`` of largest variance at most."""
    if not bool(torch.isfinite(Z).all()):
        raise ECIFInputError(f"{side} features must be finite (no NaN or Inf); drop or repair those rows")
    mu = Z.mean(0)
    C = (Z - mu).T @ (Z - mu) / Z.shape[0]
    lam, Q = torch.linalg.eigh(C)
    keep = lam > rel_tol * float(lam.max())
    if not bool(keep.any()):
        raise ECIFInputError(f"{side} features are constant (every row the same); whitening needs features that "
                             "vary between pairs")
    if max_rank is not None and int(keep.sum()) > max_rank:
        keep[:-max_rank] = False      # eigh sorts ascending: keep the max_rank largest
    return mu, Q[:, keep] / lam[keep].sqrt()
