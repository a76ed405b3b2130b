"""The secondary's receive path over real HTTP (a devchain and 4 SPs, 2+1, in this process):
a replicate-piece PUT is stored only when its body is the signed hash and the approval is the
receiver's own; a refused piece leaves no file and no checksum row, an accepted one both."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import trio

from modulars.executor import APPROVAL_HEADER, replicate_path
from node.crypto import PrivateKey
from node.ec import Codec, object_checksums, split
from node.errors import ServiceError, ServiceUnavailable
from node.tasks import ReplicatePieceApprovalTask, StorageParams
from p2p.messages import encode
from testnet.client import GfspClient, parse_error
from testnet.devchain import DevChain
from tests.faultnet import configure
from tests.p2pnet import make_chain_sps, register_on_chain, start_nodes, wait_until

MiB = 1 << 20
PARAMS = StorageParams(segment_size=1 * MiB, data_shards=2, parity_shards=1,
                       max_payload=1 << 30)
N = PARAMS.total_shards


def piece_rows(db_path: Path, object_id: int) -> list[tuple[int, int, bytes]]:
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as conn:
        return conn.execute("SELECT segment, redundancy_index, checksum FROM piece_hashes "
                            "WHERE object_id = ? ORDER BY segment", (object_id,)).fetchall()


async def test_replicate_piece_checks_then_stores(tmp_path: Path, nursery: trio.Nursery) -> None:
    with trio.fail_after(120):
        chain = DevChain(tmp_path / "chain", block_interval=0.2, params=PARAMS)
        endpoint = await nursery.start(chain.serve)
        sps = make_chain_sps(tmp_path / "sps", 1 + N, endpoint)
        await register_on_chain(endpoint, sps)
        nodes = await start_nodes(nursery, sps)
        everyone = {sp.peer_id for sp in sps}
        await wait_until(lambda: all(n.trusted() == everyone - {n.sp.peer_id} for n in nodes))

        payload = os.urandom(2 * MiB + 4321)  # 3 segments, the last one short
        segments = split(payload, PARAMS.segment_size)
        pieces = [Codec(PARAMS.data_shards, PARAMS.parity_shards).encode(s) for s in segments]
        sums = object_checksums(segments, PARAMS.data_shards, PARAMS.parity_shards)
        primary = nodes[0].node.ctx
        assert primary is not None
        async with GfspClient(PrivateKey.generate(), chain=endpoint, timeout=60) as client:
            await client.create_bucket("rbucket", primary_sp=sps[0].keys.operator.address)
            obj = await client.create_object("rbucket", "o", size=len(payload), checksums=sums)
            approvals = await primary.modulars.p2p.handle_replicate_piece_approval(
                ReplicatePieceApprovalTask(object=obj.info, params=PARAMS), N, N)
        by_operator = {sp.keys.operator.address: (sp, node) for sp, node in zip(sps, nodes,
                                                                                strict=True)}
        approval = approvals[0]
        target, target_node = by_operator[approval.approver]
        store = target_node.node.ctx.piecestore  # type: ignore[union-attr]
        db_path = target.config().db_path

        async def put(segment: int, body: bytes, *, signed: bytes | None = None,
                      index: int = 0, approval_of: Any = approval,
                      headers: dict[str, str] | None = None) -> httpx.Response:
            url = approval.endpoint.rstrip("/") + replicate_path(obj.id, index, segment)
            digest = hashlib.sha256(body if signed is None else signed).hexdigest()
            signed_headers = primary.modulars.signer.sign_http_request(
                "PUT", url, body_sha256=digest,
                headers={APPROVAL_HEADER: encode(approval_of).hex(), **(headers or {})})
            async with httpx.AsyncClient(timeout=30) as http:
                return await http.put(url, content=body, headers=signed_headers)

        good = pieces[0][0]
        bad = bytes([good[0] ^ 1]) + good[1:]
        # a body that is not the signed hash: refused, and nothing stored
        r = await put(0, bad, signed=good)
        assert (r.status_code, parse_error(r).code) == (400, "ContentSha256Mismatch"), r.text
        # a piece of the wrong size (declared), and one streamed longer than the piece
        r = await put(0, good + b"x")
        assert (r.status_code, parse_error(r).code) == (400, "InvalidArgument"), r.text

        async def longer() -> Any:
            yield good
            yield b"tail"

        url = approval.endpoint.rstrip("/") + replicate_path(obj.id, 0, 0)
        signed_headers = primary.modulars.signer.sign_http_request(
            "PUT", url, body_sha256=hashlib.sha256(good + b"tail").hexdigest(),
            headers={APPROVAL_HEADER: encode(approval).hex()})
        async with httpx.AsyncClient(timeout=30) as http:
            r = await http.put(url, content=longer(), headers=signed_headers)
        assert (r.status_code, parse_error(r).code) == (413, "EntityTooLarge"), r.text
        # another SP's approval, and a segment out of range
        other = next(a for a in approvals if a.approver != approval.approver)
        r = await put(0, good, approval_of=other)
        assert (r.status_code, parse_error(r).code) == (403, "InvalidApproval"), r.text
        r = await put(3, good)
        assert (r.status_code, parse_error(r).code) == (400, "InvalidArgument"), r.text
        # segments that are not integers (found in review: "--1" was a 500)
        for bad_segment in ("--1", "-", "1" * 25, "0x1", "\u0663"):
            url = approval.endpoint.rstrip("/") + replicate_path(obj.id, 0, 0)[:-1] + quote(
                bad_segment)
            signed_headers = primary.modulars.signer.sign_http_request(
                "PUT", url, body_sha256=hashlib.sha256(good).hexdigest(),
                headers={APPROVAL_HEADER: encode(approval).hex()})
            async with httpx.AsyncClient(timeout=30) as http:
                r = await http.put(url, content=good, headers=signed_headers)
            assert (r.status_code, parse_error(r).code) == (400, "InvalidArgument"), r.text
        assert await store.keys(obj.id) == []
        assert piece_rows(db_path, obj.id) == []
        assert target_node.node.ctx.limiter.used("receiver").memory == 0  # type: ignore[union-attr]

        # the real pieces: stored with their checksums, then "done" signs them
        for segment in range(len(segments) - 1):
            r = await put(segment, pieces[segment][0])
            assert r.status_code == 200, r.text
            assert r.json() == {"stored": len(pieces[segment][0])}

        async def done() -> httpx.Response:
            url = approval.endpoint.rstrip("/") + replicate_path(obj.id, 0)
            done_headers = primary.modulars.signer.sign_http_request(
                "POST", url, body_sha256=hashlib.sha256(b"").hexdigest(),
                headers={APPROVAL_HEADER: encode(approval).hex()})
            async with httpx.AsyncClient(timeout=30) as http:
                return await http.post(url, content=b"", headers=done_headers)

        # a "done" that comes while the last piece is being stored waits for it (before, it
        # signed what was there: 2 of 3 pieces, 400 IncompleteBody)
        receiver = target_node.node.ctx.modulars.receiver  # type: ignore[union-attr]
        real_put, writing, release = store.put, trio.Event(), trio.Event()

        async def slow_put(key: str, data: Any, **kw: Any) -> None:
            writing.set()
            await release.wait()
            await real_put(key, data, **kw)

        store.put = slow_put
        answers: dict[str, httpx.Response] = {}

        async def keep(name: str, call: Any) -> None:
            answers[name] = await call()

        async with trio.open_nursery() as inner:
            inner.start_soon(keep, "last", lambda: put(len(segments) - 1, pieces[-1][0]))
            await writing.wait()
            inner.start_soon(keep, "done", done)

            def done_waits() -> bool:
                gate = getattr(receiver, "_gates", {}).get((obj.id, 0))
                return gate is not None and gate.cond.statistics().tasks_waiting == 1

            await wait_until(lambda: "done" in answers or done_waits())
            assert "done" not in answers, answers["done"].text
            release.set()
        store.put = real_put
        assert answers["last"].status_code == 200, answers["last"].text
        r = answers["done"]
        assert r.status_code == 200, r.text
        assert receiver._gates == {}
        assert await store.keys(obj.id) == [f"{obj.id}_s{s}_p0" for s in range(3)]
        for segment in range(len(segments)):
            assert await store.get(f"{obj.id}_s{segment}_p0") == pieces[segment][0]
        assert piece_rows(db_path, obj.id) == [
            (s, 0, hashlib.sha256(pieces[s][0]).digest()) for s in range(3)]
        assert bytes.fromhex(r.json()["integrity_hash"]) == sums[1]
        # once signed, a piece is taken again only with the checksum that was signed: the
        # same bytes (a re-send) are fine, other bytes would fail this SP's challenges
        # (found in review: they replaced the piece and its row)
        r = await put(0, pieces[0][0])
        assert r.status_code == 200, r.text
        other_bytes = bytes(len(pieces[0][0]))
        r = await put(0, other_bytes)
        assert (r.status_code, parse_error(r).code) == (409, "PieceAlreadySigned"), r.text
        assert await store.get(f"{obj.id}_s0_p0") == pieces[0][0]
        assert piece_rows(db_path, obj.id)[0] == (0, 0, hashlib.sha256(pieces[0][0]).digest())
        assert target_node.node.ctx.limiter.used("receiver").memory == 0  # type: ignore[union-attr]
        # receiver.max_concurrent pieces at once, the next one 503 (found in review: the
        # key was documented and not enforced)
        most = target_node.node.ctx.config.receiver.max_concurrent  # type: ignore[union-attr]
        with contextlib.ExitStack() as held:
            for _ in range(most):
                held.enter_context(receiver.piece_buffer(4096))
            with pytest.raises(ServiceUnavailable), receiver.piece_buffer(4096):
                pass
        with receiver.piece_buffer(4096):
            pass
        store.has_room = lambda nbytes: False  # a full disk: 507, not a 500 at the write
        with pytest.raises(ServiceError) as full, receiver.piece_buffer(4096):
            pass
        assert (full.value.code, full.value.status) == ("InsufficientStorage", 507)
        for node in nodes:
            await node.stop()


@pytest.mark.parametrize("accept", ["application/octet-stream",
                                    "application/json;q=0.5, application/octet-stream"])
def test_binary_challenge_is_asked_by_accept(accept: str) -> None:
    from modulars.downloader import wants_binary_challenge

    assert wants_binary_challenge(accept)
    assert not wants_binary_challenge("application/json")
    assert not wants_binary_challenge(None)


async def test_a_trickled_piece_is_cut_at_receiver_piece_timeout(tmp_path: Path,
                                                                 nursery: trio.Nursery) -> None:
    """A primary that trickles a piece's body (a byte now and then, never idle for
    gater.body_idle_timeout) held one of the secondary's receiver.max_concurrent slots and
    its piece buffer for as long as it liked: a few such requests refused every other
    primary's pieces (found by a hostile-primary probe). The body now has
    receiver.piece_timeout in all: 400 RequestTimeout, nothing stored, the buffer given back."""
    with trio.fail_after(60):
        chain = DevChain(tmp_path / "chain", block_interval=0.2, params=PARAMS)
        endpoint = await nursery.start(chain.serve)
        sps = make_chain_sps(tmp_path / "sps", 2, endpoint)
        configure(sps[1], receiver={"piece_timeout": 0.5})
        await register_on_chain(endpoint, sps)
        nodes = await start_nodes(nursery, sps)
        everyone = {sp.peer_id for sp in sps}
        await wait_until(lambda: all(n.trusted() == everyone - {n.sp.peer_id} for n in nodes))
        payload = os.urandom(MiB)
        segments = split(payload, PARAMS.segment_size)
        sums = object_checksums(segments, PARAMS.data_shards, PARAMS.parity_shards)
        primary = nodes[0].node.ctx
        assert primary is not None
        async with GfspClient(PrivateKey.generate(), chain=endpoint, timeout=60) as client:
            await client.create_bucket("tbucket", primary_sp=sps[0].keys.operator.address)
            obj = await client.create_object("tbucket", "o", size=len(payload), checksums=sums)
            [approval] = await primary.modulars.p2p.handle_replicate_piece_approval(
                ReplicatePieceApprovalTask(object=obj.info, params=PARAMS), 1, 1)
        piece = Codec(PARAMS.data_shards, PARAMS.parity_shards).encode(segments[0])[0]
        url = approval.endpoint.rstrip("/") + replicate_path(obj.id, 0, 0)
        headers = primary.modulars.signer.sign_http_request(
            "PUT", url, body_sha256=hashlib.sha256(piece).hexdigest(),
            headers={APPROVAL_HEADER: encode(approval).hex(),
                     "content-length": str(len(piece))})

        async def trickle() -> Any:
            for i in range(len(piece)):  # a byte every 50 ms: never idle, never done
                yield piece[i:i + 1]
                await trio.sleep(0.05)

        async with httpx.AsyncClient(timeout=30) as http:
            r = await http.put(url, content=trickle(), headers=headers)
        assert (r.status_code, parse_error(r).code) == (400, "RequestTimeout"), r.text
        secondary = nodes[1].node.ctx
        assert secondary is not None
        assert await secondary.piecestore.keys(obj.id) == []  # type: ignore[union-attr]
        assert secondary.limiter.used("receiver").memory == 0
        for node in nodes:
            await node.stop()
