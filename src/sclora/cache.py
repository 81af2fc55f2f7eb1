"""Where sclora keeps downloaded wheels, converted models and judge caches."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$SCLORA_CACHE``, else ``~/.cache/sclora``."""
    return Path(os.environ.get("SCLORA_CACHE", Path.home() / ".cache" / "sclora"))
