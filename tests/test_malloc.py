"""node/malloc.py: with the fixed mmap threshold, freed segment-sized buffers leave the
process (measured in a child process, whose memory nothing else touches)."""

from __future__ import annotations

import subprocess
import sys

CHILD = r"""
import sys
from node.malloc import release_large_buffers
if sys.argv[1] == "on":
    assert release_large_buffers()
def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
base = rss_mib()
warm = bytearray(16 << 20); warm[::4096] = b"x" * len(warm[::4096]); del warm
bufs = []
for _ in range(24):
    b = bytearray(16 << 20)
    b[::4096] = b"x" * len(b[::4096])
    bufs.append(b)
bufs = [bytes(b) for b in bufs[12:]] + bufs[:12]   # interleave lifetimes
peak = rss_mib()
del bufs
print(base, peak, rss_mib())
"""


def run(mode: str) -> tuple[int, int, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    base, peak, after = map(int, out)
    return base, peak, after


def test_freed_large_buffers_are_returned() -> None:
    base, peak, after = run("on")
    assert peak - base > 300          # the buffers were really resident
    assert after - base < 64, (base, peak, after)
