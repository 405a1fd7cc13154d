"""Trust: files written as the umask says, a silent failure to learn made loud, tiny feature scales
learned, an unreachable weights server reported in seconds, the cache command."""

import json
import os
import stat
import time
from pathlib import Path

import pytest
from conftest import TINY_BACKBONE, run_cli, separable_features, write_image_folder

from xferkit.backbones import create_backbone
from xferkit.core.errors import XferkitError
from xferkit.core.reporting import Reporter
from xferkit.io.data import load_splits
from xferkit.model import BackboneOptions, ExtractOptions, fit_model
from xferkit.model.registry import create_head

TINY = ["--backbone", TINY_BACKBONE, "--no-pretrained", "--image-size", "32", "--workers", "0"]


def test_model_folder_and_cache_files_follow_the_umask(image_folder, tmp_path):
    old = os.umask(0o022)
    try:
        run_cli("repurpose", image_folder, "-o", tmp_path / "m", *TINY)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "m" / "model.json").stat().st_mode) == 0o644
    shard = next(Path(os.environ["XFERKIT_CACHE"]).glob("*/shard-*.safetensors"))
    assert stat.S_IMODE(shard.stat().st_mode) == 0o644


@pytest.mark.parametrize("head", ["lr", "bnn", "gp"])
def test_features_of_a_tiny_scale_are_learned(head):
    """A random backbone's features can all be ~1e-9: standardising must not treat them as constant."""
    X, y = separable_features(n_per_class=40, spread=2.0)
    scaled = create_head(head, random_state=0).fit(X[:90] * 1e-9, y[:90])
    assert scaled.score(X[90:] * 1e-9, y[90:]) >= 0.9


class Recorder(Reporter):
    def __init__(self):
        self.warnings = []

    def warn(self, message: str) -> None:
        self.warnings.append(message)


def test_a_head_that_does_not_learn_says_so(tmp_path):
    options = ExtractOptions(workers=0)
    backbone = BackboneOptions(TINY_BACKBONE, pretrained=False, image_size=32)
    colours = load_splits(write_image_folder(tmp_path / "colours", per_class=8), val_split=0.25)
    noise = write_image_folder(tmp_path / "noise", per_class=8)
    for name in ("green", "blue"):  # three classes of the same red noise: nothing to learn
        for i in range(8):
            (noise / name / f"{i}.png").write_bytes((noise / "red" / f"{(i + 3) % 8}.png").read_bytes())
    noise_splits = load_splits(noise, val_split=0.25)
    learned, silent = Recorder(), Recorder()
    fit_model("lr", train=colours.train, val=colours.val, backbone=backbone, options=options,
              reporter=learned)
    fit_model("lr", train=noise_splits.train, val=noise_splits.val, backbone=backbone, options=options,
              reporter=silent)
    assert not learned.warnings
    assert len(silent.warnings) == 1 and "lr head did not learn" in silent.warnings[0]


def test_an_unreachable_weights_server_is_reported_in_seconds(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    start = time.perf_counter()
    with pytest.raises(XferkitError, match="cannot be reached"):
        create_backbone(TINY_BACKBONE)
    assert time.perf_counter() - start < 10


def test_cache_command_shows_verifies_and_clears(image_folder, tmp_path):
    cache = tmp_path / "cache"
    (cache / "not-xferkit").mkdir(parents=True)
    (cache / "not-xferkit" / "keep.txt").write_text("mine")
    run_cli("extract", image_folder, "-o", tmp_path / "f.safetensors", *TINY, "--json")
    run_cli("extract", image_folder, "-o", tmp_path / "g.safetensors", *TINY, "--json")  # the default cache
    info = json.loads(run_cli("cache", "info", "--json").stdout)
    assert info["rows"] == 30 and len(info["folders"]) == 1
    shard = next(Path(info["folders"][0]["folder"]).glob("shard-*"))
    shard.write_bytes(shard.read_bytes()[:50])
    verified = json.loads(run_cli("cache", "verify", "--json").stdout)
    assert verified["checked"] >= 1 and verified["dropped"] == 1
    cleared = json.loads(run_cli("cache", "clear", "--yes", "--json").stdout)
    assert json.loads(run_cli("cache", "info", "--json").stdout)["folders"] == [] and cleared["folders"]
    json.loads(run_cli("cache", "clear", "--yes", "--cache-dir", cache, "--json").stdout)
    assert (cache / "not-xferkit" / "keep.txt").read_text() == "mine"  # not a folder xferkit wrote
