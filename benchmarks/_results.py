"""What every benchmark script shares: writing its result JSON atomically (a killed run leaves the old file)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(path: str | os.PathLike, result: dict) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    return out
