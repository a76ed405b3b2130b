"""Tests of modulars/metadata.py against a real devchain on 127.0.0.1 (port 0) and a real SPDB.

The chain state is built once per session into a template directory; each test copies it and
starts its own devchain on it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

import modulars.metadata as metadata_module
from modulars.metadata import Metadata, ReadRecord
from node import chain_msgs as msgs
from node.chain import DevChainClient
from node.config import Config, MetadataSection
from node.crypto import PrivateKey
from node.errors import ServiceError, ServiceUnavailable
from node.tasks import StorageParams
from testnet.devchain import DevChain
from testnet.devchain.testing import Account, TestSP, seal_tx
from tests.chainworld import ChainWorld, chain_world, session_template

PARAMS = StorageParams(segment_size=1024, data_shards=2, parity_shards=1, max_payload=1 << 20)
BLOCK = 0.05
TIMEOUT = 20
MAX_PAGE = 5

A_NAMES = [f"a/{i:02d}" for i in range(12)]
B_NAMES = [f"b/{i:02d}" for i in range(7)]
PICS = sorted([*A_NAMES, *B_NAMES, "c"])  # 20 objects: four pages of MAX_PAGE
SEALED = "b/00"


def checksums(name: str) -> list[bytes]:
    return [hashlib.sha256(f"{name}:{i}".encode()).digest()
            for i in range(1 + PARAMS.total_shards)]


def size_of(name: str) -> int:
    return 100 + len(name)


@dataclass
class Template:
    directory: Path
    sps: list[TestSP]  # 0 is this node, 1 another primary, the rest secondaries
    user: Account
    stranger: Account


async def _build_template(directory: Path) -> Template:
    sps = [TestSP.create(i) for i in range(2 + PARAMS.total_shards)]
    tpl = Template(directory, sps, Account(PrivateKey.generate()), Account(PrivateKey.generate()))
    user = tpl.user
    chain = DevChain(directory, block_interval=BLOCK, params=PARAMS)
    async with trio.open_nursery() as nursery:
        endpoint = await nursery.start(chain.serve)
        async with DevChainClient(endpoint) as client:
            for sp in sps:
                await client.broadcast(sp.register_tx())
            height = await client.current_height()
            for bucket, primary in (("pics", sps[0]), ("empty", sps[0]), ("elsewhere", sps[1])):
                await client.broadcast(msgs.sign(user.key, msgs.create_bucket_tx(
                    pubkey=user.pubkey, seq=user.take_seq(), bucket=bucket,
                    primary_sp=primary.address,
                    approval=primary.bucket_approval(user.address, bucket, height + 1000))))
            ids: dict[str, int] = {}
            for name in PICS:
                sums = checksums(name)
                approval = sps[0].object_approval(user.address, "pics", name, size_of(name),
                                                  sums, height + 1000)
                result = await client.broadcast(msgs.sign(user.key, msgs.create_object_tx(
                    pubkey=user.pubkey, seq=user.take_seq(), bucket="pics", object=name,
                    size=size_of(name), content_type="application/octet-stream",
                    checksums=sums, approval=approval)))
                ids[name] = int(result["object_id"])
            await client.broadcast(seal_tx(sps[0], ids[SEALED], sps[2:], checksums(SEALED)))
        chain.shutdown()
    return tpl


@pytest.fixture(scope="session")
def template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    return session_template(tmp_path_factory, "metadata-template", TIMEOUT, _build_template)


@dataclass
class World(ChainWorld):
    tpl: Template
    meta: Metadata


@pytest.fixture
async def world(template: Template, tmp_path: Path, nursery: trio.Nursery
                ) -> AsyncIterator[World]:
    config = dataclasses.replace(Config(), metadata=MetadataSection(max_page=MAX_PAGE))
    async with chain_world(template.directory, tmp_path, nursery, keys=template.sps[0].keys,
                           config=config, block_interval=BLOCK, timeout=TIMEOUT) as cw:
        meta = Metadata(cw.ctx)
        await nursery.start(meta.serve)
        cw.ctx.modulars.mark_running(meta)
        yield World(cw.devchain, cw.chain_stopped, cw.client, cw.chain, cw.ctx, template, meta)


async def walk(meta: Metadata, bucket: str, **kwargs: Any) -> list[list[str]]:
    """Every page of a listing, following next_start_after to the end."""
    pages: list[list[str]] = []
    start_after = kwargs.pop("start_after", "")
    while True:
        objects, start_after = await meta.list_objects(bucket, start_after=start_after,
                                                       **kwargs)
        pages.append([o.name for o in objects])
        if start_after is None:
            return pages
        assert start_after == objects[-1].name


def expect_error(info: pytest.ExceptionInfo[ServiceError], code: str, status: int) -> None:
    assert (info.value.code, info.value.status) == (code, status), info.value


# --- shape -----------------------------------------------------------------------------------

async def test_modular_shape(world: World) -> None:
    assert world.meta.name == "metadata"
    assert world.meta.requires == ()
    assert world.ctx.modulars.metadata is world.meta
    assert world.meta.max_page == MAX_PAGE


# --- listings ------------------------------------------------------------------------------

async def test_pages_with_prefix(world: World) -> None:
    with trio.fail_after(TIMEOUT):
        pages = await walk(world.meta, "pics", prefix="a/", limit=4)
    assert pages == [A_NAMES[0:4], A_NAMES[4:8], A_NAMES[8:12]]
    # one chain query per page (asking one more than the page), no extra bucket lookup
    assert world.chain.calls == Counter(list_objects=3)


async def test_last_page_exactly_full_has_no_next(world: World) -> None:
    with trio.fail_after(TIMEOUT):
        objects, nxt = await world.meta.list_objects("pics", prefix="b/", limit=4,
                                                     start_after="b/02")
    assert [o.name for o in objects] == B_NAMES[3:7]
    assert nxt is None


async def test_limit_is_capped_at_max_page(world: World) -> None:
    with trio.fail_after(TIMEOUT):
        for limit in (None, MAX_PAGE, MAX_PAGE + 1, 10_000):
            objects, nxt = await world.meta.list_objects("pics", limit=limit)
            assert [o.name for o in objects] == PICS[:MAX_PAGE], limit
            assert nxt == PICS[MAX_PAGE - 1]
        pages = await walk(world.meta, "pics")
    assert pages == [PICS[i:i + MAX_PAGE] for i in range(0, len(PICS), MAX_PAGE)]
    assert [n for page in pages for n in page] == PICS


async def test_start_after(world: World) -> None:
    with trio.fail_after(TIMEOUT):
        objects, nxt = await world.meta.list_objects("pics", prefix="a/", start_after="a/05",
                                                     limit=3)
        assert [o.name for o in objects] == ["a/06", "a/07", "a/08"] and nxt == "a/08"
        # a start_after that is no object's name works too
        objects, nxt = await world.meta.list_objects("pics", start_after="a/055", limit=2)
        assert [o.name for o in objects] == ["a/06", "a/07"] and nxt == "a/07"
        # across prefixes, and past the end
        assert await walk(world.meta, "pics", start_after="b/04") == [["b/05", "b/06", "c"]]
        assert await world.meta.list_objects("pics", start_after="z") == ([], None)
        assert await world.meta.list_objects("pics", prefix="nothing/") == ([], None)


async def test_chain_queries_are_chunked(world: World, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    """A page larger than the chain's cap per query is gathered over several queries."""
    monkeypatch.setattr(metadata_module, "CHAIN_MAX_LIST", 2)
    with trio.fail_after(TIMEOUT):
        objects, nxt = await world.meta.list_objects("pics", limit=5)
        assert [o.name for o in objects] == PICS[:5] and nxt == PICS[4]
        assert world.chain.calls == Counter(list_objects=3)  # 2 + 2 + 2 = page + 1
        pages = await walk(world.meta, "pics", prefix="b/", limit=3)
    assert pages == [B_NAMES[0:3], B_NAMES[3:6], B_NAMES[6:7]]


async def test_listing_errors(world: World) -> None:
    with trio.fail_after(TIMEOUT):
        with pytest.raises(ServiceError) as info:
            await world.meta.list_objects("nobucket")
        expect_error(info, "NoSuchBucket", 404)
        with pytest.raises(ServiceError) as info:
            await world.meta.list_objects("nobucket", limit=0)
        expect_error(info, "NoSuchBucket", 404)
        assert await world.meta.list_objects("empty") == ([], None)
        assert await world.meta.list_objects("pics", limit=0) == ([], None)
        for bad in (-1, 1.5, True):
            with pytest.raises(ServiceError) as info:
                await world.meta.list_objects("pics", limit=bad)  # type: ignore[arg-type]
            expect_error(info, "InvalidArgument", 400)


async def test_list_buckets(world: World) -> None:
    with trio.fail_after(TIMEOUT):
        buckets = await world.meta.list_buckets(world.tpl.user.address)
        assert [b.name for b in buckets] == ["elsewhere", "empty", "pics"]
        assert {b.owner for b in buckets} == {world.tpl.user.address}
        assert await world.meta.list_buckets(world.tpl.stranger.address) == []


async def test_get_bucket_and_object_meta(world: World) -> None:
    tpl = world.tpl
    with trio.fail_after(TIMEOUT):
        bucket = await world.meta.get_bucket_meta("pics")
        assert bucket.owner == tpl.user.address and bucket.primary_sp == tpl.sps[0].address
        obj = await world.meta.get_object_meta("pics", SEALED)
        assert obj.sealed and obj.size == size_of(SEALED)
        assert obj.secondaries == tuple(sp.address for sp in tpl.sps[2:])
        assert not (await world.meta.get_object_meta("pics", "a/00")).sealed
        with pytest.raises(ServiceError) as info:
            await world.meta.get_bucket_meta("nobucket")
        expect_error(info, "NoSuchBucket", 404)
        with pytest.raises(ServiceError) as info:
            await world.meta.get_object_meta("pics", "nokey")
        expect_error(info, "NoSuchKey", 404)
        with pytest.raises(ServiceError) as info:
            await world.meta.get_object_meta("nobucket", "a/00")
        expect_error(info, "NoSuchBucket", 404)


# --- upload progress -----------------------------------------------------------------------

async def put_progress(world: World, object_id: int, name: str, state: str, segments: int,
                       nbytes: int, error: str = "", at: float = 1234.5) -> None:
    def write(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT OR REPLACE INTO upload_progress (object_id, bucket, object, state, "
            "segments_done, bytes_done, error, update_time) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (object_id, "pics", name, state, segments, nbytes, error, at))

    await world.ctx.db.run(write)


async def test_upload_progress_states(world: World) -> None:
    meta = world.meta
    with trio.fail_after(TIMEOUT):
        created = await meta.get_object_meta("pics", "a/00")
        assert await meta.get_upload_progress("pics", "a/00") == {
            "object_id": created.id, "state": "NOT_STARTED", "segments_done": 0,
            "bytes_done": 0, "error": "", "update_time": None}

        await put_progress(world, created.id, "a/00", "UPLOADING", 2, 2048)
        assert await meta.get_upload_progress("pics", "a/00") == {
            "object_id": created.id, "state": "UPLOADING", "segments_done": 2,
            "bytes_done": 2048, "error": "", "update_time": 1234.5}

        await put_progress(world, created.id, "a/00", "FAILED", 2, 2048, error="disk full",
                           at=1300.0)
        progress = await meta.get_upload_progress("pics", "a/00")
        assert (progress["state"], progress["error"], progress["update_time"]) == (
            "FAILED", "disk full", 1300.0)

        sealed = await meta.get_object_meta("pics", SEALED)
        assert await meta.get_upload_progress("pics", SEALED) == {
            "object_id": sealed.id, "state": "SEALED", "segments_done": 0,
            "bytes_done": sealed.size, "error": "", "update_time": None}
        # the chain is the authority: a sealed object is SEALED whatever the row says
        await put_progress(world, sealed.id, SEALED, "REPLICATING", 1, sealed.size)
        progress = await meta.get_upload_progress("pics", SEALED)
        assert progress["state"] == "SEALED" and progress["segments_done"] == 1

        with pytest.raises(ServiceError) as info:
            await meta.get_upload_progress("pics", "nokey")
        expect_error(info, "NoSuchKey", 404)
        with pytest.raises(ServiceError) as info:
            await meta.get_upload_progress("nobucket", "a/00")
        expect_error(info, "NoSuchBucket", 404)


# --- read records --------------------------------------------------------------------------

async def test_read_records(world: World) -> None:
    meta = world.meta
    now = [1000.0]
    meta.wall_clock = lambda: now[0]
    user, stranger = world.tpl.user.address, world.tpl.stranger.address
    with trio.fail_after(TIMEOUT):
        ids = []
        for i in range(7):
            ids.append(await meta.record_read("pics", 10 + i, user if i % 2 else stranger,
                                              100 * i))
            now[0] += 1.0
        await meta.record_read("empty", 99, user, 5)
        assert ids == sorted(ids) and len(set(ids)) == 7

        first = await meta.list_read_records("pics", limit=2)
        assert first == [ReadRecord(id=ids[0], bucket="pics", object_id=10, account=stranger,
                                    bytes=0, ts=1000.0),
                         ReadRecord(id=ids[1], bucket="pics", object_id=11, account=user,
                                    bytes=100, ts=1001.0)]
        # capped at max_page
        assert [r.id for r in await meta.list_read_records("pics")] == ids[:MAX_PAGE]
        assert [r.id for r in await meta.list_read_records("pics", limit=100)] == ids[:MAX_PAGE]
        # since is inclusive
        later = await meta.list_read_records("pics", since=1004.0)
        assert [r.id for r in later] == ids[4:]
        assert [r.object_id for r in later] == [14, 15, 16]
        assert await meta.list_read_records("pics", since=2000.0) == []
        assert [r.bytes for r in await meta.list_read_records("empty")] == [5]
        assert await meta.list_read_records("nobucket") == []
        with pytest.raises(ValueError, match="nbytes"):
            await meta.record_read("pics", 1, user, -1)
        with pytest.raises(ServiceError) as info:
            await meta.list_read_records("pics", limit=-5)
        expect_error(info, "InvalidArgument", 400)


async def test_read_records_use_the_wall_clock(world: World) -> None:
    with trio.fail_after(TIMEOUT):
        await world.meta.record_read("pics", 1, world.tpl.user.address, 10)
        (record,) = await world.meta.list_read_records("pics")
    assert abs(record.ts - time.time()) < 60


# --- the chain is down ---------------------------------------------------------------------

async def test_chain_down_is_503(world: World) -> None:
    meta = world.meta
    user = world.tpl.user.address
    with trio.fail_after(TIMEOUT):
        await world.stop_chain()
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: meta.list_buckets(user), lambda: meta.list_objects("pics"),
            lambda: meta.get_bucket_meta("pics"), lambda: meta.get_object_meta("pics", "a/00"),
            lambda: meta.get_upload_progress("pics", "a/00")]
        for call in calls:
            with pytest.raises(ServiceUnavailable) as info:
                await call()
            expect_error(info, "SlowDown", 503)  # type: ignore[arg-type]
        # read records live in SPDB: they work without the chain
        await meta.record_read("pics", 1, user, 10)
        assert len(await meta.list_read_records("pics")) == 1
        world.ctx.chain = None
        with pytest.raises(ServiceUnavailable):
            await meta.get_bucket_meta("pics")
