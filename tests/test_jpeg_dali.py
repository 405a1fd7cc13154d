"""The DALI decode path: same pixels and features as PIL, EXIF orientation, rejects, overlap, missing DALI.

DALI pipelines run on the CPU too (libjpeg-turbo in place of the GPU decoder), so everything but
the ``mixed`` (hardware) decoder is checked here; the test marked ``gpu`` repeats it on CUDA.
"""

import sys
import threading

import numpy as np
import pytest
import torch
from conftest import TINY_BACKBONE
from test_gpu_decode import _mixed_folder, _photo
from torchvision.transforms.functional import pil_to_tensor

from xferkit.backbones import create_backbone
from xferkit.core.errors import XferkitError
from xferkit.features import extract as extract_module
from xferkit.features import extract_features
from xferkit.features import loader as loader_module
from xferkit.io import jpeg_dali
from xferkit.io.images import JpegFile, load_rgb, read_jpeg
from xferkit.io.jpeg_device import JpegBatch
from xferkit.preprocess import Preprocess, image_to_tensor, resized_centre

needs_dali = pytest.mark.skipif(not jpeg_dali.dali_available(),
                                reason="NVIDIA DALI is not installed (pip install 'xferkit[dali]')")
#: Largest mean absolute difference (of 255) from PIL decoding the whole image: measured 0.06-0.22,
#: both resample the same source box and differ by rounding only (max 1 per pixel).
PIXEL_BOUND = 0.5
#: A JPEG DALI refuses (a start-of-image marker, then nothing it can parse).
GARBAGE = b"\xff\xd8garbage\xff\xd9"


def _preprocess(interpolation="bilinear"):
    return Preprocess((224, 224), interpolation, (0.5,) * 3, (0.5,) * 3, 0.875)


def _decoder(preprocess, max_batch=8):
    return jpeg_dali.DaliDecoder(torch.device("cpu"), preprocess.resize_size, preprocess.input_size,
                                 preprocess.interpolation, max_batch=max_batch, threads=1)


def _pil_full(path, preprocess):
    """PIL decoding the whole image (no draft), resized and cropped as xferkit does."""
    return pil_to_tensor(resized_centre(load_rgb(path), preprocess)).float()


@needs_dali
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_dali_matches_pil_and_turns_exif_rotated_photos_upright(tmp_path, interpolation):
    preprocess = _preprocess(interpolation)
    paths = [_photo(tmp_path / "photo.jpg", size=(500, 375)),
             _photo(tmp_path / "rot6.jpg", size=(500, 375), orientation=6, seed=1),
             _photo(tmp_path / "rot8.jpg", size=(500, 375), orientation=8, seed=2),
             _photo(tmp_path / "large.jpg", size=(3000, 2000), seed=3),
             _photo(tmp_path / "tall.jpg", size=(240, 700), orientation=3, seed=4)]
    positions, images, rejected = _decoder(preprocess).decode(JpegBatch.of([read_jpeg(p) for p in paths]))
    assert positions == list(range(len(paths))) and rejected == []
    assert images.dtype == torch.uint8 and images.shape == (len(paths), 3, 224, 224)
    for path, image in zip(paths, images.float(), strict=True):
        assert (image - _pil_full(path, preprocess)).abs().mean() < PIXEL_BOUND, path.name
    for k in (0, 1, 2, 4):  # small enough that PIL's draft mode decodes them whole too
        assert (images[k].float() - image_to_tensor(paths[k], preprocess).float()).abs().mean() < PIXEL_BOUND
    sideways = torch.rot90(images[1], 1, dims=(-2, -1)).float()  # what ignoring orientation 6 would give
    assert (sideways - _pil_full(paths[1], preprocess)).abs().mean() > 10 * PIXEL_BOUND


@needs_dali
def test_rejected_files_are_reported_and_the_others_keep_their_places(tmp_path):
    preprocess = _preprocess()
    paths = [_photo(tmp_path / f"{i}.jpg", size=(300, 200), seed=i) for i in range(4)]
    files = [read_jpeg(p) for p in paths]
    wrong_size = JpegFile(files[3].data, (200, 300), 1)  # header and pixels disagree: not trusted
    batch = JpegBatch.of([files[0], JpegFile(GARBAGE, (300, 200), 1), files[1], wrong_size, files[2]])
    positions, images, rejected = _decoder(preprocess).decode(batch)
    assert positions == [0, 2, 4] and rejected == [1, 3]
    for path, image in zip(paths[:3], images.float(), strict=True):
        assert (image - _pil_full(path, preprocess)).abs().mean() < PIXEL_BOUND


@needs_dali
def test_runs_are_split_to_the_batch_size(tmp_path):
    preprocess = _preprocess()
    paths = [_photo(tmp_path / f"{i}.jpg", size=(260, 260), seed=i) for i in range(5)]
    batch = JpegBatch.of([read_jpeg(p) for p in paths])
    positions, images, _ = _decoder(preprocess, max_batch=2).decode(batch)
    assert positions == list(range(5))
    for path, image in zip(paths, images.float(), strict=True):
        assert (image - _pil_full(path, preprocess)).abs().mean() < PIXEL_BOUND


@needs_dali
def test_dali_extraction_matches_the_workers_and_falls_back_to_pil(tmp_path, monkeypatch):
    paths = _mixed_folder(tmp_path)  # orientations 1-8, a PNG, a corrupt and an empty file
    refused = paths[2]
    real_read = loader_module.read_jpeg
    monkeypatch.setattr(loader_module, "read_jpeg",  # DALI refuses these bytes; PIL decodes the real file
                        lambda path: JpegFile(GARBAGE, (128, 90), 1) if path == refused else real_read(path))
    backbone = create_backbone(TINY_BACKBONE, pretrained=False)
    options = {"device": "cpu", "cache": False, "workers": 0, "batch_size": 4}
    workers = extract_features(backbone, paths, decode="workers", **options)
    dali = extract_features(backbone, paths, decode="dali", **options)
    np.testing.assert_array_equal(workers.kept, dali.kept)
    assert [p for p, _ in workers.skipped] == [p for p, _ in dali.skipped]
    assert "empty.jpg" in {p.name for p, _ in dali.skipped} and paths.index(refused) in dali.kept
    scale = np.abs(workers.features).mean()
    assert np.abs(workers.features - dali.features).max() < 0.05 * scale


@needs_dali
def test_the_cache_tells_dali_features_apart(tmp_path):
    backbone = create_backbone(TINY_BACKBONE, pretrained=False)
    cpu = torch.device("cpu")
    keys = [extract_module.extractor_key(backbone, cpu, w)["decode"] for w in ("cpu", "device", "dali")]
    assert keys[2] == "dali" and len(set(keys)) == 3
    paths = [_photo(tmp_path / f"{i}.jpg", size=(120, 90), seed=i) for i in range(3)]
    cache = tmp_path / "cache"
    assert extract_features(backbone, paths, decode="workers", workers=0, cache=cache).from_cache == 0
    assert extract_features(backbone, paths, decode="dali", workers=0, cache=cache).from_cache == 0
    assert extract_features(backbone, paths, decode="dali", workers=0, cache=cache).from_cache == 3


def test_the_next_chunk_decodes_while_this_one_is_used():
    started = {k: threading.Event() for k in range(4)}

    def decode(chunk):
        started[chunk].set()
        return [chunk]

    for chunk, parts in extract_module._ahead(iter(range(4)), decode):
        assert parts == [chunk]
        if chunk < 3:  # handed out only once its successor is under way
            assert started[chunk + 1].wait(5)


def test_decode_dali_without_dali_names_the_install(monkeypatch, image_folder):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import nvidia.dali now raises ImportError
    jpeg_dali.dali_available.cache_clear()
    try:
        backbone = create_backbone(TINY_BACKBONE, pretrained=False)
        with pytest.raises(XferkitError, match=r"pip install 'xferkit\[dali\]'"):
            extract_features(backbone, sorted(image_folder.rglob("*.png")), decode="dali", cache=False)
        cuda = torch.device("cuda")  # never touched: without DALI, auto falls back before any pipeline
        assert extract_module._dali_decoder("auto", cuda, backbone.preprocess, 8, 1) is None
    finally:
        jpeg_dali.dali_available.cache_clear()


@needs_dali
def test_auto_prefers_dali_on_cuda_only():
    preprocess = create_backbone(TINY_BACKBONE, pretrained=False).preprocess
    cuda = torch.device("cuda")  # the pipeline is built on first decode, so no GPU is needed here
    assert isinstance(extract_module._dali_decoder("auto", cuda, preprocess, 8, 1), jpeg_dali.DaliDecoder)
    assert extract_module._dali_decoder("auto", torch.device("cpu"), preprocess, 8, 1) is None
    lanczos = Preprocess((224, 224), "lanczos", (0.5,) * 3, (0.5,) * 3, 0.875)
    assert extract_module._dali_decoder("auto", cuda, lanczos, 8, 1) is None
    with pytest.raises(XferkitError, match="decode='workers'"):
        extract_module._dali_decoder("dali", cuda, lanczos, 8, 1)


@needs_dali
@pytest.mark.gpu
def test_hardware_decoder_matches_pil(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    preprocess = _preprocess()
    paths = [_photo(tmp_path / f"{o}.jpg", size=(500, 375), orientation=o, seed=o) for o in (1, 6, 8)]
    decoder = jpeg_dali.DaliDecoder(torch.device("cuda"), preprocess.resize_size, preprocess.input_size,
                                    preprocess.interpolation, max_batch=8, threads=2)
    positions, images, _ = decoder.decode(JpegBatch.of([read_jpeg(p) for p in paths]))
    assert positions == [0, 1, 2] and images.is_cuda
    for path, image in zip(paths, images.float().cpu(), strict=True):
        assert (image - _pil_full(path, preprocess)).abs().mean() < 2.0  # nvJPEG's IDCT rounds differently
