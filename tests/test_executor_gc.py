"""The executor's zombie GC of pieces whose object never sealed, on a real piece store and
SPDB, with an in-memory chain (a named fake: only two chain reads are needed)."""

from __future__ import annotations

import dataclasses
import os
import time
import types
from pathlib import Path
from typing import Any

import trio

from modulars.executor import TaskExecutor
from node.app import build_limiter
from node.config import Config, ExecutorSection
from node.db import open_spdb
from node.modular import NodeContext
from node.piecestore import LocalPieceStore, piece_key, segment_key
from node.tasks import GCZombiePieceTask, ReceivePieceTask
from testnet.devchain.testing import new_keyset

OID = 77
TTL = 3600.0


class FakeChain:
    """The object (not sealed) and its bucket, whose primary is another SP."""

    async def get_object_by_id(self, object_id: int) -> Any:
        return types.SimpleNamespace(id=object_id, sealed=False, bucket="b", secondaries=())

    async def get_bucket(self, name: str) -> Any:
        return types.SimpleNamespace(primary_sp="0x" + "99" * 20)


async def test_pieces_of_an_object_never_sealed_are_collected_after_the_ttl(
        tmp_path: Path) -> None:
    """Found in review: a secondary that got pieces but never "done" (the primary moved to a
    backup, or gave up) kept them for good while the object stayed unsealed."""
    cfg = dataclasses.replace(Config(), executor=ExecutorSection(unsealed_piece_ttl=TTL))
    store = await LocalPieceStore.create(tmp_path / "pieces", fsync=False)
    old, fresh = piece_key(OID, 0, 2), piece_key(OID, 1, 2)
    # a primary's segments too (an upload or replication that failed for good, or whose
    # cleanup a crash cut short: found in review, they stayed until deleted on chain)
    segment, fresh_segment = segment_key(OID, 0), segment_key(OID, 1)
    for key in (old, fresh, segment, fresh_segment):
        await store.put(key, b"x" * 100)
    long_ago = time.time() - TTL - 60
    for key in (old, segment):
        os.utime(store._path(key), (long_ago, long_ago))
    async with open_spdb(tmp_path / "spdb.sqlite3") as db:
        ctx = NodeContext(config=cfg, limiter=build_limiter(cfg), db=db, keys=new_keyset(),
                          piecestore=store, chain=FakeChain())  # type: ignore[arg-type]
        signer = types.SimpleNamespace(name="signer", operator_address="0x" + "11" * 20)
        ctx.modulars.mark_running(signer)  # type: ignore[arg-type]
        await db.run(lambda c: c.executemany(
            "INSERT INTO piece_hashes (object_id, segment, redundancy_index, checksum) "
            "VALUES (?, ?, ?, ?)", [(OID, 0, 2, b"0" * 32), (OID, 1, 2, b"1" * 32),
                                    (OID, 0, -1, b"2" * 32), (OID, 1, -1, b"3" * 32)]))
        await db.run(lambda c: c.execute(
            "INSERT INTO integrity_meta (object_id, redundancy_index, integrity_hash, "
            "checksums, signature) VALUES (?, -1, ?, x'', x'')", (OID, b"4" * 32)))
        ex = TaskExecutor(ctx)
        task = GCZombiePieceTask(start_object_id=OID, end_object_id=OID)

        # a receive task of ours on the object: nothing is touched
        receive = ReceivePieceTask(object=_info(), params=_params(), redundancy_index=2)
        await db.run(lambda c: c.execute(
            "INSERT INTO tasks (key, type, priority, state, payload, create_time, "
            "update_time, retry, max_retry, error) VALUES (?, 'ReceivePiece', 0, 'pending', "
            "x'', 0, 0, 0, 0, '')", (receive.key,)))
        await ex.handle_gc_zombie_piece_task(task)
        assert sorted(await store.keys(OID)) == sorted([old, fresh, segment, fresh_segment])

        await db.run(lambda c: c.execute("DELETE FROM tasks"))
        await ex.handle_gc_zombie_piece_task(task)
        assert sorted(await store.keys(OID)) == sorted([fresh, fresh_segment])
        rows = await db.run(lambda c: c.execute(
            "SELECT segment, redundancy_index FROM piece_hashes WHERE object_id = ? "
            "ORDER BY redundancy_index", (OID,)).fetchall())
        assert rows == [(1, -1), (1, 2)]
        meta = await db.run(lambda c: c.execute(
            "SELECT COUNT(*) FROM integrity_meta WHERE object_id = ?", (OID,)).fetchone())
        assert meta == (0,)


def _params() -> Any:
    from node.tasks import StorageParams
    return StorageParams(segment_size=1024, data_shards=2, parity_shards=1, max_payload=1 << 20)


def _info() -> Any:
    from node.tasks import ObjectInfo
    return ObjectInfo(id=OID, bucket="b", name="o", owner="0x" + "22" * 20, size=2048,
                      checksums=tuple(bytes([i]) * 32 for i in range(4)))


class SealedChain:
    """The object sealed with this SP (``ME``) at index 0 and another SP at indices 1 and 2;
    the bucket's primary is a third SP."""

    async def get_object_by_id(self, object_id: int) -> Any:
        return types.SimpleNamespace(id=object_id, sealed=True, bucket="b",
                                     secondaries=(ME, "0x" + "33" * 20, "0x" + "44" * 20))

    async def get_bucket(self, name: str) -> Any:
        return types.SimpleNamespace(primary_sp="0x" + "99" * 20)


ME = "0x" + "11" * 20


async def test_zombie_gc_of_a_sealed_object_forgets_the_rows_of_the_pieces_it_drops(
        tmp_path: Path) -> None:
    """Found by a crash soak (SIGKILLed primaries replicate again with new approvals, so a
    secondary may hold pieces of an index the seal gave to another SP): the zombie GC of a
    sealed object removed the files of the indices this SP does not hold, and the segments
    of a bucket it is not the primary of, but kept their piece_hashes (and integrity_meta)
    rows until the object was deleted, checksums of pieces the SP no longer had."""
    with trio.fail_after(10):
        store = await LocalPieceStore.create(tmp_path / "pieces", fsync=False)
        ours = [piece_key(OID, s, 0) for s in range(2)]
        stale = [piece_key(OID, s, 2) for s in range(2)] + [segment_key(OID, 0)]
        for key in ours + stale:
            await store.put(key, b"x" * 100)
        async with open_spdb(tmp_path / "spdb.sqlite3") as db:
            cfg = Config()
            ctx = NodeContext(config=cfg, limiter=build_limiter(cfg), db=db,
                              keys=new_keyset(), piecestore=store,
                              chain=SealedChain())  # type: ignore[arg-type]
            signer = types.SimpleNamespace(name="signer", operator_address=ME)
            ctx.modulars.mark_running(signer)  # type: ignore[arg-type]
            await db.run(lambda c: c.executemany(
                "INSERT INTO piece_hashes (object_id, segment, redundancy_index, checksum) "
                "VALUES (?, ?, ?, ?)", [(OID, s, i, bytes([s]) * 32)
                                        for s in range(2) for i in (0, 2)]
                + [(OID, 0, -1, b"2" * 32)]))
            await db.run(lambda c: c.executemany(
                "INSERT INTO integrity_meta (object_id, redundancy_index, integrity_hash, "
                "checksums, signature) VALUES (?, ?, ?, x'', x'')",
                [(OID, i, bytes([i + 8]) * 32) for i in (-1, 0, 2)]))

            task = GCZombiePieceTask(start_object_id=OID, end_object_id=OID)
            await TaskExecutor(ctx).handle_gc_zombie_piece_task(task)

            assert await store.keys(OID) == ours
            rows = await db.run(lambda c: c.execute(
                "SELECT segment, redundancy_index FROM piece_hashes WHERE object_id = ? "
                "ORDER BY redundancy_index, segment", (OID,)).fetchall())
            assert rows == [(0, 0), (1, 0)]
            meta = await db.run(lambda c: c.execute(
                "SELECT redundancy_index FROM integrity_meta WHERE object_id = ?",
                (OID,)).fetchall())
            assert meta == [(0,)]
