"""Atomic writes: an interrupted save leaves the previous model untouched and no debris."""

import pytest

from xferkit.core.errors import XferkitError
from xferkit.io.files import atomic_folder, atomic_write_bytes


def test_interrupted_folder_write_keeps_the_old_folder(tmp_path):
    target = tmp_path / "model"
    with atomic_folder(target) as tmp:
        (tmp / "model.json").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(target, force=True) as tmp:
        (tmp / "model.json").write_text("half-written")
        raise RuntimeError("killed mid-save")
    assert (target / "model.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_existing_folder_needs_force_and_must_be_a_model(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "notes.txt").write_text("mine")
    with pytest.raises(XferkitError, match="--force"), atomic_folder(tmp_path / "model"):
        pass
    with (pytest.raises(XferkitError, match="not a folder xferkit wrote"),
          atomic_folder(tmp_path / "model", force=True)):
        pass
    assert (tmp_path / "model" / "notes.txt").read_text() == "mine"
    (tmp_path / "model" / "notes.txt").rename(tmp_path / "model" / "model.json")
    with atomic_folder(tmp_path / "model", force=True) as tmp:
        (tmp / "new").write_text("x")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_atomic_file_write_replaces_whole_file(tmp_path):
    atomic_write_bytes(tmp_path / "a.json", b"one")
    atomic_write_bytes(tmp_path / "a.json", b"two")
    assert (tmp_path / "a.json").read_bytes() == b"two" and len(list(tmp_path.iterdir())) == 1
