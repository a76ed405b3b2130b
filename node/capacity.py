"""Whether this SP can take an object's pieces now: the shared limiter and free disk.

One policy used by the approver (replicate-piece approvals) and by the P2P modular's fallback
when no approver runs. Free disk is asked of the OS at most once per ``disk_probe_interval``
(a statvfs per approval was ~7% of a responder's time in the quorum benchmark).
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable

from node.config import Config
from node.errors import ResourceLimitExceeded
from node.rcmgr import ResourceLimiter

RECEIVE_PRIORITY = 150  # the receive task's medium priority (node.tasks defaults)
DISK_PROBE_INTERVAL = 0.5  # seconds a free-disk reading is reused


class ReceiveCapacity:
    """``check(size, segment_size, data_shards) -> (approved, reason)`` for one SP."""

    def __init__(self, config: Config, limiter: ResourceLimiter, *,
                 disk_probe_interval: float = DISK_PROBE_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.limiter = limiter
        self.disk_probe_interval = disk_probe_interval
        self._clock = clock
        self._free: tuple[float, int] | None = None  # (when read, bytes)

    def free_disk(self) -> int:
        """Free bytes on the data folder's file system (a reading at most a probe old)."""
        now = self._clock()
        if self._free is None or now - self._free[0] >= self.disk_probe_interval:
            data_dir = self.config.data_dir
            probe = data_dir if data_dir.exists() else data_dir.parent
            self._free = (now, shutil.disk_usage(probe).free)
        return self._free[1]

    def check(self, *, size: int, segment_size: int, data_shards: int) -> tuple[bool, str]:
        """(approved, reason): room in the receiver's limits and on disk for one EC piece
        set of an object of ``size`` bytes."""
        piece = math.ceil(min(segment_size, max(size, 1)) / data_shards)
        stored = math.ceil(size / data_shards)
        try:
            with self.limiter.span("receiver", memory=2 * piece,
                                   task_priority=RECEIVE_PRIORITY):
                pass
        except ResourceLimitExceeded as exc:
            return False, f"busy: {exc.resource} limit of {exc.scope} reached"
        if self.free_disk() - stored < self.config.piecestore.min_free_bytes:
            return False, "insufficient free disk space"
        return True, ""
