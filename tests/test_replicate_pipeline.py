"""The executor's replication pipeline (segments read and encoded while earlier ones are sent,
each secondary sent its pieces in order at its own pace), on a real piece store with fake
secondaries: every piece arrives, at most ``executor.segments_in_flight`` segments are held, a
slow secondary holds up the others only once that many wait for it, a failing secondary moves
to a backup, and a failure mid-pipeline releases the limiter and leaves no task behind."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import random
import time
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from modulars.executor import ReplicateError, SealTooLate, TaskExecutor
from node.app import build_limiter
from node.config import Config, LimitsSection, LimitValues
from node.db import open_spdb
from node.ec import Codec, object_checksums, split
from node.errors import GfspError
from node.modular import NodeContext
from node.piecestore import LocalPieceStore, segment_key
from node.tasks import ObjectInfo, ReplicatePieceTask, SealObjectTask, StorageParams
from p2p.messages import SIG_LEN, ApprovalResponse
from testnet.devchain.testing import new_keyset

SEG = 64 << 10
PARAMS = StorageParams(segment_size=SEG, data_shards=4, parity_shards=2, max_payload=1 << 30)
N = PARAMS.data_shards + PARAMS.parity_shards
OBJECT_ID = 9


class FakeP2P:
    name = "p2p"

    def __init__(self, approvals: list[ApprovalResponse]) -> None:
        self.approvals = approvals

    async def handle_replicate_piece_approval(self, ask: Any, lo: int, hi: int
                                              ) -> list[ApprovalResponse]:
        return self.approvals[:hi]


class FakeSigner:
    name = "signer"

    def sign_http_request(self, method: str, url: str, *, body_sha256: str,
                          headers: dict[str, str]) -> dict[str, str]:
        return {**headers, "x-body-sha256": body_sha256}


@dataclasses.dataclass
class Response:
    status_code: int
    text: str = ""


class FakeHTTP:
    """Secondaries: ``fail`` maps (approver, segment) to an exception to raise; every piece
    that arrives is checked against its signed hash and recorded."""

    def __init__(self) -> None:
        self.got: dict[tuple[str, int, int], bytes] = {}
        self.fail: dict[tuple[str, int], Exception] = {}
        self.sent: dict[int, int] = {}  # segment -> pieces sent (first round only)
        self.lag = 0  # max segments encoded ahead of the oldest segment not fully sent

    async def put(self, url: str, *, content: AsyncIterable[memoryview],
                  headers: dict[str, str]) -> Response:
        await trio.lowlevel.checkpoint()
        body = b"".join([bytes(chunk) async for chunk in content])  # sent in slices
        assert len(body) == int(headers["content-length"])
        host = url.split("/")[2]
        *_, object_id, index, segment = url.split("/")
        assert int(object_id) == OBJECT_ID
        exc = self.fail.get((host, int(segment)))
        if exc is not None:
            raise exc
        assert hashlib.sha256(body).hexdigest() == headers["x-body-sha256"]
        self.got[(host, int(index), int(segment))] = body
        self.sent[int(segment)] = self.sent.get(int(segment), 0) + 1
        return Response(200)


def approval(i: int) -> ApprovalResponse:
    return ApprovalResponse(request_nonce=b"n", object_id=OBJECT_ID, asker="0xprimary",
                            approver=f"sp{i}", approved=True, reason="",
                            endpoint=f"http://sp{i}", expiry_height=100, ts=0, sig=bytes(SIG_LEN))


@asynccontextmanager
async def executor(tmp_path: Path, data: bytes, *, backups: int = 0,
                   config: Config | None = None) -> AsyncIterator[tuple[TaskExecutor, FakeHTTP,
                                                                       ReplicatePieceTask]]:
    config = config or Config()
    config = dataclasses.replace(config, p2p=dataclasses.replace(config.p2p,
                                                                 approval_backups=backups))
    store = await LocalPieceStore.create(tmp_path / "pieces", fsync=False)
    for i, segment in enumerate(split(data, SEG)):
        await store.put(segment_key(OBJECT_ID, i), segment)
    async with open_spdb(tmp_path / "spdb.sqlite3") as db:
        ctx = NodeContext(config=config, limiter=build_limiter(config), db=db,
                          keys=new_keyset(), piecestore=store)
        ctx.modulars.mark_running(FakeP2P([approval(i) for i in range(N + backups)]))
        ctx.modulars.mark_running(FakeSigner())
        ex = TaskExecutor(ctx)
        http = FakeHTTP()
        ex.http = http  # type: ignore[assignment]

        async def done(target: ApprovalResponse, task: Any, index: int) -> bytes:
            return f"sig-{target.approver}-{index}".encode()

        ex._done = done  # type: ignore[method-assign]
        sums = object_checksums(split(data, SEG), PARAMS.data_shards, PARAMS.parity_shards)
        obj = ObjectInfo(id=OBJECT_ID, bucket="b", name="o", owner="0x" + "11" * 20,
                         size=len(data), checksums=tuple(sums))
        yield ex, http, ReplicatePieceTask(object=obj, params=PARAMS)


def expected(data: bytes) -> list[list[bytes]]:
    codec = Codec(PARAMS.data_shards, PARAMS.parity_shards)
    return [codec.encode(s) for s in split(data, SEG)]


def assert_all_released(ex: TaskExecutor) -> None:
    """The limiter's memory and every segment buffer are back."""
    assert ex.ctx.limiter.used("executor").memory == 0
    assert ex.store._buffers.in_use == 0  # every segment buffer back in the pool


def assert_every_piece_at_its_secondary(http: FakeHTTP, data: bytes) -> None:
    """Piece i of every segment, right, at sp<i> (and nothing else)."""
    want = expected(data)
    assert len(http.got) == N * len(want)
    for (host, index, segment), piece in http.got.items():
        assert host == f"sp{index}" and piece == want[segment][index]


def watch_lag(ex: TaskExecutor, http: FakeHTTP) -> None:
    """Record how far the encoder runs ahead of the oldest segment not fully sent."""
    pieces = ex._pieces

    async def tracked(codec: Any, object_id: int, segment: int) -> Any:
        oldest = next((s for s in range(segment) if http.sent.get(s, 0) < N), segment)
        http.lag = max(http.lag, segment - oldest)
        return await pieces(codec, object_id, segment)

    ex._pieces = tracked  # type: ignore[method-assign]


def in_flight(n: int) -> Config:
    return dataclasses.replace(Config(), executor=dataclasses.replace(
        Config().executor, segments_in_flight=n))


@pytest.mark.parametrize("n", [1, 2, 3])
async def test_every_piece_arrives_with_segments_in_flight(tmp_path: Path, n: int) -> None:
    data = os.urandom(5 * SEG + 4321)  # a short last segment: its last piece is padded
    async with executor(tmp_path, data, config=in_flight(n)) as (ex, http, task):
        watch_lag(ex, http)
        with trio.fail_after(20):
            await ex.handle_replicate_piece_task(task)
        assert_every_piece_at_its_secondary(http, data)
        assert http.lag <= n - 1  # segments encoded ahead of one still being sent
        assert task.secondaries == [f"sp{i}" for i in range(N)]
        assert task.secondary_signatures == [f"sig-sp{i}-{i}".encode() for i in range(N)]
        assert_all_released(ex)


async def test_a_slow_secondary_holds_up_the_others_only_when_the_segments_run_out(
        tmp_path: Path) -> None:
    """Each secondary is sent its pieces at its own pace (found in the data bench: every
    segment waited for the slowest of the six secondaries, and the cores idled): while sp0
    is stuck on segment 0 the others get segments 0..n-1, and no further (n =
    ``executor.segments_in_flight``: the memory a replication holds)."""
    n = 3
    data = os.urandom(6 * SEG)
    async with executor(tmp_path, data, config=in_flight(n)) as (ex, http, task):
        watch_lag(ex, http)
        real_put = http.put
        others_ahead = trio.Event()
        seen_when_released: list[int] = []

        async def put(url: str, **kw: Any) -> Response:
            if url.startswith("http://sp0/") and url.endswith("/0"):
                await others_ahead.wait()
                seen_when_released.append(max(s for (h, _i, s) in http.got if h != "sp0"))
            response = await real_put(url, **kw)
            if all((f"sp{i}", i, n - 1) in http.got for i in range(1, N)):
                others_ahead.set()
            return response

        http.put = put  # type: ignore[method-assign]
        with trio.fail_after(20):
            await ex.handle_replicate_piece_task(task)
        assert seen_when_released == [n - 1]
        assert http.lag == n - 1
        assert_every_piece_at_its_secondary(http, data)
        assert_all_released(ex)


async def test_no_read_ahead_without_memory(tmp_path: Path) -> None:
    data = os.urandom(4 * SEG)
    one = ReplicatePieceTask(object=ObjectInfo(id=1, bucket="b", name="o", owner="0x",
                                               size=len(data), checksums=()),
                             params=PARAMS).estimate().memory
    cfg = dataclasses.replace(Config(), limits=LimitsSection(
        services={"executor": LimitValues(memory=one)}))
    async with executor(tmp_path, data, config=cfg) as (ex, http, task):
        watch_lag(ex, http)
        with trio.fail_after(20), ex.ctx.limiter.span("executor", memory=one):
            await ex.handle_replicate_piece_task(task)  # as run_task would hold its estimate
        assert len(http.got) == N * 4
        assert http.lag == 0
        assert_all_released(ex)


async def test_read_ahead_takes_as_many_segments_as_the_limiter_has_room_for(
        tmp_path: Path) -> None:
    """With room for fewer segments than ``executor.segments_in_flight`` the replication
    still reads ahead as far as the limiter allows (found in review: the read-ahead was all
    or nothing, so segments_in_flight = 3 with room for one more segment sent one segment at
    a time, slower than the default of 2)."""
    data = os.urandom(6 * SEG)
    one = ReplicatePieceTask(object=ObjectInfo(id=1, bucket="b", name="o", owner="0x",
                                               size=len(data), checksums=()),
                             params=PARAMS).estimate().memory
    cfg = dataclasses.replace(in_flight(3), limits=LimitsSection(
        services={"executor": LimitValues(memory=2 * one)}))  # room for one more segment
    async with executor(tmp_path, data, config=cfg) as (ex, http, task):
        watch_lag(ex, http)
        real_put = http.put
        held: list[int] = []
        others_ahead = trio.Event()
        seen_when_released: list[int] = []

        async def put(url: str, **kw: Any) -> Response:
            held.append(ex.ctx.limiter.used("executor").memory)
            if held[0] != 2 * one:  # no read-ahead: sp0 below would wait forever
                raise AssertionError(f"{held[0]} bytes held, not {2 * one}")
            if url.startswith("http://sp0/") and url.endswith("/0"):
                await others_ahead.wait()
                seen_when_released.append(max(s for (h, _i, s) in http.got if h != "sp0"))
            response = await real_put(url, **kw)
            if all((f"sp{i}", i, 1) in http.got for i in range(1, N)):
                others_ahead.set()
            return response

        http.put = put  # type: ignore[method-assign]
        with trio.fail_after(20), ex.ctx.limiter.span("executor", memory=one):
            await ex.handle_replicate_piece_task(task)  # as run_task would hold its estimate
        assert seen_when_released == [1]  # two segments held, as many as fit: no further
        assert http.lag == 1
        assert max(held) == 2 * one
        assert_every_piece_at_its_secondary(http, data)
        assert_all_released(ex)


async def test_a_failing_secondary_moves_to_a_backup(tmp_path: Path) -> None:
    data = os.urandom(4 * SEG)
    async with executor(tmp_path, data, backups=1) as (ex, http, task):
        http.fail[("sp2", 2)] = httpx.ConnectError("down")
        with trio.fail_after(20):
            await ex.handle_replicate_piece_task(task)
        want = expected(data)
        backup = {(i, s) for (h, i, s) in http.got if h == f"sp{N}"}
        assert backup == {(2, s) for s in range(4)}
        for (_host, index, segment), piece in http.got.items():
            assert piece == want[segment][index]
        assert task.secondaries[2] == f"sp{N}"
        assert_all_released(ex)


async def test_a_secondary_that_never_answers_moves_to_a_backup(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """executor.secondary_timeout bounds each request to a secondary (found in review:
    httpx's timeouts are per read, so a secondary trickling its answer held the replication
    until the task's lease ended)."""
    data = os.urandom(4 * SEG)
    async with executor(tmp_path, data, backups=1) as (ex, http, task):
        real_put = http.put

        async def stuck(url: str, **kw: Any) -> Response:
            if url.startswith("http://sp3/") and url.endswith("/1"):
                await trio.sleep_forever()
            return await real_put(url, **kw)

        http.put = stuck  # type: ignore[method-assign]
        t0 = trio.current_time()
        await ex.handle_replicate_piece_task(task)
        assert trio.current_time() - t0 == pytest.approx(ex.cfg.secondary_timeout, abs=1)
        assert task.secondaries[3] == f"sp{N}"
        want = expected(data)
        assert {(i, s) for (h, i, s) in http.got if h == f"sp{N}"} == {(3, s) for s in range(4)}
        for (_host, index, segment), piece in http.got.items():
            assert piece == want[segment][index]
        assert ex.ctx.limiter.used("executor").memory == 0


async def test_a_failure_mid_pipeline_releases_everything(tmp_path: Path) -> None:
    data = os.urandom(6 * SEG)
    async with executor(tmp_path, data) as (ex, http, task):
        http.fail[("sp1", 2)] = httpx.ConnectError("down")  # and no backup left
        with trio.fail_after(20), pytest.raises(ReplicateError, match="no secondary left"):
            await ex.handle_replicate_piece_task(task)
        assert max(s for (_h, _i, s) in http.got) <= 3  # stopped, not run to the end
        assert_all_released(ex)
        assert await ex.store.keys(OBJECT_ID) == [segment_key(OBJECT_ID, i) for i in range(6)]


async def test_more_failed_secondaries_than_backups_stop_at_once(tmp_path: Path) -> None:
    data = os.urandom(6 * SEG)
    async with executor(tmp_path, data, backups=1) as (ex, http, task):
        http.fail[("sp1", 1)] = httpx.ConnectError("down")
        http.fail[("sp4", 2)] = httpx.ConnectError("down")
        with trio.fail_after(20), pytest.raises(ReplicateError, match="no secondary left"):
            await ex.handle_replicate_piece_task(task)
        assert max(s for (_h, _i, s) in http.got) <= 4  # stopped, not run to the end
        assert not any(h == f"sp{N}" for (h, _i, _s) in http.got)  # the backup: not started
        assert_all_released(ex)


class PutLog:
    """Wraps ``http.put``: checks that each secondary is sent one piece at a time, records the
    segments each one is sent (in order) and the most segment buffers held at any send."""

    def __init__(self, ex: TaskExecutor, http: FakeHTTP,
                 rng: random.Random | None = None) -> None:
        self.order: dict[str, list[int]] = {}
        self.most_buffers = 0
        self._busy: set[str] = set()
        real_put = http.put

        async def put(url: str, **kw: Any) -> Response:
            host, segment = url.split("/")[2], int(url.split("/")[-1])
            assert host not in self._busy, f"two pieces at once to {host}"
            self._busy.add(host)
            self.most_buffers = max(self.most_buffers, ex.store._buffers.in_use)
            self.order.setdefault(host, []).append(segment)
            try:
                for _ in range(rng.randint(0, 4) if rng else 0):  # another interleaving
                    await trio.lowlevel.checkpoint()
                return await real_put(url, **kw)
            finally:
                self._busy.discard(host)

        http.put = put  # type: ignore[method-assign]


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("fail_at", [0, 3, 5])
async def test_secondaries_failing_at_any_segment_move_to_backups(
        tmp_path: Path, n: int, fail_at: int) -> None:
    """Two secondaries fail (at the first, a middle or the last segment), with two backups:
    each backup is sent every piece of its index, in order, one at a time, and the task
    lists the backups and their signatures at those indices."""
    data = os.urandom(6 * SEG)
    async with executor(tmp_path, data, backups=2, config=in_flight(n)) as (ex, http, task):
        http.fail[("sp2", fail_at)] = httpx.ConnectError("down")
        http.fail[("sp5", 5 - fail_at)] = httpx.ConnectError("down")
        log = PutLog(ex, http)
        with trio.fail_after(20):
            await ex.handle_replicate_piece_task(task)
        assert task.secondaries == ["sp0", "sp1", f"sp{N}", "sp3", "sp4", f"sp{N + 1}"]
        assert task.secondary_signatures == [
            f"sig-{host}-{i}".encode() for i, host in enumerate(task.secondaries)]
        assert log.order["sp2"] == list(range(fail_at + 1))
        assert log.order["sp5"] == list(range(5 - fail_at + 1))
        for host in task.secondaries:
            assert log.order[host] == list(range(6))
        want = expected(data)
        for (_host, index, segment), piece in http.got.items():
            assert piece == want[segment][index]
        assert log.most_buffers <= n
        assert_all_released(ex)


@pytest.mark.parametrize("backups", [1, 2])
async def test_a_backup_failing_during_its_resend(tmp_path: Path, backups: int) -> None:
    """The backup of a failed secondary fails too while it is re-sent: the next backup gets
    every piece of that index; with none left the replication fails and gives back what it
    held."""
    data = os.urandom(4 * SEG)
    async with executor(tmp_path, data, backups=backups) as (ex, http, task):
        http.fail[("sp2", 1)] = httpx.ConnectError("down")
        http.fail[(f"sp{N}", 2)] = httpx.ConnectError("down")
        with trio.fail_after(20):
            if backups == 1:
                with pytest.raises(ReplicateError, match="no secondary left"):
                    await ex.handle_replicate_piece_task(task)
            else:
                await ex.handle_replicate_piece_task(task)
                assert task.secondaries[2] == f"sp{N + 1}"
                assert {(i, s) for (h, i, s) in http.got if h == f"sp{N + 1}"} == {
                    (2, s) for s in range(4)}
        assert_all_released(ex)


@pytest.mark.parametrize("size", [0, 1, SEG, SEG + 1])
@pytest.mark.parametrize("n", [1, 3])
async def test_small_objects_do_not_wait_for_segments_that_never_come(
        tmp_path: Path, size: int, n: int) -> None:
    data = os.urandom(size)
    async with executor(tmp_path, data, config=in_flight(n)) as (ex, http, task):
        with trio.fail_after(20):
            await ex.handle_replicate_piece_task(task)
        assert_every_piece_at_its_secondary(http, data)
        assert len(task.secondary_signatures) == N
        assert_all_released(ex)


@pytest.mark.parametrize("stuck", ["sp0", f"sp{N}"])  # a secondary mid-pipeline, a backup
async def test_a_lease_ending_mid_send_gives_everything_back(
        tmp_path: Path, mock_clock: trio.testing.MockClock, stuck: str) -> None:
    """The task's lease ends while a secondary (or a backup being re-sent its index) takes
    a piece and never answers: the run stops as LeaseEnded, with every segment buffer back
    in the pool and the limiter's memory (read-ahead included) released. (The clock moves
    only once the piece is stuck: with an autojump clock the lease could end while the
    piece store's worker threads were still reading, before any piece was stuck.)"""
    data = os.urandom(6 * SEG)
    async with executor(tmp_path, data, backups=1, config=in_flight(3)) as (ex, http, task):
        http.fail[("sp2", 1)] = httpx.ConnectError("down")
        real_put = http.put
        reached: list[str] = []
        stuck_now = trio.Event()

        async def put(url: str, **kw: Any) -> Response:
            if url.startswith(f"http://{stuck}/") and url.endswith("/2"):
                reached.append(stuck)
                stuck_now.set()
                await trio.sleep_forever()
            return await real_put(url, **kw)

        http.put = put  # type: ignore[method-assign]
        task.timeout = 60.0  # below executor.secondary_timeout: the lease ends first
        reported: list[str | None] = []

        async def report(t: Any) -> None:
            reported.append(t.error)

        ex.report_task = report  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ex.run_task, task)
            await stuck_now.wait()
            mock_clock.jump(task.timeout)  # past the lease
        assert reached == [stuck]
        assert len(reported) == 1 and (reported[0] or "").startswith("LeaseEnded")
        assert ex.running == {}
        assert_all_released(ex)


async def test_an_unexpected_error_of_one_sender_stops_the_others_unwrapped(
        tmp_path: Path) -> None:
    data = os.urandom(6 * SEG)
    async with executor(tmp_path, data, backups=2, config=in_flight(3)) as (ex, http, task):
        real_put = http.put

        async def put(url: str, **kw: Any) -> Response:
            if url.startswith("http://sp3/") and url.endswith("/2"):
                raise RuntimeError("a bug")
            return await real_put(url, **kw)

        http.put = put  # type: ignore[method-assign]
        with trio.fail_after(20), pytest.raises(RuntimeError, match="a bug") as info:
            await ex.handle_replicate_piece_task(task)
        assert not isinstance(info.value, BaseExceptionGroup)
        assert not any(h.startswith(f"sp{N}") for (h, _i, _s) in http.got)  # no backup used
        assert_all_released(ex)


@pytest.mark.parametrize("seed", range(40))
async def test_random_failures_and_interleavings(tmp_path: Path, seed: int) -> None:
    """Random object sizes, segments_in_flight, backups, failing secondaries and backups
    (each at a random segment) and interleavings, against a model of the outcome: more
    failed secondaries than backups, or backups running out, fail the replication; else
    each index ends with the secondary the model says, which has every piece of it."""
    rng = random.Random(seed)
    segments, n, backups = rng.randint(0, 5), rng.randint(1, 4), rng.randint(0, 3)
    data = os.urandom(max(0, segments * SEG - rng.randint(0, 100)))
    async with executor(tmp_path, data, backups=backups, config=in_flight(n)) as (ex, http,
                                                                                   task):
        fails = {f"sp{i}": rng.randrange(segments) for i in range(N + backups)
                 if segments and rng.random() < 0.25}
        for host, segment in fails.items():
            http.fail[(host, segment)] = httpx.ConnectError("down")
        log = PutLog(ex, http, rng)
        failed = [i for i in range(N) if f"sp{i}" in fails]
        left = [f"sp{N + b}" for b in range(backups)]
        final: list[str] | None = [f"sp{i}" for i in range(N)]
        if len(failed) > backups:
            final = None
        for index in failed:
            while final is not None and left and left[0] in fails:
                left.pop(0)
            if final is not None and left:
                final[index] = left.pop(0)
            else:
                final = None
        with trio.fail_after(20):
            if final is None:
                with pytest.raises(ReplicateError, match="no secondary left"):
                    await ex.handle_replicate_piece_task(task)
            else:
                await ex.handle_replicate_piece_task(task)
                assert task.secondaries == final
                want = expected(data)
                for index, host in enumerate(final):
                    assert log.order.get(host, []) == list(range(segments))
                    for segment in range(segments):
                        assert http.got[(host, index, segment)] == want[segment][index]
        for host, sent in log.order.items():  # in order, none after a failure
            assert sent == list(range(len(sent)))
            assert host not in fails or sent[-1] <= fails[host]
        assert log.most_buffers <= max(1, min(n, segments))
        assert_all_released(ex)


async def test_a_missing_segment_fails_cleanly(tmp_path: Path) -> None:
    data = os.urandom(5 * SEG)
    async with executor(tmp_path, data) as (ex, http, task):
        await ex.store.delete(segment_key(OBJECT_ID, 3))
        with trio.fail_after(20), pytest.raises(GfspError) as info:
            await ex.handle_replicate_piece_task(task)
        assert not isinstance(info.value, BaseExceptionGroup)
        assert {s for (_h, _i, s) in http.got} <= {0, 1, 2}
        assert_all_released(ex)


async def test_a_short_segment_is_refused(tmp_path: Path) -> None:
    data = os.urandom(3 * SEG)
    async with executor(tmp_path, data) as (ex, _http, task):
        await ex.store.put(segment_key(OBJECT_ID, 1), data[SEG:2 * SEG - 1])
        with trio.fail_after(20), pytest.raises(ReplicateError, match="not 65536 bytes"):
            await ex.handle_replicate_piece_task(task)
        assert_all_released(ex)


async def test_done_is_asked_of_every_secondary_at_once(tmp_path: Path) -> None:
    """Every secondary's "done" runs concurrently; one that fails "done" moves to a backup
    (sent every piece of its index again) without holding up the others."""
    data = os.urandom(3 * SEG)
    async with executor(tmp_path, data, backups=1) as (ex, http, task):
        running = 0
        most = 0
        release = trio.Event()

        async def done(target: ApprovalResponse, task: Any, index: int) -> bytes:
            nonlocal running, most
            running += 1
            most = max(most, running)
            try:
                if running == N:
                    release.set()
                await release.wait()  # each waits until all N are in flight
                if target.approver == "sp3":
                    raise ReplicateError("sp3: done refused")
                return f"sig-{target.approver}-{index}".encode()
            finally:
                running -= 1

        ex._done = done  # type: ignore[method-assign]
        with trio.fail_after(20):
            await ex.handle_replicate_piece_task(task)
        assert most == N
        assert task.secondaries[3] == f"sp{N}"
        assert task.secondary_signatures[3] == f"sig-sp{N}-3".encode()
        assert {(i, s) for (h, i, s) in http.got if h == f"sp{N}"} == {(3, s) for s in range(3)}
        assert_all_released(ex)


async def _answering(nursery: trio.Nursery, body: bytes) -> str:
    """A real HTTP server on 127.0.0.1 that answers every request 200 with ``body``."""

    async def handler(stream: trio.SocketStream) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            buf += chunk
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\n"
                              b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                              % (len(body), body))
        await stream.aclose()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"


@pytest.mark.parametrize("body", [b"<html>busy</html>", b"[1, 2]", b'{"signature": 5}',
                                  b'{"signature": "zz", "integrity_hash": "00"}', b"{}"])
async def test_a_garbled_done_answer_is_that_secondarys_failure(tmp_path: Path,
                                                                 body: bytes) -> None:
    """A secondary (or a proxy before it) answering "done" 200 with something else is a
    ReplicateError (that secondary fails over), never an error that stops the executor."""
    async with executor(tmp_path, os.urandom(SEG)) as (ex, _http, task), \
            httpx.AsyncClient(timeout=5.0) as client, trio.open_nursery() as nursery:
        endpoint = await _answering(nursery, body)
        ex.http = client
        target = dataclasses.replace(approval(0), endpoint=endpoint)
        with trio.fail_after(10), pytest.raises(ReplicateError, match="not an answer"):
            await TaskExecutor._done(ex, target, task, 0)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("endpoint", ["http://[::1", "ftp://sp1", "sp1:9000", ""])
async def test_an_endpoint_that_is_not_a_url_is_that_secondarys_failure(
        tmp_path: Path, endpoint: str) -> None:
    async with executor(tmp_path, os.urandom(SEG)) as (ex, _http, task), \
            httpx.AsyncClient(timeout=5.0) as client:
        ex.http = client
        target = dataclasses.replace(approval(0), endpoint=endpoint)
        with pytest.raises(ReplicateError, match="endpoint"):
            await TaskExecutor._done(ex, target, task, 0)
        with pytest.raises(ReplicateError, match="endpoint"):
            await ex._send(target, OBJECT_ID, 0, 0, b"piece", "00")


async def test_an_unexpected_error_fails_the_task_not_the_worker(tmp_path: Path) -> None:
    async with executor(tmp_path, os.urandom(SEG)) as (ex, _http, task):
        reported: list[str | None] = []

        async def boom(_task: Any) -> None:
            raise RuntimeError("a bug")

        async def report(t: Any) -> None:
            reported.append(t.error)

        ex.handle = boom  # type: ignore[method-assign]
        ex.report_task = report  # type: ignore[method-assign]
        await ex.run_task(task)
        assert reported == ["RuntimeError: a bug"]
        assert ex.running == {}
        assert ex.ctx.limiter.used("executor").memory == 0


async def test_a_run_stops_before_its_lease_ends(tmp_path: Path, autojump_clock: Any) -> None:
    """The manager hands a task out again once its lease (``timeout``) ends: the executor
    stops its run a little before, reports the attempt failed and frees what it held, so
    two runs of one task never overlap (found in review)."""
    async with executor(tmp_path, os.urandom(SEG)) as (ex, _http, task):
        task.timeout = 30.0
        reported: list[str | None] = []

        async def stuck(_task: Any) -> None:
            await trio.sleep_forever()  # e.g. a secondary that takes bytes very slowly

        async def report(t: Any) -> None:
            reported.append(t.error)

        ex.handle = stuck  # type: ignore[method-assign]
        ex.report_task = report  # type: ignore[method-assign]
        t0 = trio.current_time()
        await ex.run_task(task)
        assert 30.0 - 5.0 <= trio.current_time() - t0 < 30.0
        assert reported[0] is not None and reported[0].startswith("LeaseEnded")
        assert ex.running == {}
        assert ex.ctx.limiter.used("executor").memory == 0


async def test_replication_records_when_the_secondaries_signed(tmp_path: Path) -> None:
    async with executor(tmp_path, os.urandom(2 * SEG)) as (ex, _http, task):
        before = time.time()
        with trio.fail_after(20):
            await ex.handle_replicate_piece_task(task)
        assert before <= task.signed_at <= time.time()


@pytest.mark.parametrize(("age", "seals"), [(None, True), (1.0, True), (200.0, False),
                                             (110.0, False)])
async def test_no_seal_with_signatures_a_secondary_may_have_given_up_on(
        tmp_path: Path, age: float | None, seals: bool) -> None:
    """A secondary drops its pieces ``seal_confirm_timeout`` (120 s) after it signed unless
    the object is sealed: past that (less a margin) the primary must not seal with its
    signature, or the chain would list a secondary that holds nothing (found in review)."""
    async with executor(tmp_path, os.urandom(SEG)) as (ex, _http, task):
        sealed: list[int] = []

        class Signer(FakeSigner):
            async def seal_object(self, *, object_id: int, secondaries: list[str],
                                  secondary_sigs: list[bytes]) -> None:
                sealed.append(object_id)

        ex.ctx.modulars.mark_running(Signer())
        seal = SealObjectTask(object=task.object, params=PARAMS, secondaries=["sp0"],
                              secondary_signatures=[b"s"],
                              signed_at=0.0 if age is None else time.time() - age)
        if seals:
            await ex.handle_seal_object_task(seal)
            assert sealed == [OBJECT_ID]
        else:
            with pytest.raises(SealTooLate, match="may have dropped"):
                await ex.handle_seal_object_task(seal)
            assert sealed == []
