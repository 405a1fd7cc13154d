"""Decode JPEGs on the GPU (nvJPEG) and resize them there, for when CPU decoding cannot keep up."""

from __future__ import annotations

import functools
import io
import warnings
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from xferkit.backbones import Preprocess
from xferkit.images import JpegFile

#: Pixels decoded at once, and resized at once (in float, 4x the bytes): bounds GPU memory.
DECODE_PIXELS, RESIZE_PIXELS = 2**27, 2**25
_TENSOR_MODES = {"bilinear", "bicubic"}


@dataclass
class JpegBatch:
    """Several JPEG files in one uint8 tensor (one shared-memory transfer out of a loader worker)."""

    data: torch.Tensor
    offsets: list[int]
    sizes: list[tuple[int, int]]
    orientations: list[int]

    @classmethod
    def of(cls, files: list[JpegFile]) -> JpegBatch:
        offsets = [0]
        for f in files:
            offsets.append(offsets[-1] + len(f.data))
        data = torch.frombuffer(bytearray(b"".join(f.data for f in files)), dtype=torch.uint8) \
            if files else torch.empty(0, dtype=torch.uint8)
        return cls(data, offsets, [f.size for f in files], [f.orientation for f in files])

    def __len__(self) -> int:
        return len(self.sizes)

    def file(self, i: int) -> torch.Tensor:
        return self.data[self.offsets[i]:self.offsets[i + 1]]


@functools.cache
def gpu_decode_available(device: torch.device) -> bool:
    """Whether torchvision's nvJPEG decoder works on *device* (it is optional in builds)."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, "JPEG")
    try:
        _decode([torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)], device)
    except RuntimeError:
        return False
    return True


def supports(preprocess: Preprocess) -> bool:
    """Whether the backbone's resize can run on tensors (PIL-only filters such as lanczos cannot)."""
    return preprocess.interpolation in _TENSOR_MODES


def decode_resized(jpegs: JpegBatch, preprocess: Preprocess, device: torch.device
                   ) -> tuple[torch.Tensor, list[int]]:
    """Decode, orient, resize the shorter side and centre-crop *jpegs* on *device*.

    Returns float images in 0..255, ``(n_ok, 3, H, W)``, and the positions in *jpegs* they
    come from; a file the decoder rejects is left out (the caller retries it on the CPU).
    """
    out, kept = [], []
    pixels = [w * h for w, h in jpegs.sizes]
    for part in _by_pixels(list(range(len(jpegs))), pixels.__getitem__, DECODE_PIXELS):
        by_shape: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
        for i, image in zip(part, _decode_each_on_failure([jpegs.file(i) for i in part], device),
                            strict=True):
            if image is not None:
                image = orient(image, jpegs.orientations[i])
                by_shape.setdefault(tuple(image.shape), []).append((i, image))
        for group in by_shape.values():  # same-size photos resize together
            for batch in _by_pixels(group, lambda item: pixels[item[0]], RESIZE_PIXELS):
                out.append(resize_crop(torch.stack([image for _, image in batch]), preprocess))
                kept += [i for i, _ in batch]
    if not out:
        return torch.empty(0, 3, *preprocess.input_size, device=device), []
    return torch.cat(out), kept


def resize_crop(images: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """uint8 ``(n, 3, h, w)`` to float, shorter side to ``resize_size``, centre crop: as on the CPU path."""
    x = TF.resize(images.float(), preprocess.resize_size,
                  interpolation=InterpolationMode(preprocess.interpolation), antialias=True)
    return TF.center_crop(x, list(preprocess.input_size)).clamp_(0, 255)


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation (1-8) to a ``(C, H, W)`` tensor, as ``ImageOps.exif_transpose``."""
    flips = {2: (-1,), 3: (-1, -2), 4: (-2,), 7: (-1, -2)}
    if orientation in (5, 7):
        image = image.transpose(-1, -2)
    elif orientation in (6, 8):
        return torch.rot90(image, 1 if orientation == 8 else -1, dims=(-2, -1))
    return image.flip(flips[orientation]) if orientation in flips else image


def _decode(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29+ flags its image decoders as deprecated
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def _decode_each_on_failure(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Decode as one batch; if the batch fails, decode one by one so only the bad files are lost."""
    try:
        return _decode(data, device)
    except RuntimeError:
        out = []
        for item in data:
            try:
                out.append(_decode([item], device)[0])
            except RuntimeError:
                out.append(None)
        return out


def _by_pixels(items: list, pixels, budget: int) -> list[list]:
    """Split *items* into runs whose summed ``pixels(item)`` stays within *budget*."""
    parts, current, total = [], [], 0
    for item in items:
        n = pixels(item)
        if current and total + n > budget:
            parts.append(current)
            current, total = [], 0
        current.append(item)
        total += n
    return parts + [current] if current else parts
