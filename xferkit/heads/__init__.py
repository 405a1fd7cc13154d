"""Feature heads: scikit-learn classifiers on backbone features, registered by the name a user picks.

Importing this package imports no head: ``FEATURE_HEADS`` says where each one lives, and
``FeatureHead``, ``LogisticHead``, ``GPHead`` and ``BNNHead`` are imported on first use
(``GPHead`` brings gpytorch in, ``LogisticHead`` does not).
"""

from __future__ import annotations

from xferkit.core.lazy import lazy_getattr

#: head name -> "module:Class"; a new feature head is one module plus one line here.
FEATURE_HEADS = {
    "lr": "xferkit.heads.lr:LogisticHead",
    "gp": "xferkit.heads.gp:GPHead",
    "bnn": "xferkit.heads.bnn:BNNHead",
    "laplace": "xferkit.heads.laplace:LaplaceHead",
}

_LAZY_EXPORTS = {"FeatureHead": "xferkit.heads.base:FeatureHead",
                 **{target.split(":")[1]: target for target in FEATURE_HEADS.values()}}

__getattr__ = lazy_getattr(__name__, _LAZY_EXPORTS)


__all__ = ["FEATURE_HEADS", *_LAZY_EXPORTS]
