"""Issue 4's integration test: a devchain and two nodes on 127.0.0.1; a client creates a bucket
and an object through approvals from its primary SP and sees them in the SP's metadata."""

from __future__ import annotations

import os

import pytest
import trio

from node.crypto import PrivateKey
from node.tasks import StorageParams
from testnet.client import GfspClient, SPError
from testnet.devchain import DevChain
from tests.p2pnet import make_chain_sps, register_on_chain, start_nodes, wait_until

PARAMS = StorageParams(segment_size=64 << 10, data_shards=1, parity_shards=0,
                       max_payload=1 << 30)


async def test_bucket_and_object_through_approvals(tmp_path, nursery) -> None:
    with trio.fail_after(60):
        chain = DevChain(tmp_path / "chain", block_interval=0.2, params=PARAMS)
        endpoint = await nursery.start(chain.serve)
        sps = make_chain_sps(tmp_path / "sps", 2, endpoint)
        await register_on_chain(endpoint, sps)
        nodes = await start_nodes(nursery, sps)
        # the two SPs find each other through the chain's registry
        await wait_until(lambda: nodes[0].trusted() == {sps[1].peer_id}
                         and nodes[1].trusted() == {sps[0].peer_id})
        primary = sps[0].keys.operator.address
        data_file = tmp_path / "hello.bin"
        data_file.write_bytes(os.urandom(150_000))  # three segments, the last one short
        async with GfspClient(PrivateKey.generate(), chain=endpoint) as client:
            bucket = await client.create_bucket("photos", primary_sp=primary)
            assert (bucket.owner, bucket.primary_sp) == (client.address, primary)
            obj = await client.create_object_from_file("photos", "a/b.bin", data_file)
            assert obj.size == 150_000 and not obj.sealed and len(obj.checksums) == 2
            # the primary's metadata sees both
            meta = await client.bucket_meta("photos")
            assert meta["owner"] == client.address
            listing = await client.list_objects("photos", prefix="a/")
            assert [o["name"] for o in listing["objects"]] == ["a/b.bin"]
            ometa = await client.object_meta("photos", "a/b.bin")
            assert ometa["size"] == 150_000
            progress = await client.upload_progress("photos", "a/b.bin")
            assert progress["state"] == "NOT_STARTED"
            buckets = await client.list_buckets(sps[0].info().endpoint)
            assert [b["name"] for b in buckets["buckets"]] == ["photos"]
            # the other SP is not this bucket's primary: it refuses object approvals
            with pytest.raises(SPError) as info:
                await client.request("POST", sps[1].info().endpoint,
                                     "/gfsp/v1/approvals/create-object",
                                     json_body={"bucket": "photos", "object": "x", "size": 1,
                                                "content_type": "text/plain",
                                                "checksums": [c.hex() for c in obj.checksums]})
            assert info.value.status == 403
        for node in nodes:
            await node.stop()
