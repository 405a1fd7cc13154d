"""Every image mode becomes RGB, EXIF orientation is applied, bad files raise UnreadableImage."""

import numpy as np
import pytest
from PIL import Image, ImageOps

from xferkit.io.images import UnreadableImage, load_rgb


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "I;16", "LA", "1"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    path = tmp_path / f"img.{'tiff' if mode in ('CMYK', 'I;16') else 'png'}"
    img = Image.new(mode, (20, 10))
    img.save(path)
    out = load_rgb(path)
    assert out.mode == "RGB" and out.size == (20, 10)


def test_sixteen_bit_keeps_its_contrast(tmp_path):
    arr = np.zeros((8, 8), dtype=np.uint16)
    arr[:, 4:] = 4000  # a 12-bit-style image: a plain convert would clip it to white
    Image.fromarray(arr).save(tmp_path / "deep.png")
    out = np.asarray(load_rgb(tmp_path / "deep.png"))
    assert out[0, 0, 0] == 0 and out[0, 7, 0] == 255


def test_palette_transparency_is_white(tmp_path):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0] * 256)
    img.info["transparency"] = 0
    img.save(tmp_path / "p.png", transparency=0)
    assert load_rgb(tmp_path / "p.png").getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_rgb(tmp_path / "rot.jpg").size == (20, 40)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_when_decoding_at_reduced_size(tmp_path, orientation):
    rng = np.random.default_rng(orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    pixels = rng.integers(0, 256, (15, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels).resize((640, 480), Image.BICUBIC).save(tmp_path / "o.jpg", quality=95,
                                                                   exif=exif)
    out = load_rgb(tmp_path / "o.jpg", min_size=200)  # draft mode: the DCT decodes it at half size
    upright = ImageOps.exif_transpose(Image.open(tmp_path / "o.jpg")).convert("RGB")
    assert out.size == (upright.width // 2, upright.height // 2)
    expected = np.asarray(upright.resize(out.size, Image.BOX), dtype=np.int16)
    assert np.abs(np.asarray(out, dtype=np.int16) - expected).mean() < 3  # of 255; turned wrong: ~65


def test_draft_mode_keeps_shorter_side_at_least_min_size(tmp_path):
    Image.new("RGB", (1600, 1200), (10, 20, 30)).save(tmp_path / "big.jpg")
    out = load_rgb(tmp_path / "big.jpg", min_size=256)
    assert min(out.size) >= 256 and out.size[0] < 1600


@pytest.mark.parametrize("content", [b"", b"not an image at all", None])
def test_bad_files_raise_unreadable(tmp_path, content):
    path = tmp_path / "bad.jpg"
    if content is None:  # a truncated JPEG
        Image.new("RGB", (64, 64), (1, 2, 3)).save(path)
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(content)
    with pytest.raises(UnreadableImage):
        load_rgb(path)
