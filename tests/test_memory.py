"""Giving freed heap memory back: malloc_trim where glibc is the allocator, a no-op elsewhere."""

from __future__ import annotations

import platform

from sclora.memory import release_freed_memory


def test_freed_memory_is_returned_where_glibc_allocates():
    assert release_freed_memory() is (platform.libc_ver()[0] == "glibc")
