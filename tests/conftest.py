"""Shared fixtures: tiny generated image folders and an isolated cache for every test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

#: A tiny timm architecture (random init in tests): fast enough for the default suite.
TINY_BACKBONE = "test_resnet"
COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path_factory, monkeypatch):
    """Each test gets its own feature cache and never touches the network or the real caches.

    huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when it is imported, so its constants are
    set too (a subprocess test checks the environment variables themselves).
    """
    from huggingface_hub import constants

    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("XFERKIT_CACHE", str(home / "xferkit-cache"))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(home / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def write_image_folder(root: Path, per_class: int, seed: int = 0, size: int = 32,
                       fmt: str = "png") -> Path:
    """Write one folder per colour class of noisy, easily separable images."""
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise = rng.normal(0, 25, (size, size, 3))
            pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.{fmt}")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """A 3-class folder: 10 images a class."""
    return write_image_folder(tmp_path / "data", per_class=10)


@pytest.fixture
def split_folder(tmp_path) -> Path:
    """train/ and test/ folders of the same 3 classes."""
    write_image_folder(tmp_path / "splits" / "train", per_class=10, seed=1)
    write_image_folder(tmp_path / "splits" / "test", per_class=5, seed=2)
    return tmp_path / "splits"


def separable_features(n_per_class: int = 40, dim: int = 16, n_classes: int = 3, seed: int = 0,
                       spread: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs around well-separated centres: any sane head should classify them."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 4, (n_classes, dim))
    y = np.repeat(np.arange(n_classes), n_per_class)
    X = centres[y] + rng.normal(0, spread, (len(y), dim))
    order = rng.permutation(len(y))
    return X[order].astype(np.float32), y[order]


def run_cli(*args, code: int = 0):
    """Invoke the xferkit CLI in-process; assert its exit code and return the click Result."""
    from xferkit.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output + repr(result.exception)
    return result
