"""Make glibc give large buffers back to the system (a node handles 16 MiB segments).

By default glibc raises its mmap threshold after freeing a large block, so later 16 MiB
buffers come from the heap and stay in the process after they are freed: a node's resident
memory then climbs to several hundred MiB after a few uploads (bench/data.py measured it). A
fixed threshold of 1 MiB keeps every segment-sized buffer in its own mapping, returned on free.

Below that threshold, glibc gives the free top of the heap back as soon as it passes 128 KiB,
so medium buffers (the 64 KiB-1 MiB body chunks of every request and download) were often
taken from fresh pages: a page fault costs ~2.5 us here, 10 ms per 16 MiB of 512 KiB chunks
against 1.5 ms from kept heap. The heap now keeps up to 32 MiB free at its top (the most it
adds to the resident memory) before trimming.

A no-op on a C library without ``mallopt`` (musl, macOS).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers
M_MMAP_THRESHOLD = -3
DEFAULT_THRESHOLD = 1 << 20
DEFAULT_TRIM = 32 << 20

log = logging.getLogger("gfsp.malloc")


def release_large_buffers(threshold: int = DEFAULT_THRESHOLD, trim: int = DEFAULT_TRIM) -> bool:
    """Set glibc's mmap and trim thresholds; True when both took effect."""
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
    kept = bool(mallopt(M_TRIM_THRESHOLD, trim))
    log.debug("mallopt(M_MMAP_THRESHOLD, %d): %s; mallopt(M_TRIM_THRESHOLD, %d): %s",
              threshold, ok, trim, kept)
    return ok and kept
