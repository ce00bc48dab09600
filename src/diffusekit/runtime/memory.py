"""Giving freed host memory back to the operating system.

Re-laying out or converting a model's weights (channels-last copies, a dtype change, a move to the GPU) frees
as much memory as the weights it replaces, and the C allocator keeps most of it for later allocations instead of
returning it: measured on the SD-1.5-size pipeline in float32 (torch 2.13, glibc, 2026-11-28), the process
held 611 MiB more after :func:`diffusekit.runtime.policy.prepare` than after ``malloc_trim``, and that kept
memory made the pipeline's peak resident memory exceed the reference implementation's (5,832 vs 5,581 MiB for
W5 in benchmarks/README.md; 5,440 MiB with it returned).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (returns free pages of every arena to the system), or None where there is none
    (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Return the C heap's free pages to the operating system, where the C library can (glibc). Takes a few
    milliseconds; meant for after a model's weights were converted, not for loops. True when it ran."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
