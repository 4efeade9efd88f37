"""Handing freed memory back to the operating system.

glibc's allocator keeps memory that a program frees for its own reuse; with allocations of tens of megabytes (a
model's weights) freed in a different order than they were made, the heap fragments and the resident size of a
long-running process keeps growing although nothing is alive in it. ``malloc_trim`` returns those free pages.
The ServerApp calls :func:`release_freed_memory` after each reply it has let go (see
:mod:`fedseg.server.run.screen`): without it, its resident size crept up by about one model every few replies of
the paper-size network although no reply was alive any more (``bench/server_memory.py``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from collections.abc import Callable
from typing import cast

log = logging.getLogger(__name__)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return cast(Callable[[int], int], trim)


def release_freed_memory() -> bool:
    """Return the allocator's free pages to the operating system; False where the C library cannot (not glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
