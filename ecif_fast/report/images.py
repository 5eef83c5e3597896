"""Thumbnails as inline PNG data URIs."""
from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np


def to_png_data_uri(image, *, size: int = 64) -> str | None:
    """Encode an image as ``'data:image/png;base64,...'`` whose longer side is ``size`` pixels.

    Args:
        image: a numpy array (or anything ``np.asarray`` takes, e.g. a CPU tensor) of shape ``(H, W)``
            grey, ``(H, W, 1)``, ``(H, W, 3)`` RGB or ``(H, W, 4)`` RGBA, in any numeric range: the
            colour values are min-max scaled to 0..255 per image (a constant image becomes mid grey,
            non-finite values the minimum); an alpha channel is scaled on its own (constant -> opaque).
            Or a path (str / Path) to an image file Pillow can read. Or None.
        size: the longer side of the output in pixels. Smaller images are upscaled with nearest
            neighbour (pixels stay sharp, e.g. 8×8 digits -> 64×64); larger ones are downscaled.
    Returns:
        The data URI, or None when ``image`` is None or a missing / unreadable file.
    Raises:
        ValueError: an array of another shape, or an empty one.
    """
    from PIL import Image  # Pillow ships with matplotlib

    if image is None:
        return None
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as im:
                pil = _normalise_mode(im)
        except (OSError, ValueError, Image.DecompressionBombError):
            return None
    else:
        pil = Image.fromarray(_to_uint8(np.asarray(image)))
    w, h = pil.size
    scale = size / max(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    if new != (w, h):
        resampling = getattr(Image, "Resampling", Image)
        pil = pil.resize(new, resampling.NEAREST if scale > 1 else resampling.LANCZOS)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _normalise_mode(im):
    """A loaded Pillow image -> mode L, RGB or RGBA (16-bit / float grey is min-max scaled like arrays)."""
    from PIL import Image

    if im.mode in ("I", "F") or im.mode.startswith("I;"):
        return Image.fromarray(_to_uint8(np.asarray(im)))
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        return im.convert("RGBA")
    return im.convert("L" if im.mode in ("L", "1") else "RGB")


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """``(H, W)`` / ``(H, W, 1|3|4)`` any numeric -> uint8 ``(H, W)`` / ``(H, W, 3|4)``."""
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))) or a.size == 0:
        raise ValueError(f"image array must have shape (H, W) or (H, W, 1|3|4) and be non-empty, "
                         f"got {a.shape}")
    a = a.astype(np.float64)
    if a.ndim == 3 and a.shape[2] == 4:
        rgb = _min_max(a[:, :, :3], constant=127.5)
        alpha = _min_max(a[:, :, 3:], constant=255.0)
        return np.concatenate([rgb, alpha], axis=2)
    return _min_max(a, constant=127.5)


def _min_max(a: np.ndarray, *, constant: float) -> np.ndarray:
    finite = np.isfinite(a)
    if not finite.any():
        return np.full(a.shape, round(constant), np.uint8)
    lo, hi = a[finite].min(), a[finite].max()
    a = np.where(finite, a, lo)
    if hi == lo:
        return np.full(a.shape, round(constant), np.uint8)
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)
