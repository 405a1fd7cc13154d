"""``cache info | verify | clear``: see, check and empty the feature cache."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from xferkit.core.reporting import SILENT, Reporter
from xferkit.features.cache import CacheFolder, cache_folders, clear_cache, default_cache_dir, verify_cache


@dataclass
class CacheReport:
    """The cache's folders, and what a verify or clear did to them."""

    root: Path
    folders: list[CacheFolder]
    checked: int = 0
    dropped: int = 0
    removed_bytes: int = 0

    def to_json(self) -> dict:
        return {"root": str(self.root), "folders": [f.to_json() for f in self.folders],
                "rows": sum(f.rows for f in self.folders), "bytes": sum(f.bytes for f in self.folders),
                "checked": self.checked, "dropped": self.dropped, "removed_bytes": self.removed_bytes}


def cache_info(root: str | Path | None = None) -> CacheReport:
    """What the cache holds, per extractor (backbone, weights, layer, preprocessing)."""
    root = Path(root) if root else default_cache_dir()
    return CacheReport(root, cache_folders(root))


def cache_verify(root: str | Path | None = None, reporter: Reporter = SILENT) -> CacheReport:
    """Read every shard; damaged ones are dropped (their images are extracted again when next needed)."""
    root = Path(root) if root else default_cache_dir()
    checked, dropped = verify_cache(root, reporter)
    return CacheReport(root, cache_folders(root), checked, dropped)


def cache_clear(root: str | Path | None = None) -> CacheReport:
    """Delete the extractor folders xferkit wrote in the cache (nothing else in that folder)."""
    root = Path(root) if root else default_cache_dir()
    folders = cache_folders(root)
    _, removed = clear_cache(root)
    return CacheReport(root, folders, removed_bytes=removed)
