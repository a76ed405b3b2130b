"""HTTP semantics of GET/HEAD object as an S3-style client sees them, on 127.0.0.1: a devchain
and 4 SPs (2 data + 1 parity, 256 KiB segments) in this process, one sealed object, raw
signed requests (httpx) whose status and headers the tests look at themselves."""

from __future__ import annotations

import httpx
import trio

from node.auth import quote_path
from node.crypto import PrivateKey
from testnet.client import GfspClient, checksums_of
from tests import test_data_faults as faults

TIMEOUT = 40
#: Text that is not UTF-8: a client told "charset=utf-8" would decode it wrongly.
LATIN1 = "Grüße, café, naïve\n".encode("latin-1")


async def _sealed_text_object(client: GfspClient, cluster: faults.Cluster, name: str,
                              payload: bytes, content_type: str) -> str:
    """Create, put and seal ``name`` with ``content_type``; its URL at the primary."""
    await client.create_bucket(faults.BUCKET, primary_sp=cluster.operator(0))
    sums = await checksums_of(faults.segments_of(payload), faults.PARAMS)
    await client.create_object(faults.BUCKET, name, size=len(payload), checksums=sums,
                               content_type=content_type)
    await client.put_object(faults.BUCKET, name, payload)
    await client.wait_sealed(faults.BUCKET, name, timeout=30)
    endpoint = await client.bucket_endpoint(faults.BUCKET)
    return endpoint.rstrip("/") + quote_path(f"/{faults.BUCKET}/{name}")


async def test_get_and_head_send_the_objects_content_type_as_is(tmp_path, nursery):
    """Found in review (raw GET of an object created as ``text/plain``): the answer said
    ``text/plain; charset=utf-8`` (starlette adds a charset to every text/ media type), so a
    client decoded a Latin-1 text wrongly. The Content-Type is the one on the chain, as is."""
    with trio.fail_after(TIMEOUT):
        cluster = await faults.start_cluster(tmp_path, nursery, 4)
        async with GfspClient(PrivateKey.generate(), chain=cluster.endpoint,
                              timeout=30) as client, httpx.AsyncClient(timeout=30) as http:
            url = await _sealed_text_object(client, cluster, "latin.txt", LATIN1, "text/plain")
            for method in ("GET", "HEAD"):
                r = await http.request(method, url, headers=client.sign(method, url))
                assert r.status_code == 200, r.text
                assert r.headers["content-type"] == "text/plain", method
                ranged = client.sign(method, url, headers={"range": "bytes=0-3"})
                r = await http.request(method, url, headers=ranged)
                assert r.status_code == 206
                assert r.headers["content-type"] == "text/plain", method
            r = await http.get(url, headers=client.sign("GET", url))
            assert r.content == LATIN1
        await cluster.stop()


async def test_if_range_serves_the_range_only_for_the_objects_etag(tmp_path, nursery):
    """Found in review (GET with ``Range`` and ``If-Range`` naming another ETag): the range
    was served anyway (206), so a client resuming a download of an object that was deleted
    and created again spliced bytes of the new one onto the old one. RFC 9110 13.1.5: when
    If-Range does not match (another ETag, a weak one, a date: no Last-Modified is sent), the
    Range is ignored and the whole object comes back, 200."""
    with trio.fail_after(TIMEOUT):
        cluster = await faults.start_cluster(tmp_path, nursery, 4)
        async with GfspClient(PrivateKey.generate(), chain=cluster.endpoint,
                              timeout=30) as client, httpx.AsyncClient(timeout=30) as http:
            url = await _sealed_text_object(client, cluster, "resume.bin", LATIN1,
                                            "application/octet-stream")
            r = await http.head(url, headers=client.sign("HEAD", url))
            etag = r.headers["etag"]
            for method in ("GET", "HEAD"):
                same = client.sign(method, url, headers={"range": "bytes=5-"})
                same["if-range"] = etag
                r = await http.request(method, url, headers=same)
                assert r.status_code == 206, (method, r.text)
                assert r.headers["content-range"] == f"bytes 5-{len(LATIN1) - 1}/{len(LATIN1)}"
                for other in ('"' + "0" * 64 + '"', f"W/{etag}",
                              "Wed, 21 Oct 2015 07:28:00 GMT"):
                    # a Range past the end is ignored too: no 416 for a range never served
                    for rng in ("bytes=5-", f"bytes={len(LATIN1)}-"):
                        headers = client.sign(method, url, headers={"range": rng})
                        headers["if-range"] = other
                        r = await http.request(method, url, headers=headers)
                        assert r.status_code == 200, (method, other, rng, r.text)
                        assert "content-range" not in r.headers
                        assert r.headers["content-length"] == str(len(LATIN1))
                        if method == "GET":
                            assert r.content == LATIN1
        await cluster.stop()
