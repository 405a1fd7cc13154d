"""Decode plain JPEGs on the CPU with libjpeg-turbo through simplejpeg, at reduced size where it can.

simplejpeg decodes straight into a numpy array from the file's bytes: on 500x375 photos it costs
about two thirds of PIL's CPU time for the same pixels (``benchmarks/decoders.py``), which is what
a CPU extraction's decode worker spends its time on.
"""

from __future__ import annotations

import math

import simplejpeg
import torch

from xferkit.io.images import JpegFile
from xferkit.io.jpeg_device import orient

#: DCT scalings used (as PIL's draft mode): libjpeg-turbo's other M/8 factors have no SIMD code and
#: decode slower than the full image.
SCALES = (1 / 8, 1 / 4, 1 / 2)


def dct_scale(size: tuple[int, int], min_size: int) -> float:
    """The smallest of 1/8, 1/4, 1/2 or 1 at which a JPEG of *size* still has a shorter side of *min_size*."""
    return next((s for s in SCALES if min(size) * s >= min_size), 1.0)


def decode_scaled(jpeg: JpegFile, min_size: int) -> torch.Tensor:
    """A ``(3, H, W)`` uint8 view of *jpeg*, upright, decoded at :func:`dct_scale` of its size.
    Raises ``ValueError`` where libjpeg-turbo fails."""
    w, h = jpeg.size
    scale = dct_scale(jpeg.size, min_size)
    pixels = simplejpeg.decode_jpeg(jpeg.data, colorspace="RGB", min_width=math.ceil(w * scale),
                                    min_height=math.ceil(h * scale))
    return orient(torch.from_numpy(pixels).permute(2, 0, 1), jpeg.orientation)
