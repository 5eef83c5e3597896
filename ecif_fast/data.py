"""Raw images and caption strings → the tensors a CLIP model's encoders take, with the model's own preprocessing.

::

    ds = CaptionedImages(["a.jpg", "b.jpg"], ["a dog on grass", "a red car"])    # paths load lazily
    loader = DataLoader(ds, batch_size=64, shuffle=False, collate_fn=pair_collate(model))
    ecif = ECIF(model, damping=..., batches=64).fit(loader)                     # or:
    pixel_values, input_ids = encode_pairs(model, images, captions, batch_size=64)

Defaults come from the model's family (:mod:`ecif_fast.models.families`; ``model`` is an ``ecif_fast.wrap``-ed
model holding the CLIP model in ``.clip``, or the raw CLIP model; ``peft`` wrappers are seen through):

- **open_clip**: the model's own ``open_clip.image_transform`` (evaluation mode) and ``SimpleTokenizer`` with its
  ``context_length`` (nothing is downloaded); every caption is padded with 0, or truncated keeping the
  end-of-text token, to ``context_length``: open_clip's text tower takes exactly that length.
- **Hugging Face CLIP**: none (the preprocessing lives in the checkpoint's files): pass ``processor=`` (a
  ``CLIPProcessor``) or ``image_transform=`` / ``tokenizer=``. A Hugging Face tokenizer pads each batch on the
  right to its longest caption and truncates to the model's ``max_position_embeddings``.

Right padding is harmless: CLIP's text tower runs under a causal mask and pools at the end-of-text token, so
tokens after it never reach the feature (``tests/test_data.py`` checks this for both implementations). That
is why batches padded to different lengths can be concatenated with more padding: ``ECIF.fit(loader)`` and
:func:`encode_pairs` pad to the longest batch with the collate function's ``pad_token_id``.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .errors import ECIFInputError
from .models.families import clip_of, image_batcher, library_family, text_batcher

__all__ = ["CaptionedImages", "PairCollate", "pair_collate", "encode_pairs"]


# ---------------------------------------------------------------------------------------------- images
def to_pil(image, where: str = "image"):
    """A PIL RGB image from a PIL image, a file path, a ``uint8`` array ``(H, W)`` / ``(H, W, 3|4)`` or a ``uint8``
    tensor ``(3, H, W)`` / ``(H, W)``."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as im:
                return im.convert("RGB")
        except FileNotFoundError:
            raise ECIFInputError(f"{where}: no such image file {os.fspath(image)!r}") from None
        except OSError as e:
            raise ECIFInputError(f"{where}: cannot read {os.fspath(image)!r} as an image ({e})") from None
    if torch.is_tensor(image):
        if image.dim() == 3 and image.shape[0] in (1, 3, 4):
            image = image.permute(1, 2, 0)  # torchvision's (C, H, W) → (H, W, C)
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ECIFInputError(f"{where}: an image array must be uint8 (0-255), got {image.dtype}; convert it "
                                 "with (x * 255).round().astype(np.uint8) or pass a PIL image")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
            raise ECIFInputError(f"{where}: an image array must be (H, W), (H, W, 3) or (H, W, 4), got shape "
                                 f"{image.shape}")
        return Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
    raise ECIFInputError(f"{where}: expected a PIL image, a file path or a uint8 array, got {type(image).__name__}")


class CaptionedImages(Dataset):
    """``(image, caption)`` pairs: item ``i`` is ``(PIL RGB image, str)``.

    Args:
        images: a sequence (list, tuple, array of images) of PIL images, file paths (opened lazily, on access,
            with ``PIL.Image.open(path).convert("RGB")``) or ``uint8`` arrays ``(H, W[, C])`` (tensors
            ``(C, H, W)``).
        captions: a sequence of strings, one per image.
    """

    def __init__(self, images: Sequence, captions: Sequence[str]):
        if isinstance(captions, str):
            raise ECIFInputError("captions must be a sequence of strings, one per image, not a single string; "
                                 "wrap it in a list")
        try:
            n_img, n_cap = len(images), len(captions)
        except TypeError:
            raise ECIFInputError("images and captions must be sequences with a length (lists, tuples, arrays); "
                                 "materialise an iterator with list(...)") from None
        if n_img != n_cap:
            raise ECIFInputError(f"mismatched lengths: {n_img} images but {n_cap} captions; pass one caption "
                                 "per image")
        if n_img == 0:
            raise ECIFInputError("no image-caption pairs: pass at least one image and its caption")
        bad = next((i for i, c in enumerate(captions) if not isinstance(c, str)), None)
        if bad is not None:
            raise ECIFInputError(f"caption {bad} is a {type(captions[bad]).__name__}, not a string; pass the "
                                 "caption text (str) for every image")
        self.images, self.captions = images, list(captions)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i):
        return to_pil(self.images[i], where=f"image {i}"), self.captions[i]


# ---------------------------------------------------------------------------------------------- collate
def _per_image(transform: Callable, images: list) -> torch.Tensor:
    """A per-image callable (PIL image → ``(3, H, W)``) applied to a batch."""
    return torch.stack([torch.as_tensor(transform(im)) for im in images])


class PairCollate:
    """``collate_fn`` mapping ``[(image, caption), ...]`` to ``(pixel_values (B, 3, H, W), input_ids (B, L))``.

    Built by :func:`pair_collate` from two batch functions: ``image_batch`` (``list[PIL image] -> (B, 3, H, W)``)
    and ``text_batch`` (``list[str] ->`` right-padded ids, or a mapping with ``input_ids``). ``pad_token_id`` is
    the id captions are padded with (None when the tokenizer is a plain callable whose padding is unknown);
    ``ECIF.fit`` uses it to join batches padded to different lengths.
    """

    def __init__(self, image_batch: Callable, text_batch: Callable, dtype: torch.dtype, pad_token_id: int | None):
        self.image_batch, self.text_batch, self.dtype, self.pad_token_id = image_batch, text_batch, dtype, pad_token_id

    def images(self, images: list) -> torch.Tensor:
        px = self.image_batch([to_pil(im, where=f"image {i} of the batch") for i, im in enumerate(images)])
        if px.dim() != 4:
            raise ECIFInputError(f"image_transform must give (3, H, W) per image, got a batch of shape "
                                 f"{tuple(px.shape)}")
        return px.to(self.dtype)

    def texts(self, captions: list[str]) -> torch.Tensor:
        out = self.text_batch(captions)
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        try:
            ids = torch.as_tensor(out)
        except (ValueError, TypeError):
            raise ECIFInputError("tokenizer must return equal-length token ids for the batch (a (B, L) tensor or a "
                                 "mapping with 'input_ids'); pad them on the right") from None
        if ids.dim() != 2 or ids.shape[0] != len(captions) or ids.dtype.is_floating_point:
            raise ECIFInputError(f"tokenizer must give integer ids of shape ({len(captions)}, L), got "
                                 f"{tuple(ids.shape)} {ids.dtype}")
        return ids.long()

    def __call__(self, batch):
        if not batch or not all(isinstance(b, (tuple, list)) and len(b) == 2 for b in batch):
            raise ECIFInputError("pair_collate takes a non-empty list of (image, caption) pairs, e.g. from "
                                 "CaptionedImages")
        images, captions = zip(*batch)
        return self.images(list(images)), self.texts(list(captions))


def pair_collate(model: nn.Module, *, image_transform: Callable | None = None, tokenizer: Callable | None = None,
                 processor=None, dtype: torch.dtype | None = None) -> PairCollate:
    """A DataLoader ``collate_fn`` from ``(image, caption)`` pairs to ``(pixel_values, input_ids)`` for ``model``.

    Args:
        model: the model given to ECIF (an adapter from :func:`ecif_fast.wrap` or the raw CLIP model).
        image_transform: per-image callable (PIL RGB image → ``(3, H, W)`` tensor, e.g. torchvision), or a
            Hugging Face image processor (applied to the whole batch). Default: the model family's own, where it
            has one (open_clip).
        tokenizer: a Hugging Face tokenizer (right-padded to the batch's longest caption, truncated to the
            model's maximum length), or a callable ``list[str] -> (B, L)`` ids (or a mapping with
            ``input_ids``) that pads itself. Default: the model family's own, where it has one (open_clip's
            ``SimpleTokenizer``).
        processor: a Hugging Face ``CLIPProcessor``: its ``image_processor`` and ``tokenizer`` are used where
            ``image_transform`` / ``tokenizer`` are not given.
        dtype: pixel dtype; default the model's floating-point parameter dtype.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    clip = clip_of(model)
    family = library_family(clip)
    if processor is not None:
        if image_transform is None:
            image_transform = getattr(processor, "image_processor", None)
        if tokenizer is None:
            tokenizer = getattr(processor, "tokenizer", None)
    if (image_transform is None or tokenizer is None) and family is not None:
        image_transform, tokenizer = family.fill_preprocessing(clip, image_transform, tokenizer)
    missing = [n for n, v in (("image_transform", image_transform), ("tokenizer", tokenizer)) if v is None]
    if missing:
        hint = family.preprocessing_hint if family is not None else None
        what = hint or ("pass image_transform= (PIL image → (3, H, W) tensor) and tokenizer= (list[str] → (B, L) ids) "
                        "matching how the model was trained")
        raise ECIFInputError(f"pair_collate: no {' and no '.join(missing)} for {type(clip).__name__}; {what}")
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    image_batch = image_batcher(image_transform) or functools.partial(_per_image, image_transform)
    text_batch, pad = text_batcher(tokenizer, clip) or (tokenizer, None)
    return PairCollate(image_batch, text_batch, dtype, pad)


def pad_right(ids: Sequence[torch.Tensor], pad_token_id: int | None) -> list[torch.Tensor]:
    """``(B_i, L_i)`` id batches right-padded to the longest ``L`` (error if they differ and the pad is unknown)."""
    longest = max(t.shape[1] for t in ids)
    if all(t.shape[1] == longest for t in ids):
        return list(ids)
    if pad_token_id is None:
        raise ECIFInputError("token batches have different lengths and the tokenizer's pad id is unknown; pad "
                             "every batch to one length in the tokenizer")
    return [torch.nn.functional.pad(t, (0, longest - t.shape[1]), value=pad_token_id) for t in ids]


def encode_pairs(model: nn.Module, images: Sequence, captions: Sequence[str], *, batch_size: int = 64,
                 **collate_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixel_values (n, 3, H, W), input_ids (n, L))`` for all pairs, in order, with :func:`pair_collate`.

    ``collate_kwargs`` go to :func:`pair_collate` (``processor=``, ``image_transform=``, ``tokenizer=``,
    ``dtype=``). Images are loaded and transformed ``batch_size`` at a time; captions tokenized per batch are
    right-padded to the longest batch.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ECIFInputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    collate = pair_collate(model, **collate_kwargs)
    loader = DataLoader(CaptionedImages(images, captions), batch_size=batch_size, shuffle=False,
                        collate_fn=collate)
    px, ids = zip(*loader)
    return torch.cat(px), torch.cat(pad_right(ids, collate.pad_token_id))
