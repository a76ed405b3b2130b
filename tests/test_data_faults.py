"""Data-plane faults on 127.0.0.1: a devchain and 4-5 SPs (2 data + 1 parity, 256 KiB segments),
in this process except where a SIGKILL needs an OS process.

Every fault is made deterministic by a hook at the point where it must happen, never by
timing: a secondary's receiver that refuses the first piece (and stops its node), a PUT body
that stops after its first bytes, a receiver that holds the first piece, a devchain that holds
the seal transaction; the test waits for that point (polling the primary's SPDB when it is a
process), then injects the fault.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from node.auth import quote_path
from node.config import ByteSize, LimitValues
from node.crypto import PrivateKey
from node.errors import ServiceError
from node.piecestore import segment_key
from node.tasks import GCZombiePieceTask, StorageParams
from p2p.peers import TRUSTED
from testnet.client import GfspClient, SPError, checksums_of
from testnet.devchain import DevChain
from tests.faultnet import (
    SealGateChain,
    active_tasks,
    configure,
    disk_keys,
    expected_keys,
    spdb_rows,
    task_states,
    upload_state,
)
from tests.p2pnet import RunningNode, SPDir, make_chain_sps, register_on_chain, wait_until
from tests.procnode import ProcNode

KiB, MiB = 1 << 10, 1 << 20
SEGMENT = 256 * KiB
PARAMS = StorageParams(segment_size=SEGMENT, data_shards=2, parity_shards=1,
                       max_payload=1 << 30)
#: Approvals: exactly data + parity (no backups) unless a test wants backups, so the asker
#: returns as soon as every secondary answered instead of waiting for the quorum timeout.
P2P = {"ping_interval": 1.0, "approval_backups": 0}
BUCKET = "faults"


# --- a cluster --------------------------------------------------------------------------------


@dataclass
class Cluster:
    endpoint: str
    sps: list[SPDir]
    nodes: dict[int, RunningNode] = field(default_factory=dict)
    procs: dict[int, ProcNode] = field(default_factory=dict)

    def node(self, i: int) -> RunningNode:
        return self.nodes[i]

    def ctx(self, i: int) -> Any:
        ctx = self.nodes[i].node.ctx
        assert ctx is not None
        return ctx

    def operator(self, i: int) -> str:
        return self.sps[i].keys.operator.address

    def index_of(self, operator: str) -> int:
        return next(sp.index for sp in self.sps if sp.keys.operator.address == operator)

    async def stop(self) -> None:
        for node in self.nodes.values():
            if not node.done.is_set():
                await node.stop()


@pytest.fixture
async def children() -> AsyncIterator[list[ProcNode]]:
    """Every ProcNode a test appends here is SIGKILLed and reaped at the end, whatever
    happened."""
    procs: list[ProcNode] = []
    try:
        yield procs
    finally:
        for p in procs:
            await p.kill()
            p.close_socket()


async def start_cluster(tmp_path: Path, nursery: trio.Nursery, n: int, *,
                        p2p: dict[str, object] | None = None,
                        chain: DevChain | None = None,
                        configs: Callable[[SPDir], None] | None = None,
                        processes: tuple[int, ...] = (),
                        children: list[ProcNode] | None = None) -> Cluster:
    """A devchain and ``n`` registered SPs (sp0 is the bootstrap peer and the primary of the
    tests' bucket); the SPs in ``processes`` run as OS processes, the others in-process.
    Returns once every SP trusts every other one."""
    chain = chain or DevChain(tmp_path / "chain", block_interval=0.2, params=PARAMS)
    endpoint = await nursery.start(chain.serve)
    sps = make_chain_sps(tmp_path / "sps", n, endpoint, p2p={**P2P, **(p2p or {})})
    for sp in sps:
        if configs is not None:
            configs(sp)
    await register_on_chain(endpoint, sps)
    cluster = Cluster(endpoint, sps)
    for sp in sps:  # sp0 first: the others bootstrap from it
        if sp.index in processes:
            assert children is not None
            proc = ProcNode(sp)
            children.append(proc)
            cluster.procs[sp.index] = proc
            await proc.start()
        else:
            node = RunningNode(sp)
            await nursery.start(node._run)
            cluster.nodes[sp.index] = node
    await wait_trusted(cluster)
    return cluster


async def wait_trusted(cluster: Cluster) -> None:
    everyone = {sp.peer_id for sp in cluster.sps}

    def trusted(i: int) -> set[str]:
        if i in cluster.nodes:
            return cluster.nodes[i].trusted()
        return {str(p) for p, s in spdb_rows(cluster.sps[i], "SELECT peer_id, state FROM peers")
                if s == TRUSTED}

    await wait_until(lambda: all(trusted(sp.index) >= everyone - {sp.peer_id}
                                 for sp in cluster.sps), poll=0.05)


# --- the client side --------------------------------------------------------------------------


async def create(client: GfspClient, name: str, payload: bytes) -> int:
    sums = await checksums_of([payload[i:i + SEGMENT] for i in range(0, len(payload), SEGMENT)],
                              PARAMS)
    obj = await client.create_object(BUCKET, name, size=len(payload), checksums=sums)
    return obj.id


async def raw_put(client: GfspClient, http: httpx.AsyncClient, name: str,
                  body: bytes | AsyncIterator[bytes], length: int | None = None
                  ) -> httpx.Response:
    """A signed PUT whose answer (status, headers, S3 code) the test looks at itself; an
    async-iterator body is sent with UNSIGNED-PAYLOAD and ``length`` as Content-Length."""
    endpoint = await client.bucket_endpoint(BUCKET)
    url = endpoint.rstrip("/") + quote_path(f"/{BUCKET}/{name}")
    if isinstance(body, bytes):
        headers = client.sign("PUT", url, body=body)
    else:
        headers = client.sign("PUT", url, body=None)
        headers["content-length"] = str(length)
    return await http.put(url, content=body, headers=headers)


def s3_code(response: httpx.Response) -> str:
    return ET.fromstring(response.content).findtext("Code") or ""


def segments_of(payload: bytes) -> list[bytes]:
    return [payload[i:i + SEGMENT] for i in range(0, len(payload), SEGMENT)]


async def wait_no_active_tasks(cluster: Cluster, object_id: int) -> None:
    """Until no SP has a pending or running task about the object (a secondary confirms the
    seal with backoff; the GC zombie task skips objects with work in progress)."""
    while True:
        busy = []
        for i, sp in enumerate(cluster.sps):
            if i in cluster.nodes:
                keys = await cluster.ctx(i).db.run(lambda c: active_tasks(c, object_id))
            else:
                keys = [k for (k,) in spdb_rows(sp, "SELECT key FROM tasks WHERE state IN "
                                                "('pending', 'running')")
                        if f"-id:{object_id}" in str(k)]
            busy += keys
        if not busy:
            return
        await trio.sleep(0.1)


async def gc_zombies(cluster: Cluster, object_id: int) -> None:
    """Run the executor's GCZombiePiece task over ``object_id`` on every in-process SP."""
    for i in cluster.nodes:
        task = GCZombiePieceTask(start_object_id=object_id, end_object_id=object_id)
        await cluster.ctx(i).modulars.executor.handle_gc_zombie_piece_task(task)


def holdings(cluster: Cluster, sealed_secondaries: list[str], object_id: int, segments: int
             ) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """(what each SP holds on disk, what it should hold) of a sealed object."""
    have, want = {}, {}
    for sp in cluster.sps:
        op = sp.keys.operator.address
        index = sealed_secondaries.index(op) if op in sealed_secondaries else None
        have[sp.index] = disk_keys(sp, object_id)
        if sp.index == 0:
            want[sp.index] = expected_keys(object_id, segments, None)
        elif index is None:
            want[sp.index] = []
        else:
            want[sp.index] = expected_keys(object_id, segments, index)
    return have, want


# --- 1. a secondary goes down during replication ----------------------------------------------


async def test_secondary_down_during_replication_uses_backup(tmp_path, nursery):
    """5 SPs, 2+1, one backup approval: all four other SPs approve, three are chosen. The
    first chosen secondary that is sent a piece refuses it (503) and its node is stopped at
    that moment, so that index must move to the backup; the seal lists the backup, never the
    stopped SP, and the object reads back."""
    t0 = trio.current_time()
    with trio.fail_after(60):
        cluster = await start_cluster(tmp_path, nursery, 5, p2p={"approval_backups": 1})
        victims: list[int] = []
        for i in range(1, 5):
            receiver = cluster.ctx(i).modulars.receiver
            receiver.handle_receive_piece_task = _down_on_first_piece(
                cluster, i, receiver.handle_receive_piece_task, victims, nursery)

        payload = os.urandom(3 * SEGMENT + 1234)
        async with GfspClient(PrivateKey.generate(), chain=cluster.endpoint,
                              timeout=30) as client:
            await client.create_bucket(BUCKET, primary_sp=cluster.operator(0))
            oid = await create(client, "obj", payload)
            await client.put_object(BUCKET, "obj", payload)
            sealed = await client.wait_sealed(BUCKET, "obj", timeout=40)
            assert len(victims) == 1
            (victim,) = victims
            await cluster.node(victim).done.wait()  # it really went down
            assert cluster.operator(victim) not in sealed.secondaries
            assert sorted(sealed.secondaries) == sorted(
                cluster.operator(i) for i in range(1, 5) if i != victim)
            assert disk_keys(cluster.sps[victim], oid) == []
            assert await client.get_object_bytes(BUCKET, "obj") == payload
            for index, operator in enumerate(sealed.secondaries):
                keys = disk_keys(cluster.sps[cluster.index_of(operator)], oid)
                assert keys == expected_keys(oid, 4, index)
        await cluster.stop()
    print(f"secondary down -> backup sealed in {trio.current_time() - t0:.2f}s")


def _down_on_first_piece(cluster: Cluster, i: int,
                         original: Callable[..., Awaitable[None]], victims: list[int],
                         nursery: trio.Nursery) -> Callable[..., Awaitable[None]]:
    async def receive(task: Any, *args: Any, **kwargs: Any) -> None:
        if not victims:  # the first piece sent to any secondary: this SP goes down now
            victims.append(i)
            nursery.start_soon(cluster.node(i).stop)
        if victims[0] == i:
            raise ServiceError("ServiceUnavailable", "test: this SP is going down", 503)
        await original(task, *args, **kwargs)
    return receive


# --- 2. a payload that is not the object -------------------------------------------------------


@pytest.mark.parametrize("fault", ["content", "short", "long"])
async def test_wrong_payload_refused_and_cleaned_then_retry_seals(tmp_path, nursery, fault):
    """A PUT whose content differs from the created object (same size), or whose body is one
    byte short or one byte long, is refused with 400 and its S3 code; the primary keeps no
    piece of it, the upload is FAILED, no uploader memory stays reserved; the correct PUT then
    succeeds and the object seals and reads back."""
    t0 = trio.current_time()
    with trio.fail_after(40):
        cluster = await start_cluster(tmp_path, nursery, 4)
        primary = cluster.ctx(0)
        payload = os.urandom(4 * SEGMENT + 777)
        bad = {"content": payload[:-SEGMENT] + bytes([payload[-SEGMENT] ^ 1])
                          + payload[-SEGMENT + 1:],
               "short": payload[:-1], "long": payload + b"\0"}[fault]
        code = {"content": "BadDigest", "short": "IncompleteBody", "long": "IncompleteBody"}
        async with GfspClient(PrivateKey.generate(), chain=cluster.endpoint,
                              timeout=30) as client, httpx.AsyncClient(timeout=30) as http:
            await client.create_bucket(BUCKET, primary_sp=cluster.operator(0))
            oid = await create(client, "obj", payload)
            for attempt in range(2):  # a second bad PUT after the first one failed
                response = await raw_put(client, http, "obj", bad)
                assert response.status_code == 400, response.text
                assert s3_code(response) == code[fault]
                assert await primary.piecestore.keys(oid) == []
                assert disk_keys(cluster.sps[0], oid) == []
                assert upload_state(cluster.sps[0], oid) == "FAILED", attempt
                assert task_states(cluster.sps[0], "UploadObject", oid) == ["failed"]
                assert primary.limiter.used("uploader").is_zero()
            response = await raw_put(client, http, "obj", payload)
            assert response.status_code == 200, response.text
            sealed = await client.wait_sealed(BUCKET, "obj", timeout=30)
            assert await client.get_object_bytes(BUCKET, "obj") == payload
            assert sorted(await primary.piecestore.keys(oid)) == expected_keys(oid, 5, None)
            assert len(sealed.secondaries) == 3
        await cluster.stop()
    print(f"{fault}: refused, cleaned, retried and sealed in {trio.current_time() - t0:.2f}s")


# --- 3. SIGKILL of the primary ---------------------------------------------------------------


def _hold_first_piece(object_id: int, entered: trio.Event, release: trio.Event,
                      original: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """A receiver that holds the first piece of ``object_id`` any secondary gets until
    ``release`` (then refuses it), and passes every other piece."""
    async def receive(task: Any, *args: Any, **kwargs: Any) -> None:
        if task.object.id == object_id and not entered.is_set():
            entered.set()
            await release.wait()
            raise ServiceError("ServiceUnavailable", "test: held, then dropped", 503)
        await original(task, *args, **kwargs)
    return receive


@pytest.mark.parametrize("phase", ["upload", "replicate", "seal"])
async def test_sigkill_primary(tmp_path, nursery, children, phase):
    """The primary (sp0) is an OS process, the three secondaries run in-process. It is
    SIGKILLed at a point the test holds it at:

    * upload: the PUT body stops after 600 KiB (two segments on disk); after the restart the
      upload is FAILED and its pieces are gone; a new PUT seals;
    * replicate: a secondary holds the first piece it is sent (the ReplicatePiece task is
      running); after the restart the replication resumes from SPDB and the object seals;
    * seal: the devchain holds the seal transaction (the SealObject task is running); after
      the restart the seal is sent again and the object seals.

    Then (after every secondary confirmed the seal) the GC zombie task runs on every SP, and
    each SP holds exactly its share: no orphan piece of the first attempt survives.
    """
    t0 = trio.current_time()
    with trio.fail_after(60):
        chain = SealGateChain(tmp_path / "chain", block_interval=0.2, params=PARAMS)

        def configs(sp: SPDir) -> None:
            if sp.index == 0:  # the primary's periodic GC (zombie, meta, objects)
                configure(sp, manager={"gc_interval": 0.5})

        cluster = await start_cluster(tmp_path, nursery, 4, chain=chain, configs=configs,
                                      processes=(0,), children=children)
        primary, psp = cluster.procs[0], cluster.sps[0]
        payload = os.urandom(4 * SEGMENT + 4321)
        async with GfspClient(PrivateKey.generate(), chain=cluster.endpoint,
                              timeout=30) as client, httpx.AsyncClient(timeout=30) as http:
            await client.create_bucket(BUCKET, primary_sp=cluster.operator(0))
            oid = await create(client, "obj", payload)

            if phase == "upload":
                async def body() -> AsyncIterator[bytes]:
                    yield payload[:600 * KiB]
                    await trio.sleep_forever()  # the rest never comes: the primary dies

                put_scope = trio.CancelScope()
                nursery.start_soon(_put_in, put_scope, client, http, body(), len(payload))
                await wait_until(lambda: len(disk_keys(psp, oid)) >= 2
                                 and task_states(psp, "UploadObject", oid) == ["running"],
                                 poll=0.01)
                await primary.kill()
                put_scope.cancel()
            elif phase == "replicate":
                entered, release = trio.Event(), trio.Event()
                for i in (1, 2, 3):
                    receiver = cluster.ctx(i).modulars.receiver
                    receiver.handle_receive_piece_task = _hold_first_piece(
                        oid, entered, release, receiver.handle_receive_piece_task)
                await client.put_object(BUCKET, "obj", payload)
                await entered.wait()
                await wait_until(lambda: task_states(psp, "ReplicatePiece", oid) == ["running"],
                                 poll=0.01)
                await primary.kill()
                release.set()
            else:
                chain.held.add(oid)
                await client.put_object(BUCKET, "obj", payload)
                await chain.seen.wait()
                await wait_until(lambda: task_states(psp, "SealObject", oid) == ["running"],
                                 poll=0.01)
                await primary.kill()
                chain.release.set()
            killed = trio.current_time()
            assert not (await client.chain.get_object(BUCKET, "obj")).sealed

            await primary.start()
            restarted = trio.current_time()
            if phase == "upload":
                assert task_states(psp, "UploadObject", oid) == ["failed"]
                assert upload_state(psp, oid) == "FAILED"
                assert disk_keys(psp, oid) == []  # the aborted upload left nothing behind
                response = await raw_put(client, http, "obj", payload)
                assert response.status_code == 200, response.text
            sealed = await client.wait_sealed(BUCKET, "obj", timeout=40)
            sealed_at = trio.current_time()
            assert await client.get_object_bytes(BUCKET, "obj") == payload

            # GC: secondaries once their seal confirmations are done; the primary's
            # periodic GCZombiePiece task once it ran after the seal
            await wait_no_active_tasks(cluster, oid)
            wall = time.time()
            await gc_zombies(cluster, oid)
            await wait_until(lambda: bool(spdb_rows(
                psp, "SELECT 1 FROM tasks WHERE type = 'GCZombiePiece' AND state = 'done' "
                "AND update_time > ?", (wall,))), poll=0.05)
            have, want = holdings(cluster, list(sealed.secondaries), oid, 5)
            assert have == want
        await cluster.stop()
    print(f"SIGKILL in {phase}: restart READY {restarted - killed:.2f}s, sealed "
          f"{sealed_at - restarted:.2f}s later; {trio.current_time() - t0:.2f}s in all")


async def _put_in(scope: trio.CancelScope, client: GfspClient, http: httpx.AsyncClient,
                  body: AsyncIterator[bytes], length: int) -> None:
    with scope:
        try:
            await raw_put(client, http, "obj", body, length)
        except httpx.HTTPError:
            pass  # the primary died under it


# --- 4. delete -> GC on every SP --------------------------------------------------------------


async def test_delete_then_gc_collects_every_sp(tmp_path, nursery):
    """After the seal (and every confirmation), a delete on the chain is collected by the
    GCObject task each SP's executor schedules every ``manager.gc_interval``: no piece and no
    integrity record of the object is left on any SP, and a GET is 404."""
    t0 = trio.current_time()
    with trio.fail_after(40):
        cluster = await start_cluster(
            tmp_path, nursery, 4,
            configs=lambda sp: configure(sp, manager={"gc_interval": 0.3}))
        payload = os.urandom(2 * SEGMENT + 99)
        async with GfspClient(PrivateKey.generate(), chain=cluster.endpoint,
                              timeout=30) as client:
            await client.create_bucket(BUCKET, primary_sp=cluster.operator(0))
            oid = await create(client, "obj", payload)
            await client.put_object(BUCKET, "obj", payload)
            sealed = await client.wait_sealed(BUCKET, "obj", timeout=30)
            await wait_no_active_tasks(cluster, oid)
            have, want = holdings(cluster, list(sealed.secondaries), oid, 3)
            assert have == want
            assert all(have.values())

            await client.delete_object(BUCKET, "obj")
            deleted = trio.current_time()
            await wait_until(lambda: not any(disk_keys(sp, oid) for sp in cluster.sps),
                             poll=0.05)
            collected = trio.current_time() - deleted
            for i in range(4):
                rows = await cluster.ctx(i).db.run(lambda c: c.execute(
                    "SELECT count(*) FROM integrity_meta WHERE object_id = ?", (oid,)
                ).fetchone()[0] + c.execute(
                    "SELECT count(*) FROM piece_hashes WHERE object_id = ?", (oid,)
                ).fetchone()[0])
                assert rows == 0, i
                assert await cluster.ctx(i).piecestore.keys(oid) == []
            with pytest.raises(SPError) as info:
                await client.get_object_bytes(BUCKET, "obj")
            assert info.value.status == 404
        await cluster.stop()
    print(f"delete collected on 4 SPs {collected:.2f}s after the delete; "
          f"{trio.current_time() - t0:.2f}s in all")


# --- 5. degraded read and repair --------------------------------------------------------------


async def test_degraded_read_rebuilds_and_repairs_primary(tmp_path, nursery):
    """The primary loses segment 1 and has segment 3 corrupted (same length, one bit): a whole
    GET and a range GET still return the right bytes (rebuilt from the secondaries), and the
    primary's copies are repaired in the background; a challenge of them then verifies."""
    t0 = trio.current_time()
    with trio.fail_after(40):
        cluster = await start_cluster(tmp_path, nursery, 4)
        primary = cluster.ctx(0)
        payload = os.urandom(5 * SEGMENT - 5)
        segs = segments_of(payload)
        async with GfspClient(PrivateKey.generate(), chain=cluster.endpoint,
                              timeout=30) as client:
            await client.create_bucket(BUCKET, primary_sp=cluster.operator(0))
            oid = await create(client, "obj", payload)
            await client.put_object(BUCKET, "obj", payload)
            sealed = await client.wait_sealed(BUCKET, "obj", timeout=30)

            store = primary.piecestore
            assert await store.delete(segment_key(oid, 1))
            corrupt = bytearray(segs[3])
            corrupt[100] ^= 0x10
            await store.put(segment_key(oid, 3), bytes(corrupt))

            assert await client.get_object_bytes(BUCKET, "obj") == payload
            low, high = 3 * SEGMENT - 10, 3 * SEGMENT + 500
            assert await client.get_object_bytes(BUCKET, "obj", byte_range=(low, high)) \
                == payload[low:high + 1]
            downloader = primary.modulars.downloader
            await downloader.wait_background()
            assert await store.get(segment_key(oid, 1)) == segs[1]
            assert await store.get(segment_key(oid, 3)) == segs[3]
            assert downloader.stats["repairs"] >= 2
            # the pieces fetched (real HTTP) and the rebuilt segments went back to the pool
            assert store._buffers.in_use == 0
            for seg in (1, 3):
                piece, checksums, integrity = await client.challenge(
                    cluster.sps[0].info().endpoint, oid, seg, -1)
                assert piece == segs[seg]
                assert hashlib.sha256(piece).digest() == checksums[seg]
                assert integrity == sealed.checksums[0]
        await cluster.stop()
    print(f"degraded read + repair in {trio.current_time() - t0:.2f}s")


# --- 6. the uploader's limiter ----------------------------------------------------------------


async def test_upload_limiter_refuses_excess_with_retry_after(tmp_path, nursery):
    """The primary's uploader may reserve 1.25 MiB: two uploads (2 x 256 KiB segments each)
    fit, a third does not. Two PUTs are held in flight (their bodies stop after the first
    bytes) until both are admitted; six more PUTs sent at once then all get 503 SlowDown with
    Retry-After, and reserve nothing. The held ones finish and seal; the refused ones, sent
    again at most two at a time, are all accepted and seal; the uploader's usage is zero."""
    t0 = trio.current_time()

    def configs(sp: SPDir) -> None:
        if sp.index == 0:
            configure(sp, limits=lambda s: dataclasses.replace(s, services={
                "uploader": LimitValues(memory=ByteSize(1280 * KiB))}))

    with trio.fail_after(50):
        cluster = await start_cluster(tmp_path, nursery, 4, configs=configs)
        primary = cluster.ctx(0)
        uploader = primary.modulars.uploader
        n_objects = 8
        payloads = [os.urandom(2 * SEGMENT + 1000 + i) for i in range(n_objects)]
        async with GfspClient(PrivateKey.generate(), chain=cluster.endpoint,
                              timeout=30) as client, httpx.AsyncClient(timeout=30) as http:
            await client.create_bucket(BUCKET, primary_sp=cluster.operator(0))
            for i, payload in enumerate(payloads):
                await create(client, f"o{i}", payload)
            gate = trio.Event()
            results: dict[int, httpx.Response] = {}

            async def held_put(i: int) -> None:
                async def body() -> AsyncIterator[bytes]:
                    yield payloads[i][:100 * KiB]
                    await gate.wait()
                    yield payloads[i][100 * KiB:]
                results[i] = await raw_put(client, http, f"o{i}", body(), len(payloads[i]))

            async def put(i: int) -> None:
                results[i] = await raw_put(client, http, f"o{i}", payloads[i])

            async with trio.open_nursery() as puts:
                for i in (0, 1):
                    puts.start_soon(held_put, i)
                await wait_until(lambda: len(uploader.query_tasks()) == 2, poll=0.01)
                assert primary.limiter.used("uploader").memory == 2 * 2 * SEGMENT
                async with trio.open_nursery() as burst:
                    for i in range(2, n_objects):
                        burst.start_soon(put, i)
                refused = sorted(i for i in range(2, n_objects)
                                 if results[i].status_code == 503)
                assert refused == list(range(2, n_objects)), {
                    i: r.status_code for i, r in results.items()}
                for i in refused:
                    assert s3_code(results[i]) == "SlowDown"
                    assert int(results[i].headers["retry-after"]) >= 1
                assert primary.limiter.used("uploader").memory == 2 * 2 * SEGMENT
                gate.set()
            assert results[0].status_code == results[1].status_code == 200

            two = trio.CapacityLimiter(2)  # what the limiter admits: never refused now

            async def put_again(i: int) -> None:
                async with two:
                    await put(i)

            async with trio.open_nursery() as again:
                for i in refused:
                    again.start_soon(put_again, i)
            assert all(results[i].status_code == 200 for i in refused), {
                i: (r.status_code, r.text[:100]) for i, r in results.items()}
            for i, payload in enumerate(payloads):
                await client.wait_sealed(BUCKET, f"o{i}", timeout=30)
                assert await client.get_object_bytes(BUCKET, f"o{i}") == payload
            assert primary.limiter.used("uploader").is_zero()
            assert uploader.query_tasks() == []
            await wait_until(lambda: primary.limiter.used("executor").is_zero(), poll=0.05)
        await cluster.stop()
    print(f"limiter: 2 held + 6 refused, all 8 sealed in {trio.current_time() - t0:.2f}s")
