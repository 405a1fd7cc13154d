"""Pixel trainers: networks trained on image pixels, fine-tuned from a backbone or from scratch.

Import-light: the registry is plain strings, and the trainers (with torch) load on first use.
"""

from xferkit.core.lazy import lazy_getattr

#: trainer name -> "module:Class"; the saved ``head.json`` records the name, ``load`` dispatches on it.
PIXEL_TRAINERS = {
    "finetune": "xferkit.finetune.finetune:FinetuneClassifier",
    "scratch": "xferkit.finetune.scratch:ScratchClassifier",
}

#: Public name -> "module:Class" that defines it.
_EXPORTS = {
    "PixelClassifier": "xferkit.finetune.base:PixelClassifier",
    **{target.rsplit(":", 1)[1]: target for target in PIXEL_TRAINERS.values()},
}

__all__ = ["PIXEL_TRAINERS", *_EXPORTS]

__getattr__ = lazy_getattr(__name__, _EXPORTS)
