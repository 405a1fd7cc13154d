"""Finding labelled images: folders, splits, CSV, and the clear errors for bad layouts."""

import numpy as np
import pytest
from conftest import write_image_folder

from xferkit.core.errors import XferkitError
from xferkit.io.data import expand_image_paths, load_splits, read_csv, read_image_folder


def test_image_folder_classes_sorted_and_labelled(image_folder):
    data = read_image_folder(image_folder)
    assert data.classes == ["blue", "green", "red"]
    assert len(data) == 30
    assert all(data.paths[i].parent.name == data.classes[data.labels[i]] for i in range(len(data)))


def test_split_is_stratified_and_seeded(image_folder):
    a = load_splits(image_folder, val_split=0.2, seed=3)
    b = load_splits(image_folder, val_split=0.2, seed=3)
    c = load_splits(image_folder, val_split=0.2, seed=4)
    assert np.bincount(a.val.labels).tolist() == [2, 2, 2]
    assert set(a.val.paths).isdisjoint(a.train.paths)
    assert a.val.paths == b.val.paths and a.val.paths != c.val.paths


def test_own_train_test_folders_are_used(split_folder):
    splits = load_splits(split_folder)
    assert len(splits.test) == 15 and len(splits.train) + len(splits.val) == 30
    assert splits.test.classes == splits.train.classes


def test_csv_of_path_and_label(tmp_path, image_folder):
    rows = ["path,label"] + [f"{p},{p.parent.name}" for p in sorted(image_folder.rglob("*.png"))]
    (tmp_path / "list.csv").write_text("\n".join(rows))
    data = read_csv(tmp_path / "list.csv")
    assert data.classes == ["blue", "green", "red"] and len(data) == 30


@pytest.mark.parametrize("layout, message", [
    ("empty_class", "is empty"),
    ("one_class", "only one class"),
    ("no_classes", "no class sub-folders"),
    ("missing", "does not exist"),
])
def test_bad_layouts_are_clear_errors(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout == "empty_class":
        write_image_folder(root, per_class=2)
        (root / "empty").mkdir()
    elif layout == "one_class":
        write_image_folder(root, per_class=2)
        for name in ("green", "blue"):
            for f in (root / name).iterdir():
                f.unlink()
            (root / name).rmdir()
    with pytest.raises(XferkitError, match=message):
        load_splits(root)


def test_test_class_unknown_to_model_is_refused(image_folder):
    data = read_image_folder(image_folder)
    with pytest.raises(XferkitError, match="not known to the model"):
        data.relabel(["blue", "green"])
    relabelled = data.relabel(["red", "green", "blue", "yellow"])
    assert relabelled.classes[relabelled.labels[0]] == data.classes[data.labels[0]]


def test_expand_paths_walks_folders(image_folder):
    assert len(expand_image_paths([image_folder / "red", image_folder / "blue" / "0.png"])) == 11
