"""xferkit: repurpose a pretrained CNN for your own image classes."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("xferkit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
