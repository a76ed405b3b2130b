"""Fixtures shared by the whole suite."""

from __future__ import annotations

import pytest
import trio
import trio.testing


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    """pytest-trio's virtual clock, jumping once the run has been idle for 1 ms of real time.

    With pytest-trio's own (threshold 0) a run that waits on a worker thread (SPDB's, the piece
    store's, hashing) with no deadline pending polls epoll with a zero timeout until the
    thread is done: a busy loop that takes the GIL from that thread (tests took 5-15 s instead
    of well under one). With a deadline pending both jump to it as soon as the run is idle,
    so no test can see a timeout fire sooner than with pytest-trio's.
    """
    return trio.testing.MockClock(autojump_threshold=0.001)
