"""sd_notify without a dependency: READY=1, STOPPING=1, WATCHDOG=1 to ``$NOTIFY_SOCKET``.

A no-op when ``NOTIFY_SOCKET`` is unset. Abstract (``@name``) and path sockets both work.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        self._addr = "\0" + addr[1:] if addr.startswith("@") else addr
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        ours = not pid or pid == str(os.getpid())
        self.watchdog_interval: float | None = (
            int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and ours else None)

    @property
    def enabled(self) -> bool:
        return bool(self._addr)

    def notify(self, state: str) -> None:
        """Send one state line ("READY=1", ...); errors are the caller's to see."""
        if not self._addr:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), self._addr)
