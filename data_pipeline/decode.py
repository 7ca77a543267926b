"""Robust image decoding: every input becomes an RGB uint8 array or a named reject reason.

Handles EXIF orientation, CMYK, palette/alpha (composited on white), greyscale, 16-bit and float
images, and refuses decompression bombs, empty and truncated files, and non-images, each with a
reason that the curation manifest counts (``rejected["<reason>"]``).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps

ImageFile.LOAD_TRUNCATED_IMAGES = False

DEFAULT_MAX_PIXELS = 64_000_000  # ~8000 x 8000: above this a file is treated as a decompression bomb


class DecodeError(ValueError):
    """A file that is not a usable image; ``reason`` is the manifest's reject key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _to_uint8_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = (arr / hi * 255.0).clip(0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = ((arr - lo) / (hi - lo + 1e-12) * 255.0).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    if img.mode == "CMYK":
        return np.asarray(img.convert("RGB"))
    return np.asarray(img.convert("RGB"))


def decode_image(data: bytes, name: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode ``data`` to an (H, W, 3) uint8 RGB array, or raise :class:`DecodeError`."""
    if not data:
        raise DecodeError("empty", f"{name}: zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise DecodeError(
                    "decompression_bomb",
                    f"{name}: {w}x{h} = {w * h} pixels exceeds the limit of "
                    f"{max_pixels}; raise curate `max_pixels` if it is genuine",
                )
            img.load()
            img = ImageOps.exif_transpose(img)
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError("decompression_bomb", f"{name}: {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        raise DecodeError("not_image", f"{name}: not an image file") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DecodeError("decode", f"{name}: corrupt or truncated image ({exc})") from exc
    return np.ascontiguousarray(_to_uint8_rgb(img))
