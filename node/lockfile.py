"""One node per data folder: an exclusive ``flock`` on ``<data_dir>/node.lock`` held while the
node runs.

Two processes on one SPDB and piece store (a second ``gfsp-node run`` by hand beside the
systemd unit, a copied config) would both dispatch the same tasks, collect each other's
pieces as zombies and fight over the gater port only after everything else had started. The
lock is taken before anything is opened, so the second node stops at once, naming the pid
that holds it. The kernel releases the lock when its holder exits, however it exits
(SIGKILL included): a stale file never blocks a restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from node.errors import GfspError

LOCK_NAME = "node.lock"


class DataDirLocked(GfspError):
    """Another process holds the data folder's lock."""

    def __init__(self, data_dir: Path, holder: str) -> None:
        super().__init__(f"another node runs on {data_dir} (pid {holder or '?'} holds "
                         f"{data_dir / LOCK_NAME}); stop it first")
        self.data_dir = data_dir


@contextlib.contextmanager
def data_dir_lock(data_dir: Path) -> Iterator[None]:
    """Hold ``data_dir``'s lock (this process's pid in the file) for the ``with`` block."""
    path = data_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            raise DataDirLocked(data_dir, holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
