"""The CPU fast path for plain JPEGs (simplejpeg + torch resize) gives PIL's pixels, and hands
everything it should not decode to PIL's path."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from xferkit import preprocess as pre
from xferkit.io.images import UnreadableImage, load_rgb
from xferkit.preprocess import Preprocess, image_to_tensor, resized_centre

RECIPE = Preprocess(input_size=(224, 224), interpolation="bilinear", mean=(0.5,) * 3, std=(0.25,) * 3,
                    crop_pct=0.875)


def _photo(path, size, orientation=1, seed=0, **save):
    """A photo-like JPEG: smooth colour fields plus fine noise, so resampling differences show."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    pixels = np.asarray(base, dtype=np.int16) + rng.integers(-20, 21, (size[1], size[0], 3))
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, exif=exif, quality=90, **save)
    return path


def _pil_path(path, recipe=RECIPE):
    return TF.pil_to_tensor(resized_centre(load_rgb(path, min_size=recipe.resize_size), recipe))


def _mean_abs(a, b):
    return (a.float() - b.float()).abs().mean().item()


@pytest.fixture
def fast_path_calls(monkeypatch):
    """How many times the simplejpeg decoder ran."""
    calls = []
    real = pre.decode_scaled
    monkeypatch.setattr(pre, "decode_scaled", lambda *a: calls.append(a) or real(*a))
    return calls


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (2000, 1500), (90, 60)])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_plain_jpegs_match_the_pil_path(tmp_path, fast_path_calls, size, interpolation):
    recipe = Preprocess(RECIPE.input_size, interpolation, RECIPE.mean, RECIPE.std, RECIPE.crop_pct)
    path = _photo(tmp_path / "a.jpg", size)
    ours = image_to_tensor(path, recipe)
    assert fast_path_calls and ours.dtype == torch.uint8 and ours.shape == (3, 224, 224)
    assert _mean_abs(ours, _pil_path(path, recipe)) < 0.1  # of 255


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path, fast_path_calls, orientation):
    path = _photo(tmp_path / "o.jpg", (600, 400), orientation=orientation)
    ours = image_to_tensor(path, RECIPE)
    assert fast_path_calls
    assert _mean_abs(ours, _pil_path(path)) < 0.5  # transposed views resample with other rounding
    if orientation != 1:  # a wrong orientation would differ by far more than resampling does
        assert _mean_abs(ours, _pil_path(_photo(tmp_path / "up.jpg", (600, 400)))) > 5


def test_other_files_take_the_pil_path(tmp_path, fast_path_calls):
    _photo(tmp_path / "progressive.jpg", (300, 200), progressive=True)
    Image.new("L", (300, 200), 90).save(tmp_path / "grey.jpg")
    Image.new("RGB", (300, 200), (1, 2, 3)).save(tmp_path / "x.png")
    _photo(tmp_path / "strip.jpg", (2000, 100))  # resized whole it would be 5120x256 before the crop
    for path in sorted(tmp_path.iterdir()):
        torch.testing.assert_close(image_to_tensor(path, RECIPE), _pil_path(path))
    lanczos = Preprocess(RECIPE.input_size, "lanczos", RECIPE.mean, RECIPE.std, RECIPE.crop_pct)
    image_to_tensor(_photo(tmp_path / "plain.jpg", (300, 200)), lanczos)
    assert not fast_path_calls


def test_damage_inside_a_jpeg_is_left_to_pil(tmp_path, fast_path_calls):
    data = bytearray(_photo(tmp_path / "a.jpg", (400, 300)).read_bytes())
    start = data.index(b"\xff\xda")  # start of scan: wreck the entropy-coded data after it
    data[start + 200:start + 1200] = bytes(range(256)) * 3 + bytes(232)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(bytes(data))
    try:
        expected = _pil_path(bad)
    except UnreadableImage:
        with pytest.raises(UnreadableImage):
            image_to_tensor(bad, RECIPE)
    else:
        torch.testing.assert_close(image_to_tensor(bad, RECIPE), expected)
    assert fast_path_calls  # it was tried, and it failed over
