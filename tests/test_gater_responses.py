"""The gater's streamed responses let go of what they hold however the response ends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from modulars.gater.data import ClosingStreamingResponse

SCOPE = {"type": "http", "asgi": {"spec_version": "2.1"}}


def response(events: list[str]) -> ClosingStreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        events.append("started")
        try:
            yield b"a"
            yield b"b"
        finally:
            events.append("body closed")

    return ClosingStreamingResponse(body(), lambda: events.append("on_close"))


async def test_a_disconnect_before_the_body_starts_still_runs_on_close() -> None:
    """starlette (ASGI < 2.4) cancels the body when the client is gone: if that is before
    the first chunk, the iterator never starts and a ``finally`` in it never runs (found in
    review: a GET's download slot and limiter span were released only there)."""
    events: list[str] = []
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        await trio.sleep_forever()  # a client that stopped reading

    with trio.fail_after(5):
        await response(events)(SCOPE, receive, send)
    assert events == ["on_close"]


@pytest.mark.parametrize("fail_at", [None, 1, 2])
async def test_on_close_runs_once_after_the_body_is_closed(fail_at: int | None) -> None:
    events: list[str] = []
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        if len(sent) == fail_at:
            raise OSError("connection reset")
        sent.append(message)

    with trio.fail_after(5):
        if fail_at is None:
            await response(events)(SCOPE, receive, send)
            assert [m.get("body") for m in sent[1:]] == [b"a", b"b", b""]
        else:
            with pytest.raises(OSError):
                await response(events)(SCOPE, receive, send)
    assert events == ["started", "body closed", "on_close"]
