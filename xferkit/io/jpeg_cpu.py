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


def decode_scaled(jpeg: JpegFile, min_size: int) -> torch.Tensor:
    """A ``(3, H, W)`` uint8 view of *jpeg*, upright, decoded at the smallest of 1/8, 1/4, 1/2 or full
    size whose shorter side still reaches *min_size*. Raises ``ValueError`` where libjpeg-turbo fails."""
    w, h = jpeg.size
    scale = next((s for s in SCALES if min(w, h) * s >= min_size), 1.0)
    pixels = simplejpeg.decode_jpeg(jpeg.data, colorspace="RGB", min_width=math.ceil(w * scale),
                                    min_height=math.ceil(h * scale))
    return orient(torch.from_numpy(pixels).permute(2, 0, 1), jpeg.orientation)
