"""A repurposed model: backbone + feature head, or a network trained on pixels; fitted, saved, loaded.

Import-light (the CLI reads the registry and the options without loading torch): the model
classes are imported on first use.
"""

from xferkit.core.lazy import lazy_getattr

_EXPORTS = {
    "TransferModel": "xferkit.model.models:TransferModel",
    "FeatureModel": "xferkit.model.models:FeatureModel",
    "NetworkModel": "xferkit.model.models:NetworkModel",
    "Predictions": "xferkit.model.models:Predictions",
    "fit_model": "xferkit.model.models:fit_model",
    "load_model": "xferkit.model.models:load_model",
    "create_head": "xferkit.model.registry:create_head",
    "head_names": "xferkit.model.registry:head_names",
    "BackboneOptions": "xferkit.model.options:BackboneOptions",
    "ExtractOptions": "xferkit.model.options:ExtractOptions",
}

__all__ = list(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
