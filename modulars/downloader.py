"""Downloader: serves object reads and piece challenges (the seed's Downloader).

Download (primary SP). ``GET /{bucket}/{object}`` with an optional ``Range`` (:func:`parse_range`,
one RFC 7233 byte range). :meth:`Downloader.pre_download_object` admits the read (object SEALED
on the chain, this SP the bucket's primary, a span of about one segment of memory from the
shared limiter: over the limit is 503 with Retry-After). :meth:`handle_download_object_task`
streams (an async iterator of ``bytes``; the seed returns one ``[]byte``): for each segment that
overlaps ``low..high`` it reads the whole segment ``{object_id}_s{segment}`` (the only unit that
can be verified), checks its SHA-256 against the per-segment hash the uploader recorded, and
yields only the needed slice. Segments outside the range are never read.

The per-segment hashes are trusted only once their integrity hash (SHA-256 over the list) equals
the primary checksum ``checksums[0]`` of the sealed object on the chain; they come from the
``integrity_meta`` row ``(object_id, -1)`` or, when that row is missing or bad, from the
``piece_hashes`` rows of index -1.

Degraded read. A segment that is missing, fails its hash, or cannot be verified (no trusted
hash list) is rebuilt from the secondaries listed in the sealed object: their challenge route
(below) is asked for piece ``i`` of the segment, data indices first, ``k = data_shards`` at a
time in parallel; a failed or lying answer starts the next index at once, and a slow one starts
another after :attr:`Downloader.hedge_after` seconds. A piece counts only when its SHA-256 is its
entry in the returned checksum list and the list's integrity hash is ``checksums[1 + i]`` on the
chain. With ``k`` verified pieces the segment is decoded (:class:`node.ec.Codec`), checked
against the primary hash when one is trusted, served, and a repair is queued in the modular's
own nursery (the download does not wait for it): the segment is written back to the piece
store, and the primary's ``integrity_meta`` row is rebuilt when it was missing or bad. Fewer
than ``k`` verified pieces before ``downloader.degraded_read_timeout`` is 503. The piece fetcher
is the constructor's ``fetch_piece`` (default: signed HTTP to the secondary's gater). The pieces
and the rebuilt segment live in the piece store's reused buffers (no fresh pages to fault in:
~2.5 ms per 4 MiB here); the download and the repair share the segment's buffer, which goes
back when both are done. The secondaries' endpoints come from the SP registry (cached), and a
sealed object read from the chain is reused for ``downloader.object_cache_ttl`` seconds (each
challenge asked the chain for it twice).

Once the first bytes went out, a failure can no longer become a status code: the gater must
then abort the response (close the connection without the final chunk).

Challenge. :meth:`handle_challenge_piece` returns ``(piece, checksums, integrity_hash)`` for
``(object, segment, redundancy_index)`` (-1: the primary's segment): the data from the piece
store and the checksum list from ``integrity_meta`` of that index. Before answering, the SP
checks its own data against the chain (integrity hash equals ``checksums[0]`` / ``checksums[1 +
i]``, the piece's hash its entry): bad or missing data is a logged 500, never a wrong answer (for
the primary a recovery from the secondaries is queued as well). The wire format of the challenge
route, shared by the gater and the fetcher (:func:`encode_challenge`, :func:`decode_challenge`)::

    GET /gfsp/v1/challenge/{object_id}/{segment}/{index}      (index -1: the primary segment)
    200 application/json
    {"piece": "<base64>", "checksums": ["<64 hex>", ...], "integrity_hash": "<64 hex>"}

and, asked with ``Accept: application/octet-stream`` (what SPs use between themselves: no
base64, no JSON; :func:`encode_challenge_binary`, :func:`decode_challenge_binary`)::

    200 application/octet-stream
    x-gfsp-integrity-hash: <64 hex>
    x-gfsp-checksum-count: <n>
    <n x 32 bytes: the checksum list><the piece>

Reads overlap: while one segment is being sent, the next one is read (or rebuilt from the
secondaries) in the modular's nursery, when the limiter has room for one more segment
(:meth:`Downloader.handle_download_object_task`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import json
import logging
import math
import re
import sqlite3
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

from node.chain import ChainObject, chain_errors, require_chain
from node.crypto import pack, unpack
from node.ec import Codec, integrity_hash, sha256
from node.errors import (
    AccessDenied,
    GfspError,
    InvalidObjectState,
    NoSuchBucket,
    NoSuchKey,
    ResourceLimitExceeded,
    ServiceError,
    ServiceUnavailable,
    TaskError,
)
from node.modular import ModularBase, NodeContext
from node.piecestore import PieceNotFound, PieceStoreError, piece_key, read_hashed, segment_key
from node.rcmgr import Span
from node.spregistry import SPInfo
from node.tasks import (
    ChallengePieceTask,
    DownloadObjectTask,
    ObjectInfo,
    StorageParams,
    Task,
)

__all__ = [
    "CHALLENGE_ROUTE",
    "ChallengeResponseError",
    "Downloader",
    "PieceFetchError",
    "PieceFetcher",
    "RangeNotSatisfiable",
    "challenge_path",
    "content_length",
    "content_range",
    "decode_challenge",
    "decode_challenge_binary",
    "encode_challenge",
    "encode_challenge_binary",
    "etag",
    "parse_range",
]

log = logging.getLogger("gfsp.downloader")

#: Bytes per chunk a download yields: just below glibc's mmap threshold (1 MiB, node/malloc.py),
#: so the copies made of a reused segment buffer come from the kept heap, not from fresh pages
#: (~10 ms of page faults per 16 MiB otherwise), in as few chunks as that allows.
YIELD_SLICE = (1 << 20) - 4096
#: Most sealed objects the downloader keeps from the chain (cleared when full).
OBJECT_CACHE_SIZE = 1024

#: The challenge route (starlette syntax) the gater serves and the fetcher asks.
CHALLENGE_ROUTE = "/gfsp/v1/challenge/{object_id}/{segment}/{index}"
#: Length of a SHA-256 digest.
HASH_LEN = 32
#: The binary challenge form: its media type and headers.
BINARY_CHALLENGE = "application/octet-stream"
INTEGRITY_HEADER = "x-gfsp-integrity-hash"
COUNT_HEADER = "x-gfsp-checksum-count"

PieceFetcher = Callable[[str, str, int, int, int, contextlib.ExitStack],
                        Awaitable[tuple[bytes | memoryview, list[bytes], bytes]]]
"""``fetch_piece(sp_operator, endpoint, object_id, segment, index, hold) -> (piece,
checksums, integrity_hash)``; raises on any failure (the answer is verified by the caller).
A buffer the piece lives in may be entered into ``hold``: the caller closes it once it is
done with the piece (or at once when the piece is refused)."""


# --- errors -----------------------------------------------------------------------------------


class RangeNotSatisfiable(ServiceError):
    """416: the Range is outside the object, malformed, or asks for several ranges.

    ``size`` is the object's size, for the ``Content-Range: bytes */size`` header.
    """

    def __init__(self, message: str, size: int) -> None:
        super().__init__("InvalidRange", message, 416)
        self.size = size
        self.headers = {"content-range": f"bytes */{size}"}  # RFC 9110 15.5.17


class PieceFetchError(GfspError):
    """A secondary did not give a piece (HTTP error, refusal, oversized answer)."""


class ChallengeResponseError(PieceFetchError, ValueError):
    """A challenge answer is not the JSON this module defines."""


# --- Range ------------------------------------------------------------------------------------

_RANGE_RE = re.compile(r"([0-9]*)-([0-9]*)", re.ASCII)
#: A Range number longer than this is past the end of any object (and of Python's int() limit)
_RANGE_DIGITS = 19


def _range_int(digits: str) -> int:
    return int(digits) if len(digits) <= _RANGE_DIGITS else 1 << 63


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive ``(low, high)`` a ``Range`` header asks of an object of ``size`` bytes.

    ``None`` when there is no header (serve the whole object, also a 0-byte one) or its unit is
    not ``bytes`` (RFC 7233 §3.1: an unknown unit is ignored). One range only:
    ``bytes=a-b`` (``b`` past the end is clamped), ``bytes=a-``, ``bytes=-n`` (the last ``n``
    bytes, all of them when ``n >= size``). :class:`RangeNotSatisfiable` (416) when the first
    byte is at or past the end (any range of a 0-byte object), for ``bytes=-0``, for a malformed
    ``bytes=`` value (``a > b``, no digits, signs, garbage), and for several ranges
    (``bytes=0-1,4-5``: multipart/byteranges is not served; empty list elements do not count).
    """
    if header is None:
        return None
    text = header.strip()
    if not text:
        return None
    unit, sep, spec = text.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        if sep:
            return None  # another unit: ignored
        raise RangeNotSatisfiable(f"malformed Range {header[:100]!r}", size)
    # a list may hold empty elements (RFC 9110 5.6.1): "bytes=0-4," is the one range 0-4
    ranges = [part.strip() for part in spec.split(",") if part.strip()]
    if len(ranges) > 1:
        raise RangeNotSatisfiable("only one byte range per request is served", size)
    spec = ranges[0] if ranges else ""
    m = _RANGE_RE.fullmatch(spec)
    if m is None or (not m.group(1) and not m.group(2)):
        raise RangeNotSatisfiable(f"malformed Range {header[:100]!r}", size)
    first, last = m.group(1), m.group(2)
    if not first:  # suffix: the last n bytes
        n = _range_int(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable(f"range {spec!r} of a {size}-byte object", size)
        return max(0, size - n), size - 1
    low = _range_int(first)
    high = size - 1 if not last else _range_int(last)
    if last and high < low:
        raise RangeNotSatisfiable(f"malformed Range {header[:100]!r}: last < first", size)
    if low >= size:
        raise RangeNotSatisfiable(f"range {spec!r} starts past the end of a {size}-byte "
                                  "object", size)
    return low, min(high, size - 1)


def etag(obj: ObjectInfo) -> str:
    """An object's (strong) ETag: its integrity hash ``checksums[0]``, hex, quoted."""
    return f'"{obj.checksums[0].hex()}"'


def if_range_holds(if_range: str | None, tag: str) -> bool:
    """Whether a Range may be served under ``If-Range`` (RFC 9110 13.1.5): no If-Range, or
    exactly the object's ETag ``tag``. A weak tag never matches, nor does a date (no
    Last-Modified is sent): the whole object then goes out, never a range of what may be
    another object than the one the client holds the first bytes of."""
    return if_range is None or if_range.strip() == tag


def content_length(task: DownloadObjectTask) -> int:
    """Bytes a download task serves (0 for a 0-byte object, whose task is ``0..0``)."""
    size = task.object.size
    if size == 0:
        return 0
    return max(0, min(task.high, size - 1) - task.low + 1)


def content_range(task: DownloadObjectTask) -> str:
    """The ``Content-Range`` value of a 206 answer to ``task``."""
    size = task.object.size
    return f"bytes {task.low}-{min(task.high, size - 1)}/{size}"


# --- the challenge wire format ----------------------------------------------------------------


def challenge_path(object_id: int, segment: int, index: int) -> str:
    """The path of a challenge request (``index`` -1: the primary's segment)."""
    return CHALLENGE_ROUTE.format(object_id=int(object_id), segment=int(segment),
                                  index=int(index))


def encode_challenge(piece: bytes, checksums: Sequence[bytes], integrity: bytes
                     ) -> dict[str, Any]:
    """The JSON object of a challenge answer."""
    return {"piece": base64.b64encode(piece).decode("ascii"),
            "checksums": [c.hex() for c in checksums],
            "integrity_hash": integrity.hex()}


def wants_binary_challenge(accept: str | None) -> bool:
    """Whether an ``Accept`` header asks for the binary challenge form."""
    if not accept:
        return False
    return any(part.split(";")[0].strip().lower() == BINARY_CHALLENGE
               for part in accept.split(","))


def encode_challenge_binary(piece: bytes, checksums: Sequence[bytes], integrity: bytes
                            ) -> tuple[dict[str, str], list[bytes]]:
    """(headers, body parts) of a binary challenge answer: the checksum list, then the
    piece (sent as two parts: the piece is not copied)."""
    headers = {INTEGRITY_HEADER: integrity.hex(), COUNT_HEADER: str(len(checksums)),
               "content-length": str(HASH_LEN * len(checksums) + len(piece))}
    return headers, [b"".join(checksums), piece]


def decode_challenge_binary(headers: Mapping[str, str], body: bytes | bytearray | memoryview
                            ) -> tuple[bytes | memoryview, list[bytes], bytes]:
    """``(piece, checksums, integrity_hash)`` of a binary challenge answer;
    :class:`ChallengeResponseError` when it is anything else. The piece is a read-only view
    of ``body`` (not a copy: 4 MiB of fresh pages per piece)."""
    integrity = _hash_of(headers.get(INTEGRITY_HEADER), INTEGRITY_HEADER)
    raw = headers.get(COUNT_HEADER, "")
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 12:
        raise ChallengeResponseError(f"{COUNT_HEADER} must be a number")
    count = int(raw)
    prefix = HASH_LEN * count
    if len(body) < prefix:
        raise ChallengeResponseError(f"the body is shorter than {count} checksums")
    view = memoryview(body).toreadonly()
    checksums = [bytes(view[i:i + HASH_LEN]) for i in range(0, prefix, HASH_LEN)]
    return view[prefix:], checksums, integrity


_HEX64 = re.compile(r"[0-9a-f]{64}", re.ASCII)


def _hash_of(value: object, what: str) -> bytes:
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise ChallengeResponseError(f"{what} must be 64 lowercase hex digits")
    return bytes.fromhex(value)


def decode_challenge(body: bytes | str | Mapping[str, Any]
                     ) -> tuple[bytes, list[bytes], bytes]:
    """``(piece, checksums, integrity_hash)`` of a challenge answer (JSON text or object);
    :class:`ChallengeResponseError` when it is anything else."""
    if isinstance(body, bytes | str):
        try:
            body = json.loads(body)
        except ValueError as exc:
            raise ChallengeResponseError(f"not JSON: {exc}") from None
    if not isinstance(body, Mapping) or set(body) != {"piece", "checksums", "integrity_hash"}:
        raise ChallengeResponseError("expected an object with piece, checksums, integrity_hash")
    piece = body["piece"]
    if not isinstance(piece, str):
        raise ChallengeResponseError("piece must be base64 text")
    try:
        data = base64.b64decode(piece.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ChallengeResponseError("piece is not valid base64") from None
    sums = body["checksums"]
    if not isinstance(sums, list):
        raise ChallengeResponseError("checksums must be a list")
    checksums = [_hash_of(c, "a checksum") for c in sums]
    return data, checksums, _hash_of(body["integrity_hash"], "integrity_hash")


# --- the modular ------------------------------------------------------------------------------


@dataclass
class _Download:
    task: DownloadObjectTask
    chain_object: ChainObject
    span: Span | None = None
    served: int = 0
    completed: bool = False


@dataclass
class _Challenge:
    task: ChallengePieceTask
    chain_object: ChainObject
    span: Span | None = None


class _Segment:
    """A segment read for a download: its bytes, and the store buffer holding them (given
    back by :meth:`close`; a rebuilt segment's buffer is shared with its repair)."""

    def __init__(self, data: bytes | memoryview,
                 hold: contextlib.ExitStack | _Shared | None = None) -> None:
        self.data = data
        self._hold = hold

    def close(self) -> None:
        self.data = b""
        if self._hold is not None:
            self._hold.close()


class _Prefetch:
    """A segment read in the background: :meth:`run` in a nursery, :meth:`result` to wait
    for it (its error is raised there), :meth:`cancel` when it is no longer wanted (a segment
    already read is closed then)."""

    def __init__(self) -> None:
        self._scope = trio.CancelScope()
        self._done = trio.Event()
        self._value: _Segment | None = None
        self._error: Exception | None = None
        self._taken = False

    async def run(self, read: Callable[[], Awaitable[_Segment]]) -> None:
        try:
            with self._scope:
                self._value = await read()
                if self._taken:  # cancelled while the read finished
                    self._value.close()
        except Exception as exc:  # noqa: BLE001 - handed to the reader, raised in result()
            self._error = exc
        finally:
            self._done.set()

    async def result(self) -> _Segment:
        await self._done.wait()
        self._taken = True
        if self._error is not None:
            raise self._error
        if self._value is None:
            raise ServiceUnavailable("the read of the next segment was cancelled", 1.0)
        return self._value

    def cancel(self) -> None:
        self._scope.cancel()
        if not self._taken:
            self._taken = True
            if self._value is not None:
                self._value.close()


@dataclass
class _Fetched:
    index: int
    piece: bytes | memoryview | None
    reason: str = ""
    hold: contextlib.ExitStack | None = None  # the buffer under ``piece``, if any

    def close(self) -> None:
        self.piece = None
        if self.hold is not None:
            self.hold.close()


class _Shared:
    """A hold (an ExitStack: a store buffer) with several users: closed when the last one
    lets go. A rebuilt segment is served by the download and written back by its repair."""

    def __init__(self, hold: contextlib.ExitStack) -> None:
        self._hold = hold
        self._users = 1

    def share(self) -> _Shared:
        self._users += 1
        return self

    def close(self) -> None:
        self._users -= 1
        if self._users == 0:
            self._hold.close()


@dataclass
class _Hashes:
    """The primary's per-segment hashes and where they came from (``meta``, ``piece_hashes``,
    or ``none`` when nothing verifies against the chain)."""

    hashes: list[bytes] | None
    source: str
    bad: list[str] = field(default_factory=list)


class Downloader(ModularBase):
    """Serves downloads (with degraded reads and repairs) and challenges of this SP's data."""

    name = "downloader"
    requires = ("signer",)

    def __init__(self, ctx: NodeContext, *, fetch_piece: PieceFetcher | None = None) -> None:
        super().__init__(ctx)
        self.cfg = ctx.config.downloader
        #: The piece fetcher of degraded reads (default: the challenge route over HTTP).
        self.fetch_piece: PieceFetcher = fetch_piece or self._http_fetch_piece
        #: Seconds before a degraded read asks one more secondary besides the slow ones.
        self.hedge_after: float = float(self.cfg.degraded_read_timeout) / 4
        self.stats: Counter[str] = Counter()
        self.http: httpx.AsyncClient | None = None
        self._nursery: trio.Nursery | None = None
        self._downloads: dict[int, _Download] = {}
        self._challenges: dict[int, _Challenge] = {}
        self._repairing: set[tuple[int, int]] = set()
        self._busy = 0  # read-aheads, repairs and read records queued or running
        self._idle = trio.Event()
        self._idle.set()
        self._codecs: dict[tuple[int, int], Codec] = {}
        #: object id -> (trio time it was read, the sealed object); see _object_by_id
        self._objects: dict[int, tuple[float, ChainObject]] = {}

    def __repr__(self) -> str:
        return "Downloader()"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        if self.ctx.piecestore is None:
            raise RuntimeError("the downloader needs a piece store")
        timeout = httpx.Timeout(float(self.cfg.degraded_read_timeout))
        async with httpx.AsyncClient(timeout=timeout) as http, trio.open_nursery() as nursery:
            self.http = http
            self._nursery = nursery
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._nursery = None
                self.http = None

    async def drain(self) -> None:
        """Let queued repairs and read records finish (the node calls this within its grace
        period)."""
        await self.wait_background()

    async def wait_background(self) -> None:
        """Return once no read-ahead, repair or read record is queued or running."""
        while self._busy:
            await self._idle.wait()

    async def _prefetch(self, prefetch: _Prefetch,
                        read: Callable[[], Awaitable[_Segment]]) -> None:
        """A read-ahead, counted as background work: one cancelled while its worker thread
        reads still holds a store buffer until the read ends (drain and tests wait for it)."""
        try:
            await prefetch.run(read)
        finally:
            self._busy_end()

    def _busy_begin(self) -> None:
        self._busy += 1
        if self._idle.is_set():
            self._idle = trio.Event()

    def _busy_end(self) -> None:
        self._busy -= 1
        if self._busy == 0:
            self._idle.set()

    @property
    def operator(self) -> str:
        return str(self.ctx.modulars.signer.operator_address)

    def query_tasks(self, prefix: str = "") -> list[Task]:
        """Download and challenge tasks in flight whose key starts with ``prefix``."""
        tasks: list[Task] = [d.task for d in self._downloads.values()]
        tasks += [c.task for c in self._challenges.values()]
        return [t for t in tasks if t.key.startswith(prefix)]

    def _codec(self, params: StorageParams) -> Codec:
        shape = (params.data_shards, params.parity_shards)
        codec = self._codecs.get(shape)
        if codec is None:
            codec = self._codecs[shape] = Codec(*shape)
        return codec

    # --- building tasks (for the gater) ---------------------------------------------------

    async def make_task(self, bucket: str, name: str, *, range_header: str | None = None,
                        if_range: str | None = None, user_address: str = ""
                        ) -> tuple[DownloadObjectTask, bool]:
        """The download task of ``GET /{bucket}/{name}`` and whether it is a partial (206)
        answer. NoSuchBucket / NoSuchKey, InvalidObjectState (not sealed), 416. The Range is
        ignored (the whole object, 200) when ``if_range`` is given and is not the object's
        ETag (:func:`if_range_holds`)."""
        chain = require_chain(self.ctx)
        with chain_errors("download"):
            obj = await chain.get_object(bucket, name)
            chain_bucket = await chain.get_bucket(bucket)
            params = await chain.params()
        if chain_bucket is None:
            raise NoSuchBucket(bucket)
        if obj is None:
            raise NoSuchKey(bucket, name)
        if not obj.sealed:
            raise InvalidObjectState(f"object {name!r} is not sealed yet")
        rng = None
        if if_range_holds(if_range, etag(obj.info)):
            rng = parse_range(range_header, obj.size)
        low, high = rng if rng is not None else (0, max(obj.size - 1, 0))
        task = DownloadObjectTask(object=obj.info, bucket=chain_bucket.info, params=params,
                                  low=low, high=high, user_address=user_address)
        return task, rng is not None

    async def make_challenge_task(self, object_id: int, segment: int, index: int, *,
                                  user_address: str = "") -> ChallengePieceTask:
        """The task of a challenge request (NoSuchKey; InvalidArgument for a bad index)."""
        chain = require_chain(self.ctx)
        obj = await self._object_by_id(object_id, "challenge")
        with chain_errors("challenge"):
            params = await chain.params()
        if obj is None:
            raise NoSuchKey("?", f"id {object_id}")
        try:
            return ChallengePieceTask(object=obj.info, params=params, segment=segment,
                                      redundancy_index=index, user_address=user_address)
        except TaskError as exc:
            raise ServiceError("InvalidArgument", str(exc), 400) from None

    async def _object_by_id(self, object_id: int, what: str) -> ChainObject | None:
        """The object as the chain has it. A sealed one is reused for
        ``downloader.object_cache_ttl`` seconds (a challenge asked for it twice, and a
        degraded read sends one challenge per piece); anything else is asked every time, so
        an object sealed a moment ago is seen at once. At most :data:`OBJECT_CACHE_SIZE`."""
        now = trio.current_time()
        hit = self._objects.get(object_id)
        if hit is not None and now - hit[0] < float(self.cfg.object_cache_ttl):
            return hit[1]
        with chain_errors(what):
            obj = await require_chain(self.ctx).get_object_by_id(object_id)
        if obj is None or not obj.sealed or not self.cfg.object_cache_ttl:
            self._objects.pop(object_id, None)
            return obj
        if len(self._objects) >= OBJECT_CACHE_SIZE:
            self._objects.clear()
        self._objects[object_id] = (now, obj)
        return obj

    async def _sealed_object(self, object_id: int, what: str) -> ChainObject:
        obj = await self._object_by_id(object_id, what)
        if obj is None:
            raise NoSuchKey("?", f"id {object_id}")
        if not obj.sealed:
            raise InvalidObjectState(f"object {object_id} is not sealed")
        return obj

    def _reserve(self, memory: int, priority: int) -> Span:
        try:
            return self.ctx.limiter.span(self.name, memory=memory, task_priority=priority)
        except ResourceLimitExceeded as exc:
            self.stats["refused_busy"] += 1
            raise ServiceUnavailable(f"busy: {exc}", 1.0) from None

    # --- download: the seed's pre / handle / post -----------------------------------------

    async def pre_download_object(self, task: DownloadObjectTask) -> None:
        """Admit a read: sealed object, this SP its primary, range inside, memory reserved."""
        if len(self._downloads) >= self.cfg.max_concurrent:
            self.stats["refused_busy"] += 1
            raise ServiceUnavailable("too many downloads in flight", 1.0)
        obj = await self._admit_read(task)
        span = self._reserve(task.estimate().memory, task.priority)
        self._downloads[id(task)] = _Download(task, obj, span)

    async def head_object(self, task: DownloadObjectTask) -> None:
        """Admit a ``HEAD``: the checks of :meth:`pre_download_object` (the same answer a GET
        would get), with nothing reserved, read, or recorded as read traffic."""
        await self._admit_read(task)
        self.stats["heads"] += 1

    async def _admit_read(self, task: DownloadObjectTask) -> ChainObject:
        obj = await self._sealed_object(task.object.id, "download")
        chain = require_chain(self.ctx)
        with chain_errors("download"):
            bucket = await chain.get_bucket(obj.bucket)
        if bucket is None:
            raise NoSuchBucket(obj.bucket)
        if bucket.primary_sp != self.operator:
            raise AccessDenied(f"this SP is not the primary SP of bucket {obj.bucket!r}")
        if obj.size and task.low >= obj.size:
            raise RangeNotSatisfiable(f"range starts at {task.low}, past the end of a "
                                      f"{obj.size}-byte object", obj.size)
        return obj

    async def handle_download_object_task(self, task: DownloadObjectTask
                                          ) -> AsyncIterator[bytes]:
        """Bytes ``low..min(high, size - 1)`` of the object, one segment's slice at a time."""
        state = self._downloads.get(id(task))
        if state is None:  # called without pre (tests, tools): check, but reserve nothing
            state = _Download(task, await self._sealed_object(task.object.id, "download"))
            self._downloads[id(task)] = state
        obj, params = state.chain_object, task.params
        if obj.size == 0:
            state.completed = True
            return
        low, high = task.low, min(task.high, obj.size - 1)
        if low > high:
            raise RangeNotSatisfiable(f"range starts past the end of a {obj.size}-byte object",
                                      obj.size)
        trusted = await self._primary_hashes(obj, params)
        seg_size = params.segment_size
        first, last = low // seg_size, high // seg_size
        with self._read_ahead_span(task, last - first + 1) as ahead:
            prefetch: _Prefetch | None = None
            try:
                for segment in range(first, last + 1):
                    if prefetch is not None:
                        current = await prefetch.result()
                        prefetch = None
                    else:
                        current = await self._read_segment(obj, params, segment, trusted)
                    try:
                        if ahead is not None and segment < last and self._nursery is not None:
                            # the next segment is read (or rebuilt) while this one is sent
                            prefetch = _Prefetch()
                            self._busy_begin()
                            try:
                                self._nursery.start_soon(self._prefetch, prefetch,
                                                         functools.partial(
                                                             self._read_segment, obj, params,
                                                             segment + 1, trusted))
                            except BaseException:
                                self._busy_end()
                                raise
                        start = segment * seg_size
                        wanted = current.data[max(low - start, 0): high - start + 1]
                        try:
                            for at in range(0, len(wanted), YIELD_SLICE):
                                # bytes of their own: the buffer is reused once this segment
                                # is sent (a slice under glibc's mmap threshold: no fresh pages)
                                chunk = bytes(wanted[at:at + YIELD_SLICE])
                                state.served += len(chunk)
                                self.stats["bytes_served"] += len(chunk)
                                yield chunk
                        finally:
                            del wanted  # no view of the buffer outlives the segment
                    finally:
                        current.close()
            finally:
                if prefetch is not None:
                    prefetch.cancel()
        state.completed = True

    def _read_ahead_span(self, task: DownloadObjectTask, segments: int
                         ) -> contextlib.AbstractContextManager[Span | None]:
        """A span of one more segment for reading ahead, or None (one segment to read, or
        no room in the limiter: the segments are then read one after the other)."""
        if segments < 2 or self._nursery is None:
            return contextlib.nullcontext()
        try:
            return self.ctx.limiter.span(self.name, memory=task.estimate().memory,
                                         task_priority=task.priority)
        except ResourceLimitExceeded:
            self.stats["no_read_ahead"] += 1
            return contextlib.nullcontext()

    def post_download_object(self, task: DownloadObjectTask) -> None:
        """Release the span, count the outcome, and queue the read record (the bytes actually
        served, ``high - low + 1`` for a read that completed) when metadata runs.

        Synchronous, so that it also works in the ``finally`` of a response body the client
        abandoned (a cancelled scope); the record is written in the modular's nursery.
        """
        state = self._downloads.pop(id(task), None)
        if state is None:
            return
        if state.span is not None:
            state.span.done()
        self.stats["downloads" if state.completed else "downloads_failed"] += 1
        if not state.served or not self.ctx.modulars.is_running("metadata"):
            return
        if self._nursery is None:
            log.warning("downloader not serving: a read of %d bytes of object %d is not "
                        "recorded", state.served, task.object.id)
            return
        self._busy_begin()
        self._nursery.start_soon(self._record_read, task, state.served)

    async def _record_read(self, task: DownloadObjectTask, nbytes: int) -> None:
        try:
            await self.ctx.modulars.metadata.record_read(
                task.bucket.name, task.object.id, account=task.user_address, nbytes=nbytes)
            self.stats["reads_recorded"] += 1
        except GfspError as exc:
            log.warning("cannot record the read of object %d: %s", task.object.id, exc)
        finally:
            self._busy_end()

    # --- reading segments -----------------------------------------------------------------

    async def _primary_hashes(self, obj: ChainObject, params: StorageParams) -> _Hashes:
        """The primary's per-segment hashes that verify against ``checksums[0]``."""
        count = params.segment_count(obj.size)
        hashes, source, bad = await self.ctx.db.run(
            lambda c: _trusted_list(c, obj.id, -1, count, obj.checksums[0]))
        if hashes is not None:
            return _Hashes(hashes, source, bad)
        log.warning("object %d: no trusted segment hashes (%s); every segment is read from "
                    "the secondaries", obj.id, "; ".join(bad))
        return _Hashes(None, "none", bad)

    async def _read_segment(self, obj: ChainObject, params: StorageParams, segment: int,
                            trusted: _Hashes) -> _Segment:
        """The segment, verified: from the store into one of its reused aligned buffers
        (``O_DIRECT`` when the store writes that way), else rebuilt from the secondaries."""
        seg_len = params.segment_len(obj.size, segment)
        expected = None if trusted.hashes is None else trusted.hashes[segment]
        hold = contextlib.ExitStack()
        try:
            key = segment_key(obj.id, segment)
            view = hold.enter_context(self.store.buffer(seg_len))
            # read and hash overlap (block by block)
            got, digest = await read_hashed(self.store, key, view)
            if expected is not None and got == seg_len and digest == expected and \
                    await self.store.size(key) == seg_len:
                return _Segment(view, hold)
            reason = "unverifiable" if expected is None else "corrupt"
        except PieceNotFound:
            reason = "missing"
        except PieceStoreError as exc:  # a disk error (EIO, ...): the secondaries have it too
            reason = f"unreadable ({exc})"
        except BaseException:
            hold.close()
            raise
        hold.close()
        log.warning("segment %d of object %d is %s: degraded read from the secondaries",
                    segment, obj.id, reason)
        self.stats["degraded_reads"] += 1
        data, shared = await self._recover_pooled(obj, params, segment, expected)
        try:
            await self._queue_repair(obj, params, segment, data,
                                     fix_meta=trusted.source != "meta", hold=shared)
        except BaseException:
            shared.close()
            raise
        return _Segment(data, shared)

    async def _recover_pooled(self, obj: ChainObject, params: StorageParams, segment: int,
                              expected: bytes | None) -> tuple[memoryview, _Shared]:
        """Rebuild one segment from ``k`` verified pieces of the secondaries (503 when fewer
        than ``k`` verify before the deadline), into one of the store's reused buffers (the
        pieces come in such buffers too: no fresh pages to fault in); close the returned
        hold when done with it."""
        seg_len = params.segment_len(obj.size, segment)
        hold = contextlib.ExitStack()
        try:
            view = hold.enter_context(self.store.buffer(seg_len))
            fetched = await self._gather_pieces(obj, params, segment)
            pieces: dict[int, bytes | memoryview] = {}
            try:
                pieces = {f.index: f.piece for f in fetched if f.piece is not None}
                codec = self._codec(params)
                await trio.to_thread.run_sync(codec.decode_into, pieces, view)
            finally:
                pieces.clear()  # no view of a piece's buffer outlives its hold
                for f in fetched:
                    f.close()
            if expected is not None and await trio.to_thread.run_sync(sha256, view) != expected:
                log.error("segment %d of object %d decoded from verified pieces differs from "
                          "the primary's hash", segment, obj.id)
                raise ServiceError("InternalError", "the rebuilt segment does not match its "
                                   "hash", 500)
        except BaseException:
            hold.close()
            raise
        return view, _Shared(hold)

    async def _gather_pieces(self, obj: ChainObject, params: StorageParams, segment: int
                             ) -> list[_Fetched]:
        """``k`` verified pieces (the caller closes each once done with it); every other
        answer is closed here, on every path."""
        k = params.data_shards
        total = min(params.total_shards, len(obj.secondaries), len(obj.checksums) - 1)
        pending = deque(range(total))  # data indices first, then parity
        got: dict[int, _Fetched] = {}
        failures: list[str] = []
        send, receive = trio.open_memory_channel[_Fetched](math.inf)
        in_flight = 0
        try:
            async with trio.open_nursery() as nursery:

                def launch() -> None:
                    nonlocal in_flight
                    index = pending.popleft()
                    nursery.start_soon(self._fetch_verified, obj, params, segment, index, send)
                    in_flight += 1

                while pending and in_flight < k:
                    launch()
                with trio.move_on_after(float(self.cfg.degraded_read_timeout)):
                    while len(got) < k and in_flight:
                        with trio.move_on_after(self.hedge_after) as hedge:
                            result = await receive.receive()
                        if hedge.cancelled_caught:
                            if pending:  # everyone is slow: ask one more
                                launch()
                            continue
                        in_flight -= 1
                        if result.piece is None:
                            failures.append(f"index {result.index}: {result.reason}")
                            self.stats["pieces_refused"] += 1
                            while pending and in_flight < k - len(got):
                                launch()
                        else:
                            got[result.index] = result
                nursery.cancel_scope.cancel()
        except BaseException:
            for f in got.values():
                f.close()
            raise
        finally:
            while True:  # answers that came after the last one needed
                try:
                    receive.receive_nowait().close()
                except trio.WouldBlock:
                    break
        if len(got) < k:
            for f in got.values():
                f.close()
            silent = in_flight
            raise ServiceUnavailable(
                f"degraded read of segment {segment} of object {obj.id}: {len(got)} of {k} "
                f"pieces verified ({silent} silent; {'; '.join(failures) or 'no failures'})",
                retry_after=5.0)
        return list(got.values())

    async def _fetch_verified(self, obj: ChainObject, params: StorageParams, segment: int,
                              index: int, send: trio.MemorySendChannel[_Fetched]) -> None:
        """Ask secondary ``index`` for its piece and check it against the chain."""
        operator = obj.secondaries[index]
        hold = contextlib.ExitStack()
        try:
            sp = await self._sp(operator)
            if sp is None:
                raise PieceFetchError(f"{operator} is not registered")
            piece, checksums, integrity = await self.fetch_piece(
                operator, sp.endpoint, obj.id, segment, index, hold)
            reason = _check_piece(obj, params, segment, index, piece, checksums, integrity)
            if not reason and await _sha256_off_loop(piece) != checksums[segment]:
                reason = "piece does not match its checksum"
        except Exception as exc:  # noqa: BLE001 - whatever a secondary does, it is one failure
            reason = f"{type(exc).__name__}: {exc}"
            piece = b""
        except BaseException:
            hold.close()
            raise
        if reason:
            del piece
            hold.close()
            log.warning("piece %d of segment %d of object %d from %s refused: %s", index,
                        segment, obj.id, operator, reason)
            send.send_nowait(_Fetched(index, None, reason))
        else:
            send.send_nowait(_Fetched(index, piece, hold=hold))

    async def _sp(self, operator: str) -> SPInfo | None:
        """A registered SP: from the SP registry (the chain client's keeps a short cache:
        a degraded read asks for each secondary once per segment), else from the chain."""
        if self.ctx.sp_registry is not None:
            return await self.ctx.sp_registry.sp_by_operator(operator)
        with chain_errors("degraded read"):
            return await require_chain(self.ctx).get_sp(operator)

    async def _http_fetch_piece(self, operator: str, endpoint: str, object_id: int,
                                segment: int, index: int,
                                hold: contextlib.ExitStack | None = None
                                ) -> tuple[bytes | memoryview, list[bytes], bytes]:
        """The default fetcher: the secondary's challenge route, signed as this SP. With a
        ``hold``, the answer is read into one of the piece store's reused buffers, entered
        into it."""
        if self.http is None:
            raise PieceFetchError("the downloader is not serving (no HTTP client)")
        params = await require_chain(self.ctx).params()
        cap = (2 * params.piece_size(params.segment_size) + 70 *
               params.segment_count(params.max_payload) + 4096)
        url = endpoint.rstrip("/") + challenge_path(object_id, segment, index)
        headers = self.ctx.modulars.signer.sign_http_request(
            "GET", url, body_sha256=sha256(b"").hex(), headers={"accept": BINARY_CHALLENGE})
        async with self.http.stream("GET", url, headers=headers) as response:
            if response.status_code != 200:
                raise PieceFetchError(f"{operator}: HTTP {response.status_code}")
            alloc = None if hold is None else \
                (lambda size: hold.enter_context(self.store.buffer(size)))
            body = await _read_body(response, cap, operator, alloc)
        media = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if media == BINARY_CHALLENGE:
            return decode_challenge_binary(response.headers, body)
        return decode_challenge(bytes(body))  # an SP that answers only JSON

    # --- repairs --------------------------------------------------------------------------

    async def _queue_repair(self, obj: ChainObject, params: StorageParams, segment: int,
                            data: bytes | memoryview, *, fix_meta: bool,
                            hold: _Shared | None = None) -> None:
        """Write a rebuilt segment back in the background (inline when not serving); the
        repair keeps its own share of ``hold``, the buffer under ``data``."""
        key = (obj.id, segment)
        if key in self._repairing:
            return
        try:
            span = self.ctx.limiter.span(self.name, memory=len(data))
        except ResourceLimitExceeded as exc:
            self.stats["repairs_skipped"] += 1
            log.warning("repair of segment %d of object %d skipped: %s", segment, obj.id, exc)
            return
        self._begin_repair(key)
        share = hold.share() if hold is not None else None
        if self._nursery is None:
            await self._repair(obj, params, segment, data, fix_meta, span, share)
            return
        try:
            self._nursery.start_soon(self._repair, obj, params, segment, data, fix_meta, span,
                                     share)
        except RuntimeError as exc:  # the nursery is closing (shutdown): no repair
            span.done()
            if share is not None:
                share.close()
            self._end_repair(key)
            self.stats["repairs_skipped"] += 1
            log.info("repair of segment %d of object %d not queued: %s", segment, obj.id, exc)

    async def _repair(self, obj: ChainObject, params: StorageParams, segment: int,
                      data: bytes | memoryview, fix_meta: bool, span: Span,
                      hold: _Shared | None = None) -> None:
        try:
            with span:
                current = await require_chain(self.ctx).get_object_by_id(obj.id)
                if current is None or not current.sealed or current.checksums != obj.checksums:
                    log.info("object %d changed on the chain: no repair", obj.id)
                    return
                await self.store.put(segment_key(obj.id, segment), data)
                self.stats["repairs"] += 1
                log.info("segment %d of object %d repaired", segment, obj.id)
                if fix_meta:
                    await self._rebuild_primary_meta(obj, params)
        except (GfspError, OSError) as exc:
            self.stats["repair_failures"] += 1
            log.warning("repair of segment %d of object %d failed: %s", segment, obj.id, exc)
        except Exception:  # a bug in best-effort background work: logged with
            # its traceback and counted; it must not stop the downloader (and the node)
            self.stats["repair_failures"] += 1
            log.exception("repair of segment %d of object %d failed", segment, obj.id)
        finally:
            del data
            if hold is not None:
                hold.close()
            self._end_repair((obj.id, segment))

    def _begin_repair(self, key: tuple[int, int]) -> None:
        self._repairing.add(key)
        self._busy_begin()

    def _end_repair(self, key: tuple[int, int]) -> None:
        if key in self._repairing:
            self._repairing.discard(key)
            self._busy_end()

    async def _rebuild_primary_meta(self, obj: ChainObject, params: StorageParams) -> None:
        """Rewrite the primary's integrity_meta (and piece_hashes) once they verify again."""
        trusted = await self._primary_hashes(obj, params)
        if trusted.source == "meta":
            return
        hashes = trusted.hashes
        if hashes is None:  # hash what the store holds now; keep it only if it is the object
            hashes = []
            for segment in range(params.segment_count(obj.size)):
                try:
                    data = await self.store.get(segment_key(obj.id, segment))
                except PieceNotFound:
                    return  # another repair will come back here
                hashes.append(await trio.to_thread.run_sync(sha256, data))
            if integrity_hash(hashes) != obj.checksums[0]:
                return
        integrity = obj.checksums[0]

        def write(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT OR REPLACE INTO integrity_meta (object_id, redundancy_index, "
                         "integrity_hash, checksums, signature) VALUES (?, -1, ?, ?, NULL)",
                         (obj.id, integrity, pack(hashes)))
            conn.executemany("INSERT OR REPLACE INTO piece_hashes (object_id, segment, "
                             "redundancy_index, checksum) VALUES (?, ?, -1, ?)",
                             [(obj.id, i, h) for i, h in enumerate(hashes)])

        await self.ctx.db.run(write)
        self.stats["meta_repairs"] += 1
        log.info("integrity metadata of object %d rebuilt", obj.id)

    def _start_recovery(self, obj: ChainObject, params: StorageParams, segment: int) -> None:
        """Rebuild a bad primary segment from the secondaries and repair it, in the
        background (found bad by a challenge; nothing when not serving)."""
        key = (obj.id, segment)
        if self._nursery is None or key in self._repairing:
            return
        self._begin_repair(key)
        self._nursery.start_soon(self._recover_in_background, obj, params, segment)

    async def _recover_in_background(self, obj: ChainObject, params: StorageParams,
                                     segment: int) -> None:
        try:
            trusted = await self._primary_hashes(obj, params)
            expected = None if trusted.hashes is None else trusted.hashes[segment]
            data, shared = await self._recover_pooled(obj, params, segment, expected)
            try:
                span = self.ctx.limiter.span(self.name, memory=len(data))
            except BaseException:
                shared.close()
                raise
            await self._repair(obj, params, segment, data, trusted.source != "meta", span,
                               shared)
        except (GfspError, OSError) as exc:
            self.stats["repair_failures"] += 1
            log.warning("recovery of segment %d of object %d failed: %s", segment, obj.id, exc)
        except Exception:  # as in _repair: a bug here must not stop the node
            self.stats["repair_failures"] += 1
            log.exception("recovery of segment %d of object %d failed", segment, obj.id)
        finally:
            self._end_repair((obj.id, segment))

    # --- challenge: the seed's pre / handle / post ----------------------------------------

    async def pre_challenge_piece(self, task: ChallengePieceTask) -> None:
        """Admit a challenge: object sealed, this SP holds that index, segment in range."""
        obj = await self._sealed_object(task.object.id, "challenge")
        index = task.redundancy_index
        if index == -1:
            chain = require_chain(self.ctx)
            with chain_errors("challenge"):
                bucket = await chain.get_bucket(obj.bucket)
            if bucket is None or bucket.primary_sp != self.operator:
                raise AccessDenied(f"this SP is not the primary SP of object {obj.id}")
        elif index >= len(obj.secondaries) or obj.secondaries[index] != self.operator:
            raise AccessDenied(f"this SP does not hold piece index {index} of object {obj.id}")
        count = task.params.segment_count(obj.size)
        if not 0 <= task.segment < count:
            raise ServiceError("InvalidArgument", f"segment {task.segment} is not in "
                               f"0..{count - 1}", 400)
        span = self._reserve(task.estimate().memory, task.priority)
        self._challenges[id(task)] = _Challenge(task, obj, span)

    async def handle_challenge_piece(self, task: ChallengePieceTask,
                                     hold: contextlib.ExitStack | None = None
                                     ) -> tuple[bytes | memoryview, list[bytes], bytes]:
        """``(piece, checksums, integrity_hash)``; 500 (logged) when this SP's data is bad.
        With a ``hold``, the piece is read (and hashed at the same time) into one of the
        piece store's reused buffers, entered into ``hold``: close it once the piece is sent."""
        state = self._challenges.get(id(task))
        obj = (state.chain_object if state is not None
               else await self._sealed_object(task.object.id, "challenge"))
        params, index, segment = task.params, task.redundancy_index, task.segment
        key = (segment_key(obj.id, segment) if index == -1
               else piece_key(obj.id, segment, index))
        expected = obj.checksums[0 if index == -1 else 1 + index]
        count = params.segment_count(obj.size)
        checksums, _, _ = await self.ctx.db.run(
            lambda c: _trusted_list(c, obj.id, index, count, expected))
        data: bytes | memoryview | None = None
        digest: bytes | None = None
        try:
            if hold is None:
                data = await self.store.get(key)
            else:
                data, digest = await self._read_pooled(key, hold)
        except PieceNotFound:
            data = None
        problem = ""
        if checksums is None:
            problem = "its checksum list does not verify against the chain"
        elif data is None:
            problem = "the piece is missing"
        elif not 0 <= segment < len(checksums) or (
                digest or await trio.to_thread.run_sync(sha256, data)) != checksums[segment]:
            problem = "the piece does not match its checksum"
        if problem:
            self.stats["challenge_failures"] += 1
            log.error("challenge of %s (object %d, index %d): %s", key, obj.id, index, problem)
            if index == -1:
                self._start_recovery(obj, params, segment)
            raise ServiceError("InternalError", f"piece {key}: {problem}", 500)
        assert data is not None and checksums is not None
        return data, checksums, expected

    async def _read_pooled(self, key: str, hold: contextlib.ExitStack
                           ) -> tuple[memoryview, bytes]:
        """A whole piece in a reused store buffer (entered into ``hold``) and its SHA-256."""
        size = await self.store.size(key)
        if size is None:
            raise PieceNotFound(key)
        view = hold.enter_context(self.store.buffer(size))
        got, digest = await read_hashed(self.store, key, view)
        return view[:got], digest

    def post_challenge_piece(self, task: ChallengePieceTask) -> None:
        state = self._challenges.pop(id(task), None)
        if state is None:
            return
        if state.span is not None:
            state.span.done()
        self.stats["challenges"] += 1


# --- helpers ----------------------------------------------------------------------------------


async def _read_body(response: httpx.Response, cap: int, who: str,
                     alloc: Callable[[int], memoryview] | None = None
                     ) -> bytearray | memoryview:
    """A response body of at most ``cap`` bytes. With a Content-Length (the challenge route
    sends one) it is read into one buffer of that size, allocated once (by ``alloc`` when
    given): growing a buffer 4 MiB long copied it and faulted in fresh pages at each step."""
    declared = response.headers.get("content-length", "")
    size = int(declared) if declared.isascii() and declared.isdigit() and \
        len(declared) <= 12 else -1
    if size > cap:
        raise PieceFetchError(f"{who}: answer of {size} bytes, over {cap}")
    if size < 0:  # no length given: grow as it comes
        grown = bytearray()
        async for chunk in response.aiter_bytes():
            grown += chunk
            if len(grown) > cap:
                raise PieceFetchError(f"{who}: answer over {cap} bytes")
        return grown
    body: bytearray | memoryview = bytearray(size) if alloc is None else alloc(size)
    got = 0
    with memoryview(body) as view:
        async for chunk in response.aiter_bytes():
            end = got + len(chunk)
            if end > size:
                raise PieceFetchError(f"{who}: answer longer than its {size}-byte length")
            view[got:end] = chunk
            got = end
    if got != size:
        raise PieceFetchError(f"{who}: answer of {got} bytes, its length says {size}")
    return body


def _check_piece(obj: ChainObject, params: StorageParams, segment: int, index: int,
                 piece: bytes | memoryview, checksums: list[bytes], integrity: bytes
                 ) -> str:
    """Why a fetched piece's checksum list and size are refused ("" when they verify against
    the chain; the piece's sha256 against ``checksums[segment]`` is left to the caller)."""
    if integrity != obj.checksums[1 + index]:
        return "integrity hash differs from the chain's"
    if integrity_hash(checksums) != integrity:
        return "checksum list does not hash to its integrity hash"
    if len(checksums) != params.segment_count(obj.size):
        return f"checksum list has {len(checksums)} entries"
    if len(piece) != params.piece_size(params.segment_len(obj.size, segment)):
        return f"piece has {len(piece)} bytes"
    return ""  # the caller checks the piece's own hash (in a worker thread)


#: Smaller data is hashed on the event loop (cheaper than a worker thread's round trip).
INLINE_HASH_BYTES = 256 * 1024


async def _sha256_off_loop(data: bytes | memoryview) -> bytes:
    """SHA-256 of ``data``, in a worker thread unless it is small."""
    if len(data) <= INLINE_HASH_BYTES:
        return sha256(data)
    return await trio.to_thread.run_sync(sha256, data)


def _trusted_list(conn: sqlite3.Connection, object_id: int, index: int, count: int,
                  expected: bytes) -> tuple[list[bytes] | None, str, list[str]]:
    """The checksum list this SP recorded for ``(object_id, index)`` if it is whole and hashes
    to ``expected`` (the chain's checksum): from ``integrity_meta`` (source ``meta``), else from
    ``piece_hashes`` (source ``piece_hashes``); else None (source ``none``) and what was wrong.
    """
    bad: list[str] = []
    meta = _integrity_meta(conn, object_id, index)
    if meta is None:
        bad.append("no integrity_meta row")
    else:
        hashes = _checked_list(meta, count, expected)
        if hashes is not None:
            return hashes, "meta", bad
        bad.append("integrity_meta does not verify against the chain")
    rows = _piece_hash_rows(conn, object_id, index)
    if [s for s, _ in rows] == list(range(count)):
        listed = [h for _, h in rows]
        if integrity_hash(listed) == expected:
            return listed, "piece_hashes", bad
    bad.append("piece_hashes incomplete or not verifying")
    return None, "none", bad


def _integrity_meta(conn: sqlite3.Connection, object_id: int, index: int
                    ) -> tuple[bytes, bytes] | None:
    row = conn.execute("SELECT integrity_hash, checksums FROM integrity_meta WHERE "
                       "object_id = ? AND redundancy_index = ?", (object_id, index)).fetchone()
    return None if row is None else (bytes(row[0]), bytes(row[1]))


def _piece_hash_rows(conn: sqlite3.Connection, object_id: int, index: int
                     ) -> list[tuple[int, bytes]]:
    rows = conn.execute("SELECT segment, checksum FROM piece_hashes WHERE object_id = ? AND "
                        "redundancy_index = ? ORDER BY segment", (object_id, index)).fetchall()
    return [(int(r[0]), bytes(r[1])) for r in rows]


def _checked_list(meta: tuple[bytes, bytes], count: int, expected: bytes
                  ) -> list[bytes] | None:
    """The checksum list of an integrity_meta row, if it is whole and hashes to ``expected``."""
    stored, blob = meta
    try:
        hashes = unpack(blob)
    except GfspError:
        return None
    if not isinstance(hashes, list) or len(hashes) != count or not all(
            isinstance(h, bytes) and len(h) == HASH_LEN for h in hashes):
        return None
    if stored != expected or integrity_hash(hashes) != expected:
        return None
    return hashes
