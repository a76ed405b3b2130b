"""Whether this SP can take an object's pieces now: the shared limiter and free disk.

One policy used by the approver (replicate-piece approvals) and by the P2P modular's fallback
when no approver runs.
"""

from __future__ import annotations

import math
import shutil

from node.config import Config
from node.errors import ResourceLimitExceeded
from node.rcmgr import ResourceLimiter

RECEIVE_PRIORITY = 150  # the receive task's medium priority (node.tasks defaults)


def receive_capacity(config: Config, limiter: ResourceLimiter, *, size: int,
                     segment_size: int, data_shards: int) -> tuple[bool, str]:
    """(approved, reason): room in the receiver's limits and on disk for one EC piece set."""
    piece = math.ceil(min(segment_size, max(size, 1)) / data_shards)
    stored = math.ceil(size / data_shards)
    try:
        with limiter.span("receiver", memory=2 * piece, task_priority=RECEIVE_PRIORITY):
            pass
    except ResourceLimitExceeded as exc:
        return False, f"busy: {exc.resource} limit of {exc.scope} reached"
    data_dir = config.data_dir
    probe = data_dir if data_dir.exists() else data_dir.parent
    free = shutil.disk_usage(probe).free
    if free - stored < config.piecestore.min_free_bytes:
        return False, "insufficient free disk space"
    return True, ""
