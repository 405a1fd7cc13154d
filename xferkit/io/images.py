"""Decode any image file to an RGB PIL image: EXIF orientation applied, every mode handled."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

_HIGH_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_ORIENTATION = 0x0112  # EXIF tag


class UnreadableImage(Exception):
    """The file is not an image PIL can decode (corrupt, truncated, empty or another format)."""


@dataclass
class JpegFile:
    """A JPEG's undecoded bytes, for a GPU decoder: size and EXIF orientation read from its header."""

    data: bytes
    size: tuple[int, int]
    orientation: int


def read_jpeg(path: str | Path) -> JpegFile | None:
    """The bytes of a plain baseline YCbCr JPEG that ends where it should; ``None`` for anything else.

    Other files (progressive, CMYK, greyscale, Adobe RGB, truncated, PNG, ...) are left to
    :func:`load_rgb`, so that every rule it applies still holds for them.
    """
    try:
        if not Path(path).is_file():
            return None
        with open(path, "rb") as f:  # every JPEG starts so: other files are not read past two bytes
            data = f.read(2)
            if data != b"\xff\xd8":
                return None
            data += f.read()
        with warnings.catch_warnings(), Image.open(io.BytesIO(data)) as img:
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if (img.format != "JPEG" or img.mode != "RGB" or "progression" in img.info
                    or img.info.get("adobe_transform") == 0):
                return None
            orientation = img.getexif().get(_ORIENTATION, 1)
            size = img.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning):
        return None
    return JpegFile(data, size, orientation) if data.rstrip(b"\0").endswith(b"\xff\xd9") else None


def load_rgb(path: str | Path, min_size: int | None = None) -> Image.Image:
    """Open *path* as an RGB image.

    ``min_size`` lets JPEG decoding use draft mode (DCT scaling), which decodes a large
    photo at a reduced size no smaller than ``min_size`` on each side: much faster,
    and lossless for our purpose since the image is downscaled afterwards anyway.
    """
    if not Path(path).is_file():  # a FIFO or a device would block, or never end
        raise UnreadableImage(f"{path}: does not exist" if not Path(path).exists()
                              else f"{path}: not a regular file (a folder, FIFO, socket or device)")
    try:
        with warnings.catch_warnings(), Image.open(path) as img:
            # A decompression-bomb warning becomes an error: a hostile file is skipped, not decoded.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if min_size is not None and img.format == "JPEG":
                img.draft("RGB", _draft_request(img.size, min_size))
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as err:
        raise UnreadableImage(f"{path}: {err}") from err


def _draft_request(size: tuple[int, int], min_size: int) -> tuple[int, int]:
    """Size to ask draft() for so that the *shorter* side stays >= min_size after scaling."""
    w, h = size
    scale = min_size / min(w, h)
    return max(1, int(w * scale + 0.5)), max(1, int(h * scale + 0.5))


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited onto white."""
    if img.mode == "RGB":
        return img
    if img.mode in _HIGH_BIT_MODES:
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.round().astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info or img.mode in {"LA", "PA", "La"}:
        img = img.convert("RGBA")
    if img.mode in {"RGBA", "RGBa"}:
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def resized_size(size: tuple[int, int], shorter: int) -> tuple[int, int]:
    """``(width, height)`` once the shorter side of *size* is resized to *shorter*, rounded as torchvision."""
    w, h = size
    return (shorter, int(shorter * h / w)) if w <= h else (int(shorter * w / h), shorter)


def centre_box(size: tuple[int, int], resize_size: int, crop: tuple[int, int]
               ) -> tuple[float, float, float, float]:
    """``(left, top, right, bottom)`` in source pixels of torchvision's ``center_crop(resize(img))``:
    resampling this box alone to the crop's size gives the crop's pixels."""
    (w, h), (crop_h, crop_w) = size, crop
    new_w, new_h = resized_size(size, resize_size)
    top, left = int(round((new_h - crop_h) / 2.0)), int(round((new_w - crop_w) / 2.0))
    sx, sy = w / new_w, h / new_h
    return left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy
