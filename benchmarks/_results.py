"""What every benchmark script shares: writing its result JSON atomically (a killed run leaves the old file),
through the package's one atomic-write helper."""

from __future__ import annotations

import os
from pathlib import Path

from sclora.fileio import atomic_write_json


def write_json(path: str | os.PathLike, result: dict) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    return out
