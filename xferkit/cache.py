"""On-disk feature cache: one folder per extractor, shards of safetensors plus a JSON index.

An entry is keyed by the file's resolved path, size and modification time, so an edited or
replaced image is extracted again; files that failed to decode are remembered too.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from xferkit.artifacts import atomic_write_bytes


def default_cache_dir() -> Path:
    """``$XFERKIT_CACHE``, else ``~/.cache/xferkit`` (``$XDG_CACHE_HOME`` honoured)."""
    if os.environ.get("XFERKIT_CACHE"):
        return Path(os.environ["XFERKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "xferkit"


def file_key(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


class FeatureCache:
    """Features of one extractor (backbone + weights + layer + preprocessing) for many files."""

    def __init__(self, root: Path, extractor: dict):
        key = hashlib.sha256(json.dumps(extractor, sort_keys=True).encode()).hexdigest()[:32]
        self.folder = Path(root) / key
        self._index_path = self.folder / "index.json"

    def _index(self) -> dict:
        if not self._index_path.is_file():
            return {"features": {}, "failed": {}}
        try:
            return json.loads(self._index_path.read_text())
        except (OSError, ValueError):  # a damaged index costs a re-extraction, nothing more
            return {"features": {}, "failed": {}}

    def lookup(self, keys: list[str]) -> tuple[dict[int, np.ndarray], dict[int, str]]:
        """Cached feature rows and remembered failures, by position in *keys*."""
        index = self._index()
        found, failed, by_shard = {}, {}, {}
        for i, key in enumerate(keys):
            if key in index["features"]:
                shard, row = index["features"][key]
                by_shard.setdefault(shard, []).append((i, row))
            elif key in index["failed"]:
                failed[i] = index["failed"][key]
        for shard, rows in by_shard.items():
            try:
                table = load_file(self.folder / shard)["features"]
            except (OSError, ValueError, KeyError):
                continue  # a missing shard is a cache miss
            found.update({i: table[row] for i, row in rows})
        return found, failed

    def store(self, keys: list[str], features: np.ndarray, failures: dict[str, str]) -> None:
        """Add a shard with *features* (one row per key) and the files that failed."""
        self.folder.mkdir(parents=True, exist_ok=True)
        index = self._index()
        if len(keys):
            shard = f"shard-{uuid.uuid4().hex[:12]}.safetensors"
            tmp = self.folder / f".{shard}.tmp"
            save_file({"features": np.ascontiguousarray(features, dtype=np.float32)}, tmp)
            os.replace(tmp, self.folder / shard)
            index["features"].update({key: [shard, row] for row, key in enumerate(keys)})
        index["failed"].update(failures)
        atomic_write_bytes(self._index_path, json.dumps(index).encode())
