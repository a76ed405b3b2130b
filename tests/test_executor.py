"""The executor with a real manager on a real SPDB file (task handlers faked where they would
talk to secondaries or the chain):

* a task whose resource reservation is refused (the limiter changed between the worker's ask
  and its reservation) goes back to the queue unrun, its retry count and backoff untouched;
* a seal that landed on the chain before the node could report it (killed, restarted past the
  secondaries' seal deadline) finishes the seal task instead of replicating the object again.

The manager's wall clock is a :class:`FakeClock` (nothing sleeps); the trio clock is real
(SPDB runs on a worker thread) and ``trio.fail_after`` bounds the tests that run workers.
"""

from __future__ import annotations

import dataclasses
import time
import types
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from modulars.executor import ReplicateError, TaskExecutor
from modulars.manager import DONE, FAILED, PENDING, Manager, backoff
from node.config import Config, LimitsSection, LimitValues, ManagerSection
from node.errors import DBError
from node.tasks import ReplicatePieceTask, SealObjectTask, Task
from tests.test_manager import (
    PARAMS,
    SECONDARIES,
    SIGNATURES,
    FakeClock,
    MiB,
    manager_at,
    replicate,
)

ME = "0x" + "11" * 20
TIMEOUT = 20
#: Executor memory for one 1 MiB object's replication (1.5 MiB) at a time, plus a seal
ONE_AT_A_TIME = Config(limits=LimitsSection(services={"executor": LimitValues(memory=2 * MiB)}))


class FakeSigner:
    name = "signer"
    operator_address = ME

    def __init__(self) -> None:
        self.sealed: list[int] = []

    async def seal_object(self, *, object_id: int, secondaries: list[str],
                          secondary_sigs: list[bytes]) -> dict[str, Any]:
        self.sealed.append(object_id)
        return {"object_id": object_id}


class FakeChain:
    """One object, ``status`` CREATED or SEALED, in a bucket whose primary is ``primary``."""

    def __init__(self, status: str, primary: str = ME) -> None:
        self.status, self.primary = status, primary

    async def get_object_by_id(self, object_id: int) -> Any:
        return types.SimpleNamespace(id=object_id, bucket="bkt", status=self.status,
                                     sealed=self.status == "SEALED",
                                     secondaries=tuple(SECONDARIES))

    async def get_bucket(self, name: str) -> Any:
        return types.SimpleNamespace(name=name, primary_sp=self.primary)


@asynccontextmanager
async def executor_at(tmp_path: Path, clock: FakeClock, cfg: Config | None = None,
                      chain: FakeChain | None = None
                      ) -> AsyncIterator[tuple[TaskExecutor, Manager, FakeSigner]]:
    async with manager_at(tmp_path / "spdb.sqlite3", clock, cfg) as manager:
        if chain is not None:
            manager.ctx.chain = chain  # type: ignore[assignment]
        signer = FakeSigner()
        manager.ctx.modulars.mark_running(manager)
        manager.ctx.modulars.mark_running(signer)  # type: ignore[arg-type]
        yield TaskExecutor(manager.ctx), manager, signer


async def row(manager: Manager, key: str) -> tuple[str, int, str, float]:
    return await manager.ctx.db.run(lambda c: c.execute(
        "SELECT state, retry, error, update_time FROM tasks WHERE key = ?", (key,)).fetchone())


async def progress(manager: Manager, object_id: int) -> tuple[str, str]:
    return await manager.ctx.db.run(lambda c: c.execute(
        "SELECT state, error FROM upload_progress WHERE object_id = ?",
        (object_id,)).fetchone())


async def signed(task: Task) -> None:
    """A replication or seal that succeeds at once (no secondaries, no chain)."""
    await trio.lowlevel.checkpoint()
    if isinstance(task, ReplicatePieceTask):
        task.secondaries, task.secondary_signatures = list(SECONDARIES), list(SIGNATURES)
        task.signed_at = time.time()


# ---------------------------------------------------------------------- refused reservations


async def test_a_refused_reservation_gives_the_task_back_without_a_retry(tmp_path: Path
                                                                         ) -> None:
    """Found in review: the worker's ask uses a snapshot of the limiter's remaining resources;
    another worker may take them before this one reserves. That refusal was reported as a
    failed attempt (retry + 1, backoff), and enough of them failed a replication for good."""
    clock = FakeClock()
    async with executor_at(tmp_path, clock) as (ex, manager, _signer):
        ran: list[str] = []

        async def handle(task: Task) -> None:
            ran.append(task.key)
            await signed(task)

        ex.handle = handle  # type: ignore[method-assign]
        task = replicate(1, max_retry=3)
        await manager.add_task(task)
        # one real failure first: retry 1, dispatchable again after its backoff
        first = await ex.ask_task()
        assert first is not None
        await manager.report_task(first, "ReplicateError: flaky")
        failed_at = (await row(manager, task.key))[3]
        clock.advance(backoff(task.timeout, 1) + 0.1)
        got = await ex.ask_task()
        assert got is not None and got.key == task.key and got.retry == 1

        # meanwhile another worker reserved everything the ask saw remaining
        other = ex.ctx.limiter.span("executor", memory=ex.ctx.limiter.remaining("executor").memory)
        assert not await ex.run_task(got)
        assert ran == [] and ex.running == {}
        state, retry, error, update_time = await row(manager, task.key)
        assert (state, retry, error) == (PENDING, 1, "ReplicateError: flaky")
        assert update_time == failed_at < clock()  # the dispatch undone: no new backoff
        assert ex.ctx.limiter.used("executor").tasks == 0

        assert await ex.ask_task() is None  # it does not fit while the memory is taken
        other.done()
        again = await ex.ask_task()  # the clock did not move: no backoff to wait out
        assert again is not None and again.key == task.key and again.retry == 1
        assert await ex.run_task(again)
        assert ran == [task.key]
        assert (await row(manager, task.key))[:3] == (DONE, 1, "")


async def test_workers_racing_for_the_limiter_spend_no_retries(tmp_path: Path) -> None:
    """Two workers ask at once and both get a replication that fits the same snapshot of a
    limiter with room for one: the second is given back, runs later, and nothing fails."""
    clock = FakeClock()
    cfg = dataclasses.replace(ONE_AT_A_TIME, executor=dataclasses.replace(
        ONE_AT_A_TIME.executor, workers=2))
    objects = [1, 2, 3, 4]
    async with executor_at(tmp_path, clock, cfg) as (ex, manager, _signer):
        both_asked = trio.Event()  # the first run holds its reservation until then
        answers: list[str] = []
        sealed = trio.Event()
        seals: list[str] = []
        ask, report = ex.ask_task, ex.report_task

        async def ask_and_count() -> Task | None:
            task = await ask()
            if task is not None:
                answers.append(task.key)
                if len(answers) == 2:
                    both_asked.set()
            return task

        async def handle(task: Task) -> None:
            await both_asked.wait()
            await signed(task)

        async def report_and_count(task: Task) -> None:
            await report(task)
            if isinstance(task, SealObjectTask):
                seals.append(task.key)
                if len(seals) == len(objects):
                    sealed.set()

        ex.ask_task = ask_and_count  # type: ignore[method-assign]
        ex.handle = handle  # type: ignore[method-assign]
        ex.report_task = report_and_count  # type: ignore[method-assign]
        await manager.add_tasks([replicate(i, max_retry=3) for i in objects])
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for _ in range(cfg.executor.workers):
                    nursery.start_soon(ex._worker)
                await sealed.wait()
                nursery.cancel_scope.cancel()
        assert manager.stats["released.ReplicatePiece"] >= 1  # the race did happen
        for i in objects:
            assert (await row(manager, replicate(i).key))[:3] == (DONE, 0, "")
            assert await progress(manager, i) == ("SEALED", "")


# ---------------------------------------------------------------------- a seal already on chain


async def _seal_task_past_its_deadline(ex: TaskExecutor, manager: Manager, i: int
                                       ) -> SealObjectTask:
    """Replicate object ``i`` (faked), signed long before the secondaries' seal deadline, and
    dispatch its SealObject task."""
    await manager.add_task(replicate(i))
    rep = await ex.ask_task()
    assert isinstance(rep, ReplicatePieceTask)
    await signed(rep)
    rep.signed_at = time.time() - 10 * ex.cfg.seal_confirm_timeout
    await manager.report_task(rep)
    seal = await ex.ask_task()
    assert isinstance(seal, SealObjectTask)
    return seal


async def test_a_seal_that_landed_before_a_restart_is_done_not_replicated_again(
        tmp_path: Path) -> None:
    """Found in review: the seal lands, the node is SIGKILLed before it reports, and restarts
    past the seal deadline. The seal task raised SealTooLate without asking the chain; the
    new replication's pieces were refused (409: sealed) and the upload ended FAILED although
    the object is SEALED."""
    clock = FakeClock()
    async with executor_at(tmp_path, clock, chain=FakeChain("SEALED")) as (ex, manager,
                                                                          signer):
        seal = await _seal_task_past_its_deadline(ex, manager, 5)
        assert await ex.run_task(seal)
        assert (await row(manager, seal.key))[:3] == (DONE, 0, "")
        assert await manager.get_state(replicate(5).key) == DONE  # not queued again
        assert await ex.ask_task() is None
        assert await progress(manager, 5) == ("SEALED", "")
        assert signer.sealed == []  # nothing to send: the chain has it


async def test_an_unsealed_object_past_its_deadline_is_still_replicated_again(
        tmp_path: Path) -> None:
    clock = FakeClock()
    async with executor_at(tmp_path, clock, chain=FakeChain("CREATED")) as (ex, manager,
                                                                           signer):
        seal = await _seal_task_past_its_deadline(ex, manager, 6)
        assert await ex.run_task(seal)
        state, _retry, error, _ = await row(manager, seal.key)
        assert state == FAILED and error.startswith("SealTooLate:")
        again = await ex.ask_task()
        assert isinstance(again, ReplicatePieceTask) and again.late_seals == 1
        assert (await progress(manager, 6))[0] == "REPLICATING"
        assert signer.sealed == []


async def test_a_replication_of_an_object_sealed_by_us_skips_to_done(tmp_path: Path) -> None:
    """A replication still queued for an object our seal already landed for (e.g. queued
    before the fix above) would only collect 409s from the secondaries: it ends sealed."""
    clock = FakeClock()
    async with executor_at(tmp_path, clock, chain=FakeChain("SEALED")) as (ex, manager, _s):
        await manager.add_task(replicate(7))
        rep = await ex.ask_task()
        assert isinstance(rep, ReplicatePieceTask)
        await ex.handle_replicate_piece_task(rep)  # the P2P modular is not even asked
        assert rep.sealed
        await manager.report_task(rep)
        assert await manager.get_state(rep.key) == DONE
        assert await ex.ask_task() is None  # no seal queued
        assert await progress(manager, 7) == ("SEALED", "")


@pytest.mark.parametrize("task_type", [SealObjectTask, ReplicatePieceTask])
async def test_an_object_sealed_by_another_primary_is_an_error(tmp_path: Path,
                                                               task_type: type) -> None:
    clock = FakeClock()
    chain = FakeChain("SEALED", primary="0x" + "99" * 20)
    async with executor_at(tmp_path, clock, chain=chain) as (ex, _manager, signer):
        task = task_type(object=replicate(8).object, params=PARAMS)
        with pytest.raises(ReplicateError, match="sealed on the chain, by primary 0x9999"):
            await ex.handle(task)
        assert signer.sealed == []


# ---------------------------------------------------------------------- SPDB refusing writes


class _FullDisk:
    """Wraps an SPDB: while ``full``, every call is refused as SQLite refuses a write on a
    full disk (a real one is what found this; SQLite's own refusal cannot be made to hit just
    the task rows' in-place updates)."""

    def __init__(self, db: Any) -> None:
        self.db = db
        self.full = False
        self.refused = 0
        self.retried = trio.Event()

    async def run(self, fn: Any) -> Any:
        if self.full:
            self.refused += 1
            if self.refused >= 3:
                self.retried.set()
            raise DBError("OperationalError: database or disk is full")
        return await self.db.run(fn)


async def test_workers_outlive_spdb_refusing_writes(tmp_path: Path) -> None:
    """Found by filling a testnet node's data disk: a DBError from the manager (its dispatch,
    the report of a run) went out of the executor's worker and stopped the node. The worker
    logs it and asks again later; the task's lease brings it back."""
    clock = FakeClock()
    async with executor_at(tmp_path, clock) as (ex, manager, _signer):
        ran: list[str] = []

        async def handle(task: Task) -> None:
            ran.append(task.key)
            await signed(task)

        ex.handle = handle  # type: ignore[method-assign]
        reported = trio.Event()
        report = ex.report_task

        async def report_then_tell(task: Task) -> None:
            await report(task)
            reported.set()

        ex.report_task = report_then_tell  # type: ignore[method-assign]
        full = _FullDisk(manager.ctx.db)
        manager.ctx.db = full  # type: ignore[assignment]
        task = replicate(1)
        await manager.add_task(task)
        full.full = True
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                for _ in range(2):
                    nursery.start_soon(ex._worker)
                await full.retried.wait()  # refused again and again, the workers go on
                full.full = False
                await reported.wait()
                nursery.cancel_scope.cancel()
        assert ran[0] == task.key  # (its seal may have run too)
        assert (await row(manager, task.key))[0] == DONE


async def test_gc_scheduling_outlives_spdb_refusing_writes(tmp_path: Path) -> None:
    """The same for the loop that schedules GCObject tasks every manager.gc_interval: a
    DBError stopped the executor (and the node); now the next interval asks again."""
    class Heights(FakeChain):
        async def current_height(self) -> int:
            return 10

    cfg = dataclasses.replace(Config(), manager=ManagerSection(gc_interval=0.1))
    async with executor_at(tmp_path, FakeClock(), cfg, chain=Heights("SEALED")) as (
            ex, manager, _signer):
        full = _FullDisk(manager.ctx.db)
        full.full = True
        ex.ctx.db = full  # type: ignore[assignment]  (the manager's too: one context)
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ex._watch_deletions)
                await full.retried.wait()  # three intervals refused, still running
                full.full = False
                while not await manager.query_tasks("GCObject"):
                    await manager.wait_for_work(TIMEOUT)
                nursery.cancel_scope.cancel()
