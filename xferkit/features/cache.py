"""On-disk feature cache keyed by file content: immutable, self-describing shards, safe for concurrent writes.

One folder per extractor (backbone name, weights digest, layer, preprocessing, decode path and
precision). Each shard is a safetensors file written once (temporary file, then rename) whose
metadata lists the content key of every row and a checksum of its values, so a shard carries
what is needed to trust it. ``index.json`` only caches the shards' key lists: when it lags behind
(another process added a shard, or two processes rewrote it at once) the missing shards are read
from their own headers. Writers never modify a file another process may be reading, so two
extractions into the same cache at once lose nothing and corrupt nothing, without a lock.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as safetensors_bytes

from xferkit.core.reporting import SILENT, Reporter
from xferkit.io.files import WriteError, atomic_write_bytes

#: Bumped when the layout changes; folders of other formats are never read.
CACHE_FORMAT = 2
SHARD_NAME = re.compile(r"shard-[0-9a-f]{32}\.safetensors")
#: Threads that read and hash files for their content keys (I/O bound; hashlib releases the GIL).
HASH_THREADS = 8
#: What reading a damaged shard raises.
SHARD_ERRORS = (OSError, ValueError, KeyError, TypeError, SafetensorError)


def default_cache_dir() -> Path:
    """``$XFERKIT_CACHE``, else ``~/.cache/xferkit`` (``$XDG_CACHE_HOME`` honoured)."""
    if os.environ.get("XFERKIT_CACHE"):
        return Path(os.environ["XFERKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "xferkit"


def content_key(path: Path) -> str | None:
    """blake2b of the file's bytes (128 bits), or ``None`` where it cannot be read as a regular file."""
    try:
        if not path.is_file():  # a FIFO or a device would block or never end
            return None
        digest = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def content_keys(paths: list[Path]) -> list[str | None]:
    """:func:`content_key` of every path, read by a few threads at once."""
    if len(paths) < 64:
        return [content_key(p) for p in paths]
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        return list(pool.map(content_key, paths, chunksize=16))


def extractor_folder(root: Path, extractor: dict) -> Path:
    """The folder holding the features of one extractor."""
    key = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, **extractor}, sort_keys=True).encode())
    return Path(root) / key.hexdigest()[:32]


def _checksum(features: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(features).tobytes(), digest_size=16).hexdigest()


class FeatureCache:
    """Features of one extractor (backbone, weights, layer, preprocessing, decoding) by file content."""

    def __init__(self, root: Path, extractor: dict, width: int, reporter: Reporter = SILENT):
        self.folder = extractor_folder(root, extractor)
        self.extractor, self.width, self.reporter = extractor, width, reporter
        self.writable = True

    @classmethod
    def at(cls, folder: Path, width: int, reporter: Reporter = SILENT) -> FeatureCache:
        """The cache of the extractor folder *folder* (for housekeeping: info, verify)."""
        cache = cls(folder.parent, {}, width, reporter)
        cache.folder = folder
        return cache

    # --- reading -----------------------------------------------------------------------------------
    def lookup(self, keys: list[str | None]) -> dict[int, np.ndarray]:
        """Cached feature rows by position in *keys*; damaged shards are dropped (and re-extracted).

        The index only says which shards to open; each shard's own header says which row is which.
        """
        wanted: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            if key is not None:
                wanted.setdefault(key, []).append(i)
        if not wanted or not self.folder.is_dir():
            return {}
        found: dict[int, np.ndarray] = {}
        shards = self.shards()
        corrected = dict(shards)
        for shard, shard_keys in shards.items():
            if not any(key in wanted for key in shard_keys):
                continue
            read = self.read_shard(shard)
            if read is None:
                corrected.pop(shard)
                continue
            corrected[shard] = read[0]
            for row, key in enumerate(read[0]):
                for i in wanted.pop(key, ()):
                    found[i] = read[1][row]
        if corrected != shards:  # the index was wrong about a shard: the shards' headers win
            self._write_index(corrected)
        return found

    def shards(self) -> dict[str, list[str]]:
        """Every shard's row keys: from the index where it knows the shard, else from the shard's header."""
        names = sorted(p.name for p in self.folder.glob("shard-*.safetensors")
                       if SHARD_NAME.fullmatch(p.name))
        index = self._read_index()
        known = {name: index[name] for name in names if name in index}
        for name in names:
            if name not in known:
                keys = self._header_keys(name)
                if keys is not None:
                    known[name] = keys
        if set(known) != set(index):
            self._write_index(known)
        return known

    def _read_index(self) -> dict[str, list[str]]:
        try:
            data = json.loads((self.folder / "index.json").read_text())
            shards = data["shards"]
        except (OSError, ValueError, KeyError, TypeError):
            return {}  # missing or damaged: rebuilt from the shards' own headers
        if not isinstance(shards, dict):
            return {}
        return {name: keys for name, keys in shards.items()
                if isinstance(name, str) and SHARD_NAME.fullmatch(name) and isinstance(keys, list)
                and all(isinstance(k, str) for k in keys)}

    def _header_keys(self, name: str) -> list[str] | None:
        try:
            with safe_open(self.folder / name, framework="numpy") as f:
                keys = json.loads((f.metadata() or {})["keys"])
        except SHARD_ERRORS:  # an unreadable header means a damaged shard
            self._drop(name, "unreadable header")
            return None
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            self._drop(name, "malformed key list")
            return None
        return keys

    def read_shard(self, name: str, any_width: bool = False) -> tuple[list[str], np.ndarray] | None:
        """The shard's keys and rows if they pass every check (shape, type, finite, checksum), else None."""
        try:
            with safe_open(self.folder / name, framework="numpy") as f:
                meta = f.metadata() or {}
                table = f.get_tensor("features")
            keys = json.loads(meta["keys"])
        except SHARD_ERRORS:  # truncated, garbled, missing: all mean "extract again"
            self._drop(name, "unreadable")
            return None
        valid_keys = isinstance(keys, list) and all(isinstance(k, str) for k in keys)
        width = table.shape[-1] if any_width else self.width
        expected = (len(keys), width) if valid_keys else None
        problem = (
            "malformed key list" if not valid_keys else
            "not float32" if table.dtype != np.float32 else
            f"shape {table.shape}, expected {expected}" if table.shape != expected else
            "checksum mismatch" if meta.get("checksum") != _checksum(table) else
            "non-finite values" if not np.isfinite(table).all() else None)
        if problem:
            self._drop(name, problem)
            return None
        return keys, table

    def _drop(self, name: str, problem: str) -> None:
        self.reporter.warn(f"feature cache: dropped damaged shard {self.folder / name} ({problem}); "
                           "its images are extracted again")
        try:
            (self.folder / name).unlink(missing_ok=True)
        except OSError:
            pass

    # --- writing -----------------------------------------------------------------------------------
    def store(self, keys: list[str], features: np.ndarray) -> None:
        """Add a shard with *features* (a row per key); a failed write disables the cache, with a warning."""
        if not len(keys) or not self.writable:
            return
        features = np.ascontiguousarray(features, dtype=np.float32)
        meta = {"format": str(CACHE_FORMAT), "keys": json.dumps(keys), "checksum": _checksum(features)}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if not (self.folder / "extractor.json").exists():
                description = json.dumps({**self.extractor, "width": self.width}, indent=2).encode()
                atomic_write_bytes(self.folder / "extractor.json", description)
            atomic_write_bytes(self.folder / f"shard-{uuid.uuid4().hex}.safetensors",
                               safetensors_bytes({"features": features}, meta))
        except (OSError, WriteError) as err:
            self.writable = False
            self.reporter.warn(f"feature cache: {err} Going on without caching.")

    def _write_index(self, shards: dict[str, list[str]]) -> None:
        """Best effort: the index only saves reading shard headers next time."""
        if not self.writable:
            return
        try:
            atomic_write_bytes(self.folder / "index.json", json.dumps({"shards": shards}).encode())
        except WriteError:
            pass


@dataclass
class CacheFolder:
    """One extractor's folder in the cache: what it holds and its size."""

    folder: Path
    extractor: dict | None
    shards: int
    rows: int
    bytes: int

    def to_json(self) -> dict:
        return {"folder": str(self.folder), "extractor": self.extractor, "shards": self.shards,
                "rows": self.rows, "bytes": self.bytes}


def cache_folders(root: Path) -> list[CacheFolder]:
    """The extractor folders xferkit wrote under *root* (anything else there is not looked at)."""
    found = []
    for folder in sorted(Path(root).glob("*")) if Path(root).is_dir() else ():
        if not (folder.is_dir() and re.fullmatch(r"[0-9a-f]{32}", folder.name)):
            continue
        try:
            extractor = json.loads((folder / "extractor.json").read_text())
        except (OSError, ValueError):
            extractor = None
        shards = [p for p in folder.glob("shard-*.safetensors") if SHARD_NAME.fullmatch(p.name)]
        if extractor is None and not shards:
            continue
        rows = sum(len(keys) for keys in FeatureCache.at(folder, 0).shards().values())
        found.append(CacheFolder(folder, extractor, len(shards), rows,
                                 sum(p.stat().st_size for p in folder.iterdir() if p.is_file())))
    return found


def verify_cache(root: Path, reporter: Reporter = SILENT) -> tuple[int, int]:
    """Read and check every shard under *root*; damaged ones are dropped. (shards checked, dropped)."""
    checked = dropped = 0
    for entry in cache_folders(root):
        width = int((entry.extractor or {}).get("width", 0))
        cache = FeatureCache.at(entry.folder, width, reporter)
        for name in cache.shards():
            checked += 1
            dropped += cache.read_shard(name, any_width=not width) is None
    return checked, dropped


def clear_cache(root: Path) -> tuple[int, int]:
    """Delete the extractor folders xferkit wrote under *root*: (folders, bytes) removed."""
    entries = cache_folders(root)
    for entry in entries:
        shutil.rmtree(entry.folder, ignore_errors=True)
    return len(entries), sum(entry.bytes for entry in entries)
