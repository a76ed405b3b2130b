"""Request bodies: size limits and the signed payload hash, checked while streaming.

Every route has a body limit (``gater.max_json_body`` for the JSON routes; streamed data routes
will use ``gater.max_body``). :func:`check_declared_length` refuses a declared Content-Length
over the limit before anything is read (413 ``EntityTooLarge``); :class:`BodyStream` counts
while streaming (chunked bodies) and hashes every chunk, and when the body ends compares the
sha256 with the signed ``x-gfsp-content-sha256`` (400 ``ContentSha256Mismatch``). The mismatch
is raised *instead of* the end of the stream, so a consumer that commits only after the
iteration ends normally never commits an unverified body. Small bodies are read whole with
:meth:`BodyStream.read`; data routes iterate.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import AsyncIterator, Mapping
from typing import Any

import trio
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from node.auth import AuthError
from node.errors import RequestTimeout, ServiceError

#: After a chunked body went over its limit, read and drop at most this much more (within
#: :data:`DRAIN_SECONDS`) so that the 413 reaches a client still sending.
DRAIN_BYTES = 256 * 1024
DRAIN_SECONDS = 1.0


class EntityTooLarge(ServiceError):
    def __init__(self, limit: int) -> None:
        super().__init__("EntityTooLarge",
                         f"the request body is larger than this route's limit of {limit} bytes",
                         413)


class IncompleteBody(ServiceError):
    def __init__(self) -> None:
        super().__init__("IncompleteBody", "the client disconnected before the body ended", 400)


async def idle_limited(chunks: AsyncIterator[bytes], idle: float) -> AsyncIterator[bytes]:
    """``chunks``, or :class:`RequestTimeout` once none came for ``idle`` seconds (a client
    that trickles or stalls its body holds no slot, buffer or lease for long)."""
    iterator = aiter(chunks)
    while True:
        with trio.move_on_after(idle) as wait:
            try:
                chunk = await anext(iterator)
            except StopAsyncIteration:
                return
        if wait.cancelled_caught:
            raise RequestTimeout(f"the request body sent nothing for {idle:g} s")
        yield chunk


class HeaderTooLarge(ServiceError):
    def __init__(self, limit: int) -> None:
        super().__init__("RequestHeaderSectionTooLarge",
                         f"the request head is larger than {limit} bytes", 431)


def check_head_size(scope: Mapping[str, Any], limit: int) -> None:
    """431 if the request line and headers exceed ``limit`` bytes. (hypercorn's
    ``h11_max_incomplete_size`` only catches a head that arrives in pieces.)"""
    size = (len(scope.get("method", "")) + len(scope.get("raw_path") or b"")
            + len(scope.get("query_string", b"")) + 12)
    for name, value in scope.get("headers", ()):
        size += len(name) + len(value) + 4
    if size > limit:
        raise HeaderTooLarge(limit)


def declared_length(headers: Mapping[str, str]) -> int | None:
    """The Content-Length as an int (None when absent; h11 has already checked its syntax)."""
    value = headers.get("content-length")
    if value is None:
        return None
    try:
        return int(value.strip())
    except ValueError:
        raise ServiceError("InvalidArgument", "Content-Length is not a number", 400) from None


def check_declared_length(headers: Mapping[str, str], limit: int) -> None:
    """413 if the declared body is over ``limit`` (nothing is read)."""
    length = declared_length(headers)
    if length is not None and length > limit:
        raise EntityTooLarge(limit)


class BodyStream:
    """Iterate a request body (once) under ``limit`` bytes, checking ``expected_sha256``;
    with ``idle_timeout``, :class:`RequestTimeout` once no chunk came for that long; with
    ``read_timeout``, :meth:`read` is :class:`RequestTimeout` once the whole body took that
    long (a body trickled a byte at a time is never idle, and its request holds a gater span).

    ``expected_sha256`` None means the payload was not signed (UNSIGNED-PAYLOAD): only the
    size is checked.
    """

    def __init__(self, chunks: AsyncIterator[bytes], *, limit: int,
                 expected_sha256: str | None, idle_timeout: float | None = None,
                 read_timeout: float | None = None) -> None:
        self._chunks = chunks if idle_timeout is None else idle_limited(chunks, idle_timeout)
        self.limit = limit
        self.read_timeout = read_timeout
        self.expected_sha256 = expected_sha256
        self.received = 0
        self._hash = hashlib.sha256() if expected_sha256 is not None else None
        self._used = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._used:
            raise RuntimeError("a request body can be read once")
        self._used = True
        try:
            async for chunk in self._chunks:
                if not chunk:
                    continue
                self.received += len(chunk)
                if self.received > self.limit:
                    await self._drain()
                    raise EntityTooLarge(self.limit)
                if self._hash is not None:
                    self._hash.update(chunk)
                yield chunk
        except ClientDisconnect:
            raise IncompleteBody() from None
        self.check_hash()

    def check_hash(self) -> None:
        if self._hash is not None and self._hash.hexdigest() != self.expected_sha256:
            raise AuthError("ContentSha256Mismatch",
                            "the body's sha256 differs from x-gfsp-content-sha256")

    async def read_into_unverified(self, buffer: memoryview) -> int:
        """Copy the whole body into ``buffer`` (once, no other copy) and return its length;
        a body longer than the buffer (or the limit) is 413 ``EntityTooLarge``.

        The body's sha256 is NOT checked here (no hashing on the event loop): the caller must
        verify it against :attr:`expected_sha256` before it commits anything, e.g. with the
        piece store's ``put(..., sha256=...)`` in a worker thread.
        """
        if self._used:
            raise RuntimeError("a request body can be read once")
        self._used = True
        limit = min(self.limit, len(buffer))
        try:
            async for chunk in self._chunks:
                n = len(chunk)
                if not n:
                    continue
                end = self.received + n
                if end > limit:
                    self.received = end
                    await self._drain()
                    raise EntityTooLarge(limit)
                buffer[self.received:end] = chunk
                self.received = end
        except ClientDisconnect:
            raise IncompleteBody() from None
        return self.received

    async def read(self) -> bytes:
        """The whole body (only for small bodies: the limit bounds the memory), within
        ``read_timeout``."""
        timeout = math.inf if self.read_timeout is None else self.read_timeout
        with trio.move_on_after(timeout) as deadline:
            parts = [chunk async for chunk in self]
        if deadline.cancelled_caught:
            raise RequestTimeout(f"the request body took longer than {timeout:g} s")
        return b"".join(parts)

    async def _drain(self) -> None:
        dropped = 0
        with trio.move_on_after(DRAIN_SECONDS):
            try:
                async for chunk in self._chunks:
                    dropped += len(chunk)
                    if dropped > DRAIN_BYTES:
                        break
            except ClientDisconnect:
                pass


class UnreadBodyGuard:
    """Pure ASGI middleware: a response sent before its request's body was read to the end
    drops what of the body is queued while its last message is sent.

    hypercorn delivers ``http.disconnect`` into the app's (bounded) receive queue from inside
    that very send; full of body chunks nobody reads (an early answer: 403, 404 before the
    body), it waited for ever, and with it the connection and its slot (found in review;
    stock hypercorn does the same). Once the answer is sent, the connection closes (h11
    cannot read past an unread body)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ended = False  # the body's last message, or the disconnect, was received

        async def receive_observed() -> Message:
            nonlocal ended
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                ended = True
            return message

        async def drop_body() -> None:
            while not ended:
                await receive_observed()

        async def send_guarded(message: Message) -> None:
            if (ended or message["type"] != "http.response.body"
                    or message.get("more_body", False)):
                await send(message)
                return
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drop_body)
                await send(message)
                nursery.cancel_scope.cancel()

        await self.app(scope, receive_observed, send_guarded)
