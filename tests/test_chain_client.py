"""Tests of node/chain.py (DevChainClient) against a real in-process devchain on 127.0.0.1."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from node import chain_msgs as msgs
from node.chain import ChainClient, ChainError, ChainUnavailable, DevChainClient
from node.config import ChainSection
from node.crypto import PrivateKey
from node.spregistry import SPRegistry
from node.tasks import StorageParams
from testnet.devchain import DevChain
from testnet.devchain.testing import Account, TestSP, seal_tx

BLOCK = 0.1
PARAMS = StorageParams(segment_size=1024, data_shards=2, parity_shards=1, max_payload=1 << 20)


@dataclass
class World:
    chain: DevChain
    client: DevChainClient
    sps: list[TestSP]
    user: Account


def checksums(seed: str) -> list[bytes]:
    return [hashlib.sha256(f"{seed}:{i}".encode()).digest()
            for i in range(1 + PARAMS.total_shards)]


@pytest.fixture
async def world(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[World]:
    chain = DevChain(tmp_path / "chain", block_interval=BLOCK, params=PARAMS)
    endpoint = await nursery.start(chain.serve)
    sps = [TestSP.create(i) for i in range(PARAMS.total_shards + 1)]
    async with DevChainClient(endpoint, request_timeout=5,
                              height_refresh_interval=BLOCK) as client:
        for sp in sps:
            await client.broadcast(sp.register_tx())
        yield World(chain, client, sps, Account(PrivateKey.generate()))


async def _bucket(w: World, name: str) -> dict[str, object]:
    height = await w.client.current_height()
    approval = w.sps[0].bucket_approval(w.user.address, name, height + 100)
    return await w.client.broadcast(msgs.sign(w.user.key, msgs.create_bucket_tx(
        pubkey=w.user.pubkey, seq=await w.client.account_seq(w.user.address), bucket=name,
        primary_sp=w.sps[0].address, approval=approval)))


async def _object(w: World, bucket: str, name: str) -> int:
    height = await w.client.current_height()
    sums = checksums(name)
    approval = w.sps[0].object_approval(w.user.address, bucket, name, 10, sums, height + 100,
                                        content_type="text/plain")
    result = await w.client.broadcast(msgs.sign(w.user.key, msgs.create_object_tx(
        pubkey=w.user.pubkey, seq=await w.client.account_seq(w.user.address), bucket=bucket,
        object=name, size=10, content_type="text/plain", checksums=sums, approval=approval)))
    return int(result["object_id"])  # type: ignore[call-overload]


async def test_protocols_are_implemented(world: World) -> None:
    client: ChainClient = world.client
    registry: SPRegistry = world.client
    assert client is registry
    assert await world.client.params() == PARAMS


async def test_height_refreshes_in_background(world: World, nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        await nursery.start(world.client.run)
        first = await world.client.current_height()
        while await world.client.current_height() < first + 3:  # noqa: ASYNC110 - polls
            await trio.sleep(BLOCK / 2)
        assert await world.client.fetch_height() >= first + 3


async def test_sp_registry_methods(world: World) -> None:
    with trio.fail_after(10):
        c = world.client
        sps = await c.list_sps()
        assert {sp.operator for sp in sps} == {sp.address for sp in world.sps}
        sp0 = world.sps[0]
        assert await c.sp_by_operator(sp0.address) == sp0.info
        assert await c.sp_by_peer_id(sp0.peer_id) == sp0.info
        assert await c.get_sp(sp0.address) == sp0.info
        assert await c.sp_by_operator("0x" + "11" * 20) is None
        assert await c.sp_by_peer_id("12D3KooWnobody") is None
        assert await c.get_sp("0x" + "11" * 20) is None
        # a newly registered SP is found although the list is cached
        late = TestSP.create(50)
        await c.broadcast(late.register_tx())
        while await c.sp_by_peer_id(late.peer_id) is None:  # noqa: ASYNC110 - polls
            await trio.sleep(c.sp_miss_ttl / 2)
        assert await c.sp_by_operator(late.address) == late.info
        assert isinstance(await c.current_height(), int)


async def test_buckets_objects_events_and_seal(world: World) -> None:
    with trio.fail_after(10):
        c = world.client
        start = await c.fetch_height()
        created = await _bucket(world, "things")
        assert created["bucket"] == "things"
        bucket = await c.get_bucket("things")
        assert bucket is not None and bucket.owner == world.user.address
        assert bucket.info.primary_sp == world.sps[0].address
        assert [b.name for b in await c.list_buckets(world.user.address)] == ["things"]
        assert await c.get_bucket("nothing") is None

        oid = await _object(world, "things", "dir/a b?#")
        await _object(world, "things", "dir/c")
        obj = await c.get_object("things", "dir/a b?#")
        assert obj is not None and obj.id == oid and not obj.sealed
        assert obj.info.checksums == tuple(checksums("dir/a b?#"))
        assert obj.info.content_type == "text/plain"
        assert await c.get_object("things", "nope") is None
        assert await c.get_object_by_id(10**9) is None
        listed = await c.list_objects("things", prefix="dir/", limit=1)
        assert [o.name for o in listed] == ["dir/a b?#"]
        listed = await c.list_objects("things", prefix="dir/", start_after="dir/a b?#")
        assert [o.name for o in listed] == ["dir/c"]

        primary, secs = world.sps[0], world.sps[1:]
        primary.sealer.seq = await c.account_seq(primary.keys.seal.address)
        await c.broadcast(seal_tx(primary, oid, secs, checksums("dir/a b?#")))
        sealed = await c.get_object_by_id(oid)
        assert sealed is not None and sealed.sealed
        assert sealed.secondaries == tuple(sp.address for sp in secs)
        assert sealed.seal_height is not None

        events = await c.events_since(start)
        assert [e.kind for e in events] == ["bucket_created", "object_created",
                                            "object_created", "object_sealed"]
        assert events[-1].object_id == oid
        paged = await c.events_since(start, after=events[0].index, limit=2)
        assert [e.index for e in paged] == [events[1].index, events[2].index]


async def test_object_names_with_dot_segments_are_looked_up_as_named(world: World) -> None:
    """Names that are (or hold) ``.`` / ``..`` path segments reach the chain unchanged: an
    HTTP client must not resolve them into another object's name (found in review:
    ``a/../b`` was looked up as ``b``, ``.`` failed with a redirect)."""
    with trio.fail_after(10):
        c = world.client
        await _bucket(world, "dots")
        names = [".", "..", "a/../b", "a/./b", "./x", "b", "x", "a/%2E%2E/b", "a//b", "a/"]
        ids = {name: await _object(world, "dots", name) for name in names}
        for name, oid in ids.items():
            obj = await c.get_object("dots", name)
            assert obj is not None and (obj.id, obj.name) == (oid, name)
        assert await c.get_object("dots", "a/../x") is None


async def test_refusals_become_chain_errors(world: World) -> None:
    with trio.fail_after(10):
        c = world.client
        await _bucket(world, "dup")
        with pytest.raises(ChainError) as info:
            await _bucket(world, "dup")
        assert info.value.code == "BUCKET_EXISTS" and "dup" in info.value.reason
        assert not isinstance(info.value, ChainUnavailable)
        # replay: the same signed tx twice
        height = await c.current_height()
        approval = world.sps[0].bucket_approval(world.user.address, "twice", height + 100)
        tx = msgs.sign(world.user.key, msgs.create_bucket_tx(
            pubkey=world.user.pubkey, seq=await c.account_seq(world.user.address),
            bucket="twice", primary_sp=world.sps[0].address, approval=approval))
        await c.broadcast(tx)
        with pytest.raises(ChainError) as info:
            await c.broadcast(tx)
        assert info.value.code == "BAD_SEQUENCE"
        with pytest.raises(ChainError) as info:
            await c.broadcast({"type": "nonsense"})
        assert info.value.code == "MALFORMED"
        assert await c.account_seq(PrivateKey.generate().address) == 0


async def test_unreachable_chain_is_unavailable() -> None:
    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with trio.fail_after(10):
        async with DevChainClient(f"http://127.0.0.1:{port}", request_timeout=2) as c:
            with pytest.raises(ChainUnavailable) as info:
                await c.current_height()
            assert info.value.code == "UNAVAILABLE"
            assert isinstance(info.value, ChainError)


async def test_silent_chain_times_out(nursery: trio.Nursery) -> None:
    """A server that accepts and never answers: the request deadline gives ChainUnavailable."""
    async def never_answer(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    listeners = await nursery.start(partial(trio.serve_tcp, never_answer, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(10):
        async with DevChainClient(f"http://127.0.0.1:{port}", request_timeout=0.3,
                                  height_refresh_interval=0.1) as c:
            with pytest.raises(ChainUnavailable):
                await c.list_sps()
            # the refresher keeps running (and logging) while the chain is silent
            await nursery.start(c.run)
            with pytest.raises(ChainUnavailable):
                await c.current_height()


async def test_from_config() -> None:
    section = ChainSection(endpoint="http://127.0.0.1:9/")
    async with DevChainClient.from_config(section) as c:
        assert c.endpoint == "http://127.0.0.1:9"
        assert c.request_timeout == float(section.request_timeout)


async def test_concurrent_registry_misses_share_one_refresh(world: World) -> None:
    """Many lookups of unknown operators at once (a burst of pings from strangers) make one
    GET /sps, not one each (found in review)."""
    c = world.client
    await c.list_sps()  # fills the cache
    refreshes = 0
    refresh = c._refresh_sps

    async def counted() -> Any:
        nonlocal refreshes
        refreshes += 1
        return await refresh()

    c._refresh_sps = counted  # type: ignore[method-assign]
    c._sps_at -= c.sp_miss_ttl + 0.01  # as if filled a miss TTL ago: a miss refreshes it
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(c.sp_by_operator, "0x" + f"{i:02x}" * 20)
    assert refreshes == 1
