"""Decoding JPEGs on the extraction device: same pixels and features as the worker path, same skips.

torchvision decodes on the CPU as well as with nvJPEG, so the whole device path runs here; the
test marked ``gpu`` repeats the comparison on CUDA.
"""

import numpy as np
import pytest
import torch
from conftest import TINY_BACKBONE
from PIL import Image, ImageOps
from torchvision.transforms import functional as TF

from xferkit.backbones import create_backbone
from xferkit.core.errors import XferkitError
from xferkit.features import extract as extract_module
from xferkit.features import extract_features
from xferkit.features.loader import ExtractionItems
from xferkit.io.images import load_rgb, read_jpeg
from xferkit.io.jpeg_device import JpegBatch, decode_oriented, orient
from xferkit.preprocess import image_to_tensor, resize_crop, resize_decoded, resized_centre


def _photo(path, size=(90, 60), orientation=1, seed=0, **save):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1] // 6, size[0] // 6, 3), dtype=np.uint8)
    img = Image.fromarray(pixels).resize(size, Image.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, exif=exif, quality=92, **save)
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_pillow(tmp_path, orientation):
    path = _photo(tmp_path / "o.jpg", orientation=orientation)
    decoded = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    expected = np.array(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    np.testing.assert_array_equal(orient(decoded, orientation).permute(1, 2, 0).numpy(), expected)


def test_resize_crop_matches_the_pillow_path(tmp_path):
    preprocess = create_backbone(TINY_BACKBONE, pretrained=False).preprocess
    path = _photo(tmp_path / "a.jpg", size=(400, 300))
    pixels = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    ours = resize_crop(pixels[None].float(), preprocess)[0]  # float, as on a GPU
    reference = TF.pil_to_tensor(resized_centre(load_rgb(path), preprocess)).float()
    assert ours.shape == reference.shape
    assert (ours - reference).abs().mean() < 2.0  # of 255: the two resamplers round differently


def test_only_plain_complete_jpegs_are_left_to_the_device(tmp_path):
    assert read_jpeg(_photo(tmp_path / "plain.jpg", orientation=6)).orientation == 6
    assert read_jpeg(_photo(tmp_path / "p.jpg", progressive=True)) is None
    Image.new("L", (20, 20)).save(tmp_path / "grey.jpg")
    Image.new("RGB", (20, 20)).save(tmp_path / "x.png")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(_photo(tmp_path / "whole.jpg").read_bytes()[:-300])
    for name in ("grey.jpg", "x.png", "cut.jpg"):
        assert read_jpeg(tmp_path / name) is None


def _mixed_folder(tmp_path):
    paths = [_photo(tmp_path / f"{o}.jpg", size=(120 + 8 * o, 90), orientation=o, seed=o)
             for o in range(1, 9)]
    Image.new("RGB", (50, 40), (9, 99, 199)).save(tmp_path / "png.png")
    corrupt = tmp_path / "corrupt.jpg"  # a valid header, garbage after it
    data = bytearray(paths[0].read_bytes())
    data[len(data) // 2:-2] = bytes(len(data) // 2 - 2)
    corrupt.write_bytes(bytes(data))
    (tmp_path / "empty.jpg").write_bytes(b"")
    return paths + [tmp_path / "png.png", corrupt, tmp_path / "empty.jpg"]


def _compare_decoders(paths, device: str):
    backbone = create_backbone(TINY_BACKBONE, pretrained=False)
    options = {"device": device, "cache": False, "workers": 0}
    workers = extract_features(backbone, paths, decode="workers", **options)
    on_device = extract_features(backbone, paths, decode="device", **options)
    np.testing.assert_array_equal(workers.kept, on_device.kept)
    assert [p for p, _ in workers.skipped] == [p for p, _ in on_device.skipped]
    if device == "cpu":  # float32 features; on CUDA the backbone runs in bf16 (pixels compared below)
        scale = np.abs(workers.features).mean()
        assert np.abs(workers.features - on_device.features).max() < 0.05 * scale
    return workers


def test_device_decoding_gives_the_same_features_and_skips(tmp_path):
    feats = _compare_decoders(_mixed_folder(tmp_path), "cpu")
    assert "empty.jpg" in {p.name for p, _ in feats.skipped}


def test_unknown_decode_is_an_error(image_folder):
    backbone = create_backbone(TINY_BACKBONE, pretrained=False)
    with pytest.raises(XferkitError, match="unknown decode"):
        extract_features(backbone, sorted(image_folder.rglob("*.png")), decode="gpu", cache=False)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_device_pixels_match_the_workers(tmp_path, device):
    """The device decoder's resized pixels against the workers' (libjpeg-turbo, DCT-scaled where it can)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    preprocess = create_backbone("resnet18", pretrained=False).preprocess
    shapes = [((500, 375), 1), ((375, 500), 6), ((1200, 900), 8), ((640, 480), 3)]
    paths = [_photo(tmp_path / f"{i}.jpg", size, o, seed=i) for i, (size, o) in enumerate(shapes)]
    jpegs = JpegBatch.of([read_jpeg(p) for p in paths])
    decoded = [pair for part in decode_oriented(jpegs, torch.device(device)) for pair in part]
    assert [i for i, _ in decoded] == [0, 1, 2, 3]
    for i, image in decoded:
        _, pixels = resize_decoded([(i, image)], preprocess)
        ours = pixels[0].cpu().float()
        theirs = image_to_tensor(paths[i], preprocess).float()
        assert ours.shape == theirs.shape
        # of 255 (3.0 at most on a CPU): the workers decode DCT-scaled where they can (1200x900 at 1/2),
        # the device decoder whole; nvJPEG adds its own rounding (about 1)
        assert (ours - theirs).abs().mean() < 6.0, (paths[i].name, float((ours - theirs).abs().mean()))
        assert (ours - theirs.flip(-1)).abs().mean() > 30  # a mirrored image would be caught


@pytest.mark.gpu
def test_nvjpeg_decoding_matches_the_workers(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _compare_decoders(_mixed_folder(tmp_path), "cuda")


def test_mixed_leaves_only_full_size_jpegs_to_the_device(tmp_path):
    preprocess = create_backbone("resnet18", pretrained=False).preprocess  # shorter side to 256
    paths = [_photo(tmp_path / f"{name}.jpg", size=size) for name, size in (("small", (500, 375)),
                                                                             ("large", (1200, 900)))]
    for jpegs, left in (("mixed", ["small.jpg"]), ("device", ["small.jpg", "large.jpg"]), ("cpu", [])):
        items = [ExtractionItems(paths, preprocess, jpegs)[i] for i in range(2)]
        assert [paths[i].name for i, _, _, jpeg in items if jpeg is not None] == left
        assert all(image is not None for _, image, _, jpeg in items if jpeg is None)  # decoded by the worker


@pytest.mark.parametrize(("decode", "device", "nvjpeg", "expected"), [
    ("auto", "cuda", True, "mixed"), ("auto", "cuda", False, "cpu"), ("auto", "cpu", True, "cpu"),
    ("device", "cuda", True, "device"), ("device", "cpu", True, "device"), ("workers", "cuda", True, "cpu")])
def test_where_jpegs_decode(monkeypatch, decode, device, nvjpeg, expected):
    monkeypatch.setattr(extract_module, "gpu_decode_available", lambda device: nvjpeg)
    preprocess = create_backbone(TINY_BACKBONE, pretrained=False).preprocess
    assert extract_module._jpegs_on_device(decode, torch.device(device), preprocess) == expected
    backbone, cpu = create_backbone(TINY_BACKBONE, pretrained=False), torch.device("cpu")
    keys = {extract_module.extractor_key(backbone, cpu, j)["decode"] for j in ("cpu", "mixed")}
    assert len(keys) == 2  # the cache tells "mixed" features from the workers' ones
