"""Where the engine keeps what it builds or learns on this machine (tiny checkpoints, hash and OpenVINO caches)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$CASCADE_CACHE_DIR, else $XDG_CACHE_HOME/sd-cascade (~/.cache/sd-cascade)."""
    if os.environ.get("CASCADE_CACHE_DIR"):
        return Path(os.environ["CASCADE_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "sd-cascade"


def hash_cache_file() -> Path:
    """The JSON file of checkpoint hashes keyed by (path, size, mtime), as SD.Next's cache.json does."""
    return cache_dir() / "hashes.json"
