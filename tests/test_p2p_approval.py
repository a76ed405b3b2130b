"""The replicate-approval quorum with real in-process nodes and hostile fake SPs on 127.0.0.1.

A fake SP is a real libp2p host holding a registered SP's keys: it answers pings honestly (so
the asker trusts it) and answers approval requests with a chosen fault.
"""

from __future__ import annotations

import dataclasses
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from node.crypto import PrivateKey
from node.tasks import ObjectInfo, ReplicatePieceApprovalTask, StorageParams
from p2p.approval import InsufficientApprovals
from p2p.host import P2PError, Stream, open_host
from p2p.messages import (
    APPROVAL_PROTOCOL,
    PING_PROTOCOL,
    ApprovalRequest,
    ApprovalResponse,
    Ping,
    Pong,
    decode,
    encode,
    new_nonce,
    now_ms,
    signing_payload,
)
from tests.p2pnet import SPDir, make_sps, start_nodes, wait_until

TIMEOUT = 1.0
MARGIN = 2.0


def task(object_id: int = 1) -> ReplicatePieceApprovalTask:
    obj = ObjectInfo(id=object_id, bucket="bkt", name=f"obj{object_id}", owner="0x" + "ab" * 20,
                     size=10 << 20, checksums=tuple(bytes([i]) * 32 for i in range(7)))
    return ReplicatePieceApprovalTask(object=obj, params=StorageParams(
        segment_size=16 << 20, data_shards=4, parity_shards=2, max_payload=1 << 40))


def height_now() -> int:
    return int(time.time())  # the static registry's wall-clock height, block_interval 1 s


# --- the fake SP ------------------------------------------------------------------------------

Behaviour = Callable[["FakeSP", Stream, ApprovalRequest], Awaitable[None]]


class FakeSP:
    def __init__(self, sp: SPDir, behaviour: Behaviour) -> None:
        self.sp = sp
        self.behaviour = behaviour
        self.requests: list[ApprovalRequest] = []
        self.last_pong: bytes | None = None
        self.replay_pong = False

    def response(self, req: ApprovalRequest, *, key: PrivateKey | None = None,
                 **changes: object) -> ApprovalResponse:
        resp = ApprovalResponse(req.nonce, req.object.id, req.asker, self.sp.keys.operator.address,
                                True, "", f"http://127.0.0.1:{9000 + self.sp.index}",
                                height_now() + 100, now_ms())
        resp = dataclasses.replace(resp, **changes)
        key = key or self.sp.keys.approval
        return dataclasses.replace(resp, sig=key.sign(signing_payload(resp)))

    async def handle_ping(self, stream: Stream) -> None:
        ping = decode(await stream.read_frame(1 << 16), Ping)
        if self.replay_pong and self.last_pong is not None:
            await stream.write_frame(self.last_pong)
            return
        pong = Pong(self.sp.keys.operator.address, self.sp.peer_id, (self.sp.addr,), now_ms(),
                    new_nonce(), ping.nonce, ())
        pong = dataclasses.replace(pong, sig=self.sp.keys.operator.sign(signing_payload(pong)))
        self.last_pong = encode(pong)
        await stream.write_frame(self.last_pong)

    async def handle_approval(self, stream: Stream) -> None:
        req = decode(await stream.read_frame(1 << 18), ApprovalRequest)
        self.requests.append(req)
        await self.behaviour(self, stream, req)

    def host(self):
        return open_host(self.sp.keys.p2p, self.sp.addr, connect_timeout=2.0,
                         handlers={PING_PROTOCOL: self.handle_ping,
                                   APPROVAL_PROTOCOL: self.handle_approval})


async def approve(f: FakeSP, s: Stream, r: ApprovalRequest) -> None:
    await s.write_frame(encode(f.response(r)))


async def refuse(f: FakeSP, s: Stream, r: ApprovalRequest) -> None:
    await s.write_frame(encode(f.response(r, approved=False, reason="disk full")))


async def silent(f: FakeSP, s: Stream, r: ApprovalRequest) -> None:
    await trio.sleep_forever()


async def slow(f: FakeSP, s: Stream, r: ApprovalRequest) -> None:
    await trio.sleep(TIMEOUT + 1.0)  # the fault under test: answers after the quorum timeout
    await s.write_frame(encode(f.response(r)))


async def wrong_key(f: FakeSP, s: Stream, r: ApprovalRequest) -> None:
    await s.write_frame(encode(f.response(r, key=f.sp.keys.operator)))


async def unregistered(f: FakeSP, s: Stream, r: ApprovalRequest) -> None:
    stranger = PrivateKey.from_passphrase("stranger", "approval")
    await s.write_frame(encode(f.response(r, key=stranger, approver=stranger.address)))


async def expired(f: FakeSP, s: Stream, r: ApprovalRequest) -> None:
    await s.write_frame(encode(f.response(r, expiry_height=height_now() - 5)))


async def wrong_nonce(f: FakeSP, s: Stream, r: ApprovalRequest) -> None:
    await s.write_frame(encode(f.response(r, request_nonce=new_nonce())))


async def garbage(f: FakeSP, s: Stream, r: ApprovalRequest) -> None:
    await s.write_frame(b"\xff\x00garbage" * 10)


async def oversized(f: FakeSP, s: Stream, r: ApprovalRequest) -> None:
    await s.write_raw(struct.pack(">I", 64 << 20) + b"x" * 100)


async def twice(f: FakeSP, s: Stream, r: ApprovalRequest) -> None:
    frame = encode(f.response(r))
    await s.write_frame(frame)
    await s.write_frame(frame)


def impersonating(victim: SPDir) -> Behaviour:
    async def behaviour(f: FakeSP, s: Stream, r: ApprovalRequest) -> None:
        await s.write_frame(encode(f.response(r, approver=victim.keys.operator.address)))
    return behaviour


# --- the harness ------------------------------------------------------------------------------


async def cluster(nursery: trio.Nursery, tmp_path, honest: int, fakes: list[Behaviour],
                  implementations=None):
    """sp0 (the asker) + ``honest`` nodes + fake SPs; sp0 bootstraps from every other SP."""
    n = 1 + honest + len(fakes)
    # one discovery round at start is enough here; later rounds would only add noise under load
    sps = make_sps(tmp_path, n, p2p={"ping_interval": 10.0, "ping_timeout": 2.0},
                   implementations=implementations,
                   bootstrap=lambda i, all_: [s.bootstrap_entry for s in all_ if s.index != i]
                   if i == 0 else [all_[0].bootstrap_entry])
    fake_sps = [FakeSP(sp, b) for sp, b in zip(sps[1 + honest:], fakes, strict=True)]
    for fake in fake_sps:
        await nursery.start(_serve_fake, fake)
    nodes = await start_nodes(nursery, sps[:1 + honest])
    asker = nodes[0]
    others = {sp.peer_id for sp in sps[1:]}
    with trio.fail_after(10):
        await wait_until(lambda: others <= asker.trusted())
    return sps, nodes, fake_sps


async def _serve_fake(fake: FakeSP, task_status=trio.TASK_STATUS_IGNORED) -> None:
    async with fake.host():
        task_status.started()
        await trio.sleep_forever()


def operators(approvals: list[ApprovalResponse]) -> set[str]:
    return {a.approver for a in approvals}


# --- quorum semantics -------------------------------------------------------------------------


async def test_returns_at_max_before_the_timeout(tmp_path):
    async with trio.open_nursery() as nursery:
        sps, nodes, _ = await cluster(nursery, tmp_path, honest=4, fakes=[])
        t0 = trio.current_time()
        with trio.fail_after(5 + MARGIN):
            got = await nodes[0].p2p.handle_replicate_piece_approval(task(), 2, 3, 5.0)
        assert trio.current_time() - t0 < 2.0
        assert len(got) == 3
        assert operators(got) <= {sp.keys.operator.address for sp in sps[1:]}
        assert all(a.asker == sps[0].keys.operator.address for a in got)
        nursery.cancel_scope.cancel()


async def test_returns_at_the_timeout_with_at_least_min(tmp_path):
    async with trio.open_nursery() as nursery:
        sps, nodes, _ = await cluster(nursery, tmp_path, honest=2, fakes=[silent, silent])
        t0 = trio.current_time()
        with trio.fail_after(TIMEOUT + MARGIN):
            got = await nodes[0].p2p.handle_replicate_piece_approval(task(), 2, 4, TIMEOUT)
        elapsed = trio.current_time() - t0
        assert TIMEOUT - 0.05 <= elapsed < TIMEOUT + MARGIN
        assert operators(got) == {sps[1].keys.operator.address, sps[2].keys.operator.address}
        nursery.cancel_scope.cancel()


async def test_raises_below_min_with_the_counts(tmp_path):
    async with trio.open_nursery() as nursery:
        _, nodes, _ = await cluster(nursery, tmp_path, honest=1,
                                    fakes=[refuse, garbage, silent])
        with trio.fail_after(TIMEOUT + MARGIN), pytest.raises(InsufficientApprovals) as info:
            await nodes[0].p2p.handle_replicate_piece_approval(task(), 2, 4, TIMEOUT)
        c = info.value.counts
        assert (c.asked, c.approved, c.refused, c.invalid, c.silent) == (4, 1, 1, 1, 1)
        assert "1 of 2" in str(info.value)
        nursery.cancel_scope.cancel()


async def test_answers_still_being_checked_at_the_timeout_count_as_silent(tmp_path,
                                                                          monkeypatch):
    """An answer that arrived but whose check (a registry lookup) the timeout cuts off is
    counted (silent), so the counts always add up to the peers asked (found in review:
    such a peer was in no count)."""
    async with trio.open_nursery() as nursery:
        _, nodes, _ = await cluster(nursery, tmp_path, honest=2, fakes=[refuse])
        approvals = nodes[0].p2p.approvals

        async def stuck_height() -> int:
            await trio.sleep_forever()
            raise AssertionError("unreachable")

        monkeypatch.setattr(approvals.registry, "current_height", stuck_height)
        with trio.fail_after(TIMEOUT + MARGIN), pytest.raises(InsufficientApprovals) as info:
            await nodes[0].p2p.handle_replicate_piece_approval(task(), 1, 3, TIMEOUT)
        c = info.value.counts
        assert (c.asked, c.approved, c.refused, c.invalid, c.silent) == (3, 0, 1, 0, 2)
        assert c.asked == c.approved + c.refused + c.invalid + c.silent
        nursery.cancel_scope.cancel()


async def test_min_equals_max(tmp_path):
    async with trio.open_nursery() as nursery:
        _, nodes, _ = await cluster(nursery, tmp_path, honest=3, fakes=[])
        with trio.fail_after(5 + MARGIN):
            got = await nodes[0].p2p.handle_replicate_piece_approval(task(), 3, 3, 5.0)
        assert len(got) == 3
        nursery.cancel_scope.cancel()


async def test_more_peers_than_max(tmp_path):
    async with trio.open_nursery() as nursery:
        _, nodes, _ = await cluster(nursery, tmp_path, honest=5, fakes=[])
        with trio.fail_after(5 + MARGIN):
            got = await nodes[0].p2p.handle_replicate_piece_approval(task(), 1, 2, 5.0)
        assert len(got) == 2 and len(operators(got)) == 2
        nursery.cancel_scope.cancel()


async def test_concurrent_asks_for_different_objects_are_independent(tmp_path):
    async with trio.open_nursery() as nursery:
        _, nodes, _ = await cluster(nursery, tmp_path, honest=3, fakes=[])
        results: dict[int, list[ApprovalResponse]] = {}

        async def ask(object_id: int) -> None:
            results[object_id] = await nodes[0].p2p.handle_replicate_piece_approval(
                task(object_id), 3, 3, 5.0)

        with trio.fail_after(5 + MARGIN):
            async with trio.open_nursery() as inner:
                for oid in range(1, 9):
                    inner.start_soon(ask, oid)
        assert sorted(results) == list(range(1, 9))
        assert all(len(r) == 3 and r[0].object_id == oid for oid, r in results.items())
        nursery.cancel_scope.cancel()


# --- hostile and broken peers -----------------------------------------------------------------


async def test_hostile_answers_are_dropped_and_counted(tmp_path):
    fakes: list[Behaviour] = [slow, wrong_key, unregistered, expired, wrong_nonce, oversized,
                              twice, refuse]
    async with trio.open_nursery() as nursery:
        sps, nodes, fake_sps = await cluster(nursery, tmp_path, honest=2, fakes=fakes)
        t0 = trio.current_time()
        with trio.fail_after(TIMEOUT + MARGIN):
            got = await nodes[0].p2p.handle_replicate_piece_approval(task(), 2, 10, TIMEOUT)
        assert trio.current_time() - t0 < TIMEOUT + MARGIN
        twice_sp = fake_sps[fakes.index(twice)].sp
        assert operators(got) == {sps[1].keys.operator.address, sps[2].keys.operator.address,
                                  twice_sp.keys.operator.address}
        # the attacked node still serves the next request
        with trio.fail_after(5 + MARGIN):
            again = await nodes[0].p2p.handle_replicate_piece_approval(task(2), 3, 3, 5.0)
        assert len(again) == 3
        nursery.cancel_scope.cancel()


async def test_counts_of_a_hostile_mix(tmp_path):
    fakes: list[Behaviour] = [wrong_key, unregistered, expired, wrong_nonce, oversized,
                              garbage, silent]
    async with trio.open_nursery() as nursery:
        _, nodes, _ = await cluster(nursery, tmp_path, honest=0, fakes=fakes)
        with trio.fail_after(TIMEOUT + MARGIN), pytest.raises(InsufficientApprovals) as info:
            await nodes[0].p2p.handle_replicate_piece_approval(task(), 1, 3, TIMEOUT)
        c = info.value.counts
        assert (c.approved, c.refused, c.invalid, c.silent) == (0, 0, 6, 1)
        nursery.cancel_scope.cancel()


async def test_an_approval_claimed_for_another_sp_is_invalid(tmp_path):
    async with trio.open_nursery() as nursery:
        sps = make_sps(tmp_path / "probe", 2)  # only to name a victim with real keys
        victim = sps[1]
        _, nodes, _ = await cluster(nursery, tmp_path / "c", honest=0,
                                    fakes=[impersonating(victim)])
        with trio.fail_after(TIMEOUT + MARGIN), pytest.raises(InsufficientApprovals) as info:
            await nodes[0].p2p.handle_replicate_piece_approval(task(), 1, 1, TIMEOUT)
        assert info.value.counts.invalid == 1
        nursery.cancel_scope.cancel()


# --- the responder under attack ---------------------------------------------------------------


async def _raw(host, target: SPDir, protocol: str, payload: bytes) -> bytes | None:
    """Send raw bytes on a new stream; the response frame, or None when the stream was reset."""
    await host.connect(target.peer_id, [target.addr])
    stream = await host.open_stream(target.peer_id, protocol)
    await stream.write_raw(payload)
    try:
        return await stream.read_frame(1 << 18)
    except P2PError:
        return None


async def test_responder_resets_garbage_oversized_replayed_and_unsolicited(tmp_path):
    async with trio.open_nursery() as nursery:
        sps, nodes, fake_sps = await cluster(nursery, tmp_path, honest=1, fakes=[approve])
        target, me = sps[1], fake_sps[0].sp
        async with open_host(me.keys.p2p, "/ip4/127.0.0.1/tcp/0", connect_timeout=2.0,
                             handlers={}) as host:
            with trio.fail_after(10):
                for protocol in (PING_PROTOCOL, APPROVAL_PROTOCOL):
                    assert await _raw(host, target, protocol, b"\x00\x00\x00\x05garbage") is None
                    assert await _raw(host, target, protocol,
                                      struct.pack(">I", 100 << 20)) is None
                # a valid ping is answered once; the same ping replayed is reset
                ping = Ping(me.keys.operator.address, me.peer_id, (), now_ms(), new_nonce())
                ping = dataclasses.replace(ping,
                                           sig=me.keys.operator.sign(signing_payload(ping)))
                frame = struct.pack(">I", len(encode(ping))) + encode(ping)
                assert decode(await _raw(host, target, PING_PROTOCOL, frame), Pong)
                assert await _raw(host, target, PING_PROTOCOL, frame) is None
                # a ping signed by another SP's operator (not the remote's) is reset
                ping2 = dataclasses.replace(ping, operator=sps[0].keys.operator.address,
                                            nonce=new_nonce())
                ping2 = dataclasses.replace(
                    ping2, sig=sps[0].keys.operator.sign(signing_payload(ping2)))
                frame2 = struct.pack(">I", len(encode(ping2))) + encode(ping2)
                assert await _raw(host, target, PING_PROTOCOL, frame2) is None
                # an unsolicited approval response is reset
                resp = fake_sps[0].response(
                    ApprovalRequest(_ref(), _params(),
                                    sps[0].keys.operator.address, now_ms(), new_nonce()))
                frame3 = struct.pack(">I", len(encode(resp))) + encode(resp)
                assert await _raw(host, target, APPROVAL_PROTOCOL, frame3) is None
        # the attacked node still answers pings and approvals
        with trio.fail_after(5 + MARGIN):
            assert await nodes[0].p2p.discovery.ping_peer(target.peer_id)
            got = await nodes[0].p2p.handle_replicate_piece_approval(task(), 2, 2, 5.0)
        assert len(got) == 2
        nursery.cancel_scope.cancel()


def _ref():
    from p2p.approval import request_from_task
    return request_from_task(task(), "0x" + "00" * 20).object


def _params():
    from p2p.messages import Params
    return Params(16 << 20, 4, 2)


async def test_a_replayed_pong_counts_as_a_missed_pong(tmp_path):
    async with trio.open_nursery() as nursery:
        _, nodes, fake_sps = await cluster(nursery, tmp_path, honest=0, fakes=[approve])
        fake = fake_sps[0]
        asker = nodes[0].p2p
        fake.replay_pong = True
        before = asker.table.get(fake.sp.peer_id).missed
        with trio.fail_after(5):
            assert not await asker.discovery.ping_peer(fake.sp.peer_id)
        assert asker.table.get(fake.sp.peer_id).missed == before + 1
        fake.replay_pong = False
        with trio.fail_after(5):
            assert await asker.discovery.ping_peer(fake.sp.peer_id)
        assert asker.table.get(fake.sp.peer_id).missed == 0
        nursery.cancel_scope.cancel()


async def test_the_approver_modular_decides_when_it_runs(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "helpers"))
    impl = {"approver": "gfsp_test_modulars:SizeCapApprover"}
    async with trio.open_nursery() as nursery:
        sps, nodes, _ = await cluster(nursery, tmp_path, honest=2, fakes=[],
                                      implementations=lambda i: impl if i == 1 else {})
        with trio.fail_after(TIMEOUT + MARGIN), pytest.raises(InsufficientApprovals) as info:
            await nodes[0].p2p.handle_replicate_piece_approval(task(), 2, 2, TIMEOUT)
        c = info.value.counts
        assert (c.approved, c.refused) == (1, 1)
        assert "over the 1 MiB cap" in c.reasons[sps[1].peer_id]
        nursery.cancel_scope.cancel()
