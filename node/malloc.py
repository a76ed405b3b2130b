"""Make glibc give large buffers back to the system (a node handles 16 MiB segments).

By default glibc raises its mmap threshold after freeing a large block, so later 16 MiB
buffers come from the heap and stay in the process after they are freed: a node's resident
memory then climbs to several hundred MiB after a few uploads (bench/data.py measured it). A
fixed threshold of 1 MiB keeps every segment-sized buffer in its own mapping, returned on free.
A no-op on a C library without ``mallopt`` (musl, macOS).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
DEFAULT_THRESHOLD = 1 << 20

log = logging.getLogger("gfsp.malloc")


def release_large_buffers(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Set glibc's mmap threshold; True when it took effect."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, threshold))
    log.debug("mallopt(M_MMAP_THRESHOLD, %d): %s", threshold, ok)
    return ok
