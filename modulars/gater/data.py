"""The gater's data routes: put and get objects (S3 path style), replicate pieces between SPs,
and challenges.

- ``PUT /{bucket}/{object}``: the uploader's pre/handle/post with the body streamed (a signed
  payload hash is checked as the body ends; ``UNSIGNED-PAYLOAD`` is allowed here, as the
  integrity hash is checked against the chain anyway).
- ``GET /{bucket}/{object}`` (``Range``: one range, 206 with Content-Range; 416 outside the
  object; ignored under an ``If-Range`` that is not the ETag): the downloader streams only
  the segments needed. ``HEAD`` answers the same status and headers after the same checks,
  and reads nothing (no read record either).
- ``PUT /gfsp/v1/replicate/{object_id}/{index}/{segment}`` and
  ``POST /gfsp/v1/replicate/{object_id}/{index}/done``: a primary SP sends a piece / asks for
  the integrity signature; the request is signed by the primary's operator key (its account)
  with the body's hash signed, and carries the secondary's approval in ``x-gfsp-approval``.
- ``GET /gfsp/v1/challenge/{object_id}/{segment}/{index}``: the piece, the checksum list and the
  integrity hash, as JSON, or raw bytes with ``Accept: application/octet-stream`` (what SPs
  ask each other; :mod:`modulars.downloader` defines both wire forms).

A bucket named ``gfsp`` cannot be reached by the path-style routes: ``/gfsp/...`` is the API's
own prefix, and a path there that no API route matches is a 404.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import trio
from starlette.responses import Response, StreamingResponse

from modulars.downloader import (
    BINARY_CHALLENGE,
    content_length,
    content_range,
    encode_challenge,
    encode_challenge_binary,
    etag,
    wants_binary_challenge,
)
from modulars.gater import schemas
from modulars.gater.app import API_PREFIX, AuthOpType, Call, Param, RouteSpec
from modulars.gater.body import declared_length
from node.errors import RequestTimeout, ServiceError

APPROVAL_HEADER = "x-gfsp-approval"
RESERVED_BUCKET = "gfsp"

_BUCKET = Param("bucket", "path", schemas.BUCKET, "bucket name", required=True)
_OBJECT = Param("object", "path", schemas.OBJECT_NAME,
                "object name, percent-encoded; may contain '/'", required=True)
_INT = {"type": "integer", "minimum": 0}
_INDEX = {"type": "integer", "minimum": -1}


def _names(call: Call) -> tuple[str, str]:
    if call.path("bucket") == RESERVED_BUCKET:  # an API path no route matched
        raise ServiceError("NotFound", f"no route for {call.request.url.path}", 404)
    bucket = schemas.check_bucket(call.path("bucket"))
    return bucket, schemas.check_object(call.path("object"))


_INT_RE = re.compile(r"-?[0-9]{1,19}", re.ASCII)


def _int(call: Call, name: str, lo: int = 0) -> int:
    raw = call.path(name)
    if _INT_RE.fullmatch(raw) is None:
        raise ServiceError("InvalidArgument", f"{name} must be an integer", 400)
    value = int(raw)
    if value < lo:
        raise ServiceError("InvalidArgument", f"{name} must be at least {lo}", 400)
    return value


async def put_object(call: Call) -> Any:
    bucket, name = _names(call)
    await call.authorize(AuthOpType.PUT_OBJECT, bucket, name)
    uploader = call.modulars.uploader
    task = await uploader.make_task(bucket, name)
    task.user_address = call.account
    await uploader.pre_upload_object(task)
    try:
        await uploader.handle_upload_object_task(task, aiter(call.body))
    finally:
        uploader.post_upload_object(task)
    return {"object_id": task.object.id, "size": task.object.size,
            "integrity_hash": task.object.checksums[0]}


async def get_object(call: Call) -> Any:
    bucket, name = _names(call)
    await call.authorize(AuthOpType.GET_OBJECT, bucket, name)
    downloader = call.modulars.downloader
    task, partial = await downloader.make_task(
        bucket, name, range_header=call.request.headers.get("range"),
        if_range=call.request.headers.get("if-range"), user_address=call.account)
    # the Content-Type as the chain has it: given as starlette's media_type, a text/ one
    # would get "; charset=utf-8" added, and a client would decode a Latin-1 text wrongly
    headers = {"content-length": str(content_length(task)), "accept-ranges": "bytes",
               "etag": etag(task.object),
               "content-type": task.object.content_type or "application/octet-stream"}
    if partial:
        headers["content-range"] = content_range(task)
    status = 206 if partial else 200
    if call.request.method == "HEAD":  # the GET's head; no byte is read (nor billed as read)
        await downloader.head_object(task)
        return Response(status_code=status, headers=headers)
    await downloader.pre_download_object(task)

    async def body() -> AsyncIterator[bytes]:
        # a 0-byte object too: the download then completes at once (counted as done)
        async with aclosing(downloader.handle_download_object_task(task)) as chunks:
            async for chunk in chunks:
                yield chunk

    return ClosingStreamingResponse(body(), lambda: downloader.post_download_object(task),
                                    status_code=status, headers=headers)


async def _admit(call: Call, *, fresh: bool = False) -> Any:
    object_id, index = _int(call, "object_id"), _int(call, "index")
    raw = call.request.headers.get(APPROVAL_HEADER, "")
    try:
        approval = bytes.fromhex(raw)
    except ValueError:
        raise ServiceError("InvalidApproval", f"{APPROVAL_HEADER} is not hex", 403) from None
    if call.auth is None or call.auth.payload_sha256 is None:
        raise ServiceError("UnsignedPayloadNotAllowed", "pieces must carry a signed hash", 400)
    return await call.modulars.receiver.admit(sender=call.account, approval=approval,
                                              object_id=object_id, redundancy_index=index,
                                              fresh=fresh)


async def replicate_piece(call: Call) -> Any:
    admitted = await _admit(call)
    segment = _int(call, "segment")
    receiver = call.modulars.receiver
    expected = receiver.piece_length(admitted.task, segment)
    declared = declared_length(call.request.headers)
    if declared is not None and declared != expected:
        raise ServiceError("InvalidArgument", f"piece has {declared} bytes, expected "
                           f"{expected}", 400)
    assert call.auth is not None and call.auth.payload_sha256 is not None  # _admit checked
    digest = bytes.fromhex(call.auth.payload_sha256)
    timeout = float(receiver.ctx.config.receiver.piece_timeout)
    with receiver.piece_buffer(expected) as buffer:
        # One copy of the body, into the piece store's aligned buffer; its sha256 is checked
        # against the signed one in a worker thread before the piece is stored. The body
        # has receiver.piece_timeout in all: trickled, it would hold a receive slot for good.
        with trio.move_on_after(timeout) as deadline:
            received = await call.body.read_into_unverified(buffer)
        if deadline.cancelled_caught:
            raise RequestTimeout(f"the piece took longer than receiver.piece_timeout "
                                 f"({timeout:g} s)")
        if received != expected:
            raise ServiceError("IncompleteBody", f"piece has {received} bytes, expected "
                               f"{expected}", 400)
        await receiver.handle_receive_piece_task(admitted.task, segment, buffer, digest)
    return {"stored": received}


async def replicate_done(call: Call) -> Any:
    admitted = await _admit(call, fresh=True)
    await call.body.read()
    signature, integrity = await call.modulars.receiver.handle_done_receive_piece_task(
        admitted.task)
    return {"signature": signature, "integrity_hash": integrity}


async def challenge(call: Call) -> Any:
    object_id, segment = _int(call, "object_id"), _int(call, "segment")
    index = _int(call, "index", lo=-1)
    downloader = call.modulars.downloader
    task = await downloader.make_challenge_task(object_id, segment, index,
                                                user_address=call.account)
    await call.authorize(AuthOpType.CHALLENGE_PIECE, task.object.bucket, task.object.name)
    with contextlib.ExitStack() as hold:  # the piece's buffer (the response takes it over)
        await downloader.pre_challenge_piece(task)
        try:
            piece, checksums, integrity = await downloader.handle_challenge_piece(task, hold)
        finally:
            downloader.post_challenge_piece(task)
        if wants_binary_challenge(call.request.headers.get("accept")):
            headers, parts = encode_challenge_binary(piece, checksums, integrity)
            del piece
            return HeldPartsResponse(parts, hold.pop_all(), headers=headers,
                                     media_type=BINARY_CHALLENGE)
        answer = encode_challenge(piece, checksums, integrity)
        del piece
        return answer


class ClosingStreamingResponse(StreamingResponse):
    """A streamed body that lets go of what it holds however the response ends: sent,
    failed, abandoned, or cancelled before the body started (starlette then never starts
    the iterator, so a ``finally`` inside it would never run). Once the response is done
    the iterator is closed, then ``on_close`` runs, exactly once. Nothing can run between
    the route returning the response and the response being called."""

    def __init__(self, content: AsyncIterator[Any], on_close: Callable[[], object],
                 **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    with trio.CancelScope(shield=True):
                        await aclose()
            finally:
                self._on_close()


class HeldPartsResponse(ClosingStreamingResponse):
    """A body sent as its ``parts`` (buffers, not copied), which ``hold`` keeps alive: closed
    once the response is sent, failed or abandoned."""

    def __init__(self, parts: list[bytes | memoryview], hold: contextlib.ExitStack, *,
                 headers: dict[str, str], media_type: str) -> None:
        async def body() -> AsyncIterator[bytes | memoryview]:
            for part in parts:
                yield part

        super().__init__(body(), hold.close, headers=headers, media_type=media_type)


DATA_ROUTES: tuple[RouteSpec, ...] = (
    RouteSpec("PUT", f"{API_PREFIX}/replicate/{{object_id}}/{{index}}/{{segment}}",
              replicate_piece, "replicatePiece",
              "A primary SP sends one EC piece (signed by its operator key, x-gfsp-approval)",
              body="stream",
              params=(Param("object_id", "path", _INT, "object id", required=True),
                      Param("index", "path", _INT, "redundancy index", required=True),
                      Param("segment", "path", _INT, "segment", required=True)),
              response_schema={"type": "object"}),
    RouteSpec("POST", f"{API_PREFIX}/replicate/{{object_id}}/{{index}}/done", replicate_done,
              "replicateDone", "The secondary's integrity signature over what it holds",
              body="json",
              params=(Param("object_id", "path", _INT, "object id", required=True),
                      Param("index", "path", _INT, "redundancy index", required=True)),
              response_schema={"type": "object"}),
    RouteSpec("GET", f"{API_PREFIX}/challenge/{{object_id}}/{{segment}}/{{index}}", challenge,
              "challengePiece", "A piece with its checksum list and integrity hash (JSON; "
              "binary with Accept: application/octet-stream)",
              params=(Param("object_id", "path", _INT, "object id", required=True),
                      Param("segment", "path", _INT, "segment", required=True),
                      Param("index", "path", _INDEX, "redundancy index (-1: primary)",
                            required=True)),
              response_schema={"type": "object"}),
    RouteSpec("PUT", "/{bucket}/{object:path}", put_object, "putObject",
              "Upload an object's payload to its primary SP (streamed)", body="stream",
              params=(_BUCKET, _OBJECT), response_schema={"type": "object"}),
    RouteSpec("GET", "/{bucket}/{object:path}", get_object, "getObject",
              "Download an object, or one byte range of it", params=(_BUCKET, _OBJECT),
              response_type="application/octet-stream", response_schema={"type": "string"}),
)
