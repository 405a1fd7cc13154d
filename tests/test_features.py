"""Feature extraction: order kept, bad files skipped and counted, the cache answers only for bytes it saw."""

import multiprocessing
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY_BACKBONE, write_image_folder
from PIL import Image
from safetensors.torch import save_file

from xferkit.backbones import create_backbone
from xferkit.core.errors import XferkitError
from xferkit.features import FeatureCache, extract_features
from xferkit.features import extract as extract_module
from xferkit.features.cache import content_keys
from xferkit.features.extract import extractor_key


@pytest.fixture
def backbone():
    return create_backbone(TINY_BACKBONE, pretrained=False)


def _count_forward_calls(backbone) -> list:
    calls = []
    backbone.model.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    return calls


def test_rows_follow_input_order_and_batches_do_not_matter(backbone, image_folder):
    paths = sorted(image_folder.rglob("*.png"))
    one_batch = extract_features(backbone, paths, batch_size=64, cache=False)
    small = extract_features(backbone, paths, batch_size=4, cache=False)
    single = extract_features(backbone, paths[5:6], cache=False)
    assert one_batch.features.shape == (30, backbone.num_features)
    np.testing.assert_allclose(one_batch.features, small.features, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(one_batch.features[5], single.features[0], rtol=1e-4, atol=1e-5)


def test_unreadable_files_are_skipped_and_listed(backbone, image_folder):
    (image_folder / "red" / "empty.png").write_bytes(b"")
    (image_folder / "red" / "notes.txt").write_text("hello")
    paths = [p for p in sorted(image_folder.rglob("*")) if p.is_file()]
    feats = extract_features(backbone, paths, cache=False)
    assert sorted(p.name for p, _ in feats.skipped) == ["empty.png", "notes.txt"]
    assert len(feats.kept) == len(paths) - 2 == len(feats.features)
    with pytest.raises(XferkitError, match="cannot read .*drop --strict"):
        extract_features(backbone, paths, cache=False, strict=True)


def test_second_run_hits_the_cache_without_running_the_backbone(backbone, image_folder, tmp_path):
    paths = sorted(image_folder.rglob("*.png"))
    calls = _count_forward_calls(backbone)
    first = extract_features(backbone, paths, cache=tmp_path / "c")
    assert sum(calls) == 30 and first.from_cache == 0
    second = extract_features(backbone, paths, cache=tmp_path / "c")
    assert sum(calls) == 30 and second.from_cache == 30  # no new forward call
    np.testing.assert_array_equal(first.features, second.features)


def test_the_cache_answers_for_content_not_for_names_or_times(backbone, tmp_path):
    paths = sorted(write_image_folder(tmp_path / "data", per_class=10, fmt="bmp").rglob("*.bmp"))
    calls = _count_forward_calls(backbone)
    before = extract_features(backbone, paths[:20], cache=tmp_path / "c")
    victim, stat = paths[0], paths[0].stat()
    os.utime(paths[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same bytes: a hit
    other = np.asarray(Image.open(paths[15])).copy()
    other[0, 0] = 255 - other[0, 0]
    Image.fromarray(other).save(victim)  # another picture, same size, its times restored
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert victim.stat().st_size == stat.st_size and victim.stat().st_mtime_ns == stat.st_mtime_ns
    after = extract_features(backbone, paths[:21], cache=tmp_path / "c")
    assert sum(calls) == 20 + 2  # the replaced image and the new one, nothing else
    assert not np.allclose(after.features[0], before.features[0])
    np.testing.assert_array_equal(after.features[1:20], before.features[1:20])


def test_cache_is_keyed_by_the_weights(image_folder, tmp_path):
    """Features of other weights for the same architecture never answer for these weights."""
    paths = sorted(image_folder.rglob("*.png"))[:4]
    torch.manual_seed(5)
    save_file(create_backbone(TINY_BACKBONE, pretrained=False).model.state_dict(), tmp_path / "w.safetensors")
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in
             create_backbone(TINY_BACKBONE, pretrained=False).model.state_dict().items()}
    save_file(state, tmp_path / "other.safetensors")
    a = create_backbone(TINY_BACKBONE, weights=tmp_path / "w.safetensors")
    b = create_backbone(TINY_BACKBONE, weights=tmp_path / "other.safetensors")
    fa = extract_features(a, paths, cache=tmp_path / "c")
    calls = _count_forward_calls(b)
    fb = extract_features(b, paths, cache=tmp_path / "c")
    assert sum(calls) == 4 and fb.from_cache == 0
    assert not np.allclose(fa.features, fb.features)
    assert len(list((tmp_path / "c").iterdir())) == 2  # one folder per extractor


def test_interrupted_extraction_resumes_from_what_was_stored(backbone, tmp_path, monkeypatch):
    paths = sorted(write_image_folder(tmp_path / "data", per_class=20).rglob("*.png"))  # 60 images
    monkeypatch.setattr(extract_module, "STORE_EVERY", 8)
    calls = _count_forward_calls(backbone)

    def interrupt_on_the_fourth_batch(module, args):
        if len(calls) == 4:
            raise KeyboardInterrupt

    handle = backbone.model.register_forward_pre_hook(interrupt_on_the_fourth_batch)
    with pytest.raises(KeyboardInterrupt):
        extract_features(backbone, paths, batch_size=8, workers=0, cache=tmp_path / "c")
    handle.remove()
    done = sum(calls)
    resumed = extract_features(backbone, paths, batch_size=8, workers=0, cache=tmp_path / "c")
    # three batches were done; the last was still on its way back from the backbone, and is done again
    assert resumed.from_cache == 16 and sum(calls) - done == 60 - 16
    np.testing.assert_allclose(resumed.features, extract_features(backbone, paths, cache=False).features,
                               rtol=1e-5, atol=1e-6)


def _extract_in_process(args):
    folder, cache, seed = args
    net = create_backbone(TINY_BACKBONE, pretrained=False)
    paths = sorted(folder.rglob("*.png"))
    rng = np.random.default_rng(seed)
    for part in np.array_split(rng.permutation(len(paths)), 6):  # many small stores, interleaved
        extract_features(net, [paths[i] for i in part], device="cpu", batch_size=8, workers=0, cache=cache)


def test_two_processes_extracting_into_one_cache_lose_nothing(backbone, tmp_path):
    folder = write_image_folder(tmp_path / "data", per_class=20)
    first = write_image_folder(tmp_path / "other", per_class=20, seed=9)
    shutil.copytree(first, folder / "more")  # 120 images: two overlapping halves of work
    cache = tmp_path / "c"
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.map(_extract_in_process, [(folder, cache, 1), (folder, cache, 2)])
    paths = sorted(folder.rglob("*.png"))
    store = FeatureCache(cache, extractor_key(backbone, torch.device("cpu"), "cpu"), backbone.num_features)
    found = store.lookup(content_keys(paths))
    assert len(found) == len(paths) == 120
    calls = _count_forward_calls(backbone)
    assert extract_features(backbone, paths, device="cpu", cache=cache).from_cache == 120 and sum(calls) == 0


def test_extraction_runs_within_the_thread_budget(backbone, image_folder, monkeypatch):
    from threadpoolctl import threadpool_info

    seen = []
    backbone.model.register_forward_pre_hook(lambda module, args: seen.append(
        (torch.get_num_threads(), {p["user_api"]: p["num_threads"] for p in threadpool_info()})))
    monkeypatch.setenv("XFERKIT_THREADS", "1")
    before = torch.get_num_threads()
    extract_features(backbone, sorted(image_folder.rglob("*.png"))[:4], cache=False, workers=0)
    assert seen and all(n == 1 and pools.get("blas", 1) == 1 for n, pools in seen)
    assert torch.get_num_threads() == before


def test_auto_decode_falls_back_to_the_workers_without_a_device_decoder(backbone, monkeypatch):
    from xferkit.io import jpeg_device

    def no_decoder(data, device):
        raise RuntimeError("torchvision was built without nvJPEG (simulated)")

    monkeypatch.setattr(jpeg_device, "_decode", no_decoder)
    jpeg_device.gpu_decode_available.cache_clear()
    try:
        assert not jpeg_device.gpu_decode_available(torch.device("cpu"))
        cuda = torch.device("cuda")  # never touched: the check is patched, the choice is what is tested
        monkeypatch.setattr(extract_module, "gpu_decode_available", lambda device: False)
        assert extract_module._jpegs_on_device("auto", cuda, backbone.preprocess) == "cpu"
        with pytest.raises(XferkitError, match="decode='workers'"):
            extract_module._jpegs_on_device("device", cuda, backbone.preprocess)
        monkeypatch.setattr(extract_module, "gpu_decode_available", lambda device: True)
        assert extract_module._jpegs_on_device("auto", cuda, backbone.preprocess) == "mixed"
    finally:
        jpeg_device.gpu_decode_available.cache_clear()
