"""xferkit: repurpose a pretrained CNN for your own image classes.

The package namespace is lazy: ``import xferkit`` (and the CLI's ``--help``) loads no torch; the
library functions below are imported on first use.
"""

from xferkit.core.lazy import lazy_getattr
from xferkit.core.version import __version__

#: Public name -> module that defines it.
_EXPORTS = {
    "BackboneOptions": "xferkit.model.options:BackboneOptions",
    "ExtractOptions": "xferkit.model.options:ExtractOptions",
    "repurpose": "xferkit.api.fitting:repurpose",
    "evaluate": "xferkit.api.evaluation:evaluate",
    "predict": "xferkit.api.evaluation:predict",
    "extract": "xferkit.api.extraction:extract",
    "compare": "xferkit.api.comparison:compare",
    "tune": "xferkit.api.tuning:tune",
    "load_model": "xferkit.model:load_model",
    "create_head": "xferkit.model:create_head",
    "XferkitError": "xferkit.core.errors:XferkitError",
}

__all__ = ["__version__", *_EXPORTS]


__getattr__ = lazy_getattr(__name__, _EXPORTS)
