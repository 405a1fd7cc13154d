"""Find labelled images on disk: an ImageFolder tree, a train/val/test tree, or a CSV of path,label."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xferkit.core.errors import XferkitError

SPLIT_NAMES = ("train", "val", "test")


@dataclass
class LabelledImages:
    """Image paths with integer labels indexing ``classes``."""

    paths: list[Path]
    labels: np.ndarray
    classes: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, index: np.ndarray) -> LabelledImages:
        return LabelledImages([self.paths[i] for i in index], self.labels[index], self.classes)

    def relabel(self, classes: list[str]) -> LabelledImages:
        """Express the labels against another class list (a model's), refusing unknown classes."""
        unknown = sorted(set(self.classes) - set(classes))
        if unknown:
            raise XferkitError(
                f"these classes are not known to the model: {', '.join(unknown)}. "
                f"The model was trained on: {', '.join(classes)}. "
                "Rename or remove those folders, or repurpose a model that includes them."
            )
        position = {name: i for i, name in enumerate(classes)}
        mapping = np.array([position[name] for name in self.classes], dtype=np.int64)
        return LabelledImages(self.paths, mapping[self.labels], list(classes))


@dataclass
class Splits:
    """Train, validation and (optionally) test sets sharing one class list."""

    train: LabelledImages
    val: LabelledImages | None
    test: LabelledImages | None = None
    notes: list[str] = field(default_factory=list)


def _visible(entries) -> list[Path]:
    return sorted(p for p in entries if not p.name.startswith("."))


def read_image_folder(root: str | Path, min_classes: int = 2) -> LabelledImages:
    """Read one sub-folder per class; every visible file in it counts (non-images are skipped later).

    A file path instead of a folder is read as a CSV of path,label.
    """
    root = _existing(root)
    if root.is_file():
        return read_csv(root, min_classes)
    class_dirs = [p for p in _visible(root.iterdir()) if p.is_dir()]
    if not class_dirs:
        raise XferkitError(
            f"{root} has no class sub-folders. Put each class's images in its own folder "
            f"({root}/cat/1.jpg, {root}/dog/2.jpg, ...) or pass a CSV of path,label."
        )
    paths, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        files = [p for p in _visible(class_dir.rglob("*")) if p.is_file()]
        if not files:
            raise XferkitError(
                f"class folder {class_dir} is empty. Add images to it or remove the folder."
            )
        paths += files
        labels += [label] * len(files)
    return _checked(LabelledImages(paths, np.array(labels, dtype=np.int64),
                                   [p.name for p in class_dirs]), root, min_classes)


def read_csv(path: str | Path, min_classes: int = 2) -> LabelledImages:
    """Read a CSV with ``path,label`` columns; relative paths are taken from the CSV's folder."""
    path = _existing(path)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
        rows = rows[1:]
    bad = [i for i, row in enumerate(rows, 1) if len(row) < 2 or not row[0].strip()]
    if bad:
        raise XferkitError(f"{path}: rows {bad[:5]} do not have the form path,label.")
    if not rows:
        raise XferkitError(f"{path} lists no images. Each row should be path,label.")
    classes = sorted({row[1].strip() for row in rows})
    position = {name: i for i, name in enumerate(classes)}
    paths = [Path(row[0].strip()) for row in rows]
    paths = [p if p.is_absolute() else path.parent / p for p in paths]
    labels = np.array([position[row[1].strip()] for row in rows], dtype=np.int64)
    return _checked(LabelledImages(paths, labels, classes), path, min_classes)


def load_splits(root: str | Path, val_split: float = 0.2, seed: int = 0) -> Splits:
    """Use the data's own train/val/test folders if present, else a stratified, seeded split."""
    if not 0.0 <= val_split < 1.0:
        raise XferkitError(f"--val-split must be in [0, 1), got {val_split}.")
    root = _existing(root)
    if root.is_dir() and (root / "train").is_dir():
        train = read_image_folder(root / "train")
        parts = {name: read_image_folder(root / name, min_classes=1).relabel(train.classes)
                 for name in ("val", "test") if (root / name).is_dir()}
        if "val" in parts:
            return Splits(train, parts["val"], parts.get("test"),
                          [f"using the data's own train/val{'/test' if 'test' in parts else ''}"])
        train, val = stratified_split(train, val_split, seed)
        return Splits(train, val, parts.get("test"),
                      [f"validation: {len(val or [])} images split from train/ (seed {seed})"])
    data = read_image_folder(root)
    train, val = stratified_split(data, val_split, seed)
    return Splits(train, val, None,
                  [f"validation: {len(val or [])} images split from the data (seed {seed})"])


def stratified_split(data: LabelledImages, fraction: float, seed: int = 0
                     ) -> tuple[LabelledImages, LabelledImages | None]:
    """Hold out about ``fraction`` of each class (at least one image where a class has two or more)."""
    if fraction == 0:
        return data, None
    rng = np.random.default_rng(seed)
    val_index = []
    for label in range(len(data.classes)):
        members = np.flatnonzero(data.labels == label)
        rng.shuffle(members)
        n_val = min(max(1, round(fraction * len(members))), len(members) - 1)
        val_index += members[:n_val].tolist()
    is_val = np.zeros(len(data), dtype=bool)
    is_val[val_index] = True
    return data.subset(np.flatnonzero(~is_val)), data.subset(np.flatnonzero(is_val))


def expand_image_paths(inputs: list[str | Path]) -> list[Path]:
    """Files as given; folders expanded to the visible files below them, sorted."""
    paths = []
    for item in inputs:
        item = _existing(item)
        paths += [p for p in _visible(item.rglob("*")) if p.is_file()] if item.is_dir() else [item]
    if not paths:
        raise XferkitError(f"no files found in {', '.join(map(str, inputs))}.")
    return paths


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise XferkitError(f"{path} does not exist. Check the path and try again.")
    return path


def _checked(data: LabelledImages, source: Path, min_classes: int) -> LabelledImages:
    if len(data.classes) < min_classes:
        raise XferkitError(
            f"{source} has only one class ({data.classes[0]}); a classifier needs at least two. "
            "Add another class folder."
        )
    return data
