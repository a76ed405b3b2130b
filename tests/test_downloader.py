"""Tests of modulars/downloader.py.

Two worlds, both with a real SPDB and a real LocalPieceStore under tmp_path:

* ``chain_world``: a real devchain on 127.0.0.1 (port 0). The primary stores the object with
  the real Uploader, every secondary receives its pieces with the real Receiver and answers
  challenges with its own Downloader; the object is sealed with the secondaries' signatures.
  Degraded reads there go through the secondaries' challenge handlers in process (encoded and
  decoded with the wire helpers; the HTTP path is the end-to-end tests').
* ``world``: :class:`FakeChain`, an in-memory stand-in for the chain client (the downloader only
  reads objects, buckets, SPs and params), and :class:`FakeSecondaries`, an injected piece
  fetcher whose secondaries can be missing, lying or silent; timing tests use autojump_clock
  (and no fail_after, since the clock jumps while worker threads run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import sqlite3
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from modulars.downloader import (
    CHALLENGE_ROUTE,
    YIELD_SLICE,
    ChallengeResponseError,
    Downloader,
    PieceFetchError,
    RangeNotSatisfiable,
    challenge_path,
    content_length,
    content_range,
    decode_challenge,
    decode_challenge_binary,
    encode_challenge,
    encode_challenge_binary,
    parse_range,
    wants_binary_challenge,
)
from modulars.metadata import Metadata
from modulars.receiver import Receiver
from modulars.signer import Signer
from modulars.uploader import Uploader
from node import chain_msgs as msgs
from node.app import build_limiter
from node.auth import AUTHORIZATION_HEADER, SCHEME
from node.chain import ChainBucket, ChainObject, DevChainClient
from node.config import Config
from node.crypto import PrivateKey, pack
from node.db import open_spdb
from node.ec import Codec, integrity_hash, object_checksums, sha256, split
from node.errors import ServiceError
from node.modular import Modulars, NodeContext
from node.piecestore import LocalPieceStore, PieceNotFound, PieceStoreError, piece_key, segment_key
from node.rcmgr import Limit, ResourceLimiter
from node.spregistry import SPInfo
from node.tasks import (
    ChallengePieceTask,
    DownloadObjectTask,
    ReceivePieceTask,
    StorageParams,
)
from testnet.devchain import DevChain
from testnet.devchain.testing import Account, TestSP, seal_tx

PARAMS = StorageParams(segment_size=1024, data_shards=2, parity_shards=2, max_payload=1 << 20)
SEG = PARAMS.segment_size
SIZE = 3 * SEG + 300  # four segments, the last one short
DATA = random.Random(7).randbytes(SIZE)
SEGMENTS = split(DATA, SEG)
CHECKSUMS = object_checksums(SEGMENTS, PARAMS.data_shards, PARAMS.parity_shards)
CODEC = Codec(PARAMS.data_shards, PARAMS.parity_shards)
PIECES = [CODEC.encode(s) for s in SEGMENTS]  # PIECES[segment][index]
BLOCK = 0.05
TIMEOUT = 30


def expect(info: pytest.ExceptionInfo[ServiceError], code: str, status: int) -> None:
    assert (info.value.code, info.value.status) == (code, status), info.value


def flip(data: bytes) -> bytes:
    return bytes([data[0] ^ 0xFF]) + data[1:]


class CountingStore:
    """A piece store wrapper that records the key of every read (``get``, ``read_into``)."""

    def __init__(self, inner: LocalPieceStore) -> None:
        self.inner = inner
        self.gets: list[str] = []

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        self.gets.append(key)
        return await self.inner.get(key, offset, length)

    async def read_into(self, key: str, view: memoryview, offset: int = 0) -> int:
        self.gets.append(key)
        return await self.inner.read_into(key, view, offset)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def segments_read(store: CountingStore, object_id: int) -> list[int]:
    prefix = f"{object_id}_s"
    return [int(k[len(prefix):]) for k in store.gets if k.startswith(prefix) and "_p" not in k]


async def read_all(dl: Downloader, task: DownloadObjectTask) -> bytes:
    """pre, handle, post as the gater runs them."""
    try:
        await dl.pre_download_object(task)
        return b"".join([chunk async for chunk in dl.handle_download_object_task(task)])
    finally:
        dl.post_download_object(task)


async def challenge(dl: Downloader, object_id: int, segment: int, index: int
                    ) -> tuple[bytes, list[bytes], bytes]:
    task = await dl.make_challenge_task(object_id, segment, index)
    try:
        await dl.pre_challenge_piece(task)
        return await dl.handle_challenge_piece(task)
    finally:
        dl.post_challenge_piece(task)


def verify_against_chain(obj: ChainObject, segment: int, index: int,
                         answer: tuple[bytes, list[bytes], bytes]) -> None:
    """What any verifier checks of a challenge answer."""
    piece, checksums, integrity = answer
    assert integrity == obj.checksums[0 if index == -1 else 1 + index]
    assert integrity_hash(checksums) == integrity
    assert sha256(piece) == checksums[segment]


async def node_context(stack: AsyncExitStack, tmp: Path, keys: Any, chain: Any,
                       config: Config | None = None) -> NodeContext:
    config = config or Config()
    await trio.Path(tmp).mkdir(parents=True, exist_ok=True)
    db = await stack.enter_async_context(open_spdb(tmp / "spdb.sqlite3"))
    store = CountingStore(await LocalPieceStore.create(tmp / "pieces", fsync=False))
    ctx = NodeContext(config=config, limiter=build_limiter(config), db=db, keys=keys,
                      chain=chain, piecestore=store, modulars=Modulars())  # type: ignore[arg-type]
    ctx.modulars.mark_running(Signer(ctx))
    return ctx


async def start(nursery: trio.Nursery, modular: Any) -> Any:
    await nursery.start(modular.serve)
    modular.ctx.modulars.mark_running(modular)
    return modular


# --- parse_range ------------------------------------------------------------------------------

@pytest.mark.parametrize(("header", "size", "expected"), [
    (None, 100, None),
    (None, 0, None),  # a 0-byte object without Range: the (empty) whole object
    ("", 100, None),
    ("items=0-5", 100, None),  # another unit is ignored (RFC 7233 3.1)
    ("bytes=0-0", 100, (0, 0)),
    ("bytes=0-99", 100, (0, 99)),
    ("bytes=10-20", 100, (10, 20)),
    ("bytes=10-1000", 100, (10, 99)),  # clamped to the end
    ("bytes=99-", 100, (99, 99)),
    ("bytes=0-", 100, (0, 99)),
    ("bytes=-1", 100, (99, 99)),
    ("bytes=-30", 100, (70, 99)),
    ("bytes=-1000", 100, (0, 99)),
    ("Bytes = 5-6 ", 100, (5, 6)),
    ("bytes=5-" + "9" * 5000, 100, (5, 99)),  # past Python's int() digit limit: the end
    ("bytes=-" + "9" * 5000, 100, (0, 99)),
    # empty list elements (RFC 9110 5.6.1; found in review: 416)
    ("bytes=0-4,", 100, (0, 4)),
    ("bytes= , 5-6 ,,", 100, (5, 6)),
])
def test_parse_range(header: str | None, size: int, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(("header", "size"), [
    ("bytes=100-", 100),  # starts at the end
    ("bytes=100-200", 100),
    ("bytes=0-0", 0),  # any range of a 0-byte object
    ("bytes=-5", 0),
    ("bytes=-0", 100),
    ("bytes=5-4", 100),  # last < first
    ("bytes=-", 100),
    ("bytes=", 100),
    ("bytes=a-b", 100),
    ("bytes=+1-2", 100),
    ("bytes=1-2-3", 100),
    ("bytes=0-1,4-5", 100),  # several ranges: not served
    ("bytes=,", 100),  # no range at all
    ("bytes=٣-٤", 100),  # non-ASCII digits
    ("bytes", 100),
    ("bytes=" + "9" * 5000 + "-", 100),  # past any end (and Python's int() digit limit)
    ("bytes=" + "9" * 25 + "-" + "9" * 24, 100),
])
def test_parse_range_unsatisfiable(header: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiable) as info:
        parse_range(header, size)
    expect(info, "InvalidRange", 416)  # type: ignore[arg-type]
    assert info.value.size == size
    assert info.value.headers == {"content-range": f"bytes */{size}"}


# --- the challenge wire format ----------------------------------------------------------------

def test_challenge_wire_round_trip() -> None:
    piece, sums = b"\x00piece\xff", [sha256(b"a"), sha256(b"b")]
    body = json.dumps(encode_challenge(piece, sums, integrity_hash(sums)))
    assert set(json.loads(body)) == {"piece", "checksums", "integrity_hash"}
    assert decode_challenge(body) == (piece, sums, integrity_hash(sums))
    assert decode_challenge(body.encode()) == (piece, sums, integrity_hash(sums))
    assert challenge_path(7, 3, -1) == "/gfsp/v1/challenge/7/3/-1"
    assert CHALLENGE_ROUTE == "/gfsp/v1/challenge/{object_id}/{segment}/{index}"


@pytest.mark.parametrize("body", [
    b"not json", b"[]", b"{}",
    json.dumps({"piece": "!!", "checksums": [], "integrity_hash": "00" * 32}),
    json.dumps({"piece": "", "checksums": ["zz"], "integrity_hash": "00" * 32}),
    json.dumps({"piece": "", "checksums": "00", "integrity_hash": "00" * 32}),
    json.dumps({"piece": "", "checksums": [], "integrity_hash": "00" * 31}),
    json.dumps({"piece": 5, "checksums": [], "integrity_hash": "00" * 32}),
    json.dumps({"piece": "", "checksums": [], "integrity_hash": "00" * 32, "extra": 1}),
])
def test_challenge_wire_rejects_garbage(body: str | bytes) -> None:
    with pytest.raises(ChallengeResponseError):
        decode_challenge(body)


def test_binary_challenge_wire_round_trip() -> None:
    piece, sums = b"\x00piece\xff" * 100, [sha256(b"a"), sha256(b"b"), sha256(b"c")]
    headers, parts = encode_challenge_binary(piece, sums, integrity_hash(sums))
    assert parts[1] is piece  # the piece is not copied
    body = b"".join(parts)
    assert int(headers["content-length"]) == len(body) == 3 * 32 + len(piece)
    assert decode_challenge_binary(headers, body) == (piece, sums, integrity_hash(sums))
    assert decode_challenge_binary(headers, bytearray(body)) == (piece, sums,
                                                                 integrity_hash(sums))
    assert wants_binary_challenge("application/octet-stream")
    assert wants_binary_challenge("application/json;q=0.1, Application/Octet-Stream")
    assert not wants_binary_challenge("application/json") and not wants_binary_challenge("")


@pytest.mark.parametrize(("headers", "body"), [
    ({}, b""),
    ({"x-gfsp-integrity-hash": "00" * 31, "x-gfsp-checksum-count": "0"}, b""),
    ({"x-gfsp-integrity-hash": "zz" * 32, "x-gfsp-checksum-count": "0"}, b""),
    ({"x-gfsp-integrity-hash": "00" * 32}, b""),
    ({"x-gfsp-integrity-hash": "00" * 32, "x-gfsp-checksum-count": "-1"}, b""),
    ({"x-gfsp-integrity-hash": "00" * 32, "x-gfsp-checksum-count": "2"}, b"\0" * 63),
    ({"x-gfsp-integrity-hash": "00" * 32, "x-gfsp-checksum-count": "9" * 13}, b""),
])
def test_binary_challenge_wire_rejects_garbage(headers: dict[str, str], body: bytes) -> None:
    with pytest.raises(ChallengeResponseError):
        decode_challenge_binary(headers, body)


# --- the devchain world -----------------------------------------------------------------------

@dataclass
class Node:
    sp: TestSP
    ctx: NodeContext
    downloader: Downloader

    @property
    def store(self) -> CountingStore:
        return self.ctx.piecestore  # type: ignore[return-value]


@dataclass
class ChainWorld:
    client: DevChainClient
    primary: Node
    secondaries: list[Node]
    object: ChainObject
    pending_id: int  # an object created but never sealed

    def by_operator(self, operator: str) -> Node:
        return next(n for n in self.secondaries if n.sp.address == operator)

    async def fetch_in_process(self, operator: str, endpoint: str, object_id: int,
                               segment: int, index: int, hold: contextlib.ExitStack
                               ) -> tuple[bytes, list[bytes], bytes]:
        """A fetcher that asks the secondary's own downloader, through the JSON format."""
        node = self.by_operator(operator)
        assert endpoint == node.sp.endpoint
        answer = await challenge(node.downloader, object_id, segment, index)
        return decode_challenge(json.dumps(encode_challenge(*answer)).encode())


async def _broadcast_user(client: DevChainClient, user: Account, build: Any, **kw: Any
                          ) -> dict[str, Any]:
    return await client.broadcast(msgs.sign(user.key, build(
        pubkey=user.pubkey, seq=user.take_seq(), **kw)))


@pytest.fixture
async def chain_world(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[ChainWorld]:
    with trio.fail_after(TIMEOUT):
        devchain = DevChain(tmp_path / "chain", block_interval=BLOCK, params=PARAMS)
        endpoint = await nursery.start(devchain.serve)
    async with (DevChainClient(endpoint, request_timeout=5) as client,
                AsyncExitStack() as stack):
        with trio.fail_after(TIMEOUT):
            sps = [TestSP.create(i) for i in range(1 + PARAMS.total_shards)]
            for sp in sps:
                await client.broadcast(sp.register_tx())
            user = Account(PrivateKey.generate())
            height = await client.current_height()
            await _broadcast_user(client, user, msgs.create_bucket_tx, bucket="bkt",
                                  primary_sp=sps[0].address,
                                  approval=sps[0].bucket_approval(user.address, "bkt",
                                                                  height + 1000))
            ids = {}
            for name in ("o", "pending"):
                approval = sps[0].object_approval(user.address, "bkt", name, SIZE, CHECKSUMS,
                                                  height + 1000)
                result = await _broadcast_user(
                    client, user, msgs.create_object_tx, bucket="bkt", object=name, size=SIZE,
                    content_type="application/octet-stream", checksums=CHECKSUMS,
                    approval=approval)
                ids[name] = int(result["object_id"])

            nodes = []
            for i, sp in enumerate(sps):
                ctx = await node_context(stack, tmp_path / f"sp{i}", sp.keys, client)
                ctx.modulars.mark_running(Metadata(ctx))
                nodes.append(Node(sp, ctx, Downloader(ctx)))
            primary, secondaries = nodes[0], nodes[1:]

            # the primary stores the payload with the real uploader
            uploader = Uploader(primary.ctx)
            task = await uploader.make_task("bkt", "o")
            await uploader.pre_upload_object(task)
            try:
                async def body() -> AsyncIterator[bytes]:
                    for i in range(0, SIZE, 700):
                        yield DATA[i:i + 700]
                await uploader.handle_upload_object_task(task, body())
            finally:
                uploader.post_upload_object(task)

            # each secondary receives its index with the real receiver and signs it
            sigs = []
            for index, node in enumerate(secondaries):
                receiver = Receiver(node.ctx)
                rtask = ReceivePieceTask(object=task.object, params=PARAMS,
                                         redundancy_index=index, user_address=sps[0].address)
                for segment, pieces in enumerate(PIECES):
                    await receiver.handle_receive_piece_task(rtask, segment, pieces[index])
                signature, _ = await receiver.handle_done_receive_piece_task(rtask)
                sigs.append(signature)
            sps[0].sealer.seq = await client.account_seq(sps[0].keys.seal.address)
            await client.broadcast(seal_tx(sps[0], ids["o"], sps[1:], CHECKSUMS, sigs=sigs))
            obj = await client.get_object_by_id(ids["o"])
            assert obj is not None and obj.sealed

            world = ChainWorld(client, primary, secondaries, obj, ids["pending"])
            primary.downloader.fetch_piece = world.fetch_in_process
            for node in nodes:
                await start(nursery, node.downloader)
        yield world
        for node in nodes:
            node.ctx.modulars.mark_stopped("downloader")
        devchain.shutdown()


RANGES = [
    # (Range header, expected (low, high), segments read)
    (None, (0, SIZE - 1), [0, 1, 2, 3]),
    ("bytes=0-0", (0, 0), [0]),
    ("bytes=1000-1100", (1000, 1100), [0, 1]),  # across one boundary
    ("bytes=1023-2048", (1023, 2048), [0, 1, 2]),  # two boundaries, one byte on each end
    ("bytes=1024-2047", (1024, 2047), [1]),  # exactly one segment
    ("bytes=2048-", (2048, SIZE - 1), [2, 3]),
    ("bytes=-100", (SIZE - 100, SIZE - 1), [3]),
    ("bytes=5-999999", (5, SIZE - 1), [0, 1, 2, 3]),
]


async def test_full_and_range_reads_on_devchain(chain_world: ChainWorld) -> None:
    w = chain_world
    dl, store = w.primary.downloader, w.primary.store
    with trio.fail_after(TIMEOUT):
        for header, (low, high), segments in RANGES:
            task, partial = await dl.make_task("bkt", "o", range_header=header,
                                               user_address="0xreader")
            assert partial == (header is not None)
            assert (task.low, task.high) == (low, high)
            assert content_length(task) == high - low + 1
            assert content_range(task) == f"bytes {low}-{high}/{SIZE}"
            store.gets.clear()
            assert await read_all(dl, task) == DATA[low:high + 1], header
            assert segments_read(store, w.object.id) == segments, header
        with pytest.raises(RangeNotSatisfiable):
            await dl.make_task("bkt", "o", range_header=f"bytes={SIZE}-")
        with pytest.raises(ServiceError) as info:
            await dl.make_task("bkt", "pending")
        expect(info, "InvalidObjectState", 409)
        with pytest.raises(ServiceError) as info:
            await dl.make_task("bkt", "nothing")
        expect(info, "NoSuchKey", 404)
        with pytest.raises(ServiceError) as info:
            await dl.make_task("nobucket", "o")
        expect(info, "NoSuchBucket", 404)
        await dl.wait_background()
        records = await w.primary.ctx.modulars.metadata.list_read_records("bkt")
    assert [r.bytes for r in records] == [high - low + 1 for _, (low, high), _ in RANGES]
    assert {(r.account, r.object_id) for r in records} == {("0xreader", w.object.id)}
    assert dl.stats["degraded_reads"] == 0 and dl.stats["downloads"] == len(RANGES)
    assert dl.query_tasks() == []  # nothing left in flight
    assert w.primary.ctx.limiter.used("downloader").memory == 0


async def test_challenges_verify_against_the_chain(chain_world: ChainWorld) -> None:
    w = chain_world
    with trio.fail_after(TIMEOUT):
        for segment in range(len(SEGMENTS)):
            answer = await challenge(w.primary.downloader, w.object.id, segment, -1)
            verify_against_chain(w.object, segment, -1, answer)
            assert answer[0] == SEGMENTS[segment]
            for index, node in enumerate(w.secondaries):
                answer = await challenge(node.downloader, w.object.id, segment, index)
                # through the wire format too
                answer = decode_challenge(json.dumps(encode_challenge(*answer)))
                verify_against_chain(w.object, segment, index, answer)
                assert answer[0] == PIECES[segment][index]
    assert w.secondaries[0].downloader.stats["challenges"] == len(SEGMENTS)


async def test_challenge_authorization(chain_world: ChainWorld) -> None:
    w = chain_world
    oid = w.object.id
    with trio.fail_after(TIMEOUT):
        cases = [(w.primary, 0), (w.secondaries[0], 1), (w.secondaries[0], -1),
                 (w.secondaries[3], 2)]
        for node, index in cases:
            with pytest.raises(ServiceError) as info:
                await challenge(node.downloader, oid, 0, index)
            expect(info, "AccessDenied", 403)
        with pytest.raises(ServiceError) as info:
            await challenge(w.secondaries[1].downloader, oid, len(SEGMENTS), 1)
        expect(info, "InvalidArgument", 400)
        with pytest.raises(ServiceError) as info:
            await challenge(w.secondaries[1].downloader, oid, 0, PARAMS.total_shards)
        expect(info, "InvalidArgument", 400)
        with pytest.raises(ServiceError) as info:
            await challenge(w.primary.downloader, w.pending_id, 0, -1)
        expect(info, "InvalidObjectState", 409)
        with pytest.raises(ServiceError) as info:
            await challenge(w.primary.downloader, 10**9, 0, -1)
        expect(info, "NoSuchKey", 404)
        # a secondary is not the primary: it refuses downloads
        task, _ = await w.secondaries[0].downloader.make_task("bkt", "o")
        with pytest.raises(ServiceError) as info:
            await read_all(w.secondaries[0].downloader, task)
        expect(info, "AccessDenied", 403)
    for node in [w.primary, *w.secondaries]:
        assert node.ctx.limiter.used("downloader").memory == 0


async def test_degraded_read_through_the_secondaries(chain_world: ChainWorld) -> None:
    w = chain_world
    oid, store = w.object.id, w.primary.store
    with trio.fail_after(TIMEOUT):
        await store.delete(segment_key(oid, 0))
        await store.put(segment_key(oid, 3), flip(SEGMENTS[3]))
        # the holder of data index 0 lost its piece of segment 0: a parity piece replaces it
        await w.secondaries[0].store.delete(piece_key(oid, 0, 0))
        task, _ = await w.primary.downloader.make_task("bkt", "o")
        assert await read_all(w.primary.downloader, task) == DATA
        await w.primary.downloader.wait_background()
        assert await store.inner.get(segment_key(oid, 0)) == SEGMENTS[0]
        assert await store.inner.get(segment_key(oid, 3)) == SEGMENTS[3]
        # the secondary that lost its piece answered its challenge with a logged 500
        assert w.secondaries[0].downloader.stats["challenge_failures"] == 1
        assert w.primary.downloader.stats["degraded_reads"] == 2
        assert w.primary.downloader.stats["repairs"] == 2
        # repaired: the next read is local
        w.primary.downloader.stats.clear()
        task, _ = await w.primary.downloader.make_task("bkt", "o")
        assert await read_all(w.primary.downloader, task) == DATA
        assert w.primary.downloader.stats["degraded_reads"] == 0


# --- the fake-chain world ---------------------------------------------------------------------

class FakeChain:
    """An in-memory FAKE of the chain client: objects, buckets, SPs and params only."""

    def __init__(self) -> None:
        self.objects: dict[int, ChainObject] = {}
        self.buckets: dict[str, ChainBucket] = {}
        self.sps: dict[str, SPInfo] = {}

    async def params(self) -> StorageParams:
        return PARAMS

    async def current_height(self) -> int:
        return 100

    async def get_sp(self, operator: str) -> SPInfo | None:
        return self.sps.get(operator)

    async def get_bucket(self, name: str) -> ChainBucket | None:
        return self.buckets.get(name)

    async def get_object(self, bucket: str, name: str) -> ChainObject | None:
        return next((o for o in self.objects.values()
                     if (o.bucket, o.name) == (bucket, name)), None)

    async def get_object_by_id(self, object_id: int) -> ChainObject | None:
        self.object_reads += 1
        return self.objects.get(object_id)

    object_reads = 0


@dataclass
class FakeSecondaries:
    """A fake piece fetcher: secondary ``i`` answers with piece ``i`` unless ``mode[i]`` says
    it is missing, lying or slow."""

    chain: FakeChain
    object_id: int
    mode: dict[int, str] = field(default_factory=dict)
    delay: float = 0.0
    calls: list[tuple[int, int]] = field(default_factory=list)  # (segment, index)

    async def fetch(self, operator: str, endpoint: str, object_id: int, segment: int,
                    index: int, hold: contextlib.ExitStack) -> tuple[bytes, list[bytes], bytes]:
        obj = self.chain.objects[object_id]
        assert operator == obj.secondaries[index]
        assert endpoint == self.chain.sps[operator].endpoint
        self.calls.append((segment, index))
        piece = PIECES[segment][index]
        sums = [sha256(p[index]) for p in PIECES]
        integrity = integrity_hash(sums)
        mode = self.mode.get(index, "ok")
        if mode == "missing":
            raise PieceFetchError("HTTP 500")
        if mode == "garbage":
            raise ChallengeResponseError("not JSON")
        if mode == "crash":
            raise RuntimeError("a bug in a fetcher")
        if mode == "silent":
            await trio.sleep_forever()
        if mode == "slow":
            await trio.sleep(self.delay)
        if mode == "bad_piece":  # genuine list, wrong bytes
            piece = flip(piece)
        elif mode == "forged_list":  # wrong bytes with a list made up to match them
            piece = flip(piece)
            sums[segment] = sha256(piece)
            integrity = integrity_hash(sums)
        elif mode == "bad_list":  # claims the chain's integrity hash over a changed list
            sums[segment] = sha256(flip(piece))
        elif mode == "other_index":  # a genuine piece of another index
            other = (index + 1) % PARAMS.total_shards
            piece = PIECES[segment][other]
            sums = [sha256(p[other]) for p in PIECES]
            integrity = integrity_hash(sums)
        elif mode == "short":
            piece = piece[:-1]
            sums[segment] = sha256(piece)
        return piece, sums, integrity


@dataclass
class World:
    chain: FakeChain
    ctx: NodeContext
    dl: Downloader
    secondaries: FakeSecondaries
    object: ChainObject
    sps: list[TestSP]

    @property
    def store(self) -> CountingStore:
        return self.ctx.piecestore  # type: ignore[return-value]

    async def read(self, low: int = 0, high: int = SIZE - 1,
                   object_id: int | None = None) -> bytes:
        obj = self.chain.objects[self.object.id if object_id is None else object_id]
        bucket = self.chain.buckets[obj.bucket]
        task = DownloadObjectTask(object=obj.info, bucket=bucket.info, params=PARAMS,
                                  low=low, high=high, user_address="0xreader")
        return await read_all(self.dl, task)

    async def segment_on_disk(self, segment: int) -> bytes | None:
        try:
            return await self.store.inner.get(segment_key(self.object.id, segment))
        except PieceNotFound:
            return None


def chain_object(oid: int, name: str, secondaries: list[TestSP], *, size: int = SIZE,
                 checksums: list[bytes] = CHECKSUMS, status: str = "SEALED") -> ChainObject:
    return ChainObject(id=oid, bucket="bkt", name=name, owner="0xowner", size=size,
                       content_type="application/octet-stream", checksums=tuple(checksums),
                       status=status, create_height=1, seal_height=2,
                       secondaries=tuple(sp.address for sp in secondaries),
                       secondary_sigs=tuple(b"" for _ in secondaries))


async def store_primary(ctx: NodeContext, object_id: int) -> None:
    """Store the object as the uploader does: segments, integrity_meta -1, piece_hashes."""
    assert ctx.piecestore is not None
    hashes = [sha256(s) for s in SEGMENTS]
    for i, s in enumerate(SEGMENTS):
        await ctx.piecestore.put(segment_key(object_id, i), s)

    def write(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO integrity_meta (object_id, redundancy_index, integrity_hash, "
                     "checksums, signature) VALUES (?, -1, ?, ?, NULL)",
                     (object_id, integrity_hash(hashes), pack(hashes)))
        conn.executemany("INSERT INTO piece_hashes (object_id, segment, redundancy_index, "
                         "checksum) VALUES (?, ?, -1, ?)",
                         [(object_id, i, h) for i, h in enumerate(hashes)])

    await ctx.db.run(write)


@pytest.fixture
async def world(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[World]:
    sps = [TestSP.create(i) for i in range(1 + PARAMS.total_shards)]
    chain = FakeChain()
    for sp in sps:
        chain.sps[sp.address] = sp.info
    chain.buckets["bkt"] = ChainBucket(id=1, name="bkt", owner="0xowner", primary_sp=sps[0].address,
                                     create_height=1)
    obj = chain_object(7, "o", sps[1:])
    chain.objects[7] = obj
    async with AsyncExitStack() as stack:
        ctx = await node_context(stack, tmp_path, sps[0].keys, chain)
        await store_primary(ctx, obj.id)
        secondaries = FakeSecondaries(chain, obj.id)
        dl = Downloader(ctx, fetch_piece=secondaries.fetch)
        await start(nursery, Metadata(ctx))
        await start(nursery, dl)
        yield World(chain, ctx, dl, secondaries, obj, sps)
        ctx.modulars.mark_stopped("downloader")


async def test_modular_shape(world: World) -> None:
    assert world.dl.name == "downloader" and world.dl.requires == ("signer",)
    assert world.ctx.modulars.downloader is world.dl
    assert "challenge" in world.dl.description


async def test_missing_segment_is_read_from_the_secondaries_and_repaired(world: World) -> None:
    oid = world.object.id
    await world.store.delete(segment_key(oid, 1))
    assert await world.read(1000, 2100) == DATA[1000:2101]
    # only the missing segment went to the secondaries, data indices first
    assert sorted(world.secondaries.calls) == [(1, 0), (1, 1)]
    assert segments_read(world.store, oid) == [0, 1, 2]
    await world.dl.wait_background()
    assert await world.segment_on_disk(1) == SEGMENTS[1]
    assert world.dl.stats["repairs"] == 1 and world.dl.stats["degraded_reads"] == 1
    # the next read is local
    world.secondaries.calls.clear()
    assert await world.read() == DATA
    assert world.secondaries.calls == []


async def test_corrupt_segment_is_read_from_the_secondaries_and_repaired(world: World
                                                                         ) -> None:
    oid = world.object.id
    await world.store.put(segment_key(oid, 2), flip(SEGMENTS[2]))
    await world.store.put(segment_key(oid, 3), SEGMENTS[3] + b"x")  # too long
    assert await world.read() == DATA
    assert sorted({s for s, _ in world.secondaries.calls}) == [2, 3]
    await world.dl.wait_background()
    assert await world.segment_on_disk(2) == SEGMENTS[2]
    assert await world.segment_on_disk(3) == SEGMENTS[3]
    assert world.dl.stats["repairs"] == 2


async def test_unreadable_segment_is_read_from_the_secondaries_and_repaired(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk error reading the primary's segment (EIO) is a degraded read, not a 500
    (found in review: only a missing or corrupt segment was)."""
    oid = world.object.id
    real = world.store.read_into
    bad = segment_key(oid, 1)

    async def failing(key: str, view: memoryview, offset: int = 0) -> int:
        if key == bad:
            monkeypatch.setattr(world.store, "read_into", real)  # the disk heals
            raise PieceStoreError(f"cannot read piece {key}: [Errno 5] Input/output error")
        return await real(key, view, offset)

    monkeypatch.setattr(world.store, "read_into", failing)
    assert await world.read() == DATA
    assert sorted({s for s, _ in world.secondaries.calls}) == [1]
    await world.dl.wait_background()
    assert await world.segment_on_disk(1) == SEGMENTS[1]
    assert world.dl.stats["degraded_reads"] == 1 and world.dl.stats["repairs"] == 1


async def test_a_bug_in_a_repair_is_counted_and_the_downloader_goes_on(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected error in the background repair is logged and counted; it used to end
    the downloader's nursery, and with it the node (found in review)."""
    oid = world.object.id
    await world.store.delete(segment_key(oid, 1))

    async def buggy_put(key: str, data: Any, **kw: Any) -> None:
        raise KeyError("a bug")

    monkeypatch.setattr(world.store, "put", buggy_put)
    assert await world.read() == DATA
    await world.dl.wait_background()
    assert world.dl.stats["repair_failures"] == 1
    assert world.ctx.modulars.is_running("downloader")
    assert await world.read() == DATA  # still served (degraded again)


@pytest.mark.parametrize("lie", ["bad_piece", "forged_list", "bad_list", "other_index", "short",
                                 "missing", "garbage", "crash"])
async def test_lying_or_failing_secondaries_are_skipped(world: World, lie: str) -> None:
    world.secondaries.mode = {0: lie, 2: lie}  # a data and a parity index
    await world.store.delete(segment_key(world.object.id, 0))
    assert await world.read(0, 99) == DATA[:100]
    # 0 refused, then 2 refused, then 1 and 3 decode (a parity piece is needed)
    assert sorted(i for _, i in world.secondaries.calls) == [0, 1, 2, 3]
    assert world.dl.stats["pieces_refused"] == 2
    await world.dl.wait_background()
    assert await world.segment_on_disk(0) == SEGMENTS[0]


async def test_fewer_than_k_good_pieces_is_503(world: World) -> None:
    world.secondaries.mode = {0: "missing", 1: "bad_piece", 2: "forged_list"}
    oid = world.object.id
    await world.store.delete(segment_key(oid, 1))
    with pytest.raises(ServiceError) as info:
        await world.read()
    expect(info, "SlowDown", 503)
    assert "1 of 2 pieces" in info.value.message
    await world.dl.wait_background()
    assert await world.segment_on_disk(1) is None  # nothing written from bad pieces
    assert world.dl.stats["downloads_failed"] == 1
    assert world.ctx.limiter.used("downloader").memory == 0
    # the read stopped at the failed segment: segment 0 was served and recorded
    records = await world.ctx.modulars.metadata.list_read_records("bkt")
    assert [r.bytes for r in records] == [SEG]


async def test_silent_secondaries_hit_the_deadline(world: World, autojump_clock: Any) -> None:
    world.secondaries.mode = dict.fromkeys(range(PARAMS.total_shards), "silent")
    await world.store.delete(segment_key(world.object.id, 0))
    began = trio.current_time()
    with pytest.raises(ServiceError) as info:
        await world.read(0, 10)
    expect(info, "SlowDown", 503)
    timeout = float(world.ctx.config.downloader.degraded_read_timeout)
    assert trio.current_time() - began == pytest.approx(timeout, abs=1.0)
    assert "silent" in info.value.message


async def test_a_slow_secondary_is_hedged(world: World, autojump_clock: Any) -> None:
    world.secondaries.mode = {0: "silent"}
    await world.store.delete(segment_key(world.object.id, 0))
    began = trio.current_time()
    assert await world.read(0, 10) == DATA[:11]
    elapsed = trio.current_time() - began
    assert elapsed == pytest.approx(world.dl.hedge_after, abs=0.5)
    assert sorted(i for _, i in world.secondaries.calls) == [0, 1, 2]
    await world.dl.wait_background()
    assert await world.segment_on_disk(0) == SEGMENTS[0]


async def test_degraded_read_with_a_secondary_down_overlaps_segments(
        world: World, autojump_clock: Any) -> None:
    """Every segment is rebuilt (the primary lost them all) while the holder of data index 0
    is down: each segment's pieces are asked at once (a parity piece replaces the missing
    one as soon as it fails), and the next segment is rebuilt while one is sent."""
    oid = world.object.id
    for segment in range(len(SEGMENTS)):
        await world.store.delete(segment_key(oid, segment))
    world.secondaries.mode = dict.fromkeys(range(1, PARAMS.total_shards), "slow")
    world.secondaries.mode[0] = "missing"
    delay = world.secondaries.delay = world.dl.hedge_after / 4
    # (no timings asserted: the autojump clock also jumps while worker threads run)
    obj = world.chain.objects[oid]
    task = DownloadObjectTask(object=obj.info, bucket=world.chain.buckets["bkt"].info,
                              params=PARAMS, low=0, high=SIZE - 1, user_address="0xreader")
    chunks = []
    ahead = []  # while the client holds segment n: was segment n + 1 being read already?
    world.store.gets.clear()
    calls = world.secondaries.calls
    await world.dl.pre_download_object(task)
    try:
        async for chunk in world.dl.handle_download_object_task(task):
            segment = len(chunks)
            chunks.append(chunk)
            await trio.sleep(delay)  # a client that takes as long as a fetch per segment
            ahead.append(segment + 1 in segments_read(world.store, oid))
    finally:
        world.dl.post_download_object(task)
    assert b"".join(chunks) == DATA
    assert ahead == [True, True, True, False]  # the last segment has no next one
    assert sorted({s for s, _ in calls}) == list(range(len(SEGMENTS)))
    assert all((s, 0) in calls and (s, 2) in calls for s in range(len(SEGMENTS)))
    assert world.dl.stats["degraded_reads"] == len(SEGMENTS)
    await world.dl.wait_background()
    assert world.ctx.limiter.used("downloader").memory == 0
    assert [await world.segment_on_disk(s) for s in range(len(SEGMENTS))] == SEGMENTS


async def test_read_ahead_needs_room_in_the_limiter(world: World) -> None:
    """With no room for a second segment the read goes one segment at a time (and still
    works); an abandoned read cancels its read-ahead and releases everything."""
    obj = world.object
    task = DownloadObjectTask(object=obj.info, bucket=world.chain.buckets["bkt"].info,
                              params=PARAMS, low=0, high=SIZE - 1, user_address="0xreader")
    limiter = world.ctx.limiter
    free = limiter.remaining("downloader").memory
    one = task.estimate().memory
    with limiter.span("downloader", memory=free - one):  # room for the download's own span
        assert await world.read() == DATA
    assert world.dl.stats["no_read_ahead"] == 1
    await world.dl.pre_download_object(task)
    try:
        async with aclosing(world.dl.handle_download_object_task(task)) as chunks:
            async for _ in chunks:
                break  # the client went away after the first segment
    finally:
        world.dl.post_download_object(task)
    await world.dl.wait_background()
    assert limiter.used("downloader").memory == 0
    assert world.store.inner._buffers.in_use == 0  # the read-ahead's buffer came back too


async def test_reads_give_every_store_buffer_back(world: World) -> None:
    """Segments are read into the store's reused buffers: whole, ranged and degraded reads
    give them back, and the chunks are bytes of their own, at most YIELD_SLICE long (a view of
    a reused buffer would change under a caller that keeps chunks: the join below)."""
    pool = world.store.inner._buffers
    async with aclosing(world.dl.handle_download_object_task(DownloadObjectTask(
            object=world.object.info, bucket=world.chain.buckets["bkt"].info, params=PARAMS,
            low=0, high=SIZE - 1, user_address="0xreader"))) as chunks:
        got = [chunk async for chunk in chunks]
    assert b"".join(got) == DATA
    assert all(type(c) is bytes and 0 < len(c) <= YIELD_SLICE for c in got)
    assert await world.read(1000, 2100) == DATA[1000:2101]
    await world.store.delete(segment_key(world.object.id, 1))  # degraded, then repaired
    assert await world.read() == DATA
    await world.dl.wait_background()
    assert pool.in_use == 0 and pool.idle_count() >= 1


async def test_missing_integrity_meta_falls_back_then_rebuilds(world: World) -> None:
    oid = world.object.id
    await world.ctx.db.run(lambda c: c.execute("DELETE FROM integrity_meta"))
    # piece_hashes still verify against the chain: reads stay local
    assert await world.read() == DATA
    assert world.secondaries.calls == []
    # neither verifies: every needed segment is rebuilt, and so is the metadata
    await world.ctx.db.run(lambda c: c.execute("DELETE FROM piece_hashes"))
    assert await world.read(0, SEG) == DATA[:SEG + 1]  # segments 0 and 1
    assert sorted({s for s, _ in world.secondaries.calls}) == [0, 1]
    await world.dl.wait_background()
    meta = await world.ctx.db.run(lambda c: c.execute(
        "SELECT integrity_hash FROM integrity_meta WHERE object_id = ? AND "
        "redundancy_index = -1", (oid,)).fetchone())
    assert meta is not None and bytes(meta[0]) == CHECKSUMS[0]
    assert world.dl.stats["meta_repairs"] >= 1
    world.secondaries.calls.clear()
    assert await world.read() == DATA
    assert world.secondaries.calls == []


async def test_a_wrong_integrity_meta_is_not_trusted(world: World) -> None:
    bogus = [sha256(b"x")] * len(SEGMENTS)
    await world.ctx.db.run(lambda c: c.execute(
        "UPDATE integrity_meta SET checksums = ?, integrity_hash = ?",
        (pack(bogus), integrity_hash(bogus))))
    await world.ctx.db.run(lambda c: c.execute("DELETE FROM piece_hashes"))
    assert await world.read() == DATA
    await world.dl.wait_background()
    world.secondaries.calls.clear()
    assert await world.read() == DATA
    assert world.secondaries.calls == []


async def test_limiter_exhaustion_is_503(world: World) -> None:
    one = DownloadObjectTask(object=world.object.info,
                             bucket=world.chain.buckets["bkt"].info, params=PARAMS, low=0,
                             high=0).estimate().memory
    world.ctx.limiter = ResourceLimiter(
        system=Limit.unlimited(), service_default=Limit.unlimited(),
        services={"downloader": Limit(memory=one + one // 2, tasks=10, tasks_high=10,
                                      tasks_medium=10, tasks_low=10)})

    def new_task() -> DownloadObjectTask:
        return DownloadObjectTask(object=world.object.info,
                                  bucket=world.chain.buckets["bkt"].info, params=PARAMS,
                                  low=0, high=SIZE - 1)

    first, second = new_task(), new_task()
    await world.dl.pre_download_object(first)
    assert world.dl.query_tasks("Download-") == [first]
    with pytest.raises(ServiceError) as info:
        await world.dl.pre_download_object(second)
    expect(info, "SlowDown", 503)
    assert info.value.retry_after > 0  # type: ignore[attr-defined]
    world.dl.post_download_object(second)  # the gater always calls post
    assert b"".join([c async for c in world.dl.handle_download_object_task(first)]) == DATA
    world.dl.post_download_object(first)
    assert world.ctx.limiter.used("downloader").memory == 0
    assert await world.read() == DATA  # room again
    # challenges take a span too
    world.ctx.limiter = ResourceLimiter(
        system=Limit.unlimited(), service_default=Limit.unlimited(),
        services={"downloader": Limit()})
    with pytest.raises(ServiceError) as info:
        await challenge(world.dl, world.object.id, 0, -1)
    expect(info, "SlowDown", 503)


async def test_download_admission(world: World) -> None:
    chain, sps = world.chain, world.sps
    chain.objects[8] = chain_object(8, "pending", sps[1:], status="CREATED")
    with pytest.raises(ServiceError) as info:
        await world.read(object_id=8)
    expect(info, "InvalidObjectState", 409)
    # a bucket whose primary is another SP
    chain.buckets["other"] = ChainBucket(id=2, name="other", owner="0xowner",
                                         primary_sp=sps[1].address, create_height=1)
    chain.objects[9] = dataclasses.replace(chain_object(9, "x", sps[1:]), bucket="other")
    with pytest.raises(ServiceError) as info:
        await world.read(object_id=9)
    expect(info, "AccessDenied", 403)
    # a range past the end
    with pytest.raises(ServiceError) as info:
        await world.read(SIZE, SIZE + 5)
    expect(info, "InvalidRange", 416)
    assert world.dl.query_tasks() == []
    assert world.ctx.limiter.used("downloader").memory == 0
    assert await world.ctx.modulars.metadata.list_read_records("bkt") == []


async def test_empty_object(world: World) -> None:
    empty = object_checksums([], PARAMS.data_shards, PARAMS.parity_shards)
    world.chain.objects[10] = chain_object(10, "empty", world.sps[1:], size=0, checksums=empty)
    task, partial = await world.dl.make_task("bkt", "empty")
    assert not partial and content_length(task) == 0
    assert await read_all(world.dl, task) == b""
    with pytest.raises(RangeNotSatisfiable):
        await world.dl.make_task("bkt", "empty", range_header="bytes=0-0")
    with pytest.raises(ServiceError) as info:
        await challenge(world.dl, 10, 0, -1)
    expect(info, "InvalidArgument", 400)


async def test_primary_challenge_of_bad_data_is_500_and_recovers(world: World) -> None:
    oid = world.object.id
    verify_against_chain(world.object, 1, -1, await challenge(world.dl, oid, 1, -1))
    await world.store.put(segment_key(oid, 1), flip(SEGMENTS[1]))
    with pytest.raises(ServiceError) as info:
        await challenge(world.dl, oid, 1, -1)
    expect(info, "InternalError", 500)
    await world.store.delete(segment_key(oid, 2))
    with pytest.raises(ServiceError) as info:
        await challenge(world.dl, oid, 2, -1)
    expect(info, "InternalError", 500)
    # the recoveries run in the background
    with trio.fail_after(TIMEOUT):
        await world.dl.wait_background()
    assert await world.segment_on_disk(1) == SEGMENTS[1]
    assert await world.segment_on_disk(2) == SEGMENTS[2]
    assert world.dl.stats["repairs"] == 2
    for segment in (1, 2):
        verify_against_chain(world.object, segment, -1,
                             await challenge(world.dl, oid, segment, -1))
    # a checksum list that does not verify is a 500 as well
    await world.ctx.db.run(lambda c: c.execute("UPDATE integrity_meta SET integrity_hash = ?",
                                               (sha256(b"bad"),)))
    await world.ctx.db.run(lambda c: c.execute("DELETE FROM piece_hashes"))
    with pytest.raises(ServiceError) as info:
        await challenge(world.dl, oid, 0, -1)
    expect(info, "InternalError", 500)


async def test_secondary_challenge_checks_its_own_data(world: World) -> None:
    """The same node as secondary index 0 of another object (its pieces and meta stored as
    the receiver does)."""
    chain, sps = world.chain, world.sps
    secs = [sps[0], *sps[2:]]  # this SP holds index 0
    chain.objects[11] = chain_object(11, "held", secs)
    sums = [sha256(p[0]) for p in PIECES]
    for segment, pieces in enumerate(PIECES):
        await world.store.put(piece_key(11, segment, 0), pieces[0])
    await world.ctx.db.run(lambda c: c.execute(
        "INSERT INTO integrity_meta (object_id, redundancy_index, integrity_hash, checksums, "
        "signature) VALUES (11, 0, ?, ?, ?)", (integrity_hash(sums), pack(sums), b"sig")))
    answer = await challenge(world.dl, 11, 2, 0)
    verify_against_chain(chain.objects[11], 2, 0, answer)
    assert answer[0] == PIECES[2][0]
    with pytest.raises(ServiceError) as info:
        await challenge(world.dl, 11, 2, 1)
    expect(info, "AccessDenied", 403)
    with pytest.raises(ServiceError) as info:
        await challenge(world.dl, 11, 2, -1)  # this SP is the bucket's primary, though
    assert info.value.code == "InternalError"  # ...and holds no segment of object 11
    await world.store.put(piece_key(11, 3, 0), flip(PIECES[3][0]))
    with pytest.raises(ServiceError) as info:
        await challenge(world.dl, 11, 3, 0)
    expect(info, "InternalError", 500)


async def test_a_repair_not_queued_at_shutdown_keeps_nothing(world: World) -> None:
    """A degraded read during shutdown (the downloader's nursery closed to new tasks) serves
    the segment but queues no repair: its buffer share and memory go back at once."""
    pool = world.store.inner._buffers
    obj, seg = world.chain.objects[world.object.id], 1
    data, shared = await world.dl._recover_pooled(obj, PARAMS, seg, None)
    async with trio.open_nursery() as closed:
        pass
    world.dl._nursery = closed
    await world.dl._queue_repair(obj, PARAMS, seg, data, fix_meta=False, hold=shared)
    assert world.dl.stats["repairs_skipped"] == 1 and not world.dl._repairing
    assert world.ctx.limiter.used("downloader").memory == 0
    assert bytes(data) == SEGMENTS[seg]  # still the reader's
    del data
    shared.close()
    assert pool.in_use == 0
    await world.dl.wait_background()  # nothing left running


async def test_sealed_objects_are_reused_for_a_moment(world: World,
                                                       autojump_clock: trio.testing.MockClock
                                                       ) -> None:
    """A challenge asked the chain for its object twice and a degraded read sends one
    challenge per piece: a sealed object is reused for ``downloader.object_cache_ttl``."""
    chain, oid = world.chain, world.object.id
    chain.object_reads = 0
    for _ in range(3):
        await challenge(world.dl, oid, 1, -1)
    assert chain.object_reads == 1
    await trio.sleep(world.dl.cfg.object_cache_ttl)  # then asked again
    await challenge(world.dl, oid, 1, -1)
    assert chain.object_reads == 2
    # an object that is not sealed is asked every time (sealed a moment later: seen at once)
    unsealed = dataclasses.replace(world.object, id=oid + 50, status="CREATED")
    chain.objects[unsealed.id] = unsealed
    for _ in range(2):
        with pytest.raises(ServiceError) as info:
            await challenge(world.dl, unsealed.id, 1, -1)
        assert info.value.code == "InvalidObjectState"
    assert chain.object_reads == 2 + 4
    del chain.objects[unsealed.id]
    world.dl.cfg = dataclasses.replace(world.dl.cfg, object_cache_ttl=0)  # 0: never reused
    await challenge(world.dl, oid, 1, -1)
    await challenge(world.dl, oid, 1, -1)
    assert chain.object_reads == 6 + 4


async def test_http_fetcher_signs_and_decodes(world: World) -> None:
    """The default fetcher against a mock transport (the real route is the e2e tests')."""
    oid, seen = world.object.id, []
    sp = world.sps[1]

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path.endswith("/1/0"):  # an SP that answers JSON only
            sums = [sha256(p[0]) for p in PIECES]
            return httpx.Response(200, json=encode_challenge(PIECES[1][0], sums,
                                                             integrity_hash(sums)))
        if request.url.path.endswith("/1/1"):  # the binary form the fetcher asks for
            sums = [sha256(p[1]) for p in PIECES]
            headers, parts = encode_challenge_binary(PIECES[1][1], sums, integrity_hash(sums))
            return httpx.Response(200, headers={**headers,
                                                "content-type": "application/octet-stream"},
                                  content=b"".join(parts))
        if request.url.path.endswith("/2/0"):
            return httpx.Response(200, content=b"x" * 10_000_000)
        if request.url.path.endswith("/2/1"):  # an answer shorter than its length
            return httpx.Response(200, headers={"content-length": "100"}, content=b"x" * 10)
        if request.url.path.endswith("/3/1"):  # no length: read as it comes, under the cap
            sums = [sha256(p[1]) for p in PIECES]
            headers, parts = encode_challenge_binary(PIECES[3][1], sums, integrity_hash(sums))
            del headers["content-length"]

            async def stream() -> AsyncIterator[bytes]:
                for part in parts:
                    yield part

            return httpx.Response(200, headers={**headers,
                                                "content-type": "application/octet-stream"},
                                  content=stream())
        return httpx.Response(403, json={"code": "AccessDenied"})

    dl = Downloader(world.ctx)
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        dl.http = http
        piece, _, integrity = await dl.fetch_piece(sp.address, sp.endpoint, oid, 1, 0)
        binary = await dl.fetch_piece(sp.address, sp.endpoint, oid, 1, 1)
        assert binary == (PIECES[1][1], [sha256(p[1]) for p in PIECES], CHECKSUMS[2])
        with pytest.raises(PieceFetchError, match="403"):
            await dl.fetch_piece(sp.address, sp.endpoint, oid, 3, 0)
        with pytest.raises(PieceFetchError, match="over"):
            await dl.fetch_piece(sp.address, sp.endpoint, oid, 2, 0)
        with pytest.raises(PieceFetchError, match="its length says 100"):
            await dl.fetch_piece(sp.address, sp.endpoint, oid, 2, 1)
        unsized = await dl.fetch_piece(sp.address, sp.endpoint, oid, 3, 1)
        assert unsized[0] == PIECES[3][1]
        # with a hold, the answer goes into one of the piece store's reused buffers
        pool = world.store.inner._buffers
        with contextlib.ExitStack() as hold:
            pooled = await dl.fetch_piece(sp.address, sp.endpoint, oid, 1, 1, hold)
            assert pooled == binary and pool.in_use == 1
            del pooled
        assert pool.in_use == 0
    assert piece == PIECES[1][0] and integrity == CHECKSUMS[1]
    request = seen[0]
    assert str(request.url) == sp.endpoint + challenge_path(oid, 1, 0)
    assert request.method == "GET"
    assert request.headers["accept"] == "application/octet-stream"
    auth = request.headers[AUTHORIZATION_HEADER]
    assert auth.startswith(SCHEME) and world.sps[0].address in auth
    assert request.headers["host"] == sp.endpoint.removeprefix("http://")


async def test_task_keys_and_query(world: World) -> None:
    task = ChallengePieceTask(object=world.object.info, params=PARAMS, segment=0,
                              redundancy_index=-1)
    await world.dl.pre_challenge_piece(task)
    try:
        assert world.dl.query_tasks("ChallengePiece-") == [task]
        assert world.dl.query_tasks("Download-") == []
    finally:
        world.dl.post_challenge_piece(task)
    assert world.dl.query_tasks() == []


async def test_abandoned_download_releases_and_records_what_was_served(world: World) -> None:
    obj = world.object
    task = DownloadObjectTask(object=obj.info, bucket=world.chain.buckets["bkt"].info,
                              params=PARAMS, low=0, high=SIZE - 1, user_address="0xquitter")
    await world.dl.pre_download_object(task)
    chunks = world.dl.handle_download_object_task(task)
    assert await chunks.__anext__() == SEGMENTS[0]
    with trio.CancelScope() as scope:  # the client went away: the body's finally is cancelled
        scope.cancel()
        try:
            await chunks.__anext__()
        finally:
            await chunks.aclose()
            world.dl.post_download_object(task)
    assert world.ctx.limiter.used("downloader").memory == 0
    assert world.dl.query_tasks() == []
    await world.dl.wait_background()
    records = await world.ctx.modulars.metadata.list_read_records("bkt")
    assert [(r.account, r.bytes) for r in records] == [("0xquitter", SEG)]
    assert world.dl.stats["downloads_failed"] == 1
