"""Decode, resize and centre-crop JPEGs in one NVIDIA DALI pipeline, for the GPU's hardware JPEG decoder.

On CUDA, DALI's ``mixed`` decoder hands part of every batch to the NVJPG engines of A100/H100-class
GPUs (torchvision's nvJPEG path leaves them idle); on a CPU the same pipeline runs libjpeg-turbo.
The resize reads only the crop's source box, as ``preprocess.resized_centre`` does with PIL, so
each image comes out as the backbone's uint8 ``(3, H, W)`` input, EXIF orientation applied.
"""

from __future__ import annotations

import functools
import importlib

import numpy as np
import torch

from xferkit.core.errors import XferkitError
from xferkit.io.images import centre_box
from xferkit.io.jpeg_device import DECODE_PIXELS, JpegBatch, by_budget

#: Preprocess interpolations and the DALI interpolation type that matches each (antialiased).
INTERPOLATIONS = {"bilinear": "INTERP_LINEAR", "bicubic": "INTERP_CUBIC"}
#: Share of each batch the mixed decoder sends to the hardware JPEG decoder (DALI's own default;
#: still to be tuned on an A100/H100 against the CPU threads given to the pipeline).
HW_DECODER_LOAD = 0.65
INSTALL_HINT = "pip install 'xferkit[dali]'"


@functools.cache
def dali_available() -> bool:
    """Whether NVIDIA DALI imports here (it is an optional extra)."""
    try:
        importlib.import_module("nvidia.dali")
    except (ImportError, OSError):
        return False
    return True


def require_dali() -> None:
    """One clear error where DALI is missing."""
    if not dali_available():
        raise XferkitError(f"decode='dali' needs NVIDIA DALI, which is not installed: run "
                           f"{INSTALL_HINT} (CUDA 12 wheels), or use decode='auto'.")


def dali_supports(resize_size: int, crop: tuple[int, int], interpolation: str) -> bool:
    """Whether the pipeline reproduces this recipe: a DALI interpolation, and a crop that never pads."""
    return interpolation in INTERPOLATIONS and max(crop) <= resize_size


def upright_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """``(width, height)`` once the EXIF *orientation* is applied (5-8 swap the sides)."""
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size


class DaliDecoder:
    """Turns a :class:`JpegBatch` into uint8 ``(n, 3, H, W)`` inputs on *device* with one DALI pipeline.

    The pipeline is built on first use, in the thread that runs it. A file DALI rejects (or whose
    decoded size disagrees with its header) is reported back, never dropped or misplaced.
    """

    def __init__(self, device: torch.device, resize_size: int, crop: tuple[int, int], interpolation: str,
                 max_batch: int, threads: int):
        require_dali()
        if not dali_supports(resize_size, crop, interpolation):
            raise XferkitError(f"DALI cannot reproduce a {interpolation} resize to {resize_size} with a "
                               f"{crop} crop; use decode='workers'.")
        self.device, self.resize_size, self.crop = device, resize_size, crop
        self.interpolation, self.max_batch, self.threads = interpolation, max_batch, max(1, threads)
        self._pipe = None

    def decode(self, jpegs: JpegBatch) -> tuple[list[int], torch.Tensor | None, list[int]]:
        """``(positions decoded, their images, positions rejected)``, positions into *jpegs*."""
        runs = by_budget(list(range(len(jpegs))), jpegs.pixels, DECODE_PIXELS)
        runs = [r[i:i + self.max_batch] for r in runs for i in range(0, len(r), self.max_batch)]
        positions, images = _joined([self._decoded(jpegs, run) for run in runs])
        done = set(positions)
        return positions, images, [k for k in range(len(jpegs)) if k not in done]

    def _decoded(self, jpegs: JpegBatch, run: list[int]) -> tuple[list[int], torch.Tensor | None]:
        """:meth:`_run`, or where DALI fails the whole run, each file alone: only bad files are lost."""
        try:
            return self._run(jpegs, run)
        except RuntimeError:
            return _joined([self._decoded(jpegs, [k]) for k in run]) if len(run) > 1 else ([], None)

    def _run(self, jpegs: JpegBatch, run: list[int]) -> tuple[list[int], torch.Tensor | None]:
        """Positions of *run* that decoded as their headers said, and their images."""
        sizes = [upright_size(jpegs.sizes[k], jpegs.orientations[k]) for k in run]
        boxes = [centre_box(size, self.resize_size, self.crop) for size in sizes]
        feed = {"jpegs": [jpegs.file(k).numpy() for k in run],
                "roi_start": [np.array([top, left], np.float32) for left, top, _, _ in boxes],
                "roi_end": [np.array([bottom, right], np.float32) for _, _, right, bottom in boxes]}
        try:
            images, shapes = self._pipeline().run(**feed)
        except RuntimeError:
            self._pipe = None  # DALI marks a pipeline that raised as no longer valid
            raise
        good = [tuple(s[:2]) == (h, w) for s, (w, h) in zip(shapes.as_array(), sizes, strict=True)]
        out = _to_torch(images, self.device)
        done = [k for k, ok in zip(run, good, strict=True) if ok]
        if len(done) < len(run):  # decoded, but not the image its header described: PIL decides
            out = out[torch.tensor(good, device=self.device)]
        return done, out if done else None

    def _pipeline(self):
        if self._pipe is None:
            self._pipe = _build(self.device, self.crop, self.interpolation, self.max_batch, self.threads)
        return self._pipe


def _build(device: torch.device, crop: tuple[int, int], interpolation: str, max_batch: int, threads: int):
    """decode (EXIF orientation applied) -> resize of the crop's box -> CHW; plus the decoded shapes."""
    dali = importlib.import_module("nvidia.dali")
    fn, types = dali.fn, dali.types
    cuda = device.type == "cuda"
    device_id = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
    pipe = dali.Pipeline(batch_size=max_batch, num_threads=threads, device_id=device_id,
                         prefetch_queue_depth=1)
    with pipe:
        data = fn.external_source(name="jpegs", dtype=types.UINT8)
        start = fn.external_source(name="roi_start", dtype=types.FLOAT)
        end = fn.external_source(name="roi_end", dtype=types.FLOAT)
        extra = {"hw_decoder_load": HW_DECODER_LOAD} if cuda else {}
        image = fn.decoders.image(data, device="mixed" if cuda else "cpu", output_type=types.RGB,
                                  adjust_orientation=True, **extra)
        resized = fn.resize(image, size=list(crop), roi_start=start, roi_end=end, antialias=True,
                            interp_type=getattr(types, INTERPOLATIONS[interpolation]))
        pipe.set_outputs(fn.transpose(resized, perm=[2, 0, 1]), image.shape())
    pipe.build()
    return pipe


def _joined(parts: list[tuple[list[int], torch.Tensor | None]]) -> tuple[list[int], torch.Tensor | None]:
    images = [out for _, out in parts if out is not None]
    return [k for done, _ in parts for k in done], torch.cat(images) if images else None


def _to_torch(images, device: torch.device) -> torch.Tensor:
    """Copy a dense DALI batch into a new torch tensor on *device* (on torch's stream there)."""
    feed_ndarray = importlib.import_module("nvidia.dali.plugin.pytorch").feed_ndarray
    images = images.as_tensor()
    out = torch.empty(images.shape(), dtype=torch.uint8, device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    return feed_ndarray(images, out, cuda_stream=stream)
