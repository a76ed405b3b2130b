"""Receiver: takes EC pieces from a primary SP and signs their integrity hash (the seed's
Receiver).

A primary sends piece ``i`` of every segment of an object to the secondary that approved index
``i``, one signed HTTP request per piece (the gater verifies the request's signature and its
body's SHA-256 before the receiver commits anything), with that secondary's replicate approval
attached. The receiver checks the approval is its own (signed by its approval key), for the
sending SP, for this object, and not expired; that the object is CREATED on the chain in a
bucket whose primary is the sender; and that the piece has the size the storage params give.
The body of a piece is copied once, into a page-aligned buffer of the piece store (reserved
from the node's limiter under ``receiver``), and is hashed in a worker thread while the piece
store writes it: the piece becomes visible under its key only once its SHA-256 is the signed
one (:meth:`Receiver.handle_receive_piece_task`). Its checksum is recorded in SPDB after the
piece is durable and before the request is answered, so an acknowledged piece is on disk with
its checksum. The chain lookups of an admission (object, bucket) are cached for
:data:`ADMIT_CACHE_SECONDS` per object (every piece of an object asks the same); "done" always
asks the chain.
"Done" computes the integrity hash of what it holds for the index, which must equal the
object's checksum for that index on the chain, and has the signer sign it; the manager then
keeps a task to confirm the seal (or collect the pieces when no seal comes).

What this SP signed stays what it holds: once "done" has signed an index, a piece of that
index is taken again only with the checksum that was signed (a primary may re-send the same
bytes; other bytes would fail this SP's challenges: 409 ``PieceAlreadySigned``). The pieces of
one index are stored concurrently, but never while its "done" runs (:class:`_IndexGate`), and
one piece's file and checksum row are written under one lock, so two PUTs of one piece cannot
leave the file of one beside the row of the other.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass

import trio

from node.auth import AuthError
from node.chain import ChainBucket, ChainObject, chain_errors, require_chain
from node.crypto import pack, unpack
from node.ec import integrity_hash, piece_size, sha256
from node.errors import NoSuchKey, ResourceLimitExceeded, ServiceError, ServiceUnavailable
from node.modular import ModularBase, NodeContext
from node.piecestore import PieceDigestMismatch, piece_key
from node.tasks import ReceivePieceTask, Task
from p2p.messages import ApprovalResponse, InvalidMessage, decode, verify

#: How long an admission reuses the chain's object and bucket (seconds, trio clock).
ADMIT_CACHE_SECONDS = 1.0
#: At most this many objects in that cache (it is cleared when full).
ADMIT_CACHE_SIZE = 256


class PieceAlreadySigned(ServiceError):
    def __init__(self, message: str) -> None:
        super().__init__("PieceAlreadySigned", message, 409)


class _IndexGate:
    """Pieces of one (object, index) are stored side by side; its "done" runs alone (the
    pieces arriving meanwhile wait for it, then meet its signed checksums). ``users``
    counts the tasks that hold the gate, so it lives only while one does."""

    def __init__(self) -> None:
        self.cond = trio.Condition()
        self.storing = 0
        self.users = 0
        self.pieces: dict[int, trio.Lock] = {}  # segment -> its file + row lock


class InvalidApproval(ServiceError):
    def __init__(self, message: str) -> None:
        super().__init__("InvalidApproval", message, 403)


@dataclass(frozen=True)
class Admitted:
    """What a verified replicate request is about."""

    task: ReceivePieceTask
    chain_object: ChainObject


class Receiver(ModularBase):
    name = "receiver"
    needs_piecestore = True
    requires = ("signer",)

    def __init__(self, ctx: NodeContext) -> None:
        super().__init__(ctx)
        self._tasks: dict[str, ReceivePieceTask] = {}
        self._gates: dict[tuple[int, int], _IndexGate] = {}
        self._receiving = 0  # pieces being received (piece_buffer held)
        self._chain_cache: dict[int, tuple[float, ChainObject, ChainBucket]] = {}

    def query_tasks(self, prefix: str = "") -> list[Task]:
        return [t for k, t in self._tasks.items() if k.startswith(prefix)]

    def forget_object(self, object_id: int) -> None:
        """Drop the receive tasks of an object whose pieces were collected."""
        for key in [k for k, t in self._tasks.items() if t.object.id == object_id]:
            del self._tasks[key]
        self._chain_cache.pop(object_id, None)

    async def _object_and_bucket(self, object_id: int, fresh: bool
                                 ) -> tuple[ChainObject | None, ChainBucket | None]:
        chain = require_chain(self.ctx)
        now = trio.current_time()
        hit = None if fresh else self._chain_cache.get(object_id)
        if hit is not None and now - hit[0] < ADMIT_CACHE_SECONDS:
            return hit[1], hit[2]
        with chain_errors("receive"):
            obj = await chain.get_object_by_id(object_id)
            bucket = await chain.get_bucket(obj.bucket) if obj is not None else None
        if obj is None or bucket is None or obj.sealed:  # refusals are never cached
            self._chain_cache.pop(object_id, None)
            return obj, bucket
        if len(self._chain_cache) >= ADMIT_CACHE_SIZE:
            self._chain_cache.clear()
        self._chain_cache[object_id] = (now, obj, bucket)
        return obj, bucket

    async def admit(self, *, sender: str, approval: bytes, object_id: int,
                    redundancy_index: int, fresh: bool = False) -> Admitted:
        """Check a replicate request; the ReceivePieceTask it belongs to. The object and its
        bucket may come from a cache of :data:`ADMIT_CACHE_SECONDS` unless ``fresh``."""
        signer = self.ctx.modulars.signer
        try:
            resp = decode(approval, ApprovalResponse)
            verify(resp, signer.approval_public_key)
        except InvalidMessage as exc:
            raise InvalidApproval(f"not an approval of this SP: {exc}") from None
        if resp.approver != signer.operator_address or not resp.approved:
            raise InvalidApproval("the approval is not this SP's")
        if resp.asker != sender:
            raise InvalidApproval(f"the approval was given to {resp.asker}, not {sender}")
        if resp.object_id != object_id:
            raise InvalidApproval("the approval is for another object")
        chain = require_chain(self.ctx)
        with chain_errors("receive"):
            height = await chain.current_height()
            params = await chain.params()
        obj, bucket = await self._object_and_bucket(object_id, fresh)
        if resp.expiry_height <= height:
            raise InvalidApproval(f"the approval expired at height {resp.expiry_height}")
        if obj is None or bucket is None:
            raise NoSuchKey("?", f"id {object_id}")
        if bucket.primary_sp != sender:
            raise InvalidApproval(f"{sender} is not the primary SP of bucket {obj.bucket!r}")
        if obj.sealed:
            raise ServiceError("InvalidObjectState", "the object is already sealed", 409)
        if not 0 <= redundancy_index < params.data_shards + params.parity_shards:
            raise ServiceError("InvalidArgument", f"bad redundancy index {redundancy_index}",
                               400)
        task = ReceivePieceTask(object=obj.info, params=params,
                                redundancy_index=redundancy_index, user_address=sender)
        return Admitted(task, obj)

    def piece_length(self, task: ReceivePieceTask, segment: int) -> int:
        """The size piece ``segment`` of the task's index must have (400 for a segment out
        of range)."""
        params, obj = task.params, task.object
        count = params.segment_count(obj.size)
        if not 0 <= segment < count:
            raise ServiceError("InvalidArgument", f"segment {segment} out of 0..{count - 1}",
                               400)
        return piece_size(params.segment_len(obj.size, segment), params.data_shards)

    @contextlib.contextmanager
    def piece_buffer(self, size: int) -> Iterator[memoryview]:
        """A buffer for one piece's body (the piece store's, page-aligned: put without a
        copy), its memory reserved under ``receiver``; 503 SlowDown when over the limit or
        when ``receiver.max_concurrent`` pieces are being received already; 507
        InsufficientStorage when the store has no room for it."""
        if self._receiving >= self.ctx.config.receiver.max_concurrent:
            raise ServiceUnavailable(f"busy: {self._receiving} pieces being received", 1.0)
        if not self.store.has_room(size):
            raise ServiceError("InsufficientStorage", "not enough free disk space", 507)
        try:
            span = self.ctx.limiter.span(self.name, memory=size)
        except ResourceLimitExceeded as exc:
            raise ServiceUnavailable(f"busy: {exc}", 1.0) from None
        self._receiving += 1
        try:
            with span, self.store.buffer(size) as buf:
                yield buf
        finally:
            self._receiving -= 1

    @contextlib.contextmanager
    def _gate(self, object_id: int, index: int) -> Iterator[_IndexGate]:
        key = (object_id, index)
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = _IndexGate()
        gate.users += 1
        try:
            yield gate
        finally:
            gate.users -= 1
            if gate.users == 0:
                del self._gates[key]

    # --- the seed's Receiver interface ----------------------------------------------------

    async def handle_receive_piece_task(self, task: ReceivePieceTask, segment: int,
                                        data: bytes | memoryview,
                                        digest: bytes | None = None) -> None:
        """Store one piece. ``digest``: the SHA-256 it must have (the signed payload hash of
        the request): checked in a worker thread while the piece store writes it, and the
        piece is stored only when it matches (400 ``ContentSha256Mismatch`` otherwise);
        None: computed here. The checksum is recorded once the piece is durable."""
        expected = self.piece_length(task, segment)
        if len(data) != expected:
            raise ServiceError("InvalidArgument", f"piece has {len(data)} bytes, expected "
                               f"{expected}", 400)
        obj, idx = task.object, task.redundancy_index
        self._tasks[task.key] = task
        key = piece_key(obj.id, segment, idx)
        with self._gate(obj.id, idx) as gate:
            async with gate.cond:  # waits while this index's "done" runs
                gate.storing += 1
            try:
                hashed_here = digest is None
                if digest is None:
                    digest = await trio.to_thread.run_sync(sha256, data)
                signed = await self.ctx.db.run(lambda c: _signed_checksum(c, obj.id, idx,
                                                                          segment))
                if signed is not None and signed != digest:
                    raise PieceAlreadySigned(f"this SP signed piece {segment} of index {idx} "
                                             "of this object with another checksum")
                lock = gate.pieces.setdefault(segment, trio.Lock())
                async with lock:
                    try:
                        await self.store.put(key, data,
                                             sha256=None if hashed_here else digest)
                    except PieceDigestMismatch:
                        raise AuthError("ContentSha256Mismatch", "the piece's sha256 differs "
                                        "from the signed x-gfsp-content-sha256") from None
                    await self.ctx.db.run(lambda c: c.execute(
                        "INSERT OR REPLACE INTO piece_hashes (object_id, segment, "
                        "redundancy_index, checksum) VALUES (?, ?, ?, ?)",
                        (obj.id, segment, idx, digest)))
            finally:
                with trio.CancelScope(shield=True):  # "done" must not wait for us forever
                    async with gate.cond:
                        gate.storing -= 1
                        gate.cond.notify_all()

    async def handle_done_receive_piece_task(self, task: ReceivePieceTask
                                             ) -> tuple[bytes, bytes]:
        """(signature, integrity hash) of what this SP holds for the task's index."""
        obj, idx = task.object, task.redundancy_index
        count = task.params.segment_count(obj.size)
        with self._gate(obj.id, idx) as gate:
            async with gate.cond:  # no piece of this index is being stored meanwhile
                while gate.storing:
                    await gate.cond.wait()
                hashes = await self.ctx.db.run(lambda c: _piece_hashes(c, obj.id, idx))
                if len(hashes) != count:
                    raise ServiceError("IncompleteBody", f"holding {len(hashes)} of {count} "
                                       f"pieces of index {idx}", 400)
                integrity = integrity_hash(hashes)
                if integrity != obj.checksums[1 + idx]:
                    raise ServiceError("BadDigest", f"the pieces of index {idx} do not match "
                                       "the object's checksum on the chain", 400)
                signature, _ = self.ctx.modulars.signer.sign_integrity_hash(obj.id, hashes)
                await self.ctx.db.run(lambda c: c.execute(
                    "INSERT OR REPLACE INTO integrity_meta (object_id, redundancy_index, "
                    "integrity_hash, checksums, signature) VALUES (?, ?, ?, ?, ?)",
                    (obj.id, idx, integrity, pack(hashes), signature)))
        task.piece_checksums = hashes
        task.integrity_hash = integrity
        task.signature = signature
        self._tasks.pop(task.key, None)
        if self.ctx.modulars.is_running("manager"):
            await self.ctx.modulars.manager.handle_receive_piece_task(task)
        return signature, integrity


def _signed_checksum(conn: sqlite3.Connection, object_id: int, index: int, segment: int
                     ) -> bytes | None:
    """The checksum of piece ``segment`` that this SP signed for the index (None: unsigned)."""
    row = conn.execute("SELECT checksums FROM integrity_meta WHERE object_id = ? AND "
                       "redundancy_index = ?", (object_id, index)).fetchone()
    if row is None:
        return None
    checksums = unpack(row[0])
    return checksums[segment] if 0 <= segment < len(checksums) else None


def _piece_hashes(conn: sqlite3.Connection, object_id: int, index: int) -> list[bytes]:
    rows = conn.execute("SELECT checksum FROM piece_hashes WHERE object_id = ? AND "
                        "redundancy_index = ? ORDER BY segment", (object_id, index)).fetchall()
    return [r[0] for r in rows]
