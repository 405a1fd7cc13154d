"""lr under torchrun, data-parallel: each rank keeps its own shard of the features, and none gathers them.

Each rank extracts its contiguous shard of the training images and fits
:meth:`LogisticHead.fit_streamed` on those rows with ``sharded=True``: the standardisation moments,
the L-BFGS objective and gradient and the held-out NLL of the C grid are summed over the ranks, so
every rank ends with the head one process fits on all the rows. The class means behind the OOD
distance come from summed per-class sums. Validation images are predicted where they were
extracted and only the small arrays (probabilities and per-image scores, ``n_val x classes``) are
gathered. The other heads (and cross-fitting) keep the gathered path: every rank fits on all rows.
"""

from __future__ import annotations

import numpy as np
import torch

from xferkit.core.distributed import all_gather_objects, all_reduce_sum, world_size
from xferkit.core.ood import ClassMeans
from xferkit.features import Features
from xferkit.heads.base import FeatureHead

#: The heads fitted on each rank's own rows under torchrun.
STREAMED_HEADS = ("lr",)


def streams(head: str, folds: int) -> bool:
    """Whether *head* fits on each rank's own rows: under torchrun, lr, no cross-fitting."""
    return world_size() > 1 and head in STREAMED_HEADS and not folds


def every_label(y: np.ndarray) -> np.ndarray:
    """The distinct labels of every rank's *y*."""
    return np.unique(np.concatenate(all_gather_objects(np.unique(y))))


def shared_class_means(X: np.ndarray, y: np.ndarray, n_classes: int) -> ClassMeans:
    """:meth:`ClassMeans.fit` of every rank's rows *X* (class indices *y*), from sums over the ranks."""
    X = np.asarray(X, dtype=np.float64)
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    sums = np.zeros((n_classes, X.shape[1]))
    np.add.at(sums, y, X)
    first = all_reduce_sum(torch.from_numpy(np.column_stack([sums, counts]))).numpy()
    means = first[:, :-1] / first[:, -1:]
    squares = all_reduce_sum(torch.from_numpy(((X - means[y]) ** 2).sum(axis=0))).numpy()
    return ClassMeans.of(means, np.sqrt(squares / first[:, -1].sum()))


def gathered_predictions(head: FeatureHead, class_means: ClassMeans | None, own: Features
                         ) -> tuple[np.ndarray, dict[str, np.ndarray], Features]:
    """Each rank predicts its own rows *own*; every rank gets all the predictions, in input order.

    What comes back is ``_raw_predictions``'s triple with the OOD ``distance`` among the scores; the
    features themselves stay on their ranks (the returned ``Features`` has no columns).
    """
    proba, scores = np.zeros((0, len(head.classes_))), {}
    if len(own.kept):
        proba = head.predict_proba(own.features)
        scores = {k: v for k, v in head.uncertainty(own.features).items() if k != "entropy"}
        if class_means is not None:
            scores["distance"] = class_means.distance(own.features)
    parts = all_gather_objects((proba, scores, own.kept))
    kept = np.concatenate([part[2] for part in parts])
    keys = dict.fromkeys(key for part in parts for key in part[1])  # a rank with no rows has none
    scores = {key: np.concatenate([part[1][key] for part in parts if key in part[1]]) for key in keys}
    return (np.concatenate([part[0] for part in parts]), scores,
            Features(np.zeros((len(kept), 0), np.float32), kept, own.skipped, own.from_cache))
