"""Where pyramidkv keeps what it builds once: converted models and codebooks."""

from __future__ import annotations

import os
from pathlib import Path

ENV_CACHE = "PYRAMIDKV_CACHE_DIR"


def cache_dir() -> Path:
    """The user cache folder (``$PYRAMIDKV_CACHE_DIR``, else ``$XDG_CACHE_HOME/pyramidkv`` or ``~/.cache/pyramidkv``)."""
    root = os.environ.get(ENV_CACHE) or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "pyramidkv"
    )
    return Path(root)
