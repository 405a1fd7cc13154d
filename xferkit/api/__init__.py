"""The library behind each command: repurpose, evaluate, predict, extract, compare and tune.

Every function takes keyword options, reports progress through a ``reporter`` (silent by
default) and returns a result with ``to_json()``. Import-light: modules load on first use.
"""

from xferkit.core.lazy import lazy_getattr

_EXPORTS = {
    "repurpose": "xferkit.api.fitting:repurpose",
    "RepurposeResult": "xferkit.api.fitting:RepurposeResult",
    "evaluate": "xferkit.api.evaluation:evaluate",
    "Evaluation": "xferkit.api.evaluation:Evaluation",
    "predict": "xferkit.api.evaluation:predict",
    "PredictionResult": "xferkit.api.evaluation:PredictionResult",
    "extract": "xferkit.api.extraction:extract",
    "ExtractResult": "xferkit.api.extraction:ExtractResult",
    "compare": "xferkit.api.comparison:compare",
    "Comparison": "xferkit.api.comparison:Comparison",
    "tune": "xferkit.api.tuning:tune",
    "TuneResult": "xferkit.api.tuning:TuneResult",
    "export": "xferkit.api.exporting:export",
    "ExportResult": "xferkit.api.exporting:ExportResult",
    "cache_info": "xferkit.api.housekeeping:cache_info",
    "cache_verify": "xferkit.api.housekeeping:cache_verify",
    "cache_clear": "xferkit.api.housekeeping:cache_clear",
    "BackboneOptions": "xferkit.model.options:BackboneOptions",
    "ExtractOptions": "xferkit.model.options:ExtractOptions",
    "SplitOptions": "xferkit.model.options:SplitOptions",
}

__all__ = list(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
