"""Where tierkv keeps its files: the user cache directory (override: TIERKV_CACHE_DIR)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """~/.cache/tierkv (or $XDG_CACHE_HOME/tierkv, or $TIERKV_CACHE_DIR) joined with parts; not created."""
    root = os.environ.get("TIERKV_CACHE_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "tierkv")
    return Path(root).joinpath(*parts)
