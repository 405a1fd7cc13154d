"""The last-layer Laplace head against the LR head on the same features: accuracy, NLL, ECE, fit time.

    PYTHONPATH=. python benchmarks/laplace.py [FEATURES.npz]

FEATURES.npz holds X_train, y_train, X_test, y_test; without it sample_data is extracted with the
pretrained tv:mobilenet_v2 first.

Also checks the Kronecker factorisation the head uses against the exact Gauss-Newton posterior
(too large at 1280 features: it runs on the first ``--pca`` principal components of the features).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy.special import softmax

from xferkit.core.metrics import expected_calibration_error, negative_log_likelihood
from xferkit.heads.laplace import PROBIT, LaplaceHead
from xferkit.heads.lr import LogisticHead

SAMPLE = Path(__file__).parent.parent / "sample_data"


def sample_features() -> dict[str, np.ndarray]:
    """sample_data's train and test features from the pretrained tv:mobilenet_v2, as ``repurpose`` uses."""
    from xferkit.backbones import create_backbone
    from xferkit.features import extract_features
    from xferkit.io.data import read_image_folder

    backbone, arrays = create_backbone("tv:mobilenet_v2"), {}
    for split in ("train", "test"):
        data = read_image_folder(SAMPLE / split)
        features = extract_features(backbone, data.paths, cache=False)
        arrays[f"X_{split}"], arrays[f"y_{split}"] = features.features, np.asarray(data.labels)[features.kept]
    return arrays


def scores(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    return {"accuracy": float((proba.argmax(1) == y).mean()), "nll": negative_log_likelihood(y, proba),
            "ece": expected_calibration_error(y, proba)}


def compare_heads(data: dict[str, np.ndarray]) -> dict[str, dict]:
    """Test scores and fit seconds of lr and of laplace with each link."""
    heads = {"lr": LogisticHead(random_state=0), "laplace probit": LaplaceHead(random_state=0),
             "laplace mc": LaplaceHead(link="mc", random_state=0)}
    rows = {}
    for name, head in heads.items():
        start = time.perf_counter()
        head.fit(data["X_train"], data["y_train"])
        seconds = time.perf_counter() - start
        rows[name] = scores(data["y_test"], head.predict_proba(data["X_test"])) | {"fit_s": round(seconds, 1)}
        if isinstance(head, LaplaceHead):
            rows[name]["prior_precision"] = head.prior_precision_
    return rows


def kron_against_exact(data: dict[str, np.ndarray], components: int) -> dict[str, dict]:
    """Probit test scores of the head's KFAC posterior and of the exact GGN one, same MAP and prior."""
    mean = data["X_train"].mean(0)
    _, _, Vt = np.linalg.svd(data["X_train"] - mean, full_matrices=False)
    X_train, X_test = ((data[key] - mean) @ Vt[:components].T for key in ("X_train", "X_test"))
    head = LaplaceHead(random_state=0).fit(X_train, data["y_train"])
    Phi = np.hstack([head._standardised(X_train), np.ones((len(X_train), 1))])
    p = softmax(Phi @ head.weights_, axis=1)
    k, d1 = p.shape[1], Phi.shape[1]
    lambdas = p[:, :, None] * np.eye(k) - p[:, :, None] * p[:, None, :]
    ggn = np.einsum("ni,nj,nab->iajb", Phi, Phi, lambdas, optimize=True).reshape(d1 * k, d1 * k)
    covariance = np.linalg.inv(ggn + head.prior_precision_ * np.eye(d1 * k)).reshape(d1, k, d1, k)
    Phi_test = np.hstack([head._standardised(X_test), np.ones((len(X_test), 1))])
    logit_cov = np.einsum("ni,iajb,nj->nab", Phi_test, covariance, Phi_test, optimize=True)
    centre = np.eye(k) - 1 / k
    variances = np.einsum("ab,nbc,ca->na", centre, logit_cov, centre)
    exact = softmax(Phi_test @ head.weights_ / np.sqrt(1 + PROBIT * variances), axis=1)
    return {"kfac": scores(data["y_test"], head.predict_proba(X_test)),
            "exact_ggn": scores(data["y_test"], exact),
            "map": scores(data["y_test"], softmax(Phi_test @ head.weights_, axis=1)),
            "full_ggn_gib_at_all_features": (data["X_train"].shape[1] + 1) ** 2 * k ** 2 * 8 / 2 ** 30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("features", nargs="?", type=Path, help="an .npz of X_train, y_train, X_test, y_test")
    parser.add_argument("--pca", type=int, default=64, help="components for the KFAC-against-exact check")
    args = parser.parse_args()
    data = dict(np.load(args.features)) if args.features else sample_features()
    report = {"heads": compare_heads(data), "kron_vs_exact": kron_against_exact(data, args.pca)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
