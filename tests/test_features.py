"""Feature extraction: order kept, bad files skipped and counted, the cache avoids the backbone."""

import os

import numpy as np
import pytest
from conftest import TINY_BACKBONE

from xferkit.backbones import create_backbone
from xferkit.errors import XferkitError
from xferkit.features import extract_features


@pytest.fixture
def backbone():
    return create_backbone(TINY_BACKBONE, pretrained=False)


def _count_forward_calls(backbone) -> list:
    calls = []
    backbone.model.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    return calls


def test_rows_follow_input_order_and_batches_do_not_matter(backbone, image_folder):
    paths = sorted(image_folder.rglob("*.png"))
    one_batch = extract_features(backbone, paths, batch_size=64, cache_dir=False, progress=False)
    small = extract_features(backbone, paths, batch_size=4, cache_dir=False, progress=False)
    single = extract_features(backbone, paths[5:6], cache_dir=False, progress=False)
    assert one_batch.features.shape == (30, backbone.num_features)
    np.testing.assert_allclose(one_batch.features, small.features, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(one_batch.features[5], single.features[0], rtol=1e-4, atol=1e-5)


def test_unreadable_files_are_skipped_and_listed(backbone, image_folder):
    (image_folder / "red" / "empty.png").write_bytes(b"")
    (image_folder / "red" / "notes.txt").write_text("hello")
    paths = sorted(image_folder.rglob("*"))
    paths = [p for p in paths if p.is_file()]
    feats = extract_features(backbone, paths, cache_dir=False, progress=False)
    assert sorted(p.name for p, _ in feats.skipped) == ["empty.png", "notes.txt"]
    assert len(feats.kept) == len(paths) - 2 == len(feats.features)
    with pytest.raises(XferkitError, match="cannot read .*drop --strict"):
        extract_features(backbone, paths, cache_dir=False, progress=False, strict=True)


def test_second_run_hits_the_cache_without_running_the_backbone(backbone, image_folder, tmp_path):
    paths = sorted(image_folder.rglob("*.png"))
    calls = _count_forward_calls(backbone)
    first = extract_features(backbone, paths, cache_dir=tmp_path / "c", progress=False)
    assert sum(calls) == 30
    second = extract_features(backbone, paths, cache_dir=tmp_path / "c", progress=False)
    assert sum(calls) == 30  # no new forward call
    np.testing.assert_array_equal(first.features, second.features)


def test_changed_file_and_new_file_are_extracted_again(backbone, image_folder, tmp_path):
    paths = sorted(image_folder.rglob("*.png"))
    calls = _count_forward_calls(backbone)
    extract_features(backbone, paths[:20], cache_dir=tmp_path / "c", progress=False)
    stat = paths[0].stat()
    os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    extract_features(backbone, paths[:21], cache_dir=tmp_path / "c", progress=False)
    assert sum(calls) == 20 + 2  # the touched file and the new one


def test_cache_is_keyed_by_weights(image_folder, tmp_path):
    paths = sorted(image_folder.rglob("*.png"))[:4]
    a = create_backbone(TINY_BACKBONE, pretrained=False)
    b = create_backbone(TINY_BACKBONE, pretrained=False, layer="layer2")
    fa = extract_features(a, paths, cache_dir=tmp_path / "c", progress=False)
    fb = extract_features(b, paths, cache_dir=tmp_path / "c", progress=False)
    assert fa.features.shape[1] != fb.features.shape[1]
