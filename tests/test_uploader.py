"""The uploader on a real SPDB and piece store: segments, integrity check against the object's
checksum, cleanup on every failure, limiter admission."""

from __future__ import annotations

import dataclasses
import os
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from modulars.uploader import BadDigest, IncompleteUpload, Uploader
from node.app import build_limiter
from node.config import Config, LimitsSection, LimitValues
from node.crypto import unpack
from node.db import open_spdb
from node.ec import object_checksums, split
from node.errors import DBError, ServiceError, ServiceUnavailable
from node.modular import NodeContext
from node.piecestore import LocalPieceStore, PieceStoreError, segment_key
from node.tasks import ObjectInfo, StorageParams, UploadObjectTask
from testnet.devchain.testing import new_keyset

SEG = 64 << 10
PARAMS = StorageParams(segment_size=SEG, data_shards=4, parity_shards=2, max_payload=1 << 30)


@asynccontextmanager
async def uploader(tmp_path: Path, config: Config | None = None) -> AsyncIterator[Uploader]:
    config = config or Config()
    store = await LocalPieceStore.create(tmp_path / "pieces", fsync=False)
    async with open_spdb(tmp_path / "spdb.sqlite3") as db:
        ctx = NodeContext(config=config, limiter=build_limiter(config), db=db,
                          keys=new_keyset(), piecestore=store)
        yield Uploader(ctx)


def task_for(data: bytes, *, object_id: int = 7, declared: bytes | None = None
             ) -> UploadObjectTask:
    """An upload task whose chain checksums are those of ``declared`` (default: ``data``)."""
    source = data if declared is None else declared
    sums = object_checksums(split(source, SEG), PARAMS.data_shards, PARAMS.parity_shards)
    obj = ObjectInfo(id=object_id, bucket="b", name="o", owner="0x" + "11" * 20,
                     size=len(source), checksums=tuple(sums))
    return UploadObjectTask(object=obj, params=PARAMS)


async def chunks(data: bytes, size: int = 10_000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


async def upload(up: Uploader, task: UploadObjectTask, body: bytes) -> None:
    await up.pre_upload_object(task)
    try:
        await up.handle_upload_object_task(task, chunks(body))
    finally:
        up.post_upload_object(task)


async def progress(up: Uploader, object_id: int) -> tuple[str, int, int]:
    return await up.ctx.db.run(lambda c: c.execute(
        "SELECT state, segments_done, bytes_done FROM upload_progress WHERE object_id = ?",
        (object_id,)).fetchone())


async def test_segments_are_stored_and_checked(tmp_path: Path) -> None:
    data = os.urandom(3 * SEG + 12345)
    async with uploader(tmp_path) as up:
        task = task_for(data)
        await upload(up, task, data)
        stored = [await up.store.get(segment_key(7, i)) for i in range(4)]
        assert b"".join(stored) == data
        assert await progress(up, 7) == ("UPLOADED", 4, len(data))
        row = await up.ctx.db.run(lambda c: c.execute(
            "SELECT integrity_hash, checksums FROM integrity_meta WHERE object_id = 7 AND "
            "redundancy_index = -1").fetchone())
        assert row[0] == task.object.checksums[0] and len(unpack(row[1])) == 4
        assert up.ctx.limiter.used("uploader").memory == 0


async def test_empty_object(tmp_path: Path) -> None:
    async with uploader(tmp_path) as up:
        await upload(up, task_for(b""), b"")
        assert await up.store.keys(7) == []
        assert await progress(up, 7) == ("UPLOADED", 0, 0)


@pytest.mark.parametrize("body_change", ["content", "short", "long"])
async def test_wrong_payload_is_refused_and_nothing_is_left(tmp_path: Path,
                                                            body_change: str) -> None:
    declared = os.urandom(2 * SEG + 5)
    body = {"content": bytes([declared[0] ^ 1]) + declared[1:],
            "short": declared[:-1], "long": declared + b"x"}[body_change]
    async with uploader(tmp_path) as up:
        task = task_for(body, declared=declared)
        with pytest.raises(BadDigest if body_change == "content" else IncompleteUpload):
            await upload(up, task, body)
        assert await up.store.keys(7) == []
        state, *_ = await progress(up, 7)
        assert state == "FAILED"
        assert up.ctx.limiter.used("uploader").memory == 0


async def test_a_cancelled_upload_is_cleaned(tmp_path: Path) -> None:
    data = os.urandom(3 * SEG)
    gate = trio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield data[:2 * SEG]
        gate.set()
        await trio.sleep_forever()

    async with uploader(tmp_path) as up:
        task = task_for(data)
        await up.pre_upload_object(task)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(up.handle_upload_object_task, task, stalled())
                await gate.wait()
                await trio.testing.wait_all_tasks_blocked()
                nursery.cancel_scope.cancel()
        up.post_upload_object(task)
        assert await up.store.keys(7) == []
        assert up.ctx.limiter.used("uploader").memory == 0


async def test_over_the_memory_limit_is_503(tmp_path: Path) -> None:
    cfg = dataclasses.replace(Config(), limits=LimitsSection(
        services={"uploader": LimitValues(memory=3 * SEG)}))
    async with uploader(tmp_path, cfg) as up:
        first = task_for(os.urandom(2 * SEG), object_id=1)
        await up.pre_upload_object(first)
        with pytest.raises(ServiceUnavailable) as info:
            await up.pre_upload_object(task_for(os.urandom(2 * SEG), object_id=2))
        assert info.value.status == 503 and info.value.retry_after > 0
        up.post_upload_object(first)
        await up.pre_upload_object(task_for(os.urandom(2 * SEG), object_id=2))


async def test_a_second_upload_of_the_same_object_is_refused(tmp_path: Path) -> None:
    async with uploader(tmp_path) as up:
        task = task_for(os.urandom(100))
        await up.pre_upload_object(task)
        with pytest.raises(ServiceUnavailable):
            await up.pre_upload_object(task_for(os.urandom(100)))
        up.post_upload_object(task)


async def test_a_write_failure_mid_pipeline_releases_everything(tmp_path: Path) -> None:
    data = os.urandom(5 * SEG + 7)
    async with uploader(tmp_path) as up:
        real_put = up.store.put
        puts: list[str] = []

        async def failing_put(key: str, view: bytes | memoryview) -> None:
            puts.append(key)
            if key == segment_key(7, 2):
                raise PieceStoreError("disk on fire")
            await real_put(key, view)

        up.store.put = failing_put  # type: ignore[method-assign]
        with trio.fail_after(10), pytest.raises(PieceStoreError, match="disk on fire"):
            await upload(up, task_for(data), data)
        assert segment_key(7, 4) not in puts  # stopped, not run to the end
        assert await up.store.keys(7) == []
        state, *_ = await progress(up, 7)
        assert state == "FAILED"
        assert up.ctx.limiter.used("uploader").memory == 0
        assert up.query_tasks() == []


@pytest.mark.parametrize("failing", ["start", "end"])
async def test_a_failed_progress_or_integrity_write_cleans_up(tmp_path: Path,
                                                              failing: str) -> None:
    """An SPDB error writing the first progress row or the integrity record fails the upload
    like any other failure: its segments go and its progress says FAILED (found in review:
    they were outside the cleanup, so the segments stayed)."""
    data = os.urandom(3 * SEG + 5)
    async with uploader(tmp_path) as up:
        real_progress, real_record = up._progress, up._record_integrity
        calls = {"progress": 0}

        async def flaky_progress(*args: Any, **kw: Any) -> None:
            calls["progress"] += 1
            if failing == "start" and calls["progress"] == 1:
                raise DBError("OperationalError: disk I/O error")
            await real_progress(*args, **kw)

        def flaky_record(*args: Any) -> None:
            if failing == "end":
                raise sqlite3.OperationalError("disk I/O error")
            real_record(*args)

        up._progress = flaky_progress  # type: ignore[method-assign]
        up._record_integrity = flaky_record  # type: ignore[method-assign]
        with trio.fail_after(10), pytest.raises(DBError, match="disk I/O error"):
            await upload(up, task_for(data), data)
        assert await up.store.keys(7) == []
        state, *_ = await progress(up, 7)
        assert state == "FAILED"
        assert up.ctx.limiter.used("uploader").memory == 0
        assert up.query_tasks() == []


async def test_the_manager_hears_of_a_failure_spdb_cannot_record(tmp_path: Path) -> None:
    """Found in the fault review: with SPDB's disk full the FAILED progress row could not be
    written either, and that error skipped telling the manager the upload ended (its upload
    task stayed leased until the lease ran out). The segments go, the manager hears."""
    data = os.urandom(2 * SEG)
    async with uploader(tmp_path) as up:
        ended: list[str | None] = []

        class Manager:  # a fake: only the two calls the uploader makes
            name = "manager"

            async def handle_create_upload_object_task(self, task: UploadObjectTask) -> None:
                pass

            async def handle_done_upload_object_task(self, task: UploadObjectTask) -> None:
                ended.append(task.error)

        up.ctx.modulars.mark_running(Manager())

        async def full(*args: Any, **kw: Any) -> None:
            raise DBError("OperationalError: database or disk is full")

        up._progress = full  # type: ignore[method-assign]
        with trio.fail_after(10), pytest.raises(DBError, match="disk is full"):
            await upload(up, task_for(data), data)
        assert ended == ["DBError: OperationalError: database or disk is full"]
        assert await up.store.keys(7) == []
        assert up.ctx.limiter.used("uploader").memory == 0


async def test_an_upload_past_its_timeout_is_a_request_timeout(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """uploader.upload_timeout bounds the whole body (found in review: the key existed but
    nothing enforced it, so a client trickling its body held the upload for good)."""
    from node.config import UploaderSection

    cfg = dataclasses.replace(Config(), uploader=UploaderSection(upload_timeout=100.0))
    data = os.urandom(50)

    async def trickle() -> AsyncIterator[bytes]:
        for i in range(0, len(data), 10):
            await trio.sleep(30.0)  # virtual time: the slow client under test
            yield data[i:i + 10]

    async with uploader(tmp_path, cfg) as up:
        task = task_for(data)
        await up.pre_upload_object(task)
        t0 = trio.current_time()
        try:
            with pytest.raises(ServiceError) as e:
                await up.handle_upload_object_task(task, trickle())
        finally:
            up.post_upload_object(task)
        assert (e.value.code, e.value.status) == ("RequestTimeout", 400)
        assert trio.current_time() - t0 == pytest.approx(100.0)
        assert await up.store.keys(7) == []
        state, *_ = await progress(up, 7)
        assert state == "FAILED"
        assert up.ctx.limiter.used("uploader").memory == 0


async def test_segments_reuse_two_buffers(tmp_path: Path) -> None:
    data = os.urandom(6 * SEG + 99)
    async with uploader(tmp_path) as up:
        seen: set[int] = set()
        real_put = up.store.put

        async def put(key: str, view: bytes | memoryview) -> None:
            assert isinstance(view, memoryview)
            seen.add(id(view.obj))
            await real_put(key, view)

        up.store.put = put  # type: ignore[method-assign]
        await upload(up, task_for(data), data)
        assert len(seen) <= 2
        assert b"".join([await up.store.get(segment_key(7, i)) for i in range(7)]) == data
