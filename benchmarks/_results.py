"""What every benchmark script shares: writing its result JSON atomically (a killed run leaves the old file),
through the package's one atomic-write helper; reading the process's memory."""

from __future__ import annotations

import os
import resource
from pathlib import Path

from sclora.fileio import atomic_write_json


def write_json(path: str | os.PathLike, result: dict) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    return out


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def current_rss_mb() -> float | None:
    """Resident memory now (Linux), to tell the init's own memory from the interpreter + model it shares."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
