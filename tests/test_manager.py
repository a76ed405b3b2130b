"""The manager: persistent queues in a real SPDB file, dispatch order and fit, leases, retries
with backoff, the upload stages, restart and SIGKILL recovery, queries, GC scheduling, scale.

Every timing test moves the manager's injected wall clock (:class:`FakeClock`); nothing sleeps.
The trio clock is left real (SPDB runs on a worker thread), and ``trio.fail_after`` bounds the
tests that wait on another process.
"""

from __future__ import annotations

import dataclasses
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trio.testing

from modulars.manager import (
    DONE,
    FAILED,
    PENDING,
    RUNNING,
    SEAL_TOO_LATE,
    DuplicateTask,
    Manager,
    _fast_estimate,
    backoff,
)
from node.app import build_limiter
from node.config import Config, ManagerSection
from node.db import open_spdb
from node.errors import TaskError
from node.modular import NodeContext
from node.rcmgr import Limit
from node.tasks import (
    BucketInfo,
    CreateBucketApprovalTask,
    DownloadObjectTask,
    GCMetaTask,
    GCObjectTask,
    GCZombiePieceTask,
    ObjectInfo,
    ReceivePieceTask,
    ReplicatePieceTask,
    SealObjectTask,
    StorageParams,
    Task,
    TaskType,
    UploadObjectTask,
    encode_task,
    key_prefix,
)
from testnet.devchain.testing import new_keyset

REPO_ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
PARAMS = StorageParams(segment_size=16 * MiB, data_shards=4, parity_shards=2,
                       max_payload=1024 * MiB)
T0 = 1_700_000_000.0
SECONDARIES = [f"0x{i:040x}" for i in range(1, 7)]
SIGNATURES = [bytes([i]) * 64 for i in range(1, 7)]


class FakeClock:
    """A wall clock that only moves when told to."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def obj(i: int, size: int = 1 * MiB, bucket: str = "bkt") -> ObjectInfo:
    return ObjectInfo(id=i, bucket=bucket, name=f"obj-{i}", owner="0x" + "ab" * 20, size=size,
                      checksums=tuple(bytes([i % 256]) * 32 for _ in range(7)))


def replicate(i: int, *, size: int = 1 * MiB, create_time: float = T0, **kw: object
              ) -> ReplicatePieceTask:
    return ReplicatePieceTask(object=obj(i, size), params=PARAMS, create_time=create_time,
                              **kw)  # type: ignore[arg-type]


def upload(i: int, size: int = 1 * MiB) -> UploadObjectTask:
    return UploadObjectTask(object=obj(i, size), params=PARAMS, create_time=T0)


def config(**manager: object) -> Config:
    return dataclasses.replace(Config(), manager=ManagerSection(**manager))  # type: ignore[arg-type]


@asynccontextmanager
async def manager_at(path: Path, clock: FakeClock, cfg: Config | None = None
                     ) -> AsyncIterator[Manager]:
    cfg = cfg or Config()
    async with open_spdb(path) as db:
        ctx = NodeContext(config=cfg, limiter=build_limiter(cfg), db=db, keys=new_keyset())
        manager = Manager(ctx, clock=clock)
        await manager.load()
        yield manager


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def manager(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Manager]:
    async with manager_at(tmp_path / "spdb.sqlite3", clock) as m:
        yield m


ALL = Limit.unlimited()


def limit(**kw: int) -> Limit:
    base = dict(memory=1 << 40, tasks=100, tasks_high=100, tasks_medium=100, tasks_low=100)
    base.update(kw)
    return Limit(**base)


# ---------------------------------------------------------------------- queueing


async def test_duplicate_key_refused(manager: Manager) -> None:
    t = replicate(1)
    await manager.add_task(t)
    with pytest.raises(DuplicateTask) as info:
        await manager.add_task(replicate(1))
    assert info.value.code == "DuplicateTask" and info.value.status == 409
    assert t.key in str(info.value)
    # still a duplicate while running
    got = await manager.dispatch_task(ALL)
    assert got is not None and got.key == t.key
    with pytest.raises(DuplicateTask):
        await manager.add_task(replicate(1))
    # a batch is all or nothing
    with pytest.raises(DuplicateTask):
        await manager.add_tasks([replicate(2), replicate(1)])
    assert await manager.get_task(replicate(2).key) is None
    with pytest.raises(DuplicateTask):
        await manager.add_tasks([replicate(3), replicate(3)])
    # a finished task may be replaced
    got.secondaries, got.secondary_signatures = SECONDARIES, SIGNATURES
    await manager.report_task(got)
    assert await manager.get_state(t.key) == DONE
    await manager.add_task(replicate(1))
    assert await manager.get_state(t.key) == PENDING


async def test_only_executor_types_are_queued(manager: Manager) -> None:
    with pytest.raises(TaskError, match="handle_create_upload_object_task"):
        await manager.add_task(upload(1))
    with pytest.raises(TaskError):
        await manager.add_task(CreateBucketApprovalTask(bucket="b", account="a"))
    with pytest.raises(TaskError):
        await manager.report_task(CreateBucketApprovalTask(bucket="b", account="a"))


async def test_dispatch_order_priority_then_age(manager: Manager) -> None:
    tasks: list[Task] = [
        GCZombiePieceTask(start_object_id=1, end_object_id=1, create_time=T0 - 100),  # 20
        replicate(1, create_time=T0 + 2),                                            # 150
        replicate(2, create_time=T0),                                                # 150
        SealObjectTask(object=obj(3), params=PARAMS, create_time=T0 + 1),            # 150
        GCMetaTask(create_time=T0 + 5, priority=220),                                # 220
        replicate(4, create_time=T0 + 3, priority=151),                              # 151
    ]
    random.Random(7).shuffle(tasks)
    for t in tasks:
        await manager.add_task(t)
    order = []
    while (t := await manager.dispatch_task(ALL)) is not None:
        order.append(t.key)
    assert order == [
        GCMetaTask(create_time=T0 + 5).key,
        replicate(4).key,
        replicate(2).key,
        SealObjectTask(object=obj(3), params=PARAMS).key,
        replicate(1).key,
        GCZombiePieceTask(start_object_id=1, end_object_id=1).key,
    ]
    assert all([await manager.get_state(k) == RUNNING for k in order])


async def test_dispatch_respects_memory_and_level_slots(manager: Manager, clock: FakeClock
                                                        ) -> None:
    big = replicate(1, size=64 * MiB, create_time=T0)       # 24 MiB estimate, oldest
    small = SealObjectTask(object=obj(2), params=PARAMS, create_time=T0 + 1)  # 64 KiB
    low = GCObjectTask(start_height=1, end_height=2, create_time=T0 + 2)     # priority 20
    assert big.estimate().memory == 24 * MiB
    for t in (big, small, low):
        await manager.add_task(t)

    assert await manager.dispatch_task(limit(tasks=0)) is None
    assert await manager.dispatch_task(limit(memory=1024)) is None
    # no medium slot: only the low-priority task may go
    got = await manager.dispatch_task(limit(tasks_medium=0))
    assert got is not None and got.key == low.key
    # the big one is more urgent (older) but does not fit: the small one goes
    got = await manager.dispatch_task(limit(memory=24 * MiB - 1))
    assert got is not None and got.key == small.key
    assert await manager.dispatch_task(limit(memory=20 * MiB)) is None
    assert await manager.dispatch_task(limit(tasks_medium=0)) is None
    # exactly its estimate fits
    got = await manager.dispatch_task(limit(memory=24 * MiB))
    assert got is not None and got.key == big.key
    assert got.estimate().memory == 24 * MiB


async def test_memory_class_straddling_the_remaining_memory(manager: Manager) -> None:
    # Estimates in one quarter-octave class (16..20 MiB), the better ones too big.
    sizes = [int(13.2 * MiB), int(13.1 * MiB), int(12.0 * MiB), int(11.0 * MiB)]
    tasks = [replicate(i, size=s, create_time=T0 + i) for i, s in enumerate(sizes)]
    await manager.add_tasks(tasks)
    fits = tasks[2].estimate().memory
    got = await manager.dispatch_task(limit(memory=fits))
    assert got is not None and got.key == tasks[2].key
    got = await manager.dispatch_task(limit(memory=fits))
    assert got is not None and got.key == tasks[3].key
    assert await manager.dispatch_task(limit(memory=fits)) is None
    got = await manager.dispatch_task(ALL)
    assert got is not None and got.key == tasks[0].key


# ---------------------------------------------------------------------- leases and retries


async def test_lease_expiry_retries_then_fails_with_the_error(manager: Manager,
                                                              clock: FakeClock) -> None:
    t = replicate(1, timeout=10.0, max_retry=1)
    await manager.add_task(t)
    got = await manager.dispatch_task(ALL)
    assert got is not None and got.update_time == clock()
    clock.advance(10.0)  # the lease lasts until update_time + timeout inclusive
    assert await manager.dispatch_task(ALL) is None
    assert await manager.get_state(t.key) == RUNNING
    clock.advance(0.5)
    assert await manager.dispatch_task(ALL) is None  # expired now, but backing off 2 s
    stored = await manager.get_task(t.key)
    assert stored is not None
    assert (stored.retry, stored.error) == (1, "timeout")
    assert await manager.get_state(t.key) == PENDING
    clock.advance(backoff(10.0, 1))
    got = await manager.dispatch_task(ALL)
    assert got is not None and got.key == t.key and got.retry == 1
    clock.advance(10.5)
    assert await manager.dispatch_task(ALL) is None
    stored = await manager.get_task(t.key)
    assert stored is not None and (stored.retry, stored.error) == (2, "timeout")
    assert await manager.get_state(t.key) == FAILED
    clock.advance(3600)
    assert await manager.dispatch_task(ALL) is None
    # a failed replication fails the upload's progress with the reason
    row = await manager.ctx.db.run(lambda c: c.execute(
        "SELECT state, error FROM upload_progress WHERE object_id = 1").fetchone())
    assert row[0] == "FAILED" and "timeout" in row[1]


async def test_report_error_backs_off_then_redispatches(manager: Manager,
                                                        clock: FakeClock) -> None:
    t = SealObjectTask(object=obj(1), params=PARAMS, secondaries=SECONDARIES,
                       secondary_signatures=SIGNATURES, create_time=T0, max_retry=2)
    await manager.add_task(t)
    got = await manager.dispatch_task(ALL)
    assert got is not None
    await manager.report_task(got, "chain: out of gas")
    stored = await manager.get_task(t.key)
    assert stored is not None and (stored.retry, stored.error) == (1, "chain: out of gas")
    assert await manager.get_state(t.key) == PENDING
    assert await manager.dispatch_task(ALL) is None
    clock.advance(1.9)
    assert await manager.dispatch_task(ALL) is None
    clock.advance(0.2)
    got = await manager.dispatch_task(ALL)
    assert got is not None and got.retry == 1 and got.secondaries == SECONDARIES
    # an exception-style error, second failure: backoff 4 s
    got.set_error(RuntimeError("boom"))
    await manager.report_task(got)
    stored = await manager.get_task(t.key)
    assert stored is not None and (stored.retry, stored.error) == (2, "RuntimeError: boom")
    # a late error report (the task is not running any more) is stale: nothing changes
    await manager.report_task(got, "late")
    stored = await manager.get_task(t.key)
    assert stored is not None and (stored.retry, stored.error) == (2, "RuntimeError: boom")
    assert manager.stats["stale.SealObject"] == 1
    clock.advance(3.9)
    assert await manager.dispatch_task(ALL) is None
    clock.advance(0.2)
    got = await manager.dispatch_task(ALL)
    assert got is not None and got.retry == 2
    await manager.report_task(got, "third time")
    stored = await manager.get_task(t.key)
    assert stored is not None and stored.error == "third time" and stored.retry == 3
    assert await manager.get_state(t.key) == FAILED
    clock.advance(3600)
    assert await manager.dispatch_task(ALL) is None


async def test_a_released_task_is_pending_again_without_a_retry(tmp_path: Path,
                                                                clock: FakeClock) -> None:
    """The executor gives back a dispatched task it could not reserve resources for (found
    in review: that used to be reported as a failed attempt): pending again as it was before
    the dispatch (retry, error, backoff), in SPDB too, and dispatchable at once."""
    path = tmp_path / "spdb.sqlite3"
    t = replicate(3, max_retry=3)
    async with manager_at(path, clock) as m:
        await m.add_task(t)
        got = await m.dispatch_task(ALL)
        assert got is not None
        await m.report_task(got, "flaky")                      # retry 1, backoff 2 s
        clock.advance(2.5)
        got = await m.dispatch_task(ALL)
        assert got is not None and got.retry == 1
        assert await m.release_task(got)
        stored = await m.get_task(t.key)
        assert await m.get_state(t.key) == PENDING
        assert stored is not None and (stored.retry, stored.error) == (1, "flaky")
        assert stored.update_time == T0                        # the failure's, not now
        assert not await m.release_task(got)                   # not running: nothing
        again = await m.dispatch_task(ALL)                     # no new backoff
        assert again is not None and again.key == t.key and again.retry == 1
        stale = dataclasses.replace(again, update_time=again.update_time - 1)
        assert not await m.release_task(stale)                 # another dispatch's
        assert await m.get_state(t.key) == RUNNING
        assert await m.release_task(again)
    async with manager_at(path, clock) as m:                   # the same after a restart
        again = await m.dispatch_task(ALL)
        assert again is not None and again.key == t.key and again.retry == 1
        assert m.stats["recovered.reset"] == 0


def test_backoff_is_capped_by_the_timeout() -> None:
    assert backoff(300.0, 0) == 0.0
    assert [backoff(300.0, r) for r in (1, 2, 3)] == [2.0, 4.0, 8.0]
    assert backoff(10.0, 5) == 10.0
    assert backoff(10.0, 10_000) == 10.0


# ---------------------------------------------------------------------- stages


async def test_stages_upload_replicate_seal_done(manager: Manager, clock: FakeClock) -> None:
    up = upload(7, size=40 * MiB)
    await manager.handle_create_upload_object_task(up)
    assert await manager.get_state(up.key) == RUNNING
    with pytest.raises(DuplicateTask):
        await manager.handle_create_upload_object_task(upload(7, size=40 * MiB))
    # an admitted upload is not the executor's
    assert await manager.dispatch_task(ALL) is None

    clock.advance(5)
    await manager.handle_done_upload_object_task(up)
    assert await manager.get_state(up.key) == DONE
    rep_key = ReplicatePieceTask(object=up.object, params=PARAMS).key
    assert await manager.get_state(rep_key) == PENDING
    progress = await manager.ctx.db.run(lambda c: c.execute(
        "SELECT state, segments_done, bytes_done FROM upload_progress WHERE object_id = 7"
    ).fetchone())
    assert progress == ("REPLICATING", 3, 40 * MiB)
    # an upload of the object is refused while it replicates
    with pytest.raises(DuplicateTask):
        await manager.handle_create_upload_object_task(upload(7, size=40 * MiB))

    rep = await manager.dispatch_task(ALL)
    assert isinstance(rep, ReplicatePieceTask) and rep.key == rep_key
    assert rep.object == up.object and rep.params == PARAMS
    # done without the signatures is a failed attempt
    await manager.report_task(rep)
    stored = await manager.get_task(rep_key)
    assert stored is not None and "signature" in stored.error and stored.retry == 1
    clock.advance(2)
    rep = await manager.dispatch_task(ALL)
    assert isinstance(rep, ReplicatePieceTask)
    rep.secondaries, rep.secondary_signatures = list(SECONDARIES), list(SIGNATURES)
    rep.error = ""
    await manager.report_task(rep)
    assert await manager.get_state(rep_key) == DONE
    seal_key = SealObjectTask(object=up.object, params=PARAMS).key
    assert await manager.get_state(seal_key) == PENDING

    seal = await manager.dispatch_task(ALL)
    assert isinstance(seal, SealObjectTask) and seal.key == seal_key
    assert seal.object == up.object and seal.params == PARAMS
    assert seal.secondaries == SECONDARIES and seal.secondary_signatures == SIGNATURES
    await manager.report_task(seal)
    assert await manager.get_state(seal_key) == DONE
    assert await manager.dispatch_task(ALL) is None
    state = await manager.ctx.db.run(lambda c: c.execute(
        "SELECT state FROM upload_progress WHERE object_id = 7").fetchone()[0])
    assert state == "SEALED"
    counts = await manager.counts()
    assert counts["UploadObject"] == {DONE: 1}
    assert counts["ReplicatePiece"] == {DONE: 1}
    assert counts["SealObject"] == {DONE: 1}


async def test_failed_upload_may_be_put_again(manager: Manager, clock: FakeClock) -> None:
    up = upload(3)
    await manager.handle_create_upload_object_task(up)
    up.set_error("BadDigest: mismatch")
    await manager.report_task(up)
    stored = await manager.get_task(up.key)
    assert stored is not None and stored.error == "BadDigest: mismatch"
    assert await manager.get_state(up.key) == FAILED
    assert await manager.get_task(ReplicatePieceTask(object=up.object, params=PARAMS).key) is None
    again = upload(3)
    await manager.handle_create_upload_object_task(again)
    assert await manager.get_state(up.key) == RUNNING
    # an upload whose lease expires fails without retries, freeing the key
    clock.advance(again.timeout + 1)
    await manager.handle_create_upload_object_task(upload(3))
    assert await manager.get_state(up.key) == RUNNING


async def test_a_seal_too_late_replicates_again(manager: Manager, clock: FakeClock) -> None:
    """The seal carries when the secondaries signed; an executor that finds them too old to
    seal with (a secondary may have dropped its pieces) reports SealTooLate: not retried,
    the object is replicated again instead (found in review)."""
    await manager.add_task(replicate(8))
    rep = await manager.dispatch_task(ALL)
    assert isinstance(rep, ReplicatePieceTask)
    rep.secondaries, rep.secondary_signatures = list(SECONDARIES), list(SIGNATURES)
    rep.signed_at = 1234.5
    await manager.report_task(rep)
    seal = await manager.dispatch_task(ALL)
    assert isinstance(seal, SealObjectTask) and seal.signed_at == 1234.5
    seal.set_error(f"{SEAL_TOO_LATE} the secondaries signed 200 s ago")
    await manager.report_task(seal)
    assert await manager.get_state(seal.key) == FAILED  # at once, no retry
    again = await manager.dispatch_task(ALL)
    assert isinstance(again, ReplicatePieceTask) and again.key == rep.key
    assert (again.secondaries, again.signed_at, again.retry) == ([], 0.0, 0)
    assert again.late_seals == 1
    state = await manager.ctx.db.run(lambda c: c.execute(
        "SELECT state FROM upload_progress WHERE object_id = 8").fetchone()[0])
    assert state == "REPLICATING"


async def test_seals_too_late_replicate_again_a_few_times_then_fail(manager: Manager
                                                                   ) -> None:
    """The SealTooLate -> replicate again cycle is bounded (``max_late_seals``, counted in
    the tasks' ``late_seals``): then the upload is FAILED with an error that says why."""
    key = replicate(9).key
    await manager.add_task(replicate(9))
    for late in range(manager.max_late_seals + 1):
        rep = await manager.dispatch_task(ALL)
        assert isinstance(rep, ReplicatePieceTask) and rep.key == key
        assert rep.late_seals == late
        rep.secondaries, rep.secondary_signatures = list(SECONDARIES), list(SIGNATURES)
        await manager.report_task(rep)
        seal = await manager.dispatch_task(ALL)
        assert isinstance(seal, SealObjectTask) and seal.late_seals == late
        await manager.report_task(seal, f"{SEAL_TOO_LATE} the secondaries signed 200 s ago")
        assert await manager.get_state(seal.key) == FAILED
    assert await manager.dispatch_task(ALL) is None
    assert await manager.get_state(key) == DONE
    stored = await manager.get_task(seal.key)
    assert stored is not None and "too late 4 times" in stored.error
    state, error = await manager.ctx.db.run(lambda c: c.execute(
        "SELECT state, error FROM upload_progress WHERE object_id = 9").fetchone())
    assert state == "FAILED" and "too late 4 times" in error and "at most 3" in error


async def test_replicate_reporting_sealed_skips_the_seal(manager: Manager) -> None:
    await manager.add_task(replicate(5))
    rep = await manager.dispatch_task(ALL)
    assert isinstance(rep, ReplicatePieceTask)
    rep.sealed = True
    await manager.report_task(rep)
    assert await manager.get_state(rep.key) == DONE
    assert await manager.dispatch_task(ALL) is None


async def test_receive_confirm_done_or_gc(manager: Manager, clock: FakeClock) -> None:
    received = ReceivePieceTask(object=obj(9), params=PARAMS, redundancy_index=2,
                                integrity_hash=b"h" * 32, signature=b"s" * 64, create_time=T0)
    await manager.handle_receive_piece_task(received)
    assert await manager.get_state(received.key) == PENDING
    confirm = await manager.dispatch_task(ALL)
    assert isinstance(confirm, ReceivePieceTask) and confirm.signature == b"s" * 64
    # enough retries for the executor's seal wait (2+4+...+64 >= 120 s), plus max_retry
    assert confirm.max_retry >= 6 + manager.cfg.max_retry
    confirm.sealed = True
    await manager.report_task(confirm)
    assert await manager.get_state(received.key) == DONE

    # a receive that is never confirmed: its pieces are collected by a GCZombiePiece task
    other = ReceivePieceTask(object=obj(10), params=PARAMS, redundancy_index=0,
                             create_time=T0, max_retry=0)
    await manager.handle_receive_piece_task(other)
    stored = await manager.get_task(other.key)
    assert stored is not None
    for _ in range(stored.max_retry + 1):
        clock.advance(600)
        confirm = await manager.dispatch_task(ALL)
        assert confirm is not None and confirm.key == other.key
        await manager.report_task(confirm, "NotSealedYet: object 10 is not sealed yet")
    assert await manager.get_state(other.key) == FAILED
    gc_key = GCZombiePieceTask(start_object_id=10, end_object_id=10).key
    assert await manager.get_state(gc_key) == PENDING
    # a failed receive reported by the receiver queues nothing
    bad = ReceivePieceTask(object=obj(11), params=PARAMS, redundancy_index=0, error="short")
    await manager.handle_receive_piece_task(bad)
    assert await manager.get_task(bad.key) is None


async def test_a_new_receive_while_its_confirm_runs_is_confirmed_afresh(
        manager: Manager, clock: FakeClock) -> None:
    """The primary replicated to us again (a new "done") while the confirm of the old
    receive was running: the receiver's report is not that run's result (found in review:
    it settled the running confirm as done, and the new pieces waited for the zombie GC)."""
    received = ReceivePieceTask(object=obj(9), params=PARAMS, redundancy_index=2,
                                create_time=T0)
    await manager.handle_receive_piece_task(received)
    confirm = await manager.dispatch_task(ALL)
    assert isinstance(confirm, ReceivePieceTask)
    clock.advance(30)
    again = ReceivePieceTask(object=obj(9), params=PARAMS, redundancy_index=2,
                             signature=b"n" * 64, create_time=clock())
    await manager.handle_receive_piece_task(again)
    assert await manager.get_state(received.key) == RUNNING  # not settled by the receiver
    await manager.report_task(confirm, "NotSealedYet: object 9 is not sealed yet")
    stored = await manager.get_task(received.key)
    assert await manager.get_state(received.key) == PENDING
    assert stored is not None and stored.retry == 0 and stored.create_time == clock()
    assert stored.signature == b"n" * 64
    # a confirm that finds the seal settles it, a new receive meanwhile or not
    confirm = await manager.dispatch_task(ALL)
    assert confirm is not None and confirm.key == received.key
    clock.advance(5)
    await manager.handle_receive_piece_task(dataclasses.replace(again, create_time=clock(),
                                                                update_time=0.0))
    confirm.sealed = True
    await manager.report_task(confirm)
    assert await manager.get_state(received.key) == DONE


async def test_a_cancel_racing_with_a_commit_leaves_the_index_in_step(
        manager: Manager, monkeypatch: pytest.MonkeyPatch) -> None:
    """db.run can raise Cancelled for a job that committed (the cancel came with the
    COMMIT): the index must follow SPDB all the same (found in review: a task pending in
    SPDB was never dispatched until a restart)."""
    real_run = manager.ctx.db.run
    scope = trio.CancelScope()

    async def commit_then_cancel(fn: Callable[..., object]) -> object:
        result = await real_run(fn)
        scope.cancel()  # the caller's cancel arrives with the commit
        await trio.lowlevel.checkpoint()
        return result

    monkeypatch.setattr(manager.ctx.db, "run", commit_then_cancel)
    task = replicate(3)
    with scope:
        await manager.add_task(task)
    assert scope.cancel_called  # (delivered, if at all, after the index update)
    monkeypatch.setattr(manager.ctx.db, "run", real_run)
    assert await manager.get_state(task.key) == PENDING
    got = await manager.dispatch_task(ALL)
    assert got is not None and got.key == task.key


async def test_download_and_challenge_are_stats_only(manager: Manager) -> None:
    d = DownloadObjectTask(object=obj(1), bucket=BucketInfo(id=1, name="bkt", owner="o"),
                           params=PARAMS, low=0, high=9)
    await manager.report_task(d)
    await manager.report_task(d, "boom")
    assert manager.stats["download.done"] == 1 and manager.stats["download.error"] == 1
    assert await manager.get_task(d.key) is None


# ---------------------------------------------------------------------- restart


async def test_reload_resets_running_and_keeps_everything(tmp_path: Path, clock: FakeClock
                                                          ) -> None:
    path = tmp_path / "spdb.sqlite3"
    async with manager_at(path, clock) as m:
        await m.add_tasks([replicate(i, create_time=T0 + i) for i in range(5)])
        first = await m.dispatch_task(ALL)
        second = await m.dispatch_task(ALL)
        assert first is not None and second is not None
        await m.report_task(second, "flaky")           # pending, retry 1
        await m.handle_create_upload_object_task(upload(50))
        done = await m.dispatch_task(ALL)
        assert done is not None
        done.sealed = True
        await m.report_task(done)
        before = {t.key: t for t in await m.query_tasks()}
    clock.advance(1)
    async with manager_at(path, clock) as m:
        after = {t.key: t for t in await m.query_tasks()}
        assert set(after) == set(before)
        assert await m.get_state(first.key) == PENDING
        assert after[first.key].retry == 0              # a restart costs no retry
        assert after[second.key].retry == 1 and after[second.key].error == "flaky"
        assert await m.get_state(done.key) == DONE
        assert await m.get_state(upload(50).key) == FAILED
        assert "restarted" in after[upload(50).key].error
        assert m.stats["recovered.reset"] == 1
        counts = await m.counts()
        assert RUNNING not in counts["ReplicatePiece"]
        got = []
        clock.advance(10)
        while (t := await m.dispatch_task(ALL)) is not None:
            got.append(t.key)
        assert set(got) == {replicate(i).key for i in range(5)} - {done.key}


CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path

    import trio

    from modulars.manager import Manager
    from node.app import build_limiter
    from node.config import Config
    from node.db import open_spdb
    from node.modular import NodeContext
    from node.rcmgr import Limit
    from node.tasks import ObjectInfo, ReplicatePieceTask, StorageParams

    PARAMS = StorageParams(segment_size=1 << 24, data_shards=4, parity_shards=2,
                           max_payload=1 << 30)

    async def main(path):
        cfg = Config()
        async with open_spdb(Path(path)) as db:
            ctx = NodeContext(config=cfg, limiter=build_limiter(cfg), db=db, keys=None)
            m = Manager(ctx)
            await m.load()
            i = 0
            while True:
                o = ObjectInfo(id=i, bucket="b", name=f"o{i}", owner="x", size=1000,
                               checksums=(b"c" * 32,) * 7)
                t = ReplicatePieceTask(object=o, params=PARAMS)
                await m.add_task(t)
                print("added", t.key, flush=True)
                if i % 2 == 0:
                    d = await m.dispatch_task(Limit.unlimited())
                    print("dispatched", d.key, flush=True)
                i += 1

    trio.run(main, sys.argv[1])
""")


@pytest.mark.slow
async def test_sigkill_then_a_new_manager_finds_every_committed_task(
        tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "spdb.sqlite3"
    async with open_spdb(path):
        pass  # create and migrate the file first
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, cwd=REPO_ROOT)
    assert proc.stdout is not None
    buf = b""
    try:
        with trio.fail_after(60):
            while buf.count(b"\n") < 300:
                chunk = await proc.stdout.receive_some()
                assert chunk, "the child exited early"
                buf += chunk
    finally:
        proc.send_signal(signal.SIGKILL)
        with trio.fail_after(30):
            await proc.wait()
    with trio.fail_after(30):
        while chunk := await proc.stdout.receive_some():
            buf += chunk
    assert proc.returncode == -signal.SIGKILL
    lines = [ln.split() for ln in buf.decode().splitlines() if ln.count(" ") == 1]
    added = [key for what, key in lines if what == "added"]
    dispatched = [key for what, key in lines if what == "dispatched"]
    assert len(added) >= 150 and dispatched

    with trio.fail_after(30):
        async with manager_at(path, clock) as m:
            stored = {t.key: t for t in await m.query_tasks(key_prefix(TaskType.ReplicatePiece))}
            assert set(added) <= set(stored)
            assert len(stored) <= len(added) + 1   # at most one committed, not yet printed
            for key in dispatched:
                assert await m.get_state(key) == PENDING
                assert stored[key].retry == 0
            counts = await m.counts()
            assert set(counts["ReplicatePiece"]) == {PENDING}
            ok = await m.ctx.db.run(lambda c: c.execute("PRAGMA integrity_check").fetchone())
            assert ok == ("ok",)
            resumed = 0
            while await m.dispatch_task(ALL) is not None:
                resumed += 1
            assert resumed == len(stored)


# ---------------------------------------------------------------------- queries and GC


async def test_query_tasks_by_prefix_newest_first(manager: Manager, clock: FakeClock) -> None:
    for i in range(3):
        await manager.add_task(replicate(i, create_time=clock()))
        clock.advance(1)
    await manager.add_task(SealObjectTask(object=obj(1), params=PARAMS, create_time=clock()))
    await manager.add_task(GCObjectTask(start_height=0, end_height=10, create_time=clock()))
    reps = await manager.query_tasks(key_prefix(TaskType.ReplicatePiece))
    assert [t.key for t in reps] == [replicate(i).key for i in (2, 1, 0)]
    assert all(isinstance(t, ReplicatePieceTask) for t in reps)
    one = await manager.query_tasks("ReplicatePiece-bucket:bkt-object:obj-1-")
    assert [t.key for t in one] == [replicate(1).key]
    assert len(await manager.query_tasks()) == 5
    assert len(await manager.query_tasks(limit=2)) == 2
    assert await manager.query_tasks("nothing-") == []
    # a state change makes it the newest
    clock.advance(1)
    got = await manager.dispatch_task(limit(tasks_low=0, memory=4 * MiB))
    assert got is not None
    assert (await manager.query_tasks())[0].key == got.key


async def test_counts_by_type_and_state(manager: Manager) -> None:
    await manager.add_tasks([replicate(i, create_time=T0 + i) for i in range(3)])
    await manager.add_task(GCMetaTask(create_time=T0))
    got = await manager.dispatch_task(limit(tasks_low=0))
    assert got is not None
    assert await manager.counts() == {
        "ReplicatePiece": {PENDING: 2, RUNNING: 1},
        "GCMeta": {PENDING: 1},
    }


async def test_gc_meta_deletes_only_old_terminal_rows(manager: Manager, clock: FakeClock
                                                      ) -> None:
    def put(key: str, state: str, update_time: float) -> None:
        t = replicate(int(key), create_time=update_time)

        def tx(c: sqlite3.Connection) -> None:
            c.execute("INSERT INTO tasks (key, type, priority, state, payload, create_time, "
                      "update_time) VALUES (?, ?, 150, ?, ?, ?, ?)",
                      (t.key, "ReplicatePiece", state, encode_task(t), update_time,
                       update_time))
        rows.append(tx)

    rows: list = []
    put("1", DONE, T0 - 100)
    put("2", FAILED, T0 - 100)
    put("3", DONE, T0 - 1)
    put("4", PENDING, T0 - 100)
    put("5", RUNNING, T0 - 100)
    for tx in rows:
        await manager.ctx.db.run(tx)
    assert await manager.gc_meta(T0 - 50) == 2
    left = {t.object.id for t in await manager.query_tasks()}  # type: ignore[attr-defined]
    assert left == {3, 4, 5}
    # the default horizon is now - meta_retention
    clock.advance(manager.cfg.meta_retention)
    assert await manager.gc_meta() == 1
    assert await manager.gc_meta() == 0


async def test_periodic_gc_tasks_only_when_idle(manager: Manager, clock: FakeClock) -> None:
    added = await manager.schedule_periodic_gc()
    assert [t.type for t in added] == [TaskType.GCMeta, TaskType.GCZombiePiece]
    clock.advance(5)
    assert await manager.schedule_periodic_gc() == []
    for _ in range(2):
        t = await manager.dispatch_task(ALL)
        assert t is not None
        await manager.report_task(t)
    clock.advance(5)
    again = await manager.schedule_periodic_gc()
    assert len(again) == 2
    assert again[0].key != added[0].key          # a new GCMeta (named by its time)
    assert again[1].key == added[1].key          # the done zombie scan is replaced

    first = await manager.schedule_gc_object(0, 100)
    assert isinstance(first, GCObjectTask) and (first.start_height, first.end_height) == (0, 100)
    assert await manager.schedule_gc_object(0, 150) is None
    t = await manager.dispatch_task(limit(memory=10 * MiB))
    while t is not None and t.type != TaskType.GCObject:
        t = await manager.dispatch_task(limit(memory=10 * MiB))
    assert t is not None
    await manager.report_task(t)
    assert await manager.schedule_gc_object(100, 150) is not None


async def test_serve_recovers_then_schedules_gc(tmp_path: Path, clock: FakeClock,
                                                mock_clock: trio.testing.MockClock) -> None:
    cfg = config(gc_interval=30.0)
    async with manager_at(tmp_path / "a.sqlite3", clock, cfg) as m, trio.open_nursery() as n:
        await n.start(m.serve)
        assert await m.counts() == {}
        mock_clock.jump(31)
        for _ in range(10_000):
            counts = await m.counts()
            if "GCMeta" in counts and "GCZombiePiece" in counts:
                break
            await trio.lowlevel.checkpoint()
        assert counts == {"GCMeta": {PENDING: 1}, "GCZombiePiece": {PENDING: 1}}
        n.cancel_scope.cancel()


# ---------------------------------------------------------------------- the work signal


async def test_wait_for_work(manager: Manager, clock: FakeClock) -> None:
    await manager.wait_for_work(0)                 # consume the start-up signal
    assert await manager.wait_for_work(0.01) is False
    woke: list[bool] = []

    async def waiter() -> None:
        woke.append(await manager.wait_for_work(30))

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            await manager.add_task(replicate(1))
    assert woke == [True]
    # a signal raised while nobody waits is kept for the next waiter
    await manager.add_task(replicate(2))
    assert await manager.wait_for_work(0) is True
    assert await manager.wait_for_work(0) is False
    # a backoff ending counts as work (no sleep: the clock is moved past it)
    t = await manager.dispatch_task(ALL)
    assert t is not None
    await manager.report_task(t, "retry me")
    assert await manager.wait_for_work(0) is True   # the report itself
    clock.advance(backoff(t.timeout, 1) + 1)
    with trio.fail_after(5):
        assert await manager.wait_for_work(30) is True
    again = await manager.dispatch_task(ALL)
    assert again is not None


# ---------------------------------------------------------------------- scale


def test_fast_estimate_matches_the_task() -> None:
    samples: list[Task] = [
        replicate(1, size=3 * MiB + 7), replicate(2, size=100),
        SealObjectTask(object=obj(3), params=PARAMS),
        ReceivePieceTask(object=obj(4, size=50 * MiB), params=PARAMS, redundancy_index=5,
                         timeout=77.0),
        GCObjectTask(start_height=1, end_height=5), GCZombiePieceTask(start_object_id=0,
                                                                     end_object_id=9),
        GCMetaTask(),
    ]
    for t in samples:
        o = getattr(t, "object", None)
        assert _fast_estimate(encode_task(t)) == (
            t.estimate().memory, t.timeout, o.id if o is not None else None)


async def test_ten_thousand_pending_tasks_dispatch_fast(tmp_path: Path, clock: FakeClock
                                                        ) -> None:
    rng = random.Random(1)
    tasks: list[Task] = []
    for i in range(10_000):
        size = rng.choice([1000, 300_000, 5 * MiB, 16 * MiB, 100 * MiB])
        tasks.append(replicate(i, size=size, create_time=T0 + rng.random() * 1000,
                               priority=rng.randrange(85, 256)))
    path = tmp_path / "big.sqlite3"
    async with manager_at(path, clock) as m:
        await m.add_tasks(tasks)
        start = time.perf_counter()
        out: list[Task] = []
        for k in range(1000):
            mem = 8 * MiB if k % 2 else 1 << 40
            got = await m.dispatch_task(limit(memory=mem))
            assert got is not None
            assert got.estimate().memory <= mem
            out.append(got)
        elapsed = time.perf_counter() - start
        assert elapsed < 5.0, f"1000 dispatches took {elapsed:.2f} s"
        assert len({t.key for t in out}) == 1000
        # the unconstrained dispatches come out in priority order
        prios = [t.priority for k, t in enumerate(out) if k % 2 == 0]
        assert prios == sorted(prios, reverse=True)
    start = time.perf_counter()
    async with manager_at(path, clock) as m:
        assert m.stats["recovered.reset"] == 1000
        reload_s = time.perf_counter() - start
        assert reload_s < 5.0, f"reloading 10k tasks took {reload_s:.2f} s"
        got = await m.dispatch_task(ALL)
        assert got is not None and got.priority == 255


def test_the_seal_too_late_prefix_is_the_executors_error() -> None:
    from modulars.executor import SealTooLate

    assert SEAL_TOO_LATE == f"{SealTooLate.__name__}:"
