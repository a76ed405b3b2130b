"""Freshness checks shared by every p2p protocol: clock skew and nonce replay (PROTOCOL.md)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from p2p.messages import InvalidMessage


class ReplayGuard:
    """Refuses a timestamp outside ``max_skew`` and a (sender, nonce) seen within the window.

    Only messages whose signature already verified are recorded, so the cache grows with
    honest traffic only. An entry is kept until its message's timestamp leaves the window
    (a replay of it then fails the skew check). The cache holds at most ``max_entries``:
    past that the oldest entry goes, and no message at least as old as one that went is
    accepted any more (its replay could not be told apart), so a full cache never lets a
    replay through; at worst it refuses a late honest message.
    """

    def __init__(self, max_skew: float, *, max_entries: int = 200_000,
                 clock: Callable[[], float] = time.time) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self._skew_ms = int(max_skew * 1000)
        self._seen: OrderedDict[tuple[str, bytes], int] = OrderedDict()  # -> message ts
        self._max = max_entries
        self._clock = clock
        self._floor = -1  # the newest timestamp of an entry dropped while still in the window
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._seen)

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    def check_ts(self, ts: int, what: str) -> None:
        if abs(ts - self.now_ms()) > self._skew_ms:
            raise InvalidMessage(f"{what}: timestamp {ts} outside the allowed clock skew")

    def check(self, sender: str, nonce: bytes, ts: int, what: str) -> None:
        """Check skew and replay, then remember the nonce."""
        self.check_ts(ts, what)
        self._prune()
        if ts <= self._floor:
            raise InvalidMessage(f"{what}: timestamp {ts} is older than messages the full "
                                 "replay cache had to forget")
        key = (sender, nonce)
        if key in self._seen:
            raise InvalidMessage(f"{what}: nonce already seen from {sender} (replay)")
        self._seen[key] = ts
        if len(self._seen) > self._max:
            _, old_ts = self._seen.popitem(last=False)
            self._floor = max(self._floor, old_ts)
            self.dropped += 1

    def _prune(self) -> None:
        """Forget entries whose timestamp is out of the window (about arrival order: one
        that arrived early with a late timestamp waits for the ones before it)."""
        horizon = self.now_ms() - self._skew_ms
        while self._seen:
            key, ts = next(iter(self._seen.items()))
            if ts >= horizon:
                break
            del self._seen[key]
