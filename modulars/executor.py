"""TaskExecutor: runs the background tasks the manager hands out (the seed's TaskExecutor).

``executor.workers`` workers each ask the manager for the most urgent task that fits what the
executor's limiter scope has left (:meth:`ask_task`), reserve its estimate for the run, handle
it, and report the result (:meth:`report_task`). A run stops a little before its lease
(``task.timeout``) ends, when the manager would hand the task out again, so that two runs of
one task never overlap; an unexpected error fails the task, never the worker.

- ReplicatePiece (primary): approvals from the P2P modular (min = data + parity, max = min +
  ``p2p.approval_backups``); each segment is read from the piece store once, erasure-coded in a
  worker thread, and piece ``i`` is sent to secondary ``i``'s receiver (signed HTTP, the
  approval attached), each secondary at its own pace within ``executor.segments_in_flight``
  segments held. A secondary that fails is replaced by a backup approval, which gets every
  piece of that index again (once the others have theirs; with more failed secondaries than
  backups the replication stops at once). Each secondary's "done" returns its integrity
  signature, checked against its approval key on the chain and the object's checksum for its
  index. Then the task carries the secondaries, signatures and when they signed, and the
  manager queues the seal.
  An object already sealed by us on the chain is not replicated (the task reports ``sealed``).
- SealObject: an object already sealed by us on the chain (a seal that landed before a crash
  let it be reported) is done. Else the signer seals on the chain (it retries sequence
  problems itself), unless the signatures are so old that a secondary may have stopped
  waiting for the seal and dropped its pieces (``executor.seal_confirm_timeout``, less a
  margin): then SealTooLate, and the manager replicates the object again (a few times).
- ReceivePiece (secondary): confirm the object was sealed with us at our index; when it is not
  sealed within ``executor.seal_confirm_timeout`` (or sealed without us, or deleted), collect
  our pieces.
- GCObject: objects deleted on the chain between two heights lose their pieces and records;
  GCZombiePiece: pieces with no object on the chain (and no upload or receive in progress), or
  of an index this SP does not hold; GCMeta: old task and read records.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import trio

from modulars.signer import integrity_payload
from node.chain import ChainClient, ChainError, require_chain
from node.crypto import verify
from node.ec import Codec, piece_size
from node.errors import DBError, GfspError, ResourceLimitExceeded, SignatureError, unwrap
from node.modular import ModularBase, NodeContext
from node.piecestore import parse_key, segment_key
from node.rcmgr import Span
from node.tasks import (
    GCMetaTask,
    GCObjectTask,
    GCZombiePieceTask,
    ObjectInfo,
    ReceivePieceTask,
    ReplicatePieceApprovalTask,
    ReplicatePieceTask,
    SealObjectTask,
    StorageParams,
    Task,
)
from p2p.messages import ApprovalResponse, encode

log = logging.getLogger("gfsp.executor")

APPROVAL_HEADER = "x-gfsp-approval"
#: Bytes per write of a piece sent to a secondary (see _chunks)
SEND_CHUNK = 256 * 1024


#: Seconds before the end of its lease at which a task's run is stopped (see run_task)
LEASE_MARGIN = 5.0
#: Seconds (or a tenth of ``seal_confirm_timeout``, if more) before the secondaries' seal
#: deadline after which the primary no longer seals with their signatures
SEAL_MARGIN = 5.0


class ReplicateError(GfspError):
    """A replication step failed (the task is retried by the manager)."""


class SealTooLate(GfspError):
    """The secondaries' signatures are too old to seal with (see handle_seal_object_task)."""


class NotSealedYet(GfspError):
    """A secondary's confirm task: the object is not sealed yet (retried later)."""


def replicate_path(object_id: int, index: int, segment: int | None = None) -> str:
    """The receiver's route for one piece, or for "done" when ``segment`` is None."""
    tail = "done" if segment is None else str(segment)
    return f"/gfsp/v1/replicate/{object_id}/{index}/{tail}"


class TaskExecutor(ModularBase):
    name = "executor"
    requires = ("signer", "manager", "p2p")

    def __init__(self, ctx: NodeContext) -> None:
        super().__init__(ctx)
        self.cfg = ctx.config.executor
        self.http: httpx.AsyncClient | None = None
        self.running: dict[str, Task] = {}

    @property
    def chain(self) -> ChainClient:
        return require_chain(self.ctx)

    def query_tasks(self, prefix: str = "") -> list[Task]:
        return [t for k, t in self.running.items() if k.startswith(prefix)]

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        if self.ctx.piecestore is None:
            raise RuntimeError("the executor needs a piece store")
        timeout = httpx.Timeout(self.ctx.config.p2p.request_timeout * 6,
                                connect=self.ctx.config.p2p.connect_timeout)
        async with httpx.AsyncClient(timeout=timeout) as http, trio.open_nursery() as nursery:
            self.http = http
            for _ in range(self.cfg.workers):
                nursery.start_soon(self._worker)
            if self.ctx.chain is not None:
                nursery.start_soon(self._watch_deletions)
            task_status.started()

    # --- asking for work ------------------------------------------------------------------

    async def ask_task(self) -> Task | None:
        """The seed's AskTask: the most urgent task that fits what this scope has left."""
        remaining = self.ctx.limiter.remaining(self.name)
        return await self.ctx.modulars.manager.dispatch_task(remaining)

    async def _worker(self) -> None:
        manager = self.ctx.modulars.manager
        while True:
            try:
                task = await self.ask_task()
                ran = task is not None and await self.run_task(task)
            except DBError as exc:
                # SPDB refused the dispatch or the report (e.g. its disk is full): the task
                # stays pending, or comes back when its lease ends; ask again after a pause
                # rather than stop the node (found by filling a testnet node's disk)
                log.warning("executor: SPDB refused a task update: %s", exc)
                await trio.sleep(self.cfg.ask_interval)
                continue
            if not ran:
                # nothing fits, or the task was given back unrun: wait for work (or for the
                # resources to free), at most ask_interval
                await manager.wait_for_work(self.cfg.ask_interval)

    async def run_task(self, task: Task) -> bool:
        """Handle one task within its reserved estimate and its lease, then report it.

        The manager leases a dispatched task for ``task.timeout`` seconds and hands it out
        again once the lease ends; the run stops a little before that (:data:`LEASE_MARGIN`,
        at most a tenth of the lease) and reports the attempt failed, so that two runs of
        one task never overlap.

        The task was chosen to fit :meth:`ask_task`'s snapshot of the limiter, which another
        worker (or modular) may have used up meanwhile: when the reservation is refused the
        task is given back to the manager unrun (:meth:`Manager.release_task`: no attempt
        counted, no backoff) and this returns False."""
        estimate = task.estimate()
        try:
            span = self.ctx.limiter.span(self.name, memory=estimate.memory,
                                         task_priority=task.priority)
        except ResourceLimitExceeded as exc:
            log.info("task %s given back unrun: %s", task.key, exc,
                     extra={"task_key": task.key})
            await self.ctx.modulars.manager.release_task(task)
            return False
        self.running[task.key] = task
        error = ""
        budget = task.timeout - min(LEASE_MARGIN, task.timeout / 10)
        try:
            with span:
                with trio.move_on_after(budget) as lease:
                    await self.handle(task)
            if lease.cancelled_caught:
                error = f"LeaseEnded: stopped after {budget:.1f} s of its {task.timeout:g} s lease"
                log.warning("task %s: %s", task.key, error, extra={"task_key": task.key})
        except (GfspError, httpx.HTTPError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, NotSealedYet):  # the usual wait of a secondary: no failure
                log.debug("task %s: %s; asked again later", task.key, exc,
                          extra={"task_key": task.key})
            else:
                log.warning("task %s failed: %s", task.key, error,
                            extra={"task_key": task.key})
        except Exception as exc:  # a bug or an error nobody mapped: this task fails (and is
            # retried by the manager), the worker and the node go on
            error = f"{type(exc).__name__}: {exc}"
            log.exception("task %s failed unexpectedly: %s", task.key, error,
                          extra={"task_key": task.key})
        finally:
            self.running.pop(task.key, None)
        task.set_error(error or None)
        await self.report_task(task)
        return True

    async def report_task(self, task: Task) -> None:
        """The seed's ReportTask: hand the result to the manager."""
        await self.ctx.modulars.manager.report_task(task, task.error or None)

    async def handle(self, task: Task) -> None:
        if isinstance(task, ReplicatePieceTask):
            await self.handle_replicate_piece_task(task)
        elif isinstance(task, SealObjectTask):
            await self.handle_seal_object_task(task)
        elif isinstance(task, ReceivePieceTask):
            await self.handle_receive_piece_task(task)
        elif isinstance(task, GCObjectTask):
            await self.handle_gc_object_task(task)
        elif isinstance(task, GCZombiePieceTask):
            await self.handle_gc_zombie_piece_task(task)
        elif isinstance(task, GCMetaTask):
            await self.handle_gc_meta_task(task)
        else:
            raise ReplicateError(f"the executor does not run {type(task).__name__}")

    # --- ReplicatePiece -------------------------------------------------------------------

    async def handle_replicate_piece_task(self, task: ReplicatePieceTask) -> None:
        obj, params = task.object, task.params
        if await self._sealed_by_us(obj):  # the secondaries would refuse its pieces (409)
            log.info("object %d is already sealed on the chain: %s skips to done", obj.id,
                     task.key, extra={"task_key": task.key})
            task.sealed = True
            return
        n = params.data_shards + params.parity_shards
        p2p = self.ctx.modulars.p2p
        ask = ReplicatePieceApprovalTask(object=obj, params=params)
        approvals = await p2p.handle_replicate_piece_approval(
            ask, n, n + self.ctx.config.p2p.approval_backups)
        targets: list[ApprovalResponse] = list(approvals[:n])
        backups: list[ApprovalResponse] = list(approvals[n:])
        codec = _ObjectCodec(params, obj.size)
        segments = params.segment_count(obj.size)
        failed: set[int] = set()  # indices whose secondary failed a piece: a backup takes over
        await self._send_pieces(task, targets, backups, codec, segments, failed)
        signatures: list[bytes] = [b""] * n
        signed_at: list[float] = [0.0] * n
        switching = trio.Lock()  # one backup re-sent at a time: one segment's pieces held
        for index in sorted(failed):  # before any "done": the signatures come close together
            await self._switch(targets, backups, index, codec, obj.id, segments)
        try:
            async with trio.open_nursery() as nursery:  # every secondary's "done" at once
                for index in range(n):
                    nursery.start_soon(self._done_or_switch, targets, backups, index, task,
                                       codec, segments, signatures, signed_at, switching)
        except BaseExceptionGroup as group:
            raise unwrap(group) from None
        task.secondaries = [t.approver for t in targets]
        task.secondary_signatures = signatures
        task.signed_at = min(signed_at)

    async def _done_or_switch(self, targets: list[ApprovalResponse],
                              backups: list[ApprovalResponse], index: int,
                              task: ReplicatePieceTask, codec: _ObjectCodec, segments: int,
                              signatures: list[bytes], signed_at: list[float],
                              switching: trio.Lock) -> None:
        """Secondary ``index``'s signature (and when it came: the secondary's seal deadline
        runs from about then); a secondary that fails "done" is switched to a backup (sent
        every piece of that index again) until one signs or none is left."""
        while True:
            try:
                signatures[index] = await self._done(targets[index], task, index)
                signed_at[index] = time.time()
                return
            except (ReplicateError, httpx.HTTPError) as exc:
                log.warning("secondary %s failed done for %s index %d: %s",
                            targets[index].approver, task.key, index, exc)
                async with switching:
                    await self._switch(targets, backups, index, codec, task.object.id,
                                       segments)

    async def _send_pieces(self, task: ReplicatePieceTask, targets: list[ApprovalResponse],
                           backups: list[ApprovalResponse], codec: _ObjectCodec, segments: int,
                           failed: set[int]) -> None:
        """Piece ``i`` of every segment to secondary ``i``: segments are read, encoded and
        hashed in order (:meth:`_encode_segments`) while one task per secondary sends its
        pieces in order (:meth:`_send_index`), so a secondary that is slow on one piece holds
        up the others only once ``executor.segments_in_flight`` segments wait for it. A
        segment's buffer and slot are given back once every secondary is done with it; on
        any error, every buffer goes back to the store."""
        obj = task.object
        encoded: list[_Encoded] = []  # what was encoded, to give back on every path
        ahead, depth = self._read_ahead(task)
        with ahead:
            slots = trio.Semaphore(depth)
            channels = [trio.open_memory_channel[_Encoded](depth) for _ in targets]
            try:
                async with trio.open_nursery() as nursery:
                    for index, (_send, receive) in enumerate(channels):
                        nursery.start_soon(self._send_index, targets, backups, index, obj.id,
                                           receive, failed)
                    await self._encode_segments(codec, obj.id, segments, slots,
                                                [send for send, _receive in channels], encoded)
            except BaseExceptionGroup as group:
                raise unwrap(group) from None
            finally:
                for segment in encoded:
                    segment.close()

    async def _send_index(self, targets: list[ApprovalResponse],
                          backups: list[ApprovalResponse], index: int, object_id: int,
                          receive: trio.MemoryReceiveChannel[_Encoded], failed: set[int]
                          ) -> None:
        """Send piece ``index`` of each segment that comes, in order, to ``targets[index]``.
        After a failure the rest of this index is left to a backup (re-sent once the other
        secondaries have theirs: :meth:`_switch`); with no backup left the replication
        stops at once."""
        async with receive:
            async for encoded in receive:
                try:
                    if index in failed:
                        continue
                    approval = targets[index]
                    try:
                        await self._send(approval, object_id, index, encoded.segment,
                                         encoded.piece(index), encoded.digests[index])
                    except (ReplicateError, httpx.HTTPError) as exc:
                        log.warning("piece %d/%d of object %d to %s failed: %s",
                                    encoded.segment, index, object_id, approval.approver, exc)
                        failed.add(index)
                        if len(failed) > len(backups):
                            raise ReplicateError(f"index {index} of object {object_id}: "
                                                 "no secondary left") from None
                finally:
                    encoded.release(index)

    def in_flight(self, task: ReplicatePieceTask) -> int:
        """Segments a replication holds at most (``executor.segments_in_flight``, at most
        the object's segments)."""
        return max(1, min(int(self.cfg.segments_in_flight),
                          task.params.segment_count(task.object.size)))

    def _read_ahead(self, task: ReplicatePieceTask
                    ) -> tuple[contextlib.AbstractContextManager[Span | None], int]:
        """A span holding the task's read-ahead, and how many segments the replication may
        hold with it. One segment's pieces are covered by the task's own reservation; more
        (read and encoded while earlier ones are sent) as far as the limiter has room, up to
        :meth:`in_flight`: room for fewer than that still reads ahead that far rather than
        not at all."""
        for depth in range(self.in_flight(task), 1, -1):
            try:
                return (self.ctx.limiter.span(self.name,
                                              memory=task.read_ahead_memory(depth)), depth)
            except ResourceLimitExceeded:
                continue
        if self.in_flight(task) > 1:
            log.info("replicating %s one segment at a time: no memory to read ahead", task.key)
        return contextlib.nullcontext(), 1

    async def _encode_segments(self, codec: _ObjectCodec, object_id: int, segments: int,
                               slots: trio.Semaphore,
                               sends: list[trio.MemorySendChannel[_Encoded]],
                               encoded: list[_Encoded]) -> None:
        """Read, encode and hash segments in order, each once a slot is free, and hand each
        to every sender (its slot comes back once the last of them is done with it).
        ``encoded`` keeps every segment made until it is given back."""
        async with contextlib.AsyncExitStack() as stack:
            for send in sends:
                await stack.enter_async_context(send)
            for segment in range(segments):
                await slots.acquire()
                try:
                    pieces, digests, hold = await self._pieces(codec, object_id, segment)
                except BaseException:
                    slots.release()
                    raise
                one = _Encoded(segment, pieces, digests, hold, slots)
                del pieces, digests, hold
                encoded[:] = [e for e in encoded if not e.closed] + [one]
                for send in sends:
                    await send.send(one)  # never waits: a channel holds every slot
                del one

    async def _pieces(self, codec: _ObjectCodec, object_id: int, segment: int
                      ) -> tuple[list[bytes | memoryview], list[str], contextlib.ExitStack]:
        """A segment's pieces, their SHA-256 (hex), and what holds them: encoded and hashed
        in worker threads.

        The segment is read once into one of the store's reused aligned buffers (``O_DIRECT``
        on a store that writes that way: no page cache, no copy, no fresh pages to fault in);
        the code is systematic, so the data pieces are views of that buffer and only the
        parity pieces are new. Close the stack once the pieces are sent and dropped: the
        buffer goes back to the store."""
        key = segment_key(object_id, segment)
        length = codec.segment_len(segment)
        size = piece_size(length, codec.k)
        hold = contextlib.ExitStack()
        try:
            view = hold.enter_context(self.store.buffer(size * codec.k))
            got = await self.store.read_into(key, view)
            if got != length:
                raise ReplicateError(f"segment {key} is not {length} bytes long")
            view[length:] = bytes(len(view) - length)  # the last data piece's zero padding
            blocks = [view[i * size:(i + 1) * size] for i in range(codec.k)]
            del view
            # two worker threads: one hashes the data pieces while the other computes the
            # parity pieces and hashes them (this stage sets the pace of replication)
            digests = [""] * (codec.k + codec.m)

            async def hash_data(data: list[memoryview]) -> None:
                digests[:codec.k] = await trio.to_thread.run_sync(_hex_digests, data)

            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(hash_data, blocks)
                    pieces = await trio.to_thread.run_sync(codec.encode_blocks, blocks)
                    digests[codec.k:] = await trio.to_thread.run_sync(_hex_digests,
                                                                      pieces[codec.k:])
            except BaseExceptionGroup as group:
                raise unwrap(group) from None
            del blocks
        except BaseException:
            hold.close()
            raise
        return pieces, digests, hold

    async def _send(self, approval: ApprovalResponse, object_id: int, index: int,
                    segment: int, piece: bytes | memoryview, digest: str) -> None:
        assert self.http is not None
        url = _secondary_url(approval, replicate_path(object_id, index, segment))
        headers = self.ctx.modulars.signer.sign_http_request(
            "PUT", url, body_sha256=digest, headers={APPROVAL_HEADER: encode(approval).hex()})
        headers["content-length"] = str(len(piece))
        with self._secondary_deadline(approval, f"piece {segment} of index {index}"):
            response = await self.http.put(url, content=_chunks(piece), headers=headers)
        if response.status_code != 200:
            raise ReplicateError(f"HTTP {response.status_code}: {response.text[:200]}")

    @contextlib.contextmanager
    def _secondary_deadline(self, approval: ApprovalResponse, what: str) -> Iterator[None]:
        """``executor.secondary_timeout`` for one request to a secondary (httpx's timeouts
        are per read and write: a secondary trickling its answer could hold the replication
        until its lease ends); past it, that secondary's :class:`ReplicateError`."""
        timeout = float(self.cfg.secondary_timeout)
        try:
            with trio.fail_after(timeout):
                yield
        except trio.TooSlowError:
            raise ReplicateError(f"{approval.approver}: {what} took longer than "
                                 f"{timeout:g} s") from None

    async def _switch(self, targets: list[ApprovalResponse], backups: list[ApprovalResponse],
                      index: int, codec: _ObjectCodec, object_id: int, upto: int) -> None:
        """Give ``index`` to the next backup and send it segments ``0..upto-1`` again."""
        while backups:
            approval = backups.pop(0)
            log.info("index %d of object %d moves from %s to backup %s", index, object_id,
                     targets[index].approver, approval.approver)
            targets[index] = approval
            try:
                for segment in range(upto):
                    pieces, digests, hold = await self._pieces(codec, object_id, segment)
                    with hold:
                        piece, digest = pieces[index], digests[index]
                        del pieces
                        await self._send(approval, object_id, index, segment, piece, digest)
                        del piece
                return
            except (ReplicateError, httpx.HTTPError) as exc:
                log.warning("backup %s failed too: %s", approval.approver, exc)
        raise ReplicateError(f"index {index} of object {object_id}: no secondary left")

    async def _done(self, approval: ApprovalResponse, task: ReplicatePieceTask,
                    index: int) -> bytes:
        assert self.http is not None
        obj = task.object
        url = _secondary_url(approval, replicate_path(obj.id, index))
        headers = self.ctx.modulars.signer.sign_http_request(
            "POST", url, body_sha256=hashlib.sha256(b"").hexdigest(),
            headers={APPROVAL_HEADER: encode(approval).hex()})
        with self._secondary_deadline(approval, f"done of index {index}"):
            response = await self.http.post(url, content=b"", headers=headers)
        if response.status_code != 200:
            raise ReplicateError(f"done: HTTP {response.status_code}: {response.text[:200]}")
        try:
            body = response.json()
            signature = bytes.fromhex(body["signature"])
            integrity = bytes.fromhex(body["integrity_hash"])
        except (ValueError, KeyError, TypeError) as exc:  # not JSON, not a map, not hex
            raise ReplicateError(f"done: not an answer ({type(exc).__name__}: {exc}): "
                                 f"{response.text[:200]!r}") from None
        checksum = obj.checksums[1 + index]
        if integrity != checksum:
            raise ReplicateError("the secondary's integrity hash differs from the chain's")
        sp = await self.chain.get_sp(approval.approver)
        if sp is None:
            raise ReplicateError(f"{approval.approver} is not registered")
        try:
            verify(sp.approval_key, integrity_payload(obj.id, checksum), signature)
        except SignatureError:
            raise ReplicateError("the secondary's integrity signature is invalid") from None
        return signature

    # --- SealObject -----------------------------------------------------------------------

    async def handle_seal_object_task(self, task: SealObjectTask) -> None:
        """Seal with the secondaries' signatures, unless they are so old that a secondary
        may have given up waiting (``seal_confirm_timeout``) and dropped its pieces: the
        chain would then list secondaries that hold nothing. That is :class:`SealTooLate`,
        on which the manager replicates the object again.

        First the chain is asked: an object already sealed by us (our seal landed, but the
        node was killed before it reported, and restarted past the deadline) is done."""
        if await self._sealed_by_us(task.object):
            log.info("object %d is already sealed on the chain: %s done", task.object.id,
                     task.key, extra={"task_key": task.key})
            return
        wait = self.cfg.seal_confirm_timeout
        deadline = task.signed_at + wait - max(SEAL_MARGIN, wait / 10)
        if task.signed_at and time.time() > deadline:
            raise SealTooLate(f"the secondaries signed {time.time() - task.signed_at:.0f} s "
                              f"ago; past {wait:g} s they may have dropped their pieces")
        await self.ctx.modulars.signer.seal_object(
            object_id=task.object.id, secondaries=task.secondaries,
            secondary_sigs=task.secondary_signatures)

    async def _sealed_by_us(self, obj: ObjectInfo) -> bool:
        """True when ``obj`` is sealed on the chain and we are its bucket's primary (so the
        seal was ours); False when it is not sealed, or with no chain client configured.
        Sealed under another primary is a :class:`ReplicateError`: nothing for us to do. A
        chain that cannot answer raises (the task is retried, never replicated again)."""
        if self.ctx.chain is None:
            return False
        on_chain = await self.chain.get_object_by_id(obj.id)
        if on_chain is None or not on_chain.sealed:
            return False
        bucket = await self.chain.get_bucket(on_chain.bucket)
        me = self.ctx.modulars.signer.operator_address
        if bucket is None or bucket.primary_sp != me:
            primary = None if bucket is None else bucket.primary_sp
            raise ReplicateError(f"object {obj.id} is sealed on the chain, by primary "
                                 f"{primary}, not us ({me})")
        return True

    # --- ReceivePiece: confirm the seal on a secondary ------------------------------------

    async def handle_receive_piece_task(self, task: ReceivePieceTask) -> None:
        me = self.ctx.modulars.signer.operator_address
        obj = await self.chain.get_object_by_id(task.object.id)
        idx = task.redundancy_index
        if obj is not None and obj.sealed:
            if idx < len(obj.secondaries) and obj.secondaries[idx] == me:
                task.sealed = True
                return
            await self._drop_index(task.object.id, idx)
            return
        if obj is None or time.time() - task.create_time > self.cfg.seal_confirm_timeout:
            await self._drop_index(task.object.id, idx)
            return
        raise NotSealedYet(f"object {task.object.id} is not sealed yet")

    async def _drop_index(self, object_id: int, index: int) -> None:
        for key in await self.store.keys(object_id):
            if parse_key(key).index == index:
                await self.store.delete(key)
        await self.ctx.db.run(lambda c: _forget_index(c, object_id, index))
        log.info("collected the pieces of object %d index %d", object_id, index)

    # --- GC -------------------------------------------------------------------------------

    async def handle_gc_object_task(self, task: GCObjectTask) -> None:
        after = 0
        while True:
            events = await self.chain.events_since(task.start_height, after=after)
            if not events:
                break
            for event in events:
                after = max(after, event.index)
                if event.height > task.end_height:
                    break
                if event.kind == "object_deleted" and event.object_id is not None:
                    await self.forget_object(event.object_id)
                    task.last_deleted_object_id = event.object_id
            if events[-1].height > task.end_height:
                break
        task.current_height = task.end_height
        await self.ctx.db.run(lambda c: c.execute(
            "INSERT OR REPLACE INTO gc_progress (kind, last_height, last_key, update_time) "
            "VALUES ('object', ?, '', ?)", (task.end_height, time.time())))

    async def forget_object(self, object_id: int) -> None:
        removed = await self.store.delete_object(object_id)
        await self.ctx.db.run(lambda c: _forget_object(c, object_id))
        if removed:
            log.info("collected %d pieces of deleted object %d", removed, object_id)

    async def handle_gc_zombie_piece_task(self, task: GCZombiePieceTask) -> None:
        me = self.ctx.modulars.signer.operator_address
        by_object: dict[int, list[str]] = {}
        single = task.start_object_id == task.end_object_id
        for key in await (self.store.keys(task.start_object_id) if single
                          else self.store.keys()):
            object_id = parse_key(key).object_id
            if task.start_object_id <= object_id <= task.end_object_id:
                by_object.setdefault(object_id, []).append(key)
        for object_id, keys in by_object.items():
            if await self._in_progress(object_id):
                continue
            obj = await self.chain.get_object_by_id(object_id)
            if obj is None:
                await self.forget_object(object_id)
                continue
            if not obj.sealed:
                await self._collect_unsealed(object_id, keys)
                continue
            bucket = await self.chain.get_bucket(obj.bucket)
            primary = bucket is not None and bucket.primary_sp == me
            dropped: list[tuple[int, int, int]] = []
            for key in keys:
                k = parse_key(key)
                keep = (k.index is None and primary) or (
                    k.index is not None and k.index < len(obj.secondaries)
                    and obj.secondaries[k.index] == me)
                if not keep:
                    await self.store.delete(key)
                    dropped.append((object_id, k.segment, -1 if k.index is None else k.index))
            await self._forget_pieces(dropped)

    async def _collect_unsealed(self, object_id: int, keys: list[str]) -> None:
        """Pieces and segments of an object still not sealed, with no task of ours on it
        (no upload, replication, seal or receive queued or running), last written more than
        ``unsealed_piece_ttl`` ago. Pieces: a replication that never came to "done" here
        (the primary moved to a backup, or gave up); a replication that resumes sends them
        again, and its "done" fails over if they are gone meanwhile. Segments: a primary's
        upload or replication that failed for good, or whose cleanup a crash cut short (found
        in review: they stayed until the object was deleted on the chain)."""
        cutoff = time.time() - self.cfg.unsealed_piece_ttl
        dropped: list[tuple[int, int, int]] = []
        for key in keys:
            k = parse_key(key)
            written = await self.store.modified(key)
            if written is not None and written < cutoff and await self.store.delete(key):
                dropped.append((object_id, k.segment, -1 if k.index is None else k.index))
        if dropped:
            await self._forget_pieces(dropped)
            if self.ctx.modulars.is_running("receiver"):
                self.ctx.modulars.receiver.forget_object(object_id)
            log.info("collected %d pieces and segments of object %d, not sealed after %g s",
                     len(dropped), object_id, self.cfg.unsealed_piece_ttl)

    async def _forget_pieces(self, dropped: list[tuple[int, int, int]]) -> None:
        """Forget the checksums of dropped pieces, (object id, segment, index; -1 for a
        segment), and the integrity record of their index."""
        if not dropped:
            return

        def forget(conn: sqlite3.Connection) -> None:
            conn.executemany("DELETE FROM piece_hashes WHERE object_id = ? AND "
                             "segment = ? AND redundancy_index = ?", dropped)
            conn.executemany("DELETE FROM integrity_meta WHERE object_id = ? AND "
                             "redundancy_index = ?", sorted({(o, i) for o, _, i in dropped}))

        await self.ctx.db.run(forget)

    async def _in_progress(self, object_id: int) -> bool:
        """An upload, replication or receive of the object is still queued or running."""
        def query(conn: sqlite3.Connection) -> bool:
            rows = conn.execute(
                "SELECT key FROM tasks WHERE state IN ('pending', 'running') AND key LIKE ?",
                (f"%-id:{object_id}%",)).fetchall()
            marker = f"-id:{object_id}"
            return any(k.endswith(marker) or f"{marker}-" in k for (k,) in rows)
        return await self.ctx.db.run(query)

    async def handle_gc_meta_task(self, task: GCMetaTask) -> None:
        horizon = time.time() - self.ctx.config.manager.meta_retention
        task.delete_count = await self.ctx.modulars.manager.gc_meta(horizon)
        await self.ctx.db.run(lambda c: c.execute(
            "DELETE FROM read_records WHERE ts < ?", (horizon,)))

    async def _watch_deletions(self) -> None:
        """Every ``manager.gc_interval``: schedule a GCObject over the heights not yet seen."""
        while True:
            await trio.sleep(self.ctx.config.manager.gc_interval)
            try:
                height = await self.chain.current_height()
            except ChainError as exc:
                log.warning("gc: chain unavailable: %s", exc)
                continue
            try:
                last = await self.ctx.db.run(_last_gc_height)
                if height > last:
                    await self.ctx.modulars.manager.schedule_gc_object(last, height)
            except DBError as exc:  # e.g. SPDB's disk is full: the next interval asks again
                log.warning("gc: cannot schedule a GCObject task: %s", exc)


def _secondary_url(approval: ApprovalResponse, path: str) -> str:
    """``path`` on the approving SP's endpoint (which that SP signed, so anything): an
    endpoint that is not an http(s) URL is that secondary's failure, not ours."""
    url = approval.endpoint.rstrip("/") + path
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ReplicateError(f"{approval.approver}'s endpoint {approval.endpoint!r} is not a "
                             f"URL: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ReplicateError(f"{approval.approver}'s endpoint {approval.endpoint!r} is not an "
                             "http(s) URL")
    return url


class _ObjectCodec(Codec):
    """The codec of one object: also knows the length of each of its segments."""

    def __init__(self, params: StorageParams, size: int) -> None:
        super().__init__(params.data_shards, params.parity_shards)
        self.params = params
        self.size = size

    def segment_len(self, segment: int) -> int:
        return self.params.segment_len(self.size, segment)


class _Encoded:
    """One segment's pieces and their SHA-256 (hex), shared by the secondaries' senders: the
    last one done with it (:meth:`release`) gives its buffer and its slot back."""

    __slots__ = ("_hold", "_left", "_pieces", "_slots", "digests", "segment")

    def __init__(self, segment: int, pieces: list[bytes | memoryview], digests: list[str],
                 hold: contextlib.ExitStack, slots: trio.Semaphore) -> None:
        self.segment = segment
        self.digests = digests
        # the data pieces are views of the buffer in ``hold``
        self._pieces: list[bytes | memoryview | None] = list(pieces)
        self._hold = hold
        self._slots = slots
        self._left = len(pieces)

    @property
    def closed(self) -> bool:
        return self._left == 0

    def piece(self, index: int) -> bytes | memoryview:
        piece = self._pieces[index]
        if piece is None:
            raise RuntimeError(f"piece {index} of segment {self.segment} was released")
        return piece

    def release(self, index: int) -> None:
        """Sender ``index`` is done with this segment (repeats are ignored)."""
        if self._left == 0 or self._pieces[index] is None:
            return
        self._pieces[index] = None
        self._left -= 1
        if self._left == 0:
            self._free()

    def close(self) -> None:
        """Give everything back now (an error stopped the replication)."""
        if self._left:
            self._left = 0
            self._free()

    def _free(self) -> None:
        self._pieces.clear()
        self._hold.close()
        self._slots.release()


async def _chunks(data: bytes | memoryview) -> AsyncIterator[memoryview]:
    """``data`` in :data:`SEND_CHUNK` slices, as a request body that lets go of it once sent.

    An httpx Response and its stream refer to each other (``BoundAsyncStream``), so a
    response, its request and a ``bytes`` body live until the cyclic GC runs: the 4 MiB
    pieces of several segments lingered (peak RSS growth 96 instead of 49 MiB for 1 GiB).
    A generator body holds the piece only while it is being sent."""
    with memoryview(data) as view:
        for start in range(0, len(view), SEND_CHUNK):
            yield view[start:start + SEND_CHUNK]


def _hex_digests(pieces: list[bytes | memoryview]) -> list[str]:
    """SHA-256 (hex) of each piece (in a worker thread: hashlib lets go of the GIL)."""
    return [hashlib.sha256(p).hexdigest() for p in pieces]


def _last_gc_height(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT last_height FROM gc_progress WHERE kind = 'object'").fetchone()
    return int(row[0]) if row else 0


def _forget_object(conn: sqlite3.Connection, object_id: int) -> None:
    for table in ("piece_hashes", "integrity_meta", "upload_progress"):
        conn.execute(f"DELETE FROM {table} WHERE object_id = ?", (object_id,))


def _forget_index(conn: sqlite3.Connection, object_id: int, index: int) -> None:
    for table in ("piece_hashes", "integrity_meta"):
        conn.execute(f"DELETE FROM {table} WHERE object_id = ? AND redundancy_index = ?",
                     (object_id, index))
