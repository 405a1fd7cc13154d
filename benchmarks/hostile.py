"""A catalogue of hostile and damaged inputs, run through the CLI: none may end in a traceback.

    python benchmarks/hostile.py            # every case, a table, and the totals per group

Groups: a damaged feature cache (it must heal: a warning, then the same predictions as a clean
run), outputs that cannot be written (full disk, read-only, names too long, a file where a folder
goes), options out of range, a damaged tune journal, hostile images (a 20000x1 strip, a FIFO).
Damaged model folders have their own catalogue (``benchmarks/damage_models.py``) and CSV input
its tests (``tests/test_csv_input.py``). The test suite runs the same cases
(``tests/test_hostile.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.numpy import save as safetensors_bytes

TINY = ["--backbone", "test_resnet", "--no-pretrained", "--image-size", "32", "--workers", "0"]


@dataclass
class World:
    """A labelled folder, a model fitted on it, its populated feature cache and a scratch folder."""

    root: Path
    data: Path
    model: Path
    cache: Path
    image: Path

    def shards(self) -> list[Path]:
        return sorted(self.cache.glob("*/shard-*.safetensors"))

    def index(self) -> Path:
        return next(self.cache.glob("*/index.json"))


def make_world(root: Path) -> World:
    """Write 3 colour classes of 8 images, repurpose lr on them with a fresh cache."""
    rng = np.random.default_rng(0)
    data = root / "data"
    for name, colour in {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}.items():
        (data / name).mkdir(parents=True)
        for i in range(8):
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(data / name / f"{i}.png")
    world = World(root, data, root / "model", root / "cache", data / "red" / "0.png")
    result = run_cli(["repurpose", data, "-o", world.model, *TINY], world)
    assert result.exit_code == 0, result.output
    return world


@contextlib.contextmanager
def _tmpfs(path: Path, size: str = "2m", read_only: bool = False):
    """A small (or read-only) tmpfs at *path*; raises OSError where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode:
        raise OSError(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def run_cli(args: list, world: World, env: dict | None = None):
    from typer.testing import CliRunner

    from xferkit.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], env={"XFERKIT_CACHE": str(world.cache),
                                                               "HF_HUB_OFFLINE": "1", **(env or {})})


@dataclass
class Case:
    """One hostile input: what to damage, the command to run, and the exit code it must end with."""

    group: str
    name: str
    run: Callable[[World], object]
    code: int = 2
    needs_mount: bool = False


def _predict(world: World) -> list:
    return ["predict", world.model, world.data, "--json"]


# --- the feature cache: damage it, then predict; it must heal (exit 0, same answers) ------------------
def _damage(world: World, how: Callable[[World], None]):
    """Predict, damage the cache, predict again: the second answers must be the first ones."""
    clean = run_cli(_predict(world), world)
    how(world)
    healed = run_cli(_predict(world), world)
    if healed.exit_code == 0:
        before, after = (json.loads(r.stdout)["predictions"] for r in (clean, healed))
        assert [p["top_k"] for p in after] == [p["top_k"] for p in before], "the healed cache differs"
    return healed


def _truncate(w: World):
    shard = w.shards()[0]
    shard.write_bytes(shard.read_bytes()[:100])


def _garble(w: World):
    shard = w.shards()[0]
    data = bytearray(shard.read_bytes())
    data[-200:-100] = bytes(100)
    shard.write_bytes(bytes(data))


def _rewrite_shard(w: World, features: np.ndarray, keys: list | None = None, checksum: str | None = None):
    from safetensors import safe_open

    shard = w.shards()[0]
    with safe_open(shard, framework="numpy") as f:
        meta = dict(f.metadata())
    if keys is not None:
        meta["keys"] = json.dumps(keys)
    if checksum is not None:
        meta["checksum"] = checksum
    shard.write_bytes(safetensors_bytes({"features": features}, meta))


def _nan_values(w: World):
    from xferkit.features.cache import _checksum

    table = np.full((24, 96), np.nan, dtype=np.float32)
    _rewrite_shard(w, table, checksum=_checksum(table))


def _other_width(w: World):
    from xferkit.features.cache import _checksum

    table = np.ones((24, 7), dtype=np.float32)
    _rewrite_shard(w, table, checksum=_checksum(table))


def _swapped_keys(w: World):
    from safetensors import safe_open

    with safe_open(w.shards()[0], framework="numpy") as f:
        keys = json.loads(f.metadata()["keys"])
    index = json.loads(w.index().read_text())
    index["shards"][w.shards()[0].name] = keys[::-1]
    w.index().write_text(json.dumps(index))


CACHE_DAMAGE = {
    "truncated shard": _truncate,
    "garbled shard": _garble,
    "NaN values (valid checksum)": _nan_values,
    "shard of another width": _other_width,
    "empty shard": lambda w: w.shards()[0].write_bytes(b""),
    "pickle in place of a shard": lambda w: w.shards()[0].write_bytes(pickle.dumps({"features": [1, 2]})),
    "index: wrong JSON type": lambda w: w.index().write_text("[1, 2, 3]"),
    "index: garbage bytes": lambda w: w.index().write_bytes(b"\x00\xff garbage"),
    "index: rows of a shard swapped": _swapped_keys,
    "index: shard name with ../": lambda w: w.index().write_text(json.dumps(
        {"shards": {"../../model/model.json": ["x"], "shard-../x.safetensors": ["y"]}})),
    "index: keys of the wrong type": lambda w: w.index().write_text(json.dumps(
        {"shards": {w.shards()[0].name: [1, None, {"a": 2}]}})),
    "extractor.json garbage": lambda w: next(w.cache.glob("*/extractor.json")).write_bytes(b"\xff\xfe"),
    "a stray file among the shards": lambda w: (w.shards()[0].parent / "shard-z.safetensors").write_text("x"),
}


# --- outputs that cannot be written ---------------------------------------------------------------
def _on_full_disk(world: World, args: Callable[[Path], list], code: int = 2):
    with _tmpfs(world.root / "full") as disk:
        _fill(disk / "filler")
        result = run_cli(args(disk), world)
        leftovers = [p.name for p in disk.rglob("*") if p.name != "filler" and ".tmp" in p.name]
        assert not leftovers, leftovers
    return result


def _fill(path: Path) -> None:
    """Write *path* until its disk is full."""
    with contextlib.suppress(OSError), open(path, "wb") as f:
        while True:
            f.write(b"\0" * 4096)
            f.flush()


def _read_only(world: World, args: Callable[[Path], list]):
    with _tmpfs(world.root / "ro", read_only=True) as disk:
        return run_cli(args(disk), world)


def _full_cache(world: World):
    """A cache on a full disk: the run goes on without it, with a warning."""
    with _tmpfs(world.root / "fullcache", size="200k") as disk:
        _fill(disk / "filler")
        result = run_cli(["predict", world.model, world.data, "--json"], world,
                         env={"XFERKIT_CACHE": str(disk)})
        assert "going on without caching" in result.stderr.lower(), result.stderr
    return result


LONG = "x" * 300
OUTPUTS = [
    Case("outputs", "repurpose -o on a full disk",
         lambda w: _on_full_disk(w, lambda d: ["repurpose", w.data, "-o", d / "m", *TINY]), needs_mount=True),
    Case("outputs", "predict --csv on a full disk", lambda w: _on_full_disk(
        w, lambda d: ["predict", w.model, w.data, "--csv", d / "p.csv"]), needs_mount=True),
    Case("outputs", "evaluate --plots on a full disk", lambda w: _on_full_disk(
        w, lambda d: ["evaluate", w.model, w.data, "--plots", d / "plots"]), needs_mount=True),
    Case("outputs", "extract -o on a full disk", lambda w: _on_full_disk(
        w, lambda d: ["extract", w.data, "-o", d / "f.safetensors", *TINY]), needs_mount=True),
    Case("outputs", "compare -o on a full disk", lambda w: _on_full_disk(
        w, lambda d: ["compare", w.data, "-o", d / "cmp", "--heads", "lr", *TINY]), needs_mount=True),
    Case("outputs", "feature cache on a full disk", _full_cache, code=0, needs_mount=True),
    Case("outputs", "repurpose -o read-only", lambda w: _read_only(
        w, lambda d: ["repurpose", w.data, "-o", d / "m", *TINY]), needs_mount=True),
    Case("outputs", "predict --csv read-only", lambda w: _read_only(
        w, lambda d: ["predict", w.model, w.data, "--csv", d / "p.csv"]), needs_mount=True),
    Case("outputs", "repurpose -o name too long", lambda w: run_cli(
        ["repurpose", w.data, "-o", w.root / LONG, *TINY], w)),
    Case("outputs", "predict --csv name too long", lambda w: run_cli(
        ["predict", w.model, w.image, "--csv", w.root / f"{LONG}.csv"], w)),
    Case("outputs", "evaluate --plots is a file", lambda w: run_cli(
        ["evaluate", w.model, w.data, "--plots", w.image], w)),
    Case("outputs", "repurpose -o is a file", lambda w: run_cli(
        ["repurpose", w.data, "-o", w.image, "--force", *TINY], w)),
    Case("outputs", "repurpose -o DATA --force", lambda w: run_cli(
        ["repurpose", w.data, "-o", w.data, "--force", *TINY], w)),
    Case("outputs", "repurpose -o the models' parent --force", lambda w: run_cli(
        ["repurpose", w.data, "-o", w.root, "--force", *TINY], w)),
    Case("outputs", "compare -o DATA --force", lambda w: run_cli(
        ["compare", w.data, "-o", w.data, "--force", "--heads", "lr", *TINY], w)),
    Case("outputs", "tune -o DATA", lambda w: run_cli(
        ["tune", w.data, "-o", w.data, "--trials", "1", *TINY], w)),
    Case("outputs", "extract -o over an image --force", lambda w: run_cli(
        ["extract", w.data, "-o", w.image, "--force", *TINY], w)),
    Case("outputs", "predict --csv over an image", lambda w: run_cli(
        ["predict", w.model, w.image, "--csv", w.image], w)),
]

# --- options out of range ---------------------------------------------------------------------------
def _with_option(world: World, extra: list[str]):
    command = (["predict", world.model, world.image] if extra[0] == "--top-k"
               else ["repurpose", world.data, "-o", world.root / "o", *TINY])
    return run_cli([*command, *extra], world)


OPTIONS = [Case("options", " ".join(extra), lambda w, extra=extra: _with_option(w, extra)) for extra in (
    ["--seed", "-1"], ["--batch-size", "0"], ["--batch-size", "10000000"], ["--image-size", "0"],
    ["--image-size", "100000"], ["--val-split", "1.5"], ["--workers", "-1"], ["--device", "tpu"],
    ["--set", "C=-1"], ["--set", "C=abc"], ["--set", "max_iter=0"], ["--head", "bnn", "--hidden", "-1"],
    ["--head", "bnn", "--hidden", "1000000000"], ["--head", "bnn", "--mc-samples", "0"],
    ["--head", "bnn", "--mc-samples", "100000000"], ["--head", "gp", "--inducing", "0"],
    ["--head", "gp", "--gp-dim", "100000"], ["--head", "gp", "--set", "method=laplace"],
    ["--head", "finetune", "--epochs", "0"], ["--head", "finetune", "--unfreeze", "two"],
    ["--head", "finetune", "--set", "random_freeze=2"], ["--head", "scratch", "--set", "dropout=1"],
    ["--top-k", "0"])]


# --- the tune journal ---------------------------------------------------------------------------------
def _tune_with_journal(world: World, damage: Callable[[Path], None]):
    out = world.root / "tuned"
    first = run_cli(["tune", world.data, "-o", out, "--trials", "1", *TINY], world)
    assert first.exit_code == 0, first.output
    damage(out / "trials.journal")
    return run_cli(["tune", world.data, "-o", out, "--trials", "2", *TINY], world)


JOURNAL = [
    Case("tune journal", "torn last record", lambda w: _tune_with_journal(
        w, lambda j: j.write_bytes(j.read_bytes()[:-9])), code=0),
    Case("tune journal", "garbage", lambda w: _tune_with_journal(
        w, lambda j: j.write_bytes(b"\xff\x00 x\n"))),
    Case("tune journal", "JSON of the wrong shape", lambda w: _tune_with_journal(
        w, lambda j: j.write_text('{"op_code": 99}\n[1, 2]\n'))),
]


# --- hostile images ---------------------------------------------------------------------------------
def _strip(world: World, size: tuple[int, int]):
    path = world.root / f"strip-{size[0]}x{size[1]}.png"
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return run_cli(["predict", world.model, path, "--json"], world)


def _fifo(world: World):
    path = world.root / "fifo.png"
    os.mkfifo(path)
    result = run_cli(["predict", world.model, path, world.image, "--json"], world)
    assert json.loads(result.stdout)["skipped"][0]["path"] == str(path), result.stdout
    return result


IMAGES = [
    Case("images", "20000x1 strip", lambda w: _strip(w, (20000, 1)), code=0),
    Case("images", "1x100000 strip", lambda w: _strip(w, (1, 100000)), code=0),
    Case("images", "a FIFO among the images", _fifo, code=0),
]

CASES = ([Case("cache", name, lambda w, d=d: _damage(w, d), code=0) for name, d in CACHE_DAMAGE.items()]
         + OUTPUTS + OPTIONS + JOURNAL + IMAGES)


def run_case(case: Case, root: Path, world_template: World):
    """Run *case* on a fresh copy of the world; (exit code, traceback?, stderr)."""
    shutil.copytree(world_template.root, root, symlinks=True)
    world = World(root, root / "data", root / "model", root / "cache", root / "data" / "red" / "0.png")
    result = case.run(world)
    traceback = "Traceback" in result.output or (result.exception is not None
                                                 and not isinstance(result.exception, SystemExit))
    return result.exit_code, traceback, result.stderr or ""


def _said(stderr: str) -> str:
    """The error line (or the last line) of *stderr*, unwrapped."""
    text = " ".join(stderr.split())
    return text[text.find("error:"):] if "error:" in text else text[-100:]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--group", help="only this group")
    args = parser.parse_args(argv)
    totals: dict[str, list[int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        template = make_world(Path(tmp) / "template")
        for i, case in enumerate(c for c in CASES if not args.group or c.group == args.group):
            try:
                code, traceback, stderr = run_case(case, Path(tmp) / f"case{i}", template)
            except OSError as err:  # no tmpfs here: the case cannot be staged
                print(f"| {case.group} | {case.name} | skipped: {err} |")
                continue
            runs, tracebacks, wrong = totals.setdefault(case.group, [0, 0, 0])
            totals[case.group] = [runs + 1, tracebacks + traceback, wrong + (code != case.code)]
            print(f"| {case.group} | {case.name} | exit {code} (want {case.code}) | "
                  f"{'TRACEBACK' if traceback else 'no traceback'} | {_said(stderr)[:100]} |", flush=True)
    print("\n| group | runs | tracebacks | unexpected exit codes |\n| --- | ---: | ---: | ---: |")
    for group, (runs, tracebacks, wrong) in totals.items():
        print(f"| {group} | {runs} | {tracebacks} | {wrong} |")
    return totals


if __name__ == "__main__":
    sys.exit(1 if any(t[1] or t[2] for t in main().values()) else 0)
