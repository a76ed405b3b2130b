"""End to end on 127.0.0.1: a devchain and 7 SPs (4 data + 2 parity), and 4 SPs (2 + 1), all
in this process: create, put, replicate, seal, get (whole and ranges), challenge."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from modulars.downloader import challenge_path, decode_challenge_binary
from node.crypto import PrivateKey
from node.ec import integrity_hash
from node.tasks import StorageParams
from testnet.client import GfspClient
from testnet.devchain import DevChain
from tests.p2pnet import (
    RunningNode,
    make_chain_sps,
    register_on_chain,
    start_nodes,
    wait_until,
)

MiB = 1 << 20


@pytest.mark.parametrize(("n_sps", "data", "parity", "segment"),
                         [(7, 4, 2, 16 * MiB), (4, 2, 1, 4 * MiB)], ids=["7sp-4+2", "4sp-2+1"])
async def test_put_seal_get_challenge(tmp_path: Path, nursery: trio.Nursery, n_sps: int,
                                      data: int, parity: int, segment: int) -> None:
    params = StorageParams(segment_size=segment, data_shards=data, parity_shards=parity,
                           max_payload=1 << 34)
    with trio.fail_after(240):
        chain = DevChain(tmp_path / "chain", block_interval=0.2, params=params)
        endpoint = await nursery.start(chain.serve)
        sps = make_chain_sps(tmp_path / "sps", n_sps, endpoint)
        await register_on_chain(endpoint, sps)
        nodes = await start_nodes(nursery, sps)
        everyone = {sp.peer_id for sp in sps}
        await wait_until(lambda: all(n.trusted() == everyone - {n.sp.peer_id} for n in nodes))

        payload = os.urandom(40 * MiB + 12345)
        source = tmp_path / "payload.bin"
        source.write_bytes(payload)
        primary = sps[0].keys.operator.address
        async with GfspClient(PrivateKey.generate(), chain=endpoint, timeout=120) as client:
            await client.create_bucket("data", primary_sp=primary)
            await client.create_object_from_file("data", "big.bin", source)
            await client.put_object("data", "big.bin", source)
            await client.create_object("data", "empty", size=0,
                                       checksums=[hashlib.sha256(b"").digest()] * (
                                           1 + data + parity))
            await client.put_object("data", "empty", b"")
            sealed = await client.wait_sealed("data", "big.bin", timeout=180)
            empty = await client.wait_sealed("data", "empty", timeout=60)
            assert len(sealed.secondaries) == data + parity
            assert primary not in sealed.secondaries
            assert len(set(sealed.secondaries)) == data + parity

            assert await client.get_object_bytes("data", "big.bin") == payload
            assert await client.get_object_bytes("data", "empty") == b""
            size = len(payload)
            for low, high in [(0, 0), (segment - 10, segment + 10), (size - 7, size - 1),
                              (3 * MiB, 21 * MiB)]:
                got = await client.get_object_bytes("data", "big.bin", byte_range=(low, high))
                assert got == payload[low:high + 1], (low, high)

            # HEAD: the GET's status and headers, no byte read (the metrics below count
            # the 6 GETs only), errors as a GET's
            async with httpx.AsyncClient(timeout=60) as http:
                url = f"{sps[0].info().endpoint}/data/big.bin"
                r = await http.head(url, headers=client.sign("HEAD", url))
                assert (r.status_code, r.headers["content-length"], r.content) == \
                    (200, str(size), b"")
                assert r.headers["etag"] == f'"{sealed.checksums[0].hex()}"'
                ranged = client.sign("HEAD", url, headers={"range": "bytes=10-19"})
                r = await http.head(url, headers=ranged)
                assert (r.status_code, r.headers["content-length"]) == (206, "10")
                assert r.headers["content-range"] == f"bytes 10-19/{size}"
                past = client.sign("HEAD", url, headers={"range": f"bytes={size}-"})
                r = await http.head(url, headers=past)
                assert (r.status_code, r.headers["content-range"]) == (416, f"bytes */{size}")
                url = f"{sps[0].info().endpoint}/data/nothing"
                assert (await http.head(url, headers=client.sign("HEAD", url))).status_code \
                    == 404
            # challenge every secondary (and the primary) and verify against the chain
            segments = -(-size // segment)
            by_operator = {sp.keys.operator.address: sp for sp in sps}
            for index, operator in enumerate(sealed.secondaries):
                sp_endpoint = by_operator[operator].info().endpoint
                for seg in range(segments):
                    piece, checksums, integrity = await client.challenge(
                        sp_endpoint, sealed.id, seg, index)
                    assert hashlib.sha256(piece).digest() == checksums[seg]
                    assert integrity == integrity_hash(checksums) == sealed.checksums[1 + index]
            # the binary form SPs ask each other for gives the same answer as the JSON one
            for index, operator in enumerate(sealed.secondaries[:2]):
                sp_endpoint = by_operator[operator].info().endpoint
                url = sp_endpoint + challenge_path(sealed.id, 1, index)
                headers = client.sign("GET", url, headers={"accept": "application/octet-stream"})
                async with httpx.AsyncClient(timeout=60) as http:
                    r = await http.get(url, headers=headers)
                assert r.status_code == 200, r.text
                assert r.headers["content-type"] == "application/octet-stream"
                assert decode_challenge_binary(r.headers, r.content) == \
                    await client.challenge(sp_endpoint, sealed.id, 1, index)
                # a reader that leaves after the head: the piece's buffer still goes back
                headers = client.sign("GET", url, headers={"accept": "application/octet-stream"})
                async with httpx.AsyncClient(timeout=60) as http, \
                        http.stream("GET", url, headers=headers) as r:
                    assert r.status_code == 200
            # every piece read for a challenge came back to its store's pool once answered
            stores = [n.node.ctx.piecestore for n in nodes]
            await wait_until(lambda: all(s._buffers.in_use == 0 for s in stores))
            piece, checksums, integrity = await client.challenge(
                sps[0].info().endpoint, sealed.id, 0, -1)
            assert piece == payload[:segment]
            assert integrity == sealed.checksums[0]
            assert empty.size == 0
        await check_primary_metrics(nodes[0], size=size, n_sps=n_sps, shards=data + parity)
        for node in nodes:
            await node.stop()


async def check_primary_metrics(node: RunningNode, *, size: int, n_sps: int, shards: int
                                ) -> None:
    """Issue 6: after an upload, the primary's /metrics has the counters and gauges."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{node.node.admin_endpoint}/metrics")).text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("gfsp_http_requests_total", route="/{bucket}/{object:path}", method="PUT",
                 status="200") == 2
    assert value("gfsp_tasks", type="SealObject", state="done") == 2
    assert value("gfsp_tasks", type="ReplicatePiece", state="done") == 2
    assert value("gfsp_piecestore_used_bytes") == size
    assert value("gfsp_p2p_peers", state="trusted") == n_sps - 1
    assert value("gfsp_p2p_approval_outcomes_total", role="asker", outcome="approved") >= shards
    assert value("gfsp_chain_height") > 0
    assert value("gfsp_limiter_used", scope="service:uploader", resource="memory") == 0
    assert value("gfsp_limiter_used", scope="service:executor", resource="memory") == 0
    # whole, empty and 4 ranges; one challenge of the primary's segment; nothing degraded
    events = {k[1][0][1]: v for k, v in samples.items() if k[0] == "gfsp_downloader_events_total"}
    assert value("gfsp_downloader_events_total", event="downloads") == 6, events
    assert value("gfsp_downloader_events_total", event="challenges") == 1
    assert ("gfsp_downloader_events_total", (("event", "degraded_reads"),)) not in samples
    assert value("gfsp_downloader_events_total", event="heads") == 2  # the 416 and 404 not
