"""CSV input and paths of the wrong kind: one clear error or a counted skip each, never a traceback."""

import codecs
import contextlib
import io
import os
import signal
import time

import pytest
from conftest import TINY_BACKBONE, run_cli, write_image_folder
from PIL import Image

from xferkit.api import predict, repurpose
from xferkit.core.errors import XferkitError
from xferkit.io.data import expand_image_paths, load_splits, read_csv, read_image_folder
from xferkit.model.options import BackboneOptions, ExtractOptions

TINY = BackboneOptions(TINY_BACKBONE, pretrained=False, image_size=32)
CLI_TINY = ["--backbone", TINY_BACKBONE, "--no-pretrained", "--image-size", "32"]
needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="os.mkfifo is not available")


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging when the body blocks (a FIFO opened for reading would)."""
    def give_up(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, give_up)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def listing(image_folder, header: str = "path,label") -> str:
    """``header`` then one ``path,label`` row per image of *image_folder*."""
    images = sorted(image_folder.rglob("*.png"))
    return "\n".join([header] * bool(header) + [f"{p},{p.parent.name}" for p in images]) + "\n"


@pytest.mark.parametrize("bom", [b"", codecs.BOM_UTF8], ids=["utf8", "utf8-bom"])
@pytest.mark.parametrize("header", ["path,label", " PATH , Label ", ""],
                         ids=["header", "spaced-header", "no-header"])
def test_utf8_csv_with_or_without_bom_and_header_is_read(tmp_path, image_folder, bom, header):
    csv_path = tmp_path / "data.csv"
    csv_path.write_bytes(bom + listing(image_folder, header).encode())
    data = read_image_folder(csv_path)
    assert data.classes == ["blue", "green", "red"] and len(data) == 30
    assert all(p.is_file() for p in data.paths)
    assert [data.classes[y] for y in data.labels] == [p.parent.name for p in data.paths]


@pytest.mark.parametrize("content, message", [
    (b"path,label\na.png,cat\nb.png,dog\ncaf\xe9.png,cat\n",
     "data.csv line 4 is not UTF-8 text; save the CSV as UTF-8"),
    ("path,label\na.png,cat\n".encode("utf-16"), "data.csv is UTF-16 text; save the CSV as UTF-8"),
    (b"path,label\na.png,cat\nb\0.png,dog\nc.png,dog\0\n", "data.csv lines 3, 4: a NUL byte"),
    (b'path,label\na.png,cat\n"b\n.png",dog\nc.png,dog\n',
     "data.csv line 3: a line break inside a quoted path or label"),
    (b"path,label\na.png,cat\nb.png\nc.png,dog\n", "data.csv line 3: not of the form path,label"),
    (b"path,label\na.png,cat\n,dog\nc.png, \n\nd.png,dog\n", "data.csv lines 3, 4: not of the form"),
    (b"a.png,cat\n" + b"x.png\n" * 7, r"data.csv lines 2, 3, 4, 5, 6 \(and 2 more\): not of the form"),
    (b"\xef\xbb\xbfpath,label\n\n", "data.csv lists no images"),
    (b"", "data.csv lists no images"),
])
def test_malformed_csv_is_one_error_naming_file_and_line(tmp_path, content, message):
    (tmp_path / "data.csv").write_bytes(content)
    with pytest.raises(XferkitError, match=message):
        read_image_folder(tmp_path / "data.csv")


def test_listed_file_that_does_not_exist_is_a_counted_skip(tmp_path, image_folder):
    csv_path = tmp_path / "data.csv"
    csv_path.write_text(listing(image_folder) + "gone.png,red\n")
    data = read_csv(csv_path)
    assert tmp_path / "gone.png" in data.paths and len(data) == 31
    result = repurpose(csv_path, backbone=TINY, val_split=0.2)
    assert result.skipped == [(tmp_path / "gone.png", "does not exist")]


@pytest.mark.parametrize("name, write, message", [
    ("photo.png", lambda p: Image.new("RGB", (8, 8)).save(p),
     r"photo.png is an image, not a folder of class folders or a CSV of path,label; "
     r"to label images use `xferkit predict MODEL .*photo.png`"),
    ("labels.csv", lambda p: Image.new("RGB", (8, 8)).save(p, format="JPEG"),
     "labels.csv is an image, not a folder"),
    ("model.safetensors", lambda p: p.write_bytes(b" N\0\0\0\0\0\0" + b'{"w": {"dtype": "F32"}, "b": 1}'),
     "model.safetensors is neither a folder of class folders nor a CSV of path,label"),
    ("paths.txt", lambda p: p.write_text("a.png\nb.png\n"),
     "paths.txt is neither a folder of class folders nor a CSV of path,label"),
])
def test_file_that_is_not_a_csv_is_named_for_what_it_is(tmp_path, name, write, message):
    write(tmp_path / name)
    with pytest.raises(XferkitError, match=message):
        load_splits(tmp_path / name)


@needs_fifo
def test_fifo_where_data_is_expected_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    with deadline(10), pytest.raises(XferkitError, match="pipe is neither a folder nor a regular file"):
        read_image_folder(tmp_path / "pipe")


def test_folder_named_like_a_csv_is_read_as_a_folder(tmp_path):
    root = write_image_folder(tmp_path / "images.csv", per_class=2)
    data = read_image_folder(root)
    assert data.classes == ["blue", "green", "red"] and len(data) == 6


@pytest.mark.parametrize("names", [
    ["[bold]cat", "dog[b]", "\\[red]"],
    ["naïve 猫", "-dash", "100% [red]"],
])
def test_class_folder_names_with_markup_are_kept_verbatim(tmp_path, names):
    for name in names:
        (tmp_path / "data" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "data" / name / "0.png")
    assert read_image_folder(tmp_path / "data").classes == sorted(names)


def test_csv_labels_with_markup_are_kept_verbatim(tmp_path):
    (tmp_path / "data.csv").write_text('path,label\na.png,[/]\nb.png,"[bold], naïve"\nc.png,[/]\n')
    data = read_csv(tmp_path / "data.csv")
    assert data.classes == ["[/]", "[bold], naïve"] and data.labels.tolist() == [0, 1, 0]


@needs_fifo
def test_fifo_given_to_predict_is_skipped_not_waited_on(tmp_path, image_folder):
    model = repurpose(image_folder, backbone=TINY).model
    os.mkfifo(tmp_path / "pipe")
    assert expand_image_paths([tmp_path / "pipe"]) == [tmp_path / "pipe"]
    started = time.perf_counter()
    with deadline(60):
        result = predict(model, [tmp_path / "pipe", image_folder / "red" / "0.png"],
                         options=ExtractOptions(cache=False))
    assert time.perf_counter() - started < 30
    assert [p.path for p in result.predictions] == [image_folder / "red" / "0.png"]
    assert result.skipped == [(tmp_path / "pipe", "not a regular file (a folder, FIFO, socket or device)")]


def png_bytes() -> bytes:
    """A small PNG file's bytes."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("name, content, message", [
    ("data.csv", b"path,label\na.png,caf\xe9\n", "data.csv line 2 is not UTF-8 text"),
    ("data.csv", b"path,label\na\0.png,cat\n", "data.csv line 2: a NUL byte"),
    ("photo.png", png_bytes(), "photo.png is an image"),
], ids=["latin-1", "nul", "image"])
def test_cli_reports_bad_data_in_one_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    result = run_cli("repurpose", tmp_path / name, *CLI_TINY, "-o", tmp_path / "model", code=2)
    assert "Traceback" not in result.output
    assert result.stderr.startswith("error:") and message in result.stderr
    assert not (tmp_path / "model").exists()
