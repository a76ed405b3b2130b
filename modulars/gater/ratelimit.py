"""Per-key token buckets (S3's SlowDown): ``rate`` tokens a second, at most ``burst`` saved.

Keys are verified account addresses (and ``ip:<address>`` for the public routes). The table is
bounded: past ``max_keys`` the least recently used bucket is dropped; a dropped bucket comes
back full, which is what an idle bucket would be anyway (a key active enough to be refused is
recently used, so it is not the one dropped).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

from node.errors import ServiceUnavailable

DEFAULT_MAX_KEYS = 100_000


class SlowDown(ServiceUnavailable):
    """503 SlowDown with Retry-After (the S3 answer to too many requests)."""


class RateLimiter:
    def __init__(self, rate: float, burst: int, *, clock: Callable[[], float],
                 max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate must be > 0, burst and max_keys >= 1")
        self.rate = float(rate)
        self.burst = float(burst)
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at

    def __len__(self) -> int:
        return len(self._buckets)

    def try_take(self, key: str) -> float | None:
        """Take one token for ``key``: None if granted, else the seconds until one is due."""
        now = self.clock()
        tokens, at = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - at) * self.rate)
        granted = tokens >= 1.0
        if granted:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return None if granted else (1.0 - tokens) / self.rate

    def take(self, key: str) -> None:
        """Take one token or raise :class:`SlowDown` with a whole-second Retry-After."""
        wait = self.try_take(key)
        if wait is not None:
            raise SlowDown("too many requests; slow down", retry_after=max(1, math.ceil(wait)))
