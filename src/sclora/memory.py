"""Giving freed memory back to the operating system.

glibc raises its mmap threshold each time a large block is freed, so after the first few temporaries of a
decomposition (float64 covariances, eigenvector blocks: MBs each) later ones are carved from the heap and stay
resident when freed, in the decomposition and, from the forwards' freed activations, during the statistics pass
(by a different amount in every run). :func:`release_freed_memory` asks glibc to return free heap pages
(``malloc_trim(0)``); it frees nothing still in use and is a no-op where glibc is not the allocator. What this
saves and costs on SmolLM2's init is measured in docs/performance.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["release_freed_memory"]


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return None


def release_freed_memory() -> bool:
    """Return free heap memory to the OS; True where glibc's ``malloc_trim`` ran."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
