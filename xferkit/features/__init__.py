"""Backbone features of image files: batched extraction, decode workers, and a content-keyed cache."""

from xferkit.features.cache import FeatureCache, default_cache_dir
from xferkit.features.check import readable_images
from xferkit.features.extract import Features, extract_features, refuse_skipped

__all__ = ["FeatureCache", "Features", "default_cache_dir", "extract_features", "readable_images",
           "refuse_skipped"]
