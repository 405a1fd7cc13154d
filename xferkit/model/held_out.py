"""What held-out predictions leave a model for prediction time: conformal scores and an OOD detector.

Both are kept as sorted held-out scores, so the coverage of a prediction set and the false-alarm
rate of an OOD flag are chosen when predicting. The held-out predictions come from the validation
split, or (a model refitted on train + validation) from K-fold cross-fitting: each image predicted
by a head fitted on the other folds. The class means behind the ``distance`` score are saved in
``ood.safetensors``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from safetensors.numpy import save as safetensors_bytes

from xferkit.core.conformal import aps_scores, finite_sample_quantile, prediction_sets
from xferkit.core.errors import XferkitError
from xferkit.core.ood import ClassMeans, ood_threshold
from xferkit.core.saved import blame, read_safetensors, require

#: The OOD score each head flags by: of the scores that flag points far from the training data (a
#: synthetic check: softmax scores of lr and the BNN's mutual information stay confident there), the
#: one with the best mean AUROC over three pairs of offline image sets (docs/uncertainty.md). The GP's
#: predictive entropy grows away from the data (its latent reverts to the prior); the other heads use
#: the distance to the nearest class mean in feature space.
OOD_SCORES = {"gp": "entropy"}
DEFAULT_OOD_SCORE = "distance"
OOD_SCORE_NAMES = ("distance", "variance", "mutual_information", "entropy")
#: Where the class means are saved in a model folder.
CLASS_MEANS = "ood.safetensors"
#: The default false-alarm rate of the OOD flag.
DEFAULT_OOD_RATE = 0.05


@dataclass(frozen=True)
class HeldOut:
    """Sorted held-out APS scores and OOD scores (of the named kind), and where they were predicted."""

    source: str
    conformal_scores: np.ndarray
    ood_score: str
    ood_scores: np.ndarray

    @classmethod
    def of(cls, proba: np.ndarray, y: np.ndarray, uncertainty: dict[str, np.ndarray], head: str,
           source: str) -> HeldOut:
        """The record of held-out calibrated *proba* with labels *y* and the *uncertainty* scores."""
        score = OOD_SCORES.get(head, DEFAULT_OOD_SCORE)
        return cls(source, np.sort(aps_scores(proba, y)), score, np.sort(uncertainty[score]))

    def set_threshold(self, coverage: float) -> float:
        """The APS score threshold of prediction sets that hold the true label with probability *coverage*."""
        return finite_sample_quantile(self.conformal_scores, coverage, f"--coverage {coverage:g}")

    def sets(self, proba: np.ndarray, coverage: float) -> np.ndarray:
        """Boolean ``(n, classes)`` prediction sets covering the true label with probability *coverage*."""
        return prediction_sets(proba, self.set_threshold(coverage))

    def threshold(self, rate: float) -> float:
        """The OOD score above which an image is flagged, for at most *rate* false alarms."""
        return ood_threshold(self.ood_scores, rate)

    def to_json(self) -> dict:
        return {"source": self.source, "n": len(self.conformal_scores),
                "conformal_scores": self.conformal_scores.tolist(), "ood_score": self.ood_score,
                "ood_scores": self.ood_scores.tolist()}

    @classmethod
    def from_json(cls, data: dict) -> HeldOut:
        return cls(data["source"], np.asarray(data["conformal_scores"], dtype=np.float64), data["ood_score"],
                   np.asarray(data["ood_scores"], dtype=np.float64))


def require_held_out(held_out: HeldOut | None, what: str) -> HeldOut:
    """*held_out*, or the error for a model saved without one (before this xferkit, or without validation)."""
    if held_out is None:
        raise XferkitError(f"{what} needs held-out predictions this model did not record (it was saved by an "
                           "older xferkit, fitted without validation images, or is an exported .onnx file, "
                           "which carries probabilities only): use the model folder of a `xferkit repurpose` "
                           "run with --val-split > 0 or a val/ folder.")
    return held_out


def save_class_means(means: ClassMeans, folder: Path) -> None:
    (folder / CLASS_MEANS).write_bytes(safetensors_bytes({"means": means.means, "std": means.std}))


def load_class_means(folder: Path, n_classes: int, n_features: int) -> ClassMeans | None:
    """The class means saved in *folder* (None if there are none), checked against the model's sizes."""
    path = folder / CLASS_MEANS
    if not path.exists():
        return None
    with blame(path):
        arrays = read_safetensors(path, load_file)
        require(sorted(arrays) == ["means", "std"], f"must hold the arrays means and std, not "
                                                    f"{', '.join(sorted(arrays))}")
        means, std = arrays["means"], arrays["std"]
        require(means.shape == (n_classes, n_features) and std.shape == (n_features,)
                and means.dtype == std.dtype == np.float32,
                f"arrays means {means.shape} and std {std.shape} must be float32 of shapes "
                f"({n_classes}, {n_features}) and ({n_features},)")
        require(bool(np.isfinite(means).all() and (std > 0).all() and np.isfinite(std).all()),
                "means must be finite and std positive and finite")
    return ClassMeans(means, std)
