"""Tests of modulars/authorizer.py against a real devchain on 127.0.0.1 (port 0).

The chain state (SPs, buckets, objects, seals) is built once per session into a template
directory; each test copies it and starts its own devchain on it, so every case of the
op x situation table runs against a fresh, real chain in a few tens of milliseconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import socket
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from modulars.authorizer import AuthOpType, Authorizer
from node import chain_msgs as msgs
from node.chain import DevChainClient
from node.config import AuthorizerSection, Config, Seconds
from node.crypto import PrivateKey
from node.errors import ServiceError, ServiceUnavailable
from node.modular import Modulars, NodeContext
from node.tasks import StorageParams
from testnet.devchain import DevChain
from testnet.devchain.testing import Account, TestSP, seal_tx
from tests.chainworld import ChainWorld, chain_world, session_template

PARAMS = StorageParams(segment_size=1024, data_shards=2, parity_shards=1, max_payload=1 << 20)
BLOCK = 0.05
TIMEOUT = 20

# SP roles in the template: index 0 is this node, 1 another primary, 2.. secondaries.
US, OTHER = 0, 1


def checksums(name: str) -> list[bytes]:
    return [hashlib.sha256(f"{name}:{i}".encode()).digest()
            for i in range(1 + PARAMS.total_shards)]


async def create_bucket(client: DevChainClient, user: Account, primary: TestSP, name: str
                        ) -> None:
    height = await client.current_height()
    approval = primary.bucket_approval(user.address, name, height + 1000)
    await client.broadcast(msgs.sign(user.key, msgs.create_bucket_tx(
        pubkey=user.pubkey, seq=await client.account_seq(user.address), bucket=name,
        primary_sp=primary.address, approval=approval)))


async def create_object(client: DevChainClient, user: Account, primary: TestSP, bucket: str,
                        name: str) -> int:
    height = await client.current_height()
    sums = checksums(name)
    approval = primary.object_approval(user.address, bucket, name, 100, sums, height + 1000)
    result = await client.broadcast(msgs.sign(user.key, msgs.create_object_tx(
        pubkey=user.pubkey, seq=await client.account_seq(user.address), bucket=bucket,
        object=name, size=100, content_type="application/octet-stream", checksums=sums,
        approval=approval)))
    return int(result["object_id"])


async def seal(client: DevChainClient, primary: TestSP, object_id: int, name: str,
               secondaries: Sequence[TestSP]) -> None:
    primary.sealer.seq = await client.account_seq(primary.keys.seal.address)
    await client.broadcast(seal_tx(primary, object_id, secondaries, checksums(name)))


@dataclass
class Template:
    directory: Path
    sps: list[TestSP]
    user: Account
    stranger: Account
    paused: TestSP  # registered, then IN_MAINTENANCE

    @property
    def us(self) -> TestSP:
        return self.sps[US]

    @property
    def other(self) -> TestSP:
        return self.sps[OTHER]


async def _build_template(directory: Path) -> Template:
    sps = [TestSP.create(i) for i in range(2 + PARAMS.total_shards)]
    us, other, pool = sps[US], sps[OTHER], sps[2:]
    tpl = Template(directory, sps, Account(PrivateKey.generate()), Account(PrivateKey.generate()),
                   TestSP.create(len(sps)))
    chain = DevChain(directory, block_interval=BLOCK, params=PARAMS)
    async with trio.open_nursery() as nursery:
        endpoint = await nursery.start(chain.serve)
        async with DevChainClient(endpoint) as client:
            for sp in [*sps, tpl.paused]:
                await client.broadcast(sp.register_tx())
            paused = tpl.paused.operator
            await client.broadcast(msgs.sign(paused.key, msgs.set_sp_status_tx(
                pubkey=paused.pubkey, seq=paused.take_seq(), status="IN_MAINTENANCE")))
            # "ours": this SP is the primary; "theirs": the other SP is.
            await create_bucket(client, tpl.user, us, "ours")
            await create_bucket(client, tpl.user, other, "theirs")
            await create_object(client, tpl.user, us, "ours", "created")
            oid = await create_object(client, tpl.user, us, "ours", "sealed")
            await seal(client, us, oid, "sealed", pool[:PARAMS.total_shards])
            await create_object(client, tpl.user, other, "theirs", "created")
            oid = await create_object(client, tpl.user, other, "theirs", "sealed-us")
            await seal(client, other, oid, "sealed-us", [us, *pool[:PARAMS.total_shards - 1]])
            oid = await create_object(client, tpl.user, other, "theirs", "sealed-not-us")
            await seal(client, other, oid, "sealed-not-us", pool[:PARAMS.total_shards])
        chain.shutdown()
    return tpl


@pytest.fixture(scope="session")
def template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    return session_template(tmp_path_factory, "authorizer-template", TIMEOUT, _build_template)


@dataclass
class World(ChainWorld):
    tpl: Template
    auth: Authorizer

    def set_ttl(self, ttl: float) -> None:
        self.ctx.config = dataclasses.replace(
            self.ctx.config, authorizer=AuthorizerSection(cache_ttl=Seconds(ttl)))

    async def verify(self, op: AuthOpType, who: str, bucket: str, obj: str = "") -> bool:
        return await self.auth.verify_authorize(op, self.account(who), bucket, obj)

    def account(self, who: str) -> str:
        return {"user": self.tpl.user.address, "stranger": self.tpl.stranger.address,
                "sp": self.tpl.other.address, "paused": self.tpl.paused.address,
                "anonymous": ""}[who]


async def start_authorizer(ctx: NodeContext, nursery: trio.Nursery) -> Authorizer:
    auth = Authorizer(ctx)
    await nursery.start(auth.serve)
    ctx.modulars.mark_running(auth)
    return auth


@pytest.fixture
async def world(template: Template, tmp_path: Path, nursery: trio.Nursery
                ) -> AsyncIterator[World]:
    async with chain_world(template.directory, tmp_path, nursery, keys=template.us.keys,
                           config=Config(), block_interval=BLOCK, timeout=TIMEOUT) as cw:
        auth = await start_authorizer(cw.ctx, nursery)
        yield World(cw.devchain, cw.chain_stopped, cw.client, cw.chain, cw.ctx, template, auth)


# --- the op x situation table --------------------------------------------------------------

# situation -> (account, bucket, object)
SITUATIONS: dict[str, tuple[str, str, str]] = {
    "bucket-missing": ("user", "nobucket", "obj"),
    "object-missing": ("user", "ours", "nokey"),
    "created": ("user", "ours", "created"),
    "sealed": ("user", "ours", "sealed"),
    "not-owner-created": ("stranger", "ours", "created"),
    "not-owner-sealed": ("stranger", "ours", "sealed"),
    "other-primary-created": ("user", "theirs", "created"),
    "other-primary-object-missing": ("user", "theirs", "nokey"),
    "other-primary-we-are-secondary": ("user", "theirs", "sealed-us"),
    "other-primary-not-secondary": ("user", "theirs", "sealed-not-us"),
    "not-owner-we-are-secondary": ("stranger", "theirs", "sealed-us"),
    "not-owner-not-secondary": ("stranger", "theirs", "sealed-not-us"),
    "anonymous": ("anonymous", "ours", "sealed"),
    # "sp" is the other SP's operator (registered, in service), "paused" one in maintenance
    "sp-sealed": ("sp", "ours", "sealed"),
    "sp-created": ("sp", "ours", "created"),
    "sp-primary-we-are-secondary": ("sp", "theirs", "sealed-us"),
    "sp-primary-not-secondary": ("sp", "theirs", "sealed-not-us"),
    "sp-not-in-service": ("paused", "ours", "sealed"),
}

OK = None
EXISTS_B = ("BucketAlreadyExists", 409)
EXISTS_O = ("ObjectAlreadyExists", 409)
NO_BUCKET = ("NoSuchBucket", 404)
NO_KEY = ("NoSuchKey", 404)
DENIED = ("AccessDenied", 403)
NOT_PRIMARY = ("AccessDenied", 403, "not the primary SP")
STATE = ("InvalidObjectState", 409)

Expect = tuple[str, int] | tuple[str, int, str] | None


def _row(**cells: Expect) -> dict[str, Expect]:
    return {name.replace("_", "-"): value for name, value in cells.items()}


# The bucket-level checks shared by every op but create-bucket and challenge.
_BUCKET_LEVEL = _row(bucket_missing=NO_BUCKET, not_owner_created=DENIED,
                     not_owner_sealed=DENIED, other_primary_created=NOT_PRIMARY,
                     other_primary_object_missing=NOT_PRIMARY,
                     other_primary_we_are_secondary=NOT_PRIMARY,
                     other_primary_not_secondary=NOT_PRIMARY,
                     not_owner_we_are_secondary=DENIED, not_owner_not_secondary=DENIED,
                     anonymous=DENIED, sp_sealed=DENIED, sp_created=DENIED,
                     sp_primary_we_are_secondary=DENIED, sp_primary_not_secondary=DENIED,
                     sp_not_in_service=DENIED)

TABLE: dict[AuthOpType, dict[str, Expect]] = {
    AuthOpType.UNKNOWN: dict.fromkeys(SITUATIONS, DENIED),
    AuthOpType.ASK_CREATE_BUCKET_APPROVAL: {
        **dict.fromkeys(SITUATIONS, EXISTS_B), "bucket-missing": OK, "anonymous": DENIED},
    AuthOpType.ASK_CREATE_OBJECT_APPROVAL: {
        **_BUCKET_LEVEL, **_row(object_missing=OK, created=EXISTS_O, sealed=EXISTS_O)},
    AuthOpType.PUT_OBJECT: {
        **_BUCKET_LEVEL, **_row(object_missing=NO_KEY, created=OK, sealed=STATE)},
    AuthOpType.GET_OBJECT: {
        **_BUCKET_LEVEL, **_row(object_missing=NO_KEY, created=STATE, sealed=OK)},
    AuthOpType.GET_UPLOADING_STATE: {
        **_BUCKET_LEVEL, **_row(object_missing=NO_KEY, created=OK, sealed=OK)},
    AuthOpType.GET_BUCKET_QUOTA: {
        **_BUCKET_LEVEL, **_row(object_missing=OK, created=OK, sealed=OK)},
    AuthOpType.LIST_BUCKET_READ_RECORD: {
        **_BUCKET_LEVEL, **_row(object_missing=OK, created=OK, sealed=OK)},
    # The bucket owner and SPs in service may challenge a sealed object we hold a piece of.
    # Found in review: any account could, and so read any object (a challenge of index -1
    # answers the primary's whole segment) without GET's owner check nor its accounting.
    AuthOpType.CHALLENGE_PIECE: _row(
        bucket_missing=NO_BUCKET, object_missing=NO_KEY, created=STATE, sealed=OK,
        not_owner_created=DENIED, not_owner_sealed=DENIED, other_primary_created=STATE,
        other_primary_object_missing=NO_KEY, other_primary_we_are_secondary=OK,
        other_primary_not_secondary=DENIED, not_owner_we_are_secondary=DENIED,
        not_owner_not_secondary=DENIED, anonymous=DENIED, sp_sealed=OK, sp_created=STATE,
        sp_primary_we_are_secondary=OK, sp_primary_not_secondary=DENIED,
        sp_not_in_service=DENIED),
}

CASES = [pytest.param(op, situation, expected, id=f"{op.name}-{situation}")
         for op, row in TABLE.items() for situation, expected in row.items()]


def test_table_is_complete() -> None:
    assert set(TABLE) == set(AuthOpType)
    for op, row in TABLE.items():
        assert set(row) == set(SITUATIONS), op


def test_op_values_match_the_seed() -> None:
    assert [(op.name, op.value) for op in AuthOpType] == [
        ("UNKNOWN", 0), ("ASK_CREATE_BUCKET_APPROVAL", 1), ("ASK_CREATE_OBJECT_APPROVAL", 2),
        ("CHALLENGE_PIECE", 3), ("PUT_OBJECT", 4), ("GET_OBJECT", 5),
        ("GET_UPLOADING_STATE", 6), ("GET_BUCKET_QUOTA", 7), ("LIST_BUCKET_READ_RECORD", 8)]


@pytest.mark.parametrize(("op", "situation", "expected"), CASES)
async def test_op_situation(world: World, op: AuthOpType, situation: str,
                            expected: Expect) -> None:
    who, bucket, obj = SITUATIONS[situation]
    with trio.fail_after(TIMEOUT):
        if expected is None:
            assert await world.verify(op, who, bucket, obj) is True
            return
        with pytest.raises(ServiceError) as info:
            await world.verify(op, who, bucket, obj)
    assert (info.value.code, info.value.status) == expected[:2], info.value
    if len(expected) == 3:
        assert expected[2] in info.value.message
    assert not isinstance(info.value, ServiceUnavailable)


async def test_modular_shape(world: World) -> None:
    assert world.auth.name == "authorizer"
    assert world.auth.requires == ("signer",)
    assert world.auth.description == "Authorization authentication."
    assert world.ctx.modulars.authorizer is world.auth


async def test_op_may_be_a_plain_int(world: World) -> None:
    with trio.fail_after(TIMEOUT):
        assert await world.auth.verify_authorize(5, world.tpl.user.address, "ours", "sealed")
        with pytest.raises(ServiceError) as info:
            await world.auth.verify_authorize(99, world.tpl.user.address, "ours", "sealed")
        assert (info.value.code, info.value.status) == DENIED


# --- the cache -----------------------------------------------------------------------------

async def test_cache_serves_a_burst_from_one_lookup(world: World, nursery: trio.Nursery
                                                    ) -> None:
    world.set_ttl(600)
    with trio.fail_after(TIMEOUT):
        for _ in range(20):
            assert await world.verify(AuthOpType.GET_OBJECT, "user", "ours", "sealed")
        assert world.chain.calls == Counter(get_bucket=1, get_object=1)
        # other ops on the same bucket/object reuse the same answers
        assert await world.verify(AuthOpType.GET_UPLOADING_STATE, "user", "ours", "sealed")
        assert await world.verify(AuthOpType.GET_BUCKET_QUOTA, "user", "ours")
        assert await world.verify(AuthOpType.CHALLENGE_PIECE, "user", "ours", "sealed")
        assert world.chain.calls == Counter(get_bucket=1, get_object=1)
        # the cache belongs to one instance: another authorizer asks the chain itself
        ctx2 = dataclasses.replace(world.ctx, modulars=Modulars())
        ctx2.modulars.mark_running(world.ctx.modulars.signer)
        other = await start_authorizer(ctx2, nursery)
        assert await other.verify_authorize(AuthOpType.GET_OBJECT, world.tpl.user.address,
                                            "ours", "sealed")
        assert world.chain.calls == Counter(get_bucket=2, get_object=2)


async def test_challenge_sp_lookups_are_cached_like_the_rest(world: World) -> None:
    world.set_ttl(600)
    with trio.fail_after(TIMEOUT):
        for _ in range(5):
            assert await world.verify(AuthOpType.CHALLENGE_PIECE, "sp", "ours", "sealed")
        assert world.chain.calls["get_sp"] == 1
        # the owner needs no SP lookup; a stranger's refusal costs one each time
        assert await world.verify(AuthOpType.CHALLENGE_PIECE, "user", "ours", "sealed")
        for _ in range(2):
            with pytest.raises(ServiceError) as info:
                await world.verify(AuthOpType.CHALLENGE_PIECE, "stranger", "ours", "sealed")
            assert (info.value.code, info.value.status) == DENIED
        assert world.chain.calls["get_sp"] == 3


async def test_an_sp_leaving_service_may_no_longer_challenge(world: World) -> None:
    world.set_ttl(0)
    other = world.tpl.other
    with trio.fail_after(TIMEOUT):
        assert await world.verify(AuthOpType.CHALLENGE_PIECE, "sp", "theirs", "sealed-us")
        await world.client.broadcast(msgs.sign(other.keys.operator, msgs.set_sp_status_tx(
            pubkey=other.operator.pubkey, seq=await world.client.account_seq(other.address),
            status="JAILED")))
        with pytest.raises(ServiceError) as info:
            await world.verify(AuthOpType.CHALLENGE_PIECE, "sp", "theirs", "sealed-us")
    assert (info.value.code, info.value.status) == DENIED


async def test_concurrent_burst_shares_one_lookup(world: World) -> None:
    world.set_ttl(600)
    results: list[bool] = []

    async def one() -> None:
        results.append(await world.verify(AuthOpType.GET_OBJECT, "user", "ours", "sealed"))

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            for _ in range(25):
                nursery.start_soon(one)
    assert results == [True] * 25
    assert world.chain.calls == Counter(get_bucket=1, get_object=1)


async def test_cache_expires_after_ttl(world: World) -> None:
    now = [1000.0]
    world.ctx.clock = lambda: now[0]
    world.set_ttl(2)
    with trio.fail_after(TIMEOUT):
        assert await world.verify(AuthOpType.GET_OBJECT, "user", "ours", "sealed")
        now[0] += 1.9
        assert await world.verify(AuthOpType.GET_OBJECT, "user", "ours", "sealed")
        assert world.chain.calls == Counter(get_bucket=1, get_object=1)
        now[0] += 0.2  # 2.1 s after the lookup: stale
        assert await world.verify(AuthOpType.GET_OBJECT, "user", "ours", "sealed")
        assert world.chain.calls == Counter(get_bucket=2, get_object=2)


async def test_ttl_zero_disables_the_cache(world: World) -> None:
    world.set_ttl(0)
    with trio.fail_after(TIMEOUT):
        for _ in range(3):
            assert await world.verify(AuthOpType.GET_OBJECT, "user", "ours", "sealed")
    assert world.chain.calls == Counter(get_bucket=3, get_object=3)


async def test_refusal_is_rechecked_against_the_chain(world: World) -> None:
    """A cached "absent"/"not sealed" never refuses a request on its own."""
    world.set_ttl(600)
    tpl = world.tpl
    with trio.fail_after(TIMEOUT):
        # approval for a new object caches "no such object"
        assert await world.verify(AuthOpType.ASK_CREATE_OBJECT_APPROVAL, "user", "ours", "new")
        oid = await create_object(world.client, tpl.user, tpl.us, "ours", "new")
        # ...the user creates it and uploads at once: the stale "absent" is re-checked
        assert await world.verify(AuthOpType.PUT_OBJECT, "user", "ours", "new")
        assert world.chain.calls["get_object"] == 2
        assert await world.verify(AuthOpType.PUT_OBJECT, "user", "ours", "new")
        assert world.chain.calls["get_object"] == 2  # allowed: from the cache
        # not sealed yet: the refusal is confirmed with one fresh lookup
        with pytest.raises(ServiceError) as info:
            await world.verify(AuthOpType.GET_OBJECT, "user", "ours", "new")
        assert (info.value.code, info.value.status) == STATE
        assert world.chain.calls["get_object"] == 3
        await seal(world.client, tpl.us, oid, "new", tpl.sps[2:2 + PARAMS.total_shards])
        assert await world.verify(AuthOpType.GET_OBJECT, "user", "ours", "new")
        assert world.chain.calls["get_object"] == 4
        # a bucket created after a cached "absent" is found at once too
        assert await world.verify(AuthOpType.ASK_CREATE_BUCKET_APPROVAL, "user", "later")
        await create_bucket(world.client, tpl.user, tpl.us, "later")
        assert await world.verify(AuthOpType.GET_BUCKET_QUOTA, "user", "later")


async def test_refusal_on_fresh_data_is_not_fetched_twice(world: World) -> None:
    world.set_ttl(600)
    with trio.fail_after(TIMEOUT):
        with pytest.raises(ServiceError) as info:
            await world.verify(AuthOpType.GET_OBJECT, "user", "nobucket", "x")
        assert info.value.code == "NoSuchBucket"
    assert world.chain.calls == Counter(get_bucket=1)


# --- the chain is down ---------------------------------------------------------------------

ALL_OPS_BUT_UNKNOWN = [op for op in AuthOpType if op is not AuthOpType.UNKNOWN]


async def test_unreachable_chain_is_503(world: World) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with trio.fail_after(TIMEOUT):
        async with DevChainClient(f"http://127.0.0.1:{port}", request_timeout=2) as dead:
            world.ctx.chain = dead
            for op in ALL_OPS_BUT_UNKNOWN:
                with pytest.raises(ServiceUnavailable) as info:
                    await world.verify(op, "user", "ours", "sealed")
                assert (info.value.code, info.value.status) == ("SlowDown", 503), op


async def test_no_chain_client_is_503(world: World) -> None:
    world.ctx.chain = None
    with pytest.raises(ServiceUnavailable):
        await world.verify(AuthOpType.GET_OBJECT, "user", "ours", "sealed")


async def test_chain_going_down(world: World) -> None:
    world.set_ttl(600)
    with trio.fail_after(TIMEOUT):
        assert await world.verify(AuthOpType.GET_OBJECT, "user", "ours", "sealed")
        with pytest.raises(ServiceError):
            await world.verify(AuthOpType.GET_OBJECT, "user", "ours", "created")
        await world.stop_chain()
        # what the cache allows is still allowed while it is fresh
        assert await world.verify(AuthOpType.GET_OBJECT, "user", "ours", "sealed")
        # a refusal cannot be confirmed, a new key cannot be looked up: 503, not a guess
        for obj in ("created", "unknown"):
            with pytest.raises(ServiceUnavailable) as info:
                await world.verify(AuthOpType.GET_OBJECT, "user", "ours", obj)
            assert info.value.status == 503


async def test_concurrent_waiters_share_the_outage(world: World) -> None:
    """Callers waiting on one lookup all get 503 when it fails; none retries on its own."""
    with trio.fail_after(TIMEOUT):
        await world.stop_chain()
        errors: list[BaseException] = []

        async def one() -> None:
            try:
                await world.verify(AuthOpType.GET_OBJECT, "user", "ours", "sealed")
            except ServiceUnavailable as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(one)
    assert len(errors) == 10
    assert world.chain.calls == Counter(get_bucket=1)
