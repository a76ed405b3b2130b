"""Freshness checks shared by every p2p protocol: clock skew and nonce replay (PROTOCOL.md)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from p2p.messages import InvalidMessage


class ReplayGuard:
    """Refuses a timestamp outside ``max_skew`` and a (sender, nonce) seen within the window.

    Only messages whose signature already verified are recorded, so the cache grows with
    honest traffic only; it is pruned by age and capped at ``max_entries`` all the same.
    """

    def __init__(self, max_skew: float, *, max_entries: int = 200_000,
                 clock: Callable[[], float] = time.time) -> None:
        self._skew_ms = int(max_skew * 1000)
        self._seen: OrderedDict[tuple[str, bytes], int] = OrderedDict()
        self._max = max_entries
        self._clock = clock

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    def check_ts(self, ts: int, what: str) -> None:
        if abs(ts - self.now_ms()) > self._skew_ms:
            raise InvalidMessage(f"{what}: timestamp {ts} outside the allowed clock skew")

    def check(self, sender: str, nonce: bytes, ts: int, what: str) -> None:
        """Check skew and replay, then remember the nonce."""
        self.check_ts(ts, what)
        self._prune()
        key = (sender, nonce)
        if key in self._seen:
            raise InvalidMessage(f"{what}: nonce already seen from {sender} (replay)")
        self._seen[key] = self.now_ms()
        if len(self._seen) > self._max:
            self._seen.popitem(last=False)

    def _prune(self) -> None:
        horizon = self.now_ms() - 2 * self._skew_ms
        while self._seen:
            key, seen = next(iter(self._seen.items()))
            if seen >= horizon:
                break
            del self._seen[key]
