"""P2P across OS processes: an in-process asker node and `node.cli run` children on 127.0.0.1.

Every child is started with its own NOTIFY_SOCKET (an abstract AF_UNIX datagram socket the
test binds) and is considered up at READY=1. Faults are real signals: SIGSTOP freezes a peer
(libp2p never notices, only our deadlines do), SIGKILL closes its sockets (the kernel resets the
connections). Every child is SIGCONTed and SIGKILLed in the fixture's teardown whatever happens.
Timing assertions are bounds that catch hangs, not performance targets.
"""

from __future__ import annotations

import signal
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from node.tasks import ObjectInfo, ReplicatePieceApprovalTask, StorageParams
from p2p.approval import InsufficientApprovals
from p2p.messages import ApprovalResponse, verify
from p2p.peers import EVICTED, TRUSTED
from tests.p2pnet import (
    RunningNode,
    make_sps,
    start_nodes,
    wait_until,
)
from tests.procnode import ProcNode

MiB = 1 << 20
#: Pings are not what tests 1-4 are about: slow enough that none is due while a peer is frozen.
QUIET_P2P: dict[str, object] = {"ping_interval": 30.0, "ping_timeout": 2.0}
#: Startup of one child: ~0.6 s of imports, more when several start at once on 2 cores.
START_BOUND = 20.0
#: Slack for "about the timeout" / "well before": catches hangs, not a performance target.
MARGIN = 2.0


# --- child processes --------------------------------------------------------------------------


@pytest.fixture
async def children() -> AsyncIterator[list[ProcNode]]:
    """Every ProcNode a test appends here is SIGCONTed + SIGKILLed and reaped at the end."""
    procs: list[ProcNode] = []
    try:
        yield procs
    finally:
        for p in procs:
            await p.kill()
            p.close_socket()


async def start_cluster(root: Path, nursery: trio.Nursery, children: list[ProcNode],
                        n_procs: int, *, p2p: dict[str, object]
                        ) -> tuple[RunningNode, list[ProcNode]]:
    """sp0 in-process (the asker), sp1..spN as processes bootstrapping from it; returns once
    the asker trusts every process node."""
    sps = make_sps(root, n_procs + 1, p2p=p2p)
    (asker,) = await start_nodes(nursery, sps[:1])
    procs = [ProcNode(sp) for sp in sps[1:]]
    children.extend(procs)
    t0 = trio.current_time()
    for p in procs:
        await p.spawn()
    async with trio.open_nursery() as starting:
        for p in procs:
            starting.start_soon(p.wait_ready)
    everyone = {p.sp.peer_id for p in procs}
    await wait_until(lambda: everyone <= asker.trusted())
    print(f"{n_procs} process nodes ready and trusted in {trio.current_time() - t0:.2f}s")
    return asker, procs


def approval_task(object_id: int) -> ReplicatePieceApprovalTask:
    obj = ObjectInfo(id=object_id, bucket="bucket", name=f"object-{object_id}",
                     owner="0x" + "11" * 20, size=3 * MiB,
                     checksums=tuple(bytes([i]) * 32 for i in range(1 + 6)))
    params = StorageParams(segment_size=16 * MiB, data_shards=4, parity_shards=2,
                           max_payload=64 * MiB)
    return ReplicatePieceApprovalTask(object=obj, params=params)


async def ask(asker: RunningNode, object_id: int, min_a: int, max_a: int, timeout: float
              ) -> tuple[list[ApprovalResponse], float]:
    t0 = trio.current_time()
    result = await asker.p2p.handle_replicate_piece_approval(
        approval_task(object_id), min_a, max_a, timeout)
    return result, trio.current_time() - t0


async def check_valid(asker: RunningNode, approvals: list[ApprovalResponse],
                      expected: list[ProcNode]) -> None:
    """Each approval approved, for this asker, signed by its approver's approval key."""
    by_operator = {p.sp.keys.operator.address: p.sp for p in expected}
    assert sorted(a.approver for a in approvals) == sorted(by_operator)
    height = await asker.node.ctx.sp_registry.current_height()
    for a in approvals:
        sp = by_operator[a.approver]
        verify(a, sp.keys.approval.public_key)
        assert a.approved and a.reason == ""
        assert a.asker == asker.sp.keys.operator.address
        assert a.expiry_height > height
        assert a.endpoint == sp.info().endpoint


# --- tests ------------------------------------------------------------------------------------


async def test_approval_quorum_across_processes(tmp_path, nursery, children):
    with trio.fail_after(START_BOUND + 10):
        asker, procs = await start_cluster(tmp_path, nursery, children, 3, p2p=QUIET_P2P)
        approvals, elapsed = await ask(asker, 1, 2, 3, timeout=5.0)
        print(f"3 approvals in {elapsed * 1000:.1f} ms")
        assert len(approvals) == 3
        await check_valid(asker, approvals, procs)
        assert elapsed < 1.0, f"quorum of 3 live peers took {elapsed:.2f}s of a 5 s timeout"


async def test_sigstopped_peer_is_silent_then_serves_after_sigcont(tmp_path, nursery, children):
    with trio.fail_after(START_BOUND + 15):
        asker, procs = await start_cluster(tmp_path, nursery, children, 3, p2p=QUIET_P2P)
        frozen = procs[0]
        await frozen.stop_process()

        approvals, elapsed = await ask(asker, 2, 2, 3, timeout=1.5)
        print(f"frozen peer: {len(approvals)} approvals after {elapsed:.3f}s")
        assert len(approvals) == 2
        await check_valid(asker, approvals, procs[1:])
        assert 1.4 <= elapsed < 1.5 + MARGIN

        frozen.signal(signal.SIGCONT)
        await wait_until(lambda: frozen.state() not in ("T", "X"), poll=0.005)
        approvals, elapsed = await ask(asker, 3, 2, 3, timeout=5.0)
        print(f"after SIGCONT: {len(approvals)} approvals in {elapsed * 1000:.1f} ms")
        assert len(approvals) == 3
        await check_valid(asker, approvals, procs)
        assert elapsed < 5.0


async def test_peer_killed_mid_request(tmp_path, nursery, children):
    timeout = 5.0
    with trio.fail_after(START_BOUND + timeout + 10):
        asker, procs = await start_cluster(tmp_path, nursery, children, 3, p2p=QUIET_P2P)
        victim = procs[0]
        await victim.stop_process()
        before = victim.rx_queued()
        outcome: dict[str, object] = {}
        done = trio.Event()

        async def asking() -> None:
            try:
                outcome["result"] = await ask(asker, 4, 2, 3, timeout=timeout)
            finally:
                outcome["returned_at"] = trio.current_time()
                done.set()

        t0 = trio.current_time()
        nursery.start_soon(asking)
        # in flight: the task is registered and the request bytes sit unread at the frozen peer
        await wait_until(lambda: asker.p2p.query_tasks("ReplicatePieceApproval")
                         and victim.rx_queued() > before, poll=0.005)
        assert not done.is_set()
        killed_at = trio.current_time()
        victim.signal(signal.SIGKILL)
        await done.wait()
        approvals, elapsed = outcome["result"]  # type: ignore[misc]
        noticed = outcome["returned_at"] - killed_at  # type: ignore[operator]
        print(f"killed {killed_at - t0:.3f}s into the ask; it returned {noticed * 1000:.1f} ms "
              f"after the kill ({elapsed:.3f}s in all)")
        assert len(approvals) == 2
        await check_valid(asker, approvals, procs[1:])
        # the dead connection is noticed (reset by the kernel), not the 5 s timeout
        assert noticed < 1.0
        assert elapsed < timeout - 1.0


async def test_two_of_three_frozen_is_below_min(tmp_path, nursery, children):
    timeout = 1.0
    with trio.fail_after(START_BOUND + timeout + 10):
        asker, procs = await start_cluster(tmp_path, nursery, children, 3, p2p=QUIET_P2P)
        for p in procs[:2]:
            await p.stop_process()
        t0 = trio.current_time()
        with pytest.raises(InsufficientApprovals) as info:
            await ask(asker, 5, 2, 3, timeout=timeout)
        elapsed = trio.current_time() - t0
        counts = info.value.counts
        print(f"InsufficientApprovals after {elapsed:.3f}s: {counts}")
        assert info.value.needed == 2
        assert counts.asked == 3
        assert counts.approved == 1
        assert counts.silent == 2
        assert counts.refused == counts.invalid == 0
        assert timeout - 0.1 <= elapsed < timeout + MARGIN


PING = 0.4
EVICT_AFTER = 2


async def test_killed_peer_is_evicted_and_relearned_after_restart(tmp_path, nursery, children):
    p2p = {"ping_interval": PING, "ping_timeout": PING, "evict_after": EVICT_AFTER}
    with trio.fail_after(2 * START_BOUND + 10):
        asker, procs = await start_cluster(tmp_path, nursery, children, 2, p2p=p2p)
        victim, other = procs
        asker_id = asker.sp.peer_id
        # the victim learned the other process node through peer exchange (not its bootstrap)
        await wait_until(lambda: victim.sp.peer_id in {
            p.peer_id for p in asker.p2p.table.trusted()} and _trusted_in(victim, other))

        killed_wall = time.time()
        t0 = trio.current_time()
        victim.signal(signal.SIGKILL)
        await victim.proc.wait()
        with trio.fail_after((EVICT_AFTER + 2) * PING + MARGIN):
            await wait_until(lambda: _state(asker, victim) == EVICTED)
        evicted_after = trio.current_time() - t0
        print(f"evicted {evicted_after:.2f}s after SIGKILL "
              f"(bound {(EVICT_AFTER + 2) * PING + MARGIN:.1f}s)")
        assert victim.sp.peer_id not in asker.trusted()

        # what the victim's SPDB held at its death
        rows = victim.peer_rows()
        assert {asker_id, other.sp.peer_id} <= set(rows)

        t1 = trio.current_time()
        await victim.spawn()  # same folder, same config, same port
        with trio.fail_after(START_BOUND):
            await victim.wait_ready()
        ready_after = trio.current_time() - t1
        # right after READY=1: the rows from before the kill are there, first_seen unchanged
        # (a peer learned anew would have first_seen after the kill)
        again = victim.peer_rows()
        for peer_id in (asker_id, other.sp.peer_id):
            assert peer_id in again
            assert again[peer_id][1] == rows[peer_id][1] < killed_wall
        t2 = trio.current_time()
        with trio.fail_after((EVICT_AFTER + 2) * PING + MARGIN):
            await wait_until(lambda: _state(asker, victim) == TRUSTED)
        print(f"restart: READY=1 after {ready_after:.2f}s, trusted again "
              f"{trio.current_time() - t2:.2f}s later")
        assert victim.sp.peer_id in asker.trusted()


def _state(asker: RunningNode, p: ProcNode) -> str | None:
    rec = asker.p2p.table.get(p.sp.peer_id)
    return rec.state if rec else None


def _trusted_in(p: ProcNode, other: ProcNode) -> bool:
    try:
        state = p.peer_rows().get(other.sp.peer_id, ("", 0.0))[0]
    except sqlite3.Error:
        return False
    return state == TRUSTED
