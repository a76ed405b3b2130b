"""The signer against a real devchain: approvals, concurrent seals, sequence recovery, no key
material in reprs, errors or logs."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from modulars.signer import Signer
from node import chain_msgs as msgs
from node.app import build_limiter
from node.chain import DevChainClient
from node.config import Config
from node.crypto import PrivateKey, verify_message
from node.db import open_spdb
from node.modular import NodeContext
from node.tasks import StorageParams
from testnet.devchain import DevChain
from testnet.devchain.testing import Account, TestSP, new_keyset, seal_tx

BLOCK = 0.1
PARAMS = StorageParams(segment_size=1024, data_shards=2, parity_shards=1, max_payload=1 << 20)


@dataclass
class World:
    client: DevChainClient
    signer: Signer
    me: TestSP
    secondaries: list[TestSP]
    user: Account


def sums(name: str) -> list[bytes]:
    return [hashlib.sha256(f"{name}:{i}".encode()).digest() for i in range(1 + PARAMS.total_shards)]


@pytest.fixture
async def world(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[World]:
    chain = DevChain(tmp_path / "chain", block_interval=BLOCK, params=PARAMS)
    endpoint = await nursery.start(chain.serve)
    keys = new_keyset()
    me = TestSP(keys, "http://127.0.0.1:1", "12D3KooWsigner")
    secondaries = [TestSP.create(i) for i in range(PARAMS.total_shards)]
    async with (DevChainClient(endpoint, request_timeout=5, height_refresh_interval=BLOCK)
                as client, open_spdb(tmp_path / "spdb.sqlite3") as db):
        for sp in [me, *secondaries]:
            await client.broadcast(sp.register_tx())
        ctx = NodeContext(config=Config(), limiter=build_limiter(Config()), db=db, keys=keys,
                          chain=client)
        signer = Signer(ctx)
        ctx.modulars.mark_running(signer)
        yield World(client, signer, me, secondaries, Account(PrivateKey.generate()))


async def make_objects(w: World, bucket: str, n: int) -> list[int]:
    height = await w.client.current_height()
    await w.client.broadcast(msgs.sign(w.user.key, msgs.create_bucket_tx(
        pubkey=w.user.pubkey, seq=w.user.take_seq(), bucket=bucket, primary_sp=w.me.address,
        approval=w.me.bucket_approval(w.user.address, bucket, height + 100))))
    ids = []
    for i in range(n):
        name = f"o{i}"
        approval = w.me.object_approval(w.user.address, bucket, name, 10, sums(name),
                                        height + 100)
        result = await w.client.broadcast(msgs.sign(w.user.key, msgs.create_object_tx(
            pubkey=w.user.pubkey, seq=w.user.take_seq(), bucket=bucket, object=name, size=10,
            content_type="application/octet-stream", checksums=sums(name), approval=approval)))
        ids.append(int(result["object_id"]))
    return ids


def integrity_sigs(w: World, object_id: int, name: str) -> list[bytes]:
    return [sp.integrity_sig(object_id, sums(name)[i + 1]) for i, sp in enumerate(w.secondaries)]


async def test_fifty_concurrent_seals_all_land(world: World) -> None:
    with trio.fail_after(60):
        ids = await make_objects(world, "bulk", 50)

        async def seal(i: int, object_id: int) -> None:
            await world.signer.seal_object(
                object_id=object_id, secondaries=[s.address for s in world.secondaries],
                secondary_sigs=integrity_sigs(world, object_id, f"o{i}"))

        async with trio.open_nursery() as nursery:
            for i, oid in enumerate(ids):
                nursery.start_soon(seal, i, oid)
        for oid in ids:
            obj = await world.client.get_object_by_id(oid)
            assert obj is not None and obj.sealed
        assert await world.client.account_seq(world.me.keys.seal.address) == 50


async def test_a_sequence_moved_behind_its_back_is_recovered(world: World) -> None:
    with trio.fail_after(30):
        ids = await make_objects(world, "drift", 2)
        secondaries = [s.address for s in world.secondaries]
        await world.signer.seal_object(object_id=ids[0], secondaries=secondaries,
                                       secondary_sigs=integrity_sigs(world, ids[0], "o0"))
        # another process with the same seal key spends sequence number 1
        world.me.sealer.seq = 1
        await world.client.broadcast(seal_tx(world.me, ids[1], world.secondaries, sums("o1")))
        # the signer's cached number (1) is now stale; and the object is sealed already
        result = await world.signer.seal_object(object_id=ids[1], secondaries=secondaries,
                                                secondary_sigs=integrity_sigs(world, ids[1],
                                                                              "o1"))
        assert result.get("already") is True


async def test_a_bad_seal_is_refused_with_its_code(world: World) -> None:
    with trio.fail_after(30):
        ids = await make_objects(world, "bad", 1)
        with pytest.raises(msgs.ChainError) as info:
            await world.signer.seal_object(
                object_id=ids[0], secondaries=[s.address for s in world.secondaries],
                secondary_sigs=[b"\0" * 64] * len(world.secondaries))
        assert info.value.code == "BAD_SEAL"


async def test_bucket_and_object_approvals_are_signed_by_the_approval_key(world: World) -> None:
    msg = msgs.create_bucket_approval(creator=world.user.address, bucket="b",
                                      primary_sp=world.me.address, expiry_height=5)
    msg["sig"] = world.signer.sign_create_bucket_approval(msg)
    verify_message(world.me.keys.approval.public_key, msg)
    obj = msgs.create_object_approval(creator=world.user.address, bucket="b", object="o",
                                      size=1, content_type="x", checksums=sums("o"),
                                      expiry_height=5)
    obj["sig"] = world.signer.sign_create_object_approval(obj)
    verify_message(world.me.keys.approval.public_key, obj)
    with pytest.raises(ValueError):
        world.signer.sign_create_bucket_approval(obj)


async def test_keys_never_appear_in_reprs_errors_or_logs(world: World, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    secrets = [getattr(world.me.keys, r).seed_bytes().hex() for r in
               ("operator", "approval", "seal", "gc", "p2p")]
    ids = await make_objects(world, "leak", 1)
    with pytest.raises(msgs.ChainError) as info:
        await world.signer.seal_object(object_id=ids[0], secondaries=[],
                                       secondary_sigs=[])
    texts = [repr(world.signer), str(world.signer), repr(world.me.keys), str(info.value),
             repr(info.value), caplog.text, repr(world.signer.ctx)]
    for text in texts:
        for secret in secrets:
            assert secret not in text
