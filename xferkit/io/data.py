"""Find labelled images on disk: an ImageFolder tree, a train/val/test tree, or a CSV of path,label."""

from __future__ import annotations

import codecs
import csv
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from xferkit.core.errors import XferkitError

SPLIT_NAMES = ("train", "val", "test")
#: How much of a file is read to tell a CSV from an image or another binary file.
SNIFF_BYTES = 64 * 1024
#: How many offending line numbers an error message lists.
LINES_LISTED = 5


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

    A file path instead of a folder is read as a CSV of path,label (a folder named ``x.csv`` is a folder).
    """
    root = _existing(root)
    if root.is_file():
        return read_csv(root, min_classes)
    if not root.is_dir():
        raise XferkitError(f"{root} is neither a folder nor a regular file (a FIFO, socket or device?); "
                           "pass a folder of class folders or a CSV of path,label.")
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
    """Read a UTF-8 CSV (BOM or not) of ``path,label`` rows; relative paths are taken from the CSV's folder.

    Listed files are not opened here: a missing one is skipped and counted later, like an unreadable image.
    """
    path = _existing(path)
    _refuse_non_csv(path)
    rows = _csv_rows(path)
    if rows and [c.strip().lower() for c in rows[0][1][:2]] == ["path", "label"]:
        rows = rows[1:]
    broken = [line for line, row in rows if any("\n" in c or "\r" in c for c in row[:2])]
    if broken:
        raise XferkitError(f"{path} {_lines(broken)}: a line break inside a quoted path or label; "
                           "put each image on one line.")
    bad = [line for line, row in rows if len(row) < 2 or not row[0].strip() or not row[1].strip()]
    if bad:
        raise XferkitError(f"{path} {_lines(bad)}: not of the form path,label "
                           "(a path and a non-empty label, separated by a comma).")
    if not rows:
        raise XferkitError(f"{path} lists no images. Each row should be path,label.")
    classes = sorted({row[1].strip() for _, row in rows})
    position = {name: i for i, name in enumerate(classes)}
    paths = [Path(row[0].strip()) for _, row in rows]
    paths = [p if p.is_absolute() else path.parent / p for p in paths]
    labels = np.array([position[row[1].strip()] for _, row in rows], dtype=np.int64)
    return _checked(LabelledImages(paths, labels, classes), path, min_classes)


def _refuse_non_csv(path: Path) -> None:
    """Refuse a file whose first non-empty line is not text with a comma, naming an image as one."""
    if not path.is_file():
        raise XferkitError(f"{path} is not a file; a CSV of path,label was expected.")
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES).removeprefix(codecs.BOM_UTF8)
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise XferkitError(f"{path} is UTF-16 text; save the CSV as UTF-8.")
    first_line = next((line for line in head.splitlines() if line.strip()), None)
    if first_line is None or b"," in first_line and all(b >= 0x20 or b == 0x09 for b in first_line):
        return
    if _is_image(path):
        raise XferkitError(f"{path} is an image, not a folder of class folders or a CSV of path,label; "
                           f"to label images use `xferkit predict MODEL {path}`.")
    raise XferkitError(f"{path} is neither a folder of class folders nor a CSV of path,label "
                       "(UTF-8 text whose first line holds a comma).")


def _is_image(path: Path) -> bool:
    """Whether PIL recognises the file's header as an image format (nothing is decoded)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path):
                return True
    except Image.DecompressionBombError:
        return True
    except (OSError, ValueError, SyntaxError):
        return False


def _csv_rows(path: Path) -> list[tuple[int, list[str]]]:
    """Non-blank rows of a UTF-8 CSV with the line each starts on; other encodings and NULs are refused."""
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise XferkitError(f"{path} line {line} is not UTF-8 text; save the CSV as UTF-8.") from None
    with_nul = [n for n, line in enumerate(io.StringIO(text, newline=""), 1) if "\0" in line]
    if with_nul:
        raise XferkitError(f"{path} {_lines(with_nul)}: a NUL byte, which no path can hold; "
                           "save the CSV as UTF-8 text.")
    reader = csv.reader(io.StringIO(text, newline=""))
    rows, start = [], 1
    for row in reader:
        if len(row) > 1 or "".join(row).strip():
            rows.append((start, row))
        start = reader.line_num + 1
    return rows


def _lines(numbers: list[int]) -> str:
    """``line 3`` or ``lines 3, 7, ... (and 4 more)``: the first few line numbers, for an error message."""
    if len(numbers) == 1:
        return f"line {numbers[0]}"
    more = f" (and {len(numbers) - LINES_LISTED} more)" if len(numbers) > LINES_LISTED else ""
    return f"lines {', '.join(map(str, numbers[:LINES_LISTED]))}{more}"


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
    """Files as given; folders expanded to the visible regular files below them, sorted.

    A FIFO, socket or device named explicitly stays in the list: decoding skips it, and counts it.
    """
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
