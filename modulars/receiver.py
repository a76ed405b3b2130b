"""Receiver: takes EC pieces from a primary SP and signs their integrity hash (the seed's
Receiver).

A primary sends piece ``i`` of every segment of an object to the secondary that approved index
``i``, one signed HTTP request per piece (the gater verifies the request's signature and its
body's SHA-256 before the receiver commits anything), with that secondary's replicate approval
attached. The receiver checks the approval is its own (signed by its approval key), for the
sending SP, for this object, and not expired; that the object is CREATED on the chain in a
bucket whose primary is the sender; and that the piece has the size the storage params give.
"Done" computes the integrity hash of what it holds for the index, which must equal the
object's checksum for that index on the chain, and has the signer sign it; the manager then
keeps a task to confirm the seal (or collect the pieces when no seal comes).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

import trio

from node.chain import ChainObject, chain_errors, require_chain
from node.crypto import pack
from node.ec import integrity_hash, piece_size, sha256
from node.errors import NoSuchKey, ServiceError
from node.modular import ModularBase, NodeContext
from node.piecestore import piece_key
from node.tasks import ReceivePieceTask, Task
from p2p.messages import ApprovalResponse, InvalidMessage, decode, verify


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

    def query_tasks(self, prefix: str = "") -> list[Task]:
        return [t for k, t in self._tasks.items() if k.startswith(prefix)]

    async def admit(self, *, sender: str, approval: bytes, object_id: int,
                    redundancy_index: int) -> Admitted:
        """Check a replicate request; the ReceivePieceTask it belongs to."""
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
            obj = await chain.get_object_by_id(object_id)
            params = await chain.params()
            bucket = await chain.get_bucket(obj.bucket) if obj is not None else None
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

    # --- the seed's Receiver interface ----------------------------------------------------

    async def handle_receive_piece_task(self, task: ReceivePieceTask, segment: int,
                                        data: bytes, digest: bytes | None = None) -> None:
        """Store one piece. ``digest``: its SHA-256 when the caller already verified it (the
        gater checks the body against the signed hash), else computed here."""
        params, obj = task.params, task.object
        count = params.segment_count(obj.size)
        if not 0 <= segment < count:
            raise ServiceError("InvalidArgument", f"segment {segment} out of 0..{count - 1}",
                               400)
        expected = piece_size(params.segment_len(obj.size, segment), params.data_shards)
        if len(data) != expected:
            raise ServiceError("InvalidArgument", f"piece has {len(data)} bytes, expected "
                               f"{expected}", 400)
        self._tasks[task.key] = task
        if digest is None:
            digest = await trio.to_thread.run_sync(sha256, data)
        await self.store.put(piece_key(obj.id, segment, task.redundancy_index), data)
        await self.ctx.db.run(lambda c: c.execute(
            "INSERT OR REPLACE INTO piece_hashes (object_id, segment, redundancy_index, "
            "checksum) VALUES (?, ?, ?, ?)", (obj.id, segment, task.redundancy_index, digest)))

    async def handle_done_receive_piece_task(self, task: ReceivePieceTask
                                             ) -> tuple[bytes, bytes]:
        """(signature, integrity hash) of what this SP holds for the task's index."""
        obj, idx = task.object, task.redundancy_index
        count = task.params.segment_count(obj.size)
        hashes = await self.ctx.db.run(lambda c: _piece_hashes(c, obj.id, idx))
        if len(hashes) != count:
            raise ServiceError("IncompleteBody", f"holding {len(hashes)} of {count} pieces "
                               f"of index {idx}", 400)
        integrity = integrity_hash(hashes)
        if integrity != obj.checksums[1 + idx]:
            raise ServiceError("BadDigest", f"the pieces of index {idx} do not match the "
                               "object's checksum on the chain", 400)
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


def _piece_hashes(conn: sqlite3.Connection, object_id: int, index: int) -> list[bytes]:
    rows = conn.execute("SELECT checksum FROM piece_hashes WHERE object_id = ? AND "
                        "redundancy_index = ? ORDER BY segment", (object_id, index)).fetchall()
    return [r[0] for r in rows]
