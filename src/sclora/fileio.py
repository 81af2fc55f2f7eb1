"""Crash-safe file writes and cross-process locks: the one place sclora writes files that must survive kill -9.

* :func:`atomic_write` / :func:`atomic_write_bytes` / :func:`atomic_write_json`: the bytes go to a temp
  file with a name unique to this process and call (``<name>.tmp-<pid>-<random>``), are fsync'd, then
  renamed over the target (``os.replace`` is atomic on POSIX), and the folder entry is fsync'd. A reader
  sees the old file or the new one, never a half-written one, and two writers never share a temp file.
* :func:`atomic_path`: the same for writers that need a path (safetensors ``save_file``, ``savefig``);
  :func:`atomic_dir` for whole folders (``save_pretrained``).
* :func:`locked`: an exclusive ``flock`` on ``.<file>.lock`` for read-modify-write of a shared file.
  flock is advisory and per host; on network file systems (NFS without lock support) it may not exclude
  processes of other machines (docs/reliability.md).
* :func:`update_json`: one entry of a shared JSON object set under that lock.
* :func:`digest`: the fingerprint of what made a cache or a result (sha256 of canonical JSON).
* :func:`parse_yaml`: YAML read the way people write numbers (``2e-4`` is a float).
* :func:`safe_name`: names that become file or folder names (run names, labels) stay inside their folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import yaml

__all__ = ["atomic_dir", "atomic_path", "atomic_write", "atomic_write_bytes", "atomic_write_json", "digest",
           "fsync_dir", "locked", "parse_yaml", "safe_name", "temp_name", "update_json"]

#: Every temp file sclora writes has this marker, so leftovers of a killed process are recognisable.
TMP_MARKER = ".tmp-"


def temp_name(path: str | os.PathLike) -> Path:
    """A sibling temp path unique to this process and call."""
    path = Path(path)
    return path.with_name(f"{path.name}{TMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}")


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename inside ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(os.fspath(directory), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path to write to; on success it is fsync'd and renamed over ``path``, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder to fill (a saved model, an adapter); on success its files are fsync'd and it replaces
    ``path`` (the old folder is moved aside under a unique name, then deleted), on error it is removed. A reader
    sees the old folder or the new one; a killed writer leaves only a ``.tmp-`` sibling, never a half folder."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    tmp.mkdir()
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
        old = temp_name(path)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()


def atomic_write(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data, *, indent: int | None = 2, **kwargs) -> None:
    atomic_write(path, json.dumps(data, indent=indent, **kwargs) + "\n")


@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``.<name>.lock`` next to ``path`` (blocking) for a read-modify-write of it."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as handle:  # hidden: it holds nothing
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def digest(obj, length: int = 16) -> str:
    """Hex sha256 (first ``length`` digits) of ``obj`` as canonical JSON: equal settings, equal digest."""
    import hashlib

    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def update_json(path: str | os.PathLike, key: str, value) -> dict:
    """Set ``key`` in the JSON object at ``path`` under the file's lock: concurrent writers lose no entry."""
    path = Path(path)
    with locked(path):
        current = json.loads(path.read_text()) if path.exists() else {}
        current[key] = value
        atomic_write(path, json.dumps(current) + "\n")
    return current


class _Loader(yaml.SafeLoader):
    """YAML as people write numbers: ``2e-4`` and ``1e5`` are floats (YAML 1.1 reads them as strings)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.VERBOSE),
    list("-+0123456789."))


def parse_yaml(text: str):
    """YAML text -> Python values, with numbers such as ``2e-4`` read as floats."""
    return yaml.load(text, Loader=_Loader)


_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=,-]{0,127}$")


def safe_name(name, what: str = "name") -> str:
    """``name`` if it can be used as one file or folder name: letters, digits and ``. _ + = , -``, starting
    with a letter or digit, at most 128 characters, no separators and no ``..``; else a ValueError."""
    if not isinstance(name, str) or not _SAFE.match(name) or ".." in name:
        raise ValueError(
            f"{what} {name!r} cannot be used as a file name: use 1-128 letters, digits and . _ + = , - (starting "
            "with a letter or digit, no '/', no '..'), e.g. 'sc_lora-beta0.8'."
        )
    return name
