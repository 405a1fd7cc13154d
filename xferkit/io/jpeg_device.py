"""Decode JPEGs on a GPU (nvJPEG through torchvision), for when CPU decoding cannot keep up."""

from __future__ import annotations

import functools
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from xferkit.io.images import JpegFile

#: Pixels decoded at once: bounds GPU memory.
DECODE_PIXELS = 2**27


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

    def pixels(self, i: int) -> int:
        w, h = self.sizes[i]
        return w * h


@functools.cache
def gpu_decode_available(device: torch.device) -> bool:
    """Whether torchvision's JPEG decoder works on *device* (nvJPEG is optional in builds)."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, "JPEG")
    try:
        _decode([torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)], device)
    except RuntimeError:
        return False
    return True


def decode_oriented(jpegs: JpegBatch, device: torch.device
                    ) -> Iterator[list[tuple[int, torch.Tensor | None]]]:
    """Decode *jpegs* on *device* in parts of at most ``DECODE_PIXELS``, EXIF orientation applied.

    Yields lists of ``(position in jpegs, uint8 (3, H, W) image)``; the image is ``None`` where
    the decoder rejected the file (the caller decodes it on the CPU instead).
    """
    for part in by_budget(list(range(len(jpegs))), jpegs.pixels, DECODE_PIXELS):
        images = _decode_each_on_failure([jpegs.file(i) for i in part], device)
        yield [(i, None if image is None else orient(image, jpegs.orientations[i]))
               for i, image in zip(part, images, strict=True)]


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


def by_budget(items: list, cost, budget: int) -> list[list]:
    """Split *items* into runs whose summed ``cost(item)`` stays within *budget*."""
    parts, current, total = [], [], 0
    for item in items:
        n = cost(item)
        if current and total + n > budget:
            parts.append(current)
            current, total = [], 0
        current.append(item)
        total += n
    return parts + [current] if current else parts
