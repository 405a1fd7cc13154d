"""xferkit: repurpose a pretrained CNN for your own image classes."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("xferkit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

from xferkit.heads import create_head  # noqa: E402
from xferkit.model import TransferModel  # noqa: E402
from xferkit.pipeline import (  # noqa: E402
    BackboneOptions,
    ExtractOptions,
    evaluate,
    extract,
    predict,
    repurpose,
)

__all__ = ["BackboneOptions", "ExtractOptions", "TransferModel", "create_head", "evaluate", "extract",
           "predict", "repurpose"]
