"""Uploader: stores a put object's payload on the primary SP (the seed's Uploader).

``pre_upload_object`` admits the upload (object CREATED on the chain, size within the chain's
max payload, the manager's global upload policy) and reserves about two segments of memory from
the shared limiter (over the limit: 503 with Retry-After). ``handle_upload_object_task`` streams
the body: it cuts segments of the chain's segment size, and while the next segment arrives, a
writer task hashes the previous one and writes it to the piece store, both in worker threads
(hashlib and file IO release the GIL), so the event loop stays responsive and memory stays at
about two segments whatever the object size. At the end the length must equal the object's
size and the integrity hash (SHA-256 over the segment hashes) its primary checksum on the chain;
otherwise every piece written is removed and the upload refused. Progress is kept in SPDB
(``upload_progress``); a finished upload goes to the manager, which queues its replication.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import trio

from node.chain import chain_errors, require_chain
from node.crypto import pack
from node.ec import integrity_hash, sha256
from node.errors import (
    DBError,
    InvalidObjectState,
    NoSuchKey,
    RequestTimeout,
    ResourceLimitExceeded,
    ServiceError,
    ServiceUnavailable,
    unwrap,
)
from node.modular import ModularBase, NodeContext
from node.piecestore import segment_key
from node.rcmgr import Span
from node.tasks import Task, UploadObjectTask

log = logging.getLogger("gfsp.uploader")

UPLOADING, UPLOADED, FAILED = "UPLOADING", "UPLOADED", "FAILED"

#: Segment buffers per upload: one being received while the previous one is hashed and written
#: (the memory ``pre_upload_object`` reserves).
SEGMENTS_IN_FLIGHT = 2
#: Seconds between two upload-progress rows of one upload (its end is always written)
PROGRESS_INTERVAL = 0.5


class BadDigest(ServiceError):
    def __init__(self, message: str) -> None:
        super().__init__("BadDigest", message, 400)


class IncompleteUpload(ServiceError):
    def __init__(self, message: str) -> None:
        super().__init__("IncompleteBody", message, 400)


class Uploader(ModularBase):
    name = "uploader"
    needs_piecestore = True
    requires = ("authorizer", "manager")

    def __init__(self, ctx: NodeContext) -> None:
        super().__init__(ctx)
        self.cfg = ctx.config.uploader
        self._spans: dict[str, Span] = {}
        self._tasks: dict[str, UploadObjectTask] = {}

    def query_tasks(self, prefix: str = "") -> list[Task]:
        return [t for k, t in self._tasks.items() if k.startswith(prefix)]

    async def make_task(self, bucket: str, name: str) -> UploadObjectTask:
        """The upload task of an object on the chain (NoSuchKey / InvalidObjectState)."""
        chain = require_chain(self.ctx)
        with chain_errors("upload"):
            obj = await chain.get_object(bucket, name)
            params = await chain.params()
        if obj is None:
            raise NoSuchKey(bucket, name)
        if obj.sealed:
            raise InvalidObjectState(f"object {name!r} is already sealed")
        return UploadObjectTask(object=obj.info, params=params)

    # --- the seed's pre / handle / post ---------------------------------------------------

    async def pre_upload_object(self, task: UploadObjectTask) -> None:
        if task.object.size > task.params.max_payload:
            raise ServiceError("EntityTooLarge", f"object size {task.object.size} is over the "
                               f"chain's max payload {task.params.max_payload}", 413)
        if task.key in self._tasks or len(self._tasks) >= self.cfg.max_concurrent:
            raise ServiceUnavailable("too many uploads in flight" if task.key not in self._tasks
                                     else "this object is being uploaded already", 1.0)
        if not self.store.has_room(task.object.size):
            raise ServiceError("InsufficientStorage", "not enough free disk space", 507)
        memory = SEGMENTS_IN_FLIGHT * min(task.params.segment_size, max(task.object.size, 1))
        try:
            span = self.ctx.limiter.span(self.name, memory=memory, task_priority=task.priority)
        except ResourceLimitExceeded as exc:
            raise ServiceUnavailable(f"busy: {exc}", 1.0) from None
        try:
            if self.ctx.modulars.is_running("manager"):
                await self.ctx.modulars.manager.handle_create_upload_object_task(task)
        except BaseException:
            span.done()
            raise
        self._spans[task.key] = span
        self._tasks[task.key] = task

    async def handle_upload_object_task(self, task: UploadObjectTask,
                                        stream: AsyncIterator[bytes]) -> None:
        """Store the payload; raises (after removing what it wrote) when it is not the object."""
        obj, seg_size = task.object, task.params.segment_size
        hashes: list[bytes] = []
        send, receive = trio.open_memory_channel[tuple[int, memoryview, int]](
            SEGMENTS_IN_FLIGHT)
        try:  # every failure below, the progress writes included, cleans up what was written
            await self._progress(task, UPLOADING, 0, 0)
            # the segment buffers are the piece store's (page-aligned: an O_DIRECT put writes
            # straight from them), and go before the manager queues replication
            with contextlib.ExitStack() as buffers:
                size = min(seg_size, max(obj.size, 1))
                slots = _Slots(SEGMENTS_IN_FLIGHT,
                               lambda: buffers.enter_context(self.store.buffer(size)))
                timeout = float(self.cfg.upload_timeout)
                try:
                    with trio.move_on_after(timeout) as deadline:
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(self._writer, task, receive, hashes, slots)
                            async with send:
                                total = await self._cut(stream, seg_size, obj.size, send,
                                                        slots)
                except BaseExceptionGroup as group:
                    raise unwrap(group) from None
                finally:
                    slots.drop()
                if deadline.cancelled_caught:
                    raise RequestTimeout(f"the upload took longer than uploader.upload_timeout"
                                         f" ({timeout:g} s)")
            if total != obj.size:
                raise IncompleteUpload(f"got {total} bytes, the object has {obj.size}")
            integrity = integrity_hash(hashes)
            if integrity != obj.checksums[0]:
                raise BadDigest("the payload's integrity hash differs from the object's "
                                "checksum on the chain")
            await self.ctx.db.run(lambda c: self._record_integrity(c, task, integrity, hashes))
            await self._progress(task, UPLOADED, len(hashes), obj.size)
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                await self.store.delete_object(task.object.id)
                task.set_error(_reason(exc))
                try:
                    await self._progress(task, FAILED, len(hashes), 0, error=_reason(exc))
                except DBError as db_exc:  # e.g. SPDB's disk is full (the manager must hear)
                    log.warning("upload %s failed (%s); its FAILED state was not recorded: %s",
                                task.key, _reason(exc), db_exc, extra={"task_key": task.key})
                if self.ctx.modulars.is_running("manager"):
                    await self.ctx.modulars.manager.handle_done_upload_object_task(task)
            raise
        if self.ctx.modulars.is_running("manager"):
            await self.ctx.modulars.manager.handle_done_upload_object_task(task)

    def post_upload_object(self, task: UploadObjectTask) -> None:
        span = self._spans.pop(task.key, None)
        if span is not None:
            span.done()
        self._tasks.pop(task.key, None)

    # --- the pipeline ---------------------------------------------------------------------

    async def _cut(self, stream: AsyncIterator[bytes], seg_size: int, size: int,
                   send: trio.MemorySendChannel[tuple[int, memoryview, int]],
                   slots: _Slots) -> int:
        """Cut the stream into segments, copied once into a slot each and handed to the
        writer; returns the length."""
        total = index = fill = 0
        slot: memoryview | None = None
        async for chunk in stream:
            total += len(chunk)
            if total > size:
                raise IncompleteUpload(f"the body is longer than the object's {size} bytes")
            with memoryview(chunk) as view:
                done = 0
                while done < len(view):
                    if slot is None:
                        slot = await slots.take()
                    n = min(len(view) - done, seg_size - fill)
                    slot[fill:fill + n] = view[done:done + n]
                    fill += n
                    done += n
                    if fill == seg_size:
                        await send.send((index, slot, fill))
                        slot, fill, index = None, 0, index + 1
        if slot is not None and fill:
            await send.send((index, slot, fill))
        return total

    async def _writer(self, task: UploadObjectTask,
                      receive: trio.MemoryReceiveChannel[tuple[int, memoryview, int]],
                      hashes: list[bytes], slots: _Slots) -> None:
        """Hash and durably write each segment (worker threads, in parallel), in order; the
        slot goes back to the cutter once both are done."""
        done_bytes = 0
        last_saved = trio.current_time()
        async with receive:
            async for index, slot, length in receive:
                digest: list[bytes] = []
                with slot[:length] as segment:

                    async def hash_it(data: memoryview = segment, out: list[bytes] = digest
                                      ) -> None:
                        out.append(await trio.to_thread.run_sync(sha256, data))

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(hash_it)
                        nursery.start_soon(self.store.put, segment_key(task.object.id, index),
                                           segment)
                slots.give(slot)
                hashes.append(digest[0])
                done_bytes += length
                now = trio.current_time()
                if now - last_saved >= PROGRESS_INTERVAL:  # a row per segment cost a DB trip
                    last_saved = now
                    await self._progress(task, UPLOADING, index + 1, done_bytes)

    def _record_integrity(self, conn: sqlite3.Connection, task: UploadObjectTask,
                          integrity: bytes, hashes: list[bytes]) -> None:
        conn.execute("INSERT OR REPLACE INTO integrity_meta (object_id, redundancy_index, "
                     "integrity_hash, checksums, signature) VALUES (?, -1, ?, ?, NULL)",
                     (task.object.id, integrity, pack(hashes)))
        conn.executemany("INSERT OR REPLACE INTO piece_hashes (object_id, segment, "
                         "redundancy_index, checksum) VALUES (?, ?, -1, ?)",
                         [(task.object.id, i, h) for i, h in enumerate(hashes)])

    async def _progress(self, task: UploadObjectTask, state: str, segments: int, nbytes: int,
                        *, error: str = "") -> None:
        o = task.object
        row: tuple[Any, ...] = (o.id, o.bucket, o.name, state, segments, nbytes, error,
                                time.time())
        await self.ctx.db.run(lambda c: c.execute(
            "INSERT OR REPLACE INTO upload_progress (object_id, bucket, object, state, "
            "segments_done, bytes_done, error, update_time) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            row))


class _Slots:
    """At most ``count`` segment buffers for one upload, made by ``make`` on first use and
    reused: the cutter fills one while the writer hashes and writes another."""

    def __init__(self, count: int, make: Callable[[], memoryview]) -> None:
        self._made = 0
        self._count = count
        self._make = make
        self._send, self._receive = trio.open_memory_channel[memoryview](count)

    async def take(self) -> memoryview:
        if self._made < self._count:
            try:
                return self._receive.receive_nowait()
            except trio.WouldBlock:
                self._made += 1
                return self._make()
        return await self._receive.receive()

    def give(self, slot: memoryview) -> None:
        self._send.send_nowait(slot)

    def drop(self) -> None:
        """No more takes or gives (the buffers themselves go with their maker's scope)."""
        self._send.close()
        self._receive.close()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ServiceError):
        return f"{exc.code}: {exc.message}"
    if isinstance(exc, trio.Cancelled):
        return "cancelled"
    return f"{type(exc).__name__}: {exc}"
