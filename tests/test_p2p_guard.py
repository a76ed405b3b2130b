"""p2p/guard.py: skew and replay checks, with a fake clock."""

from __future__ import annotations

import pytest

from p2p.guard import ReplayGuard
from p2p.messages import InvalidMessage


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def test_skew_and_replay() -> None:
    clock = Clock()
    g = ReplayGuard(30.0, clock=clock)
    now = g.now_ms()
    g.check("a", b"n1", now, "ping")
    with pytest.raises(InvalidMessage, match="replay"):
        g.check("a", b"n1", now, "ping")
    g.check("b", b"n1", now, "ping")  # another sender's nonce
    for ts in (now - 30_001, now + 30_001):
        with pytest.raises(InvalidMessage, match="skew"):
            g.check("a", b"n2", ts, "ping")


def test_an_entry_is_kept_while_its_message_could_pass_the_skew_check() -> None:
    clock = Clock()
    g = ReplayGuard(30.0, clock=clock)
    ts = g.now_ms() + 29_000  # from a peer whose clock is ahead
    g.check("a", b"n", ts, "ping")
    clock.t += 50  # the message is still within the window of the receiver's clock
    with pytest.raises(InvalidMessage, match="replay"):
        g.check("a", b"n", ts, "ping")
    clock.t += 10  # now it is not: the skew check refuses it, the entry may go
    with pytest.raises(InvalidMessage, match="skew"):
        g.check("a", b"n", ts, "ping")
    g.check("a", b"m", g.now_ms(), "ping")
    assert len(g) == 1


def test_a_full_cache_never_lets_a_replay_through() -> None:
    """Found in review: dropping the oldest entry of a full cache made its message
    replayable while still inside the window."""
    clock = Clock()
    g = ReplayGuard(30.0, max_entries=3, clock=clock)
    sent = []
    for i in range(5):
        clock.t += 0.001
        sent.append(("a", bytes([i]) * 16, g.now_ms()))
        g.check(*sent[-1], "ping")
    assert len(g) == 3 and g.dropped == 2
    for sender, nonce, ts in sent:
        with pytest.raises(InvalidMessage):
            g.check(sender, nonce, ts, "ping")
    clock.t += 0.001
    g.check("a", b"new" * 5 + b"x", g.now_ms(), "ping")  # fresh messages still pass
