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
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as safetensors_bytes

from xferkit.core.reporting import SILENT, Reporter
from xferkit.io.files import atomic_write_bytes

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

    # --- reading -----------------------------------------------------------------------------------
    def lookup(self, keys: list[str | None]) -> dict[int, np.ndarray]:
        """Cached feature rows by position in *keys*; damaged shards are dropped (and re-extracted)."""
        wanted: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            if key is not None:
                wanted.setdefault(key, []).append(i)
        if not wanted or not self.folder.is_dir():
            return {}
        found: dict[int, np.ndarray] = {}
        for shard, shard_keys in self.shards().items():
            rows = [(row, key) for row, key in enumerate(shard_keys) if key in wanted]
            if not rows:
                continue
            table = self.read_shard(shard, shard_keys)
            if table is None:
                continue
            for row, key in rows:
                for i in wanted.pop(key, ()):
                    found[i] = table[row]
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
        except SHARD_ERRORS:  # any unreadable header means a damaged shard
            self._drop(name, "unreadable header")
            return None
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            self._drop(name, "malformed key list")
            return None
        return keys

    def read_shard(self, name: str, keys: list[str]) -> np.ndarray | None:
        """The shard's rows if they pass every check (shape, type, finite, checksum), else ``None``."""
        try:
            with safe_open(self.folder / name, framework="numpy") as f:
                meta = f.metadata() or {}
                table = f.get_tensor("features")
        except SHARD_ERRORS:  # truncated, garbled, missing: all mean "extract again"
            self._drop(name, "unreadable")
            return None
        expected = (len(keys), self.width)
        problem = (
            "not float32" if table.dtype != np.float32 else
            f"shape {table.shape}, expected {expected}" if table.shape != expected else
            "keys differ from the index" if json.loads(meta.get("keys", "null")) != keys else
            "checksum mismatch" if meta.get("checksum") != _checksum(table) else
            "non-finite values" if not np.isfinite(table).all() else None)
        if problem:
            self._drop(name, problem)
            return None
        return table

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
                description = json.dumps(self.extractor, indent=2).encode()
                atomic_write_bytes(self.folder / "extractor.json", description)
            atomic_write_bytes(self.folder / f"shard-{uuid.uuid4().hex}.safetensors",
                               safetensors_bytes({"features": features}, meta))
        except OSError as err:
            self.writable = False
            self.reporter.warn(f"feature cache: cannot write to {self.folder} ({err.strerror or err}); "
                               "going on without caching")

    def _write_index(self, shards: dict[str, list[str]]) -> None:
        """Best effort: the index only saves reading shard headers next time."""
        if not self.writable:
            return
        try:
            atomic_write_bytes(self.folder / "index.json", json.dumps({"shards": shards}).encode())
        except OSError:
            pass
