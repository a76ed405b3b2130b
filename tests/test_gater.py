"""Tests of the gater (modulars/gater): real hypercorn on 127.0.0.1 port 0, httpx clients.

Two set-ups:

- ``fakes``: the gater over small fakes of the authorizer, approver and metadata modulars
  (``FakeAuthorizer``, ``FakeApprover``, ``FakeMetadata``, named as fakes): authentication,
  limits, errors, drain;
- ``real``: the gater over the real signer, authorizer, approver and metadata modulars, a real
  SPDB and an in-process devchain: every route end to end, and the schema-driven fuzz run.

Every test runs under ``trio.fail_after``; nothing sleeps a fixed time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import secrets
import struct
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import hypercorn.trio.run
import hypercorn.trio.tcp_server
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from starlette.responses import StreamingResponse

from modulars.gater import Gater
from modulars.gater.app import AuthOpType, Call, RouteSpec
from modulars.gater.body import BodyStream
from modulars.gater.server import set_receive_size
from node import chain_msgs
from node.app import build_limiter
from node.auth import parse_query, payload_sha256, quote_path, sign_request
from node.config import Config, GaterSection, NodeSection
from node.crypto import PrivateKey, unpack
from node.db import open_spdb
from node.errors import AccessDenied, NoSuchBucket, NoSuchKey, ServiceError
from node.modular import ModularBase, NodeContext
from node.rcmgr import Limit, ResourceLimiter
from testnet.devchain.testing import TestSP, new_keyset

TIMEOUT = 20
API = "/gfsp/v1"
CHECKSUMS = [secrets.token_hex(32) for _ in range(4)]


# --- a signing client (the reference for the client library) -------------------------------


@dataclass
class Client:
    """Signs and sends requests to one gater."""

    http: httpx.AsyncClient
    endpoint: str
    key: PrivateKey

    def build(self, method: str, path: str, *, query: list[tuple[str, str]] | None = None,
              json_body: Any = None, content: Any = None,
              headers: dict[str, str] | None = None) -> httpx.Request:
        url = self.endpoint + quote_path(path)
        if query:
            url += "?" + urlencode(query)
        if json_body is not None:
            content = json.dumps(json_body).encode()
            headers = {"content-type": "application/json", **(headers or {})}
        return self.http.build_request(method, url, content=content, headers=headers)

    def sign(self, request: httpx.Request, *, key: PrivateKey | None = None,
             payload: bytes | str | None = "body", expiry: int | None = None,
             nonce: bytes | None = None) -> httpx.Request:
        """Sign exactly what httpx will send: its raw path and query, host, the body hash."""
        path, _, qs = request.url.raw_path.decode("ascii").partition("?")
        if payload == "body":
            payload_hash: str | None = payload_sha256(request.content)
        elif payload is None:
            payload_hash = None
        else:
            assert isinstance(payload, bytes)
            payload_hash = payload_sha256(payload)
        added = sign_request(key or self.key, request.method, path, parse_query(qs),
                             dict(request.headers), payload_hash,
                             expiry if expiry is not None else int(time.time()) + 300,
                             nonce if nonce is not None else secrets.token_bytes(16))
        request.headers.update(added)
        return request

    async def call(self, method: str, path: str, *, signed: bool = True, **kw: Any
                   ) -> httpx.Response:
        sign_kw = {k: kw.pop(k) for k in ("key", "payload", "expiry", "nonce") if k in kw}
        request = self.build(method, path, **kw)
        if signed:
            self.sign(request, **sign_kw)
        return await self.http.send(request)


def xml_error(response: httpx.Response) -> dict[str, str]:
    assert response.headers["content-type"] == "application/xml"
    root = ET.fromstring(response.content)
    assert root.tag == "Error"
    out = {child.tag: child.text or "" for child in root}
    assert set(out) == {"Code", "Message", "RequestId"}
    assert out["RequestId"] == response.headers["x-gfsp-request-id"]
    return out


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, str]:
    assert response.status_code == status, (response.status_code, response.text)
    err = xml_error(response)
    assert err["Code"] == code, err
    return err


# --- fakes of the modulars the gater calls ---------------------------------------------------


class FakeAuthorizer(ModularBase):
    """A fake authorizer: bucket owners in a dict; raises like the real one."""

    name = "authorizer"

    def __init__(self, ctx: NodeContext) -> None:
        super().__init__(ctx)
        self.owners: dict[str, str] = {}
        self.calls: list[tuple[int, str, str, str]] = []

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        task_status.started()
        await trio.sleep_forever()

    async def verify_authorize(self, op: int, account: str, bucket: str, object: str = ""
                               ) -> bool:
        self.calls.append((int(op), account, bucket, object))
        if op == AuthOpType.ASK_CREATE_BUCKET_APPROVAL:
            if bucket in self.owners:
                raise ServiceError("BucketAlreadyExists", f"bucket {bucket!r} exists", 409)
            return True
        if bucket not in self.owners:
            raise NoSuchBucket(bucket)
        if self.owners[bucket] != account:
            raise AccessDenied(f"{account} does not own {bucket}")
        return True


class FakeApprover(ModularBase):
    """A fake approver: approves everything at expiry height 100, records the steps."""

    name = "approver"

    def __init__(self, ctx: NodeContext) -> None:
        super().__init__(ctx)
        self.steps: list[str] = []

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        task_status.started()
        await trio.sleep_forever()

    async def pre_create_bucket_approval(self, task: Any) -> None:
        self.steps.append("pre")

    async def handle_create_bucket_approval_task(self, task: Any) -> bool:
        self.steps.append("handle")
        task.expiry_height = 100
        return True

    def post_create_bucket_approval(self, task: Any) -> None:
        self.steps.append("post")

    async def pre_create_object_approval(self, task: Any) -> None:
        self.steps.append("pre-object")

    async def handle_create_object_approval_task(self, task: Any) -> bool:
        self.steps.append("handle-object")
        task.expiry_height = 101
        return task.object.size < 10**9  # "no" to big objects

    def post_create_object_approval(self, task: Any) -> None:
        self.steps.append("post-object")

    def approval_message(self, task: Any) -> dict[str, Any]:
        if hasattr(task, "bucket"):
            msg = chain_msgs.create_bucket_approval(
                creator=task.account, bucket=task.bucket, primary_sp="0x" + "00" * 20,
                expiry_height=task.expiry_height)
        else:
            o = task.object
            msg = chain_msgs.create_object_approval(
                creator=o.owner, bucket=o.bucket, object=o.name, size=o.size,
                content_type=o.content_type, checksums=list(o.checksums),
                expiry_height=task.expiry_height)
        msg["sig"] = b"\x01" * 64
        return msg


@dataclass(frozen=True)
class FakeBucket:
    id: int
    name: str
    owner: str


class FakeMetadata(ModularBase):
    """A fake metadata modular over dicts; ``gate`` makes get_bucket_meta wait; ``boom``
    makes it raise an unexpected error."""

    name = "metadata"

    def __init__(self, ctx: NodeContext) -> None:
        super().__init__(ctx)
        self.buckets: dict[str, FakeBucket] = {}
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.entered = trio.Event()
        self.gate: trio.Event | None = None
        self.boom = False

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        task_status.started()
        await trio.sleep_forever()

    async def get_bucket_meta(self, bucket: str) -> FakeBucket:
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.boom:
            raise RuntimeError("secret internal detail")
        return self.buckets[bucket]

    async def list_buckets(self, account: str) -> list[FakeBucket]:
        return [b for b in self.buckets.values() if b.owner == account]

    async def list_objects(self, bucket: str, *, prefix: str = "", start_after: str = "",
                           limit: int | None = None) -> tuple[list[dict[str, Any]], str | None]:
        names = sorted(n for (b, n) in self.objects if b == bucket and n.startswith(prefix)
                       and n > start_after)
        page = names[:limit or 1000]
        more = len(names) > len(page)
        return [self.objects[(bucket, n)] for n in page], (page[-1] if more else None)

    async def get_object_meta(self, bucket: str, object: str) -> dict[str, Any]:
        try:
            return self.objects[(bucket, object)]
        except KeyError:
            raise NoSuchKey(bucket, object) from None

    async def get_upload_progress(self, bucket: str, object: str) -> dict[str, Any]:
        await self.get_object_meta(bucket, object)
        return {"object_id": 1, "state": "UPLOADING", "segments_done": 1, "bytes_done": 7,
                "error": "", "update_time": None}


# --- set-ups ---------------------------------------------------------------------------------


@dataclass
class Stack:
    gater: Gater
    ctx: NodeContext
    client: Client
    other: Client  # another account
    fakes: dict[str, Any] = field(default_factory=dict)
    sp: TestSP | None = None

    @property
    def port(self) -> int:
        return int(self.client.endpoint.rsplit(":", 1)[1])


def gater_config(**gater: Any) -> Config:
    section = dataclasses.replace(GaterSection(listen="127.0.0.1:0", drain_timeout=10), **gater)
    return Config(node=NodeSection(name="sp-test"), gater=section)


async def bare_gater(nursery: trio.Nursery, config: Config,
                     routes: tuple[RouteSpec, ...]) -> tuple[Gater, int]:
    """A gater with only ``routes`` (no modulars behind it), serving in ``nursery``; its
    port."""
    ctx = NodeContext(config=config, limiter=build_limiter(config), db=None,  # type: ignore[arg-type]
                      keys=new_keyset())
    gater = Gater(ctx, routes=routes)
    await nursery.start(gater.serve)
    return gater, int(str(gater.endpoint).rsplit(":", 1)[1])


StackFactory = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def fakes(nursery: trio.Nursery) -> AsyncIterator[StackFactory]:
    """Start a gater over fakes; keyword arguments override GaterSection fields."""
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        async def start(**gater: Any) -> Stack:
            config = gater_config(**gater)
            ctx = NodeContext(config=config, limiter=build_limiter(config), db=None,  # type: ignore[arg-type]
                              keys=new_keyset())
            made = {}
            for cls in (FakeAuthorizer, FakeApprover, FakeMetadata):
                m = cls(ctx)
                await nursery.start(m.serve)
                ctx.modulars.mark_running(m)
                made[m.name] = m
            g = Gater(ctx)
            await nursery.start(g.serve)
            ctx.modulars.mark_running(g)
            assert g.endpoint is not None
            return Stack(g, ctx, Client(http, g.endpoint, PrivateKey.generate()),
                         Client(http, g.endpoint, PrivateKey.generate()), made)
        yield start


@pytest.fixture
async def real(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[StackFactory]:
    """Start a gater over the real modulars, SPDB and an in-process devchain."""
    from modulars.approver import Approver
    from modulars.authorizer import Authorizer
    from modulars.downloader import Downloader
    from modulars.manager import Manager
    from modulars.metadata import Metadata
    from modulars.receiver import Receiver
    from modulars.signer import Signer
    from modulars.uploader import Uploader
    from node.chain import DevChainClient
    from node.db import open_spdb
    from node.piecestore import LocalPieceStore
    from testnet.devchain import DevChain

    devchain = DevChain(tmp_path / "chain", block_interval=0.2)
    chain_endpoint = await nursery.start(devchain.serve)
    async with (DevChainClient(chain_endpoint, request_timeout=5,
                               height_refresh_interval=0.2) as chain,
                open_spdb(tmp_path / "spdb.sqlite3") as db,
                httpx.AsyncClient(timeout=TIMEOUT) as http):
        await nursery.start(chain.run)

        async def start(**gater: Any) -> Stack:
            config = gater_config(**gater)
            keys = new_keyset()
            sp = TestSP(keys, "http://127.0.0.1:1", "12D3KooWgatertest")
            await chain.broadcast(sp.register_tx())
            store = await LocalPieceStore.create(tmp_path / f"pieces-{keys.p2p.address}",
                                                 fsync=False)
            ctx = NodeContext(config=config, limiter=build_limiter(config), db=db, keys=keys,
                              sp_registry=chain, chain=chain, piecestore=store)
            for cls in (Signer, Metadata, Authorizer, Approver, Manager, Uploader, Receiver,
                        Downloader):
                m = cls(ctx)
                await nursery.start(m.serve)
                ctx.modulars.mark_running(m)
            g = Gater(ctx)
            await nursery.start(g.serve)
            ctx.modulars.mark_running(g)
            assert g.endpoint is not None
            return Stack(g, ctx, Client(http, g.endpoint, PrivateKey.generate()),
                         Client(http, g.endpoint, PrivateKey.generate()), sp=sp)
        yield start


def own_bucket(stack: Stack, name: str = "mybucket", *, owner: Client | None = None) -> None:
    owner = owner or stack.client
    stack.fakes["authorizer"].owners[name] = owner.key.address
    stack.fakes["metadata"].buckets[name] = FakeBucket(1, name, owner.key.address)


# --- public routes --------------------------------------------------------------------------


async def test_status_is_public(fakes: StackFactory) -> None:
    with trio.fail_after(TIMEOUT):
        s = await fakes()
        r = await s.client.call("GET", f"{API}/status", signed=False)
        assert r.status_code == 200
        body = r.json()
        assert body["node"] == "sp-test"
        assert body["operator"] == s.ctx.keys.operator.address
        assert set(body["modulars"]) >= {"gater", "authorizer", "approver", "metadata"}
        assert body["height"] is None  # no chain here
        assert body["endpoint"] == s.gater.endpoint
        assert re.fullmatch(r"[0-9a-f]{16}", r.headers["x-gfsp-request-id"])
        assert "server" not in r.headers


async def test_openapi_document_lists_every_route(fakes: StackFactory) -> None:
    with trio.fail_after(TIMEOUT):
        s = await fakes()
        r = await s.client.call("GET", f"{API}/openapi.json", signed=False)
        assert r.status_code == 200
        doc = r.json()
        assert doc["openapi"].startswith("3.")
        ops = {(m.upper(), p) for p, item in doc["paths"].items() for m in item}
        assert ops == {
            ("GET", f"{API}/status"), ("GET", f"{API}/openapi.json"),
            ("POST", f"{API}/approvals/create-bucket"),
            ("POST", f"{API}/approvals/create-object"),
            ("GET", f"{API}/buckets/{{bucket}}"), ("GET", f"{API}/buckets/{{bucket}}/objects"),
            ("GET", f"{API}/objects/{{bucket}}/{{object}}"),
            ("GET", f"{API}/uploads/{{bucket}}/{{object}}"),
            ("GET", f"{API}/accounts/{{address}}/buckets"),
            ("PUT", f"{API}/replicate/{{object_id}}/{{index}}/{{segment}}"),
            ("POST", f"{API}/replicate/{{object_id}}/{{index}}/done"),
            ("GET", f"{API}/challenge/{{object_id}}/{{segment}}/{{index}}"),
            ("PUT", "/{bucket}/{object}"), ("GET", "/{bucket}/{object}"),
        }
        assert doc["paths"][f"{API}/status"]["get"]["security"] == []
        assert doc["paths"][f"{API}/buckets/{{bucket}}"]["get"]["security"]
        assert doc["servers"] == [{"url": s.gater.endpoint}]


# --- authentication refusals ----------------------------------------------------------------


async def test_unsigned_request_is_401(fakes: StackFactory) -> None:
    with trio.fail_after(TIMEOUT):
        s = await fakes()
        own_bucket(s)
        r = await s.client.call("GET", f"{API}/buckets/mybucket", signed=False)
        assert_error(r, 401, "MissingAuthentication")
        assert r.headers["www-authenticate"] == "GFSP1-ED25519"
        r = await s.client.call("POST", f"{API}/approvals/create-bucket", signed=False,
                                json_body={"bucket": "abc"})
        assert_error(r, 401, "MissingAuthentication")
        assert s.fakes["approver"].steps == []


@pytest.mark.parametrize("garble", [
    "Basic dXNlcjpwYXNz",
    "GFSP1-ED25519",
    "GFSP1-ED25519 Account=0x1,PubKey=2",
    "GFSP1-ED25519 " + "A=" * 2000,
    "\u00e9\u00e9".encode("latin-1"),
])
async def test_garbled_authorization_is_401(fakes: StackFactory, garble: str | bytes) -> None:
    with trio.fail_after(TIMEOUT):
        s = await fakes()
        own_bucket(s)
        request = s.client.build("GET", f"{API}/buckets/mybucket")
        s.client.sign(request)
        raw = [(k, v) for k, v in request.headers.raw if k.lower() != b"authorization"]
        value = garble.encode() if isinstance(garble, str) else garble
        request.headers = httpx.Headers([*raw, (b"authorization", value)])
        r = await s.client.http.send(request)
        assert_error(r, 401, "MalformedAuthorization")


async def test_expired_and_too_far_are_403(fakes: StackFactory) -> None:
    with trio.fail_after(TIMEOUT):
        s = await fakes(max_signature_age=3600)
        own_bucket(s)
        now = int(time.time())
        r = await s.client.call("GET", f"{API}/buckets/mybucket", expiry=now - 5)
        assert_error(r, 403, "ExpiredRequest")
        r = await s.client.call("GET", f"{API}/buckets/mybucket", expiry=now + 3700)
        assert_error(r, 403, "ExpiryTooFar")
        r = await s.client.call("GET", f"{API}/buckets/mybucket", expiry=now + 3000)
        assert r.status_code == 200


async def test_wrong_key_is_403(fakes: StackFactory) -> None:
    """Signed by another key while naming the client's account and key."""
    with trio.fail_after(TIMEOUT):
        s = await fakes()
        own_bucket(s)
        request = s.client.build("GET", f"{API}/buckets/mybucket")
        s.client.sign(request, nonce=bytes(16))
        forged = s.client.build("GET", f"{API}/buckets/mybucket")
        s.client.sign(forged, key=s.other.key, nonce=bytes(16))
        mine = request.headers["authorization"]
        theirs = forged.headers["authorization"]
        request.headers["authorization"] = (mine.rsplit("Signature=", 1)[0] + "Signature="
                                            + theirs.rsplit("Signature=", 1)[1])
        r = await s.client.http.send(request)
        assert_error(r, 403, "SignatureDoesNotMatch")


async def test_wrong_account_is_403(fakes: StackFactory) -> None:
    """A valid signature by the other key, but Account names the client's address."""
    with trio.fail_after(TIMEOUT):
        s = await fakes()
        own_bucket(s)
        request = s.client.build("GET", f"{API}/buckets/mybucket")
        s.client.sign(request, key=s.other.key)
        request.headers["authorization"] = request.headers["authorization"].replace(
            s.other.key.address, s.client.key.address)
        r = await s.client.http.send(request)
        assert_error(r, 403, "AccountMismatch")


async def test_tampered_request_is_403(fakes: StackFactory) -> None:
    with trio.fail_after(TIMEOUT):
        s = await fakes()
        own_bucket(s)
        own_bucket(s, "otherbucket")
        request = s.client.build("GET", f"{API}/buckets/mybucket")
        s.client.sign(request)
        moved = s.client.build("GET", f"{API}/buckets/otherbucket")
        moved.headers.update({k: request.headers[k]
                              for k in ("authorization", "x-gfsp-content-sha256")})
        r = await s.client.http.send(moved)
        assert_error(r, 403, "SignatureDoesNotMatch")


def signed_for(client: Client, host: str, path: str, *, to: str | None = None
               ) -> httpx.Request:
    """A GET of ``path`` signed for ``host``, sent to ``to`` (default: the client's gater)."""
    request = client.build("GET", path, headers={"host": host})
    client.sign(request)
    if to is not None:
        request.url = httpx.URL(to + quote_path(path))
    return request


async def test_a_request_signed_for_another_sp_is_421(fakes: StackFactory) -> None:
    """Each SP keeps its own replay cache: a request signed for SP b, replayed unchanged at
    SP a, must not act at a (found in review: the signed host was never compared)."""
    with trio.fail_after(TIMEOUT):
        a, b = await fakes(), await fakes()
        own_bucket(a)
        b_host = b.client.endpoint.removeprefix("http://")
        request = signed_for(a.client, b_host, f"{API}/buckets/mybucket", to=a.client.endpoint)
        assert request.headers["host"] == b_host
        r = await a.client.http.send(request)
        err = assert_error(r, 421, "MisdirectedRequest")
        assert b_host in err["Message"]
        # the same account, signing for a's own host (any case, as sent): served
        a_host = a.client.endpoint.removeprefix("http://")
        r = await a.client.http.send(signed_for(a.client, a_host.upper(),
                                                f"{API}/buckets/mybucket"))
        assert r.status_code == 200, r.text
        # a loopback gater is also localhost (the port still names the SP)
        port = a_host.rsplit(":", 1)[1]
        r = await a.client.http.send(signed_for(a.client, f"localhost:{port}",
                                                f"{API}/buckets/mybucket"))
        assert r.status_code == 200, r.text
        r = await a.client.http.send(signed_for(a.client, f"localhost:{b.port}",
                                                f"{API}/buckets/mybucket"))
        assert_error(r, 421, "MisdirectedRequest")
        # a host that is no host[:port] at all
        r = await a.client.http.send(signed_for(a.client, "a b", f"{API}/buckets/mybucket"))
        assert r.status_code in (400, 421), r.text


async def test_gater_hosts_names_further_hosts(fakes: StackFactory) -> None:
    with trio.fail_after(TIMEOUT):
        s = await fakes(hosts=["SP.example", "alias.example:8443", "tls.example:443"])
        own_bucket(s)
        for host, status in (("sp.example", 200), ("sp.example:80", 200),
                             ("alias.example:8443", 200), ("alias.example", 421),
                             ("sp.example:9033", 421), ("other.example", 421),
                             ("tls.example", 200), ("tls.example:443", 200)):
            r = await s.client.http.send(signed_for(s.client, host, f"{API}/buckets/mybucket"))
            assert r.status_code == status, (host, r.status_code, r.text)


async def test_the_registered_endpoint_names_the_sp(real: StackFactory) -> None:
    """Behind a proxy, clients sign for the endpoint in the SP registry, not the bound one."""
    with trio.fail_after(TIMEOUT):
        s = await real()
        assert s.sp is not None and s.sp.endpoint == "http://127.0.0.1:1"
        path = f"{API}/accounts/{s.client.key.address}/buckets"
        r = await s.client.http.send(signed_for(s.client, "127.0.0.1:1", path))
        assert r.status_code == 200, r.text
        r = await s.client.http.send(signed_for(s.client, "127.0.0.1:2", path))
        assert_error(r, 421, "MisdirectedRequest")


async def test_replayed_request_is_403(fakes: StackFactory) -> None:
    with trio.fail_after(TIMEOUT):
        s = await fakes()
        own_bucket(s)
        request = s.client.build("GET", f"{API}/buckets/mybucket")
        s.client.sign(request)
        assert (await s.client.http.send(request)).status_code == 200
        again = s.client.build("GET", f"{API}/buckets/mybucket")
        again.headers.update(request.headers)
        r = await s.client.http.send(again)
        assert_error(r, 403, "ReplayedRequest")


async def test_body_hash_mismatch_is_400(fakes: StackFactory) -> None:
    with trio.fail_after(TIMEOUT):
        s = await fakes()
        r = await s.client.call("POST", f"{API}/approvals/create-bucket",
                                json_body={"bucket": "abc"}, payload=b'{"bucket":"xyz"}')
        assert_error(r, 400, "ContentSha256Mismatch")
        assert s.fakes["approver"].steps == []


async def test_unsigned_payload_refused_on_json_routes(fakes: StackFactory) -> None:
    with trio.fail_after(TIMEOUT):
        s = await fakes()
        r = await s.client.call("POST", f"{API}/approvals/create-bucket",
                                json_body={"bucket": "abc"}, payload=None)
        assert_error(r, 400, "UnsignedPayloadNotAllowed")
        own_bucket(s)
        r = await s.client.call("GET", f"{API}/buckets/mybucket", payload=None)
        assert r.status_code == 200  # reads have no body to protect


# --- size limits -----------------------------------------------------------------------------


async def test_oversized_body_is_413(fakes: StackFactory) -> None:
    with trio.fail_after(TIMEOUT):
        s = await fakes(max_json_body=4096)
        big = {"bucket": "abc", "pad": "x" * 5000}
        r = await s.client.call("POST", f"{API}/approvals/create-bucket", json_body=big)
        assert_error(r, 413, "EntityTooLarge")
        r = await s.client.call("POST", f"{API}/approvals/create-bucket", json_body=big,
                                signed=False)
        assert_error(r, 413, "EntityTooLarge")  # refused before anything else

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(6):
                yield b" " * 1024

        request = s.client.build("POST", f"{API}/approvals/create-bucket", content=chunks(),
                                 headers={"content-type": "application/json"})
        assert "content-length" not in request.headers
        s.client.sign(request, payload=b" " * 6144)
        r = await s.client.http.send(request)
        assert_error(r, 413, "EntityTooLarge")
        assert s.fakes["approver"].steps == []
        # The node still serves.
        r = await s.client.call("POST", f"{API}/approvals/create-bucket",
                                json_body={"bucket": "abc"})
        assert r.status_code == 200


async def test_oversized_head_is_refused(fakes: StackFactory) -> None:
    with trio.fail_after(TIMEOUT):
        s = await fakes(max_header_bytes=2048)
        r = await s.client.call("GET", f"{API}/status", signed=False,
                                headers={"x-pad": "y" * 4096})
        assert_error(r, 431, "RequestHeaderSectionTooLarge")
        # A head arriving in pieces is refused by h11 (hypercorn's plain 400) or by the app.
        with trio.socket.socket() as sock:
            await sock.connect(("127.0.0.1", s.port))
            try:  # hypercorn may answer and close before the head is complete
                await sock.send(b"GET /gfsp/v1/status HTTP/1.1\r\nhost: x\r\n")
                for _ in range(8):
                    await sock.send(b"x-pad: " + b"z" * 1000 + b"\r\n")
                await sock.send(b"\r\n")
            except OSError:
                pass
            head = await sock.recv(4096)
        assert head.startswith((b"HTTP/1.1 400", b"HTTP/1.1 431")), head[:40]
        r = await s.client.call("GET", f"{API}/status", signed=False)
        assert r.status_code == 200


# --- rate and resource limits ----------------------------------------------------------------


async def test_rate_limit_is_503_slowdown(fakes: StackFactory) -> None:
    with trio.fail_after(TIMEOUT):
        s = await fakes(rate_limit=0.1, rate_burst=2)
        own_bucket(s)
        for _ in range(2):
            assert (await s.client.call("GET", f"{API}/buckets/mybucket")).status_code == 200
        r = await s.client.call("GET", f"{API}/buckets/mybucket")
        assert_error(r, 503, "SlowDown")
        assert 1 <= int(r.headers["retry-after"]) <= 10
        # Another account has its own bucket.
        own_bucket(s, "theirs", owner=s.other)
        assert (await s.other.call("GET", f"{API}/buckets/theirs")).status_code == 200


async def test_public_routes_are_rate_limited_per_client_address(fakes: StackFactory) -> None:
    with trio.fail_after(TIMEOUT):
        s = await fakes(rate_limit=0.1, rate_burst=1)
        assert (await s.client.call("GET", f"{API}/status", signed=False)).status_code == 200
        r = await s.client.call("GET", f"{API}/status", signed=False)
        assert_error(r, 503, "SlowDown")
        assert "retry-after" in r.headers


async def test_rate_limited_request_may_be_retried_as_is(fakes: StackFactory) -> None:
    with trio.fail_after(TIMEOUT):
        s = await fakes(rate_limit=1000, rate_burst=1)
        own_bucket(s)
        assert (await s.client.call("GET", f"{API}/buckets/mybucket")).status_code == 200
        s.gater.rate.clock = lambda: 0.0  # freeze the bucket: empty
        request = s.client.build("GET", f"{API}/buckets/mybucket")
        s.client.sign(request)
        r = await s.client.http.send(request)
        assert_error(r, 503, "SlowDown")
        s.gater.rate.clock = trio.current_time
        again = s.client.build("GET", f"{API}/buckets/mybucket")
        again.headers.update(request.headers)
        assert (await s.client.http.send(again)).status_code == 200  # the nonce was not spent


async def test_replays_cost_the_victim_no_rate_limit_tokens(fakes: StackFactory) -> None:
    """Found in review: each replay of a captured request took a token from its signer's
    bucket before being refused, so replaying one request kept the victim at SlowDown."""
    with trio.fail_after(TIMEOUT):
        s = await fakes(rate_limit=0.01, rate_burst=3)
        own_bucket(s)
        request = s.client.build("GET", f"{API}/buckets/mybucket")
        s.client.sign(request)
        assert (await s.client.http.send(request)).status_code == 200
        for _ in range(5):
            again = s.client.build("GET", f"{API}/buckets/mybucket")
            again.headers.update(request.headers)
            assert_error(await s.client.http.send(again), 403, "ReplayedRequest")
        for _ in range(2):  # the two tokens left are still the victim's
            assert (await s.client.call("GET", f"{API}/buckets/mybucket")).status_code == 200


async def test_signatures_expire_within_15_minutes_by_default(fakes: StackFactory) -> None:
    with trio.fail_after(TIMEOUT):
        s = await fakes()
        own_bucket(s)
        now = int(time.time())
        r = await s.client.call("GET", f"{API}/buckets/mybucket", expiry=now + 3600)
        assert_error(r, 403, "ExpiryTooFar")
        r = await s.client.call("GET", f"{API}/buckets/mybucket", expiry=now + 850)
        assert r.status_code == 200


async def test_a_replay_cache_flood_leaves_other_accounts_served(fakes: StackFactory) -> None:
    """Found in review: fresh keys sending bursts that expire as late as allowed filled the
    replay cache, which then refused every account's requests (503) until they expired."""
    with trio.fail_after(TIMEOUT):
        s = await fakes(replay_entries=64, replay_per_account=4)
        assert (s.gater.replay.max_entries, s.gater.replay.max_per_account) == (64, 4)
        own_bucket(s)
        codes: Counter[int] = Counter()
        for _ in range(3):
            for _ in range(8):
                attacker = PrivateKey.generate()
                for _ in range(5):
                    r = await s.client.call("GET", f"{API}/buckets/mybucket", key=attacker,
                                            expiry=int(time.time()) + 890)
                    codes[r.status_code] += 1
            r = await s.client.call("GET", f"{API}/buckets/mybucket")  # expires in 300 s
            assert r.status_code == 200, r.text
        assert codes[403] >= 3 * 8 * 4 and codes[503] > 0  # not the owner; over their cap
        assert s.gater.replay.evicted > 0


async def test_an_account_over_its_replay_cap_is_503_alone(fakes: StackFactory) -> None:
    with trio.fail_after(TIMEOUT):
        s = await fakes(replay_per_account=2)
        own_bucket(s)
        own_bucket(s, "theirs", owner=s.other)
        for _ in range(2):
            assert (await s.client.call("GET", f"{API}/buckets/mybucket")).status_code == 200
        r = await s.client.call("GET", f"{API}/buckets/mybucket")
        assert_error(r, 503, "SlowDown")
        assert 250 <= int(r.headers["retry-after"]) <= 302  # when its first request expires
        assert (await s.other.call("GET", f"{API}/buckets/theirs")).status_code == 200


async def test_limiter_full_is_503(fakes: StackFactory) -> None:
    with trio.fail_after(TIMEOUT):
        s = await fakes()
        own_bucket(s)
        s.ctx.limiter = ResourceLimiter(system=Limit.unlimited(), service_default=Limit())
        r = await s.client.call("GET", f"{API}/buckets/mybucket")
        assert_error(r, 503, "SlowDown")
        assert r.headers["retry-after"] == "1"


async def test_modular_not_running_is_503(fakes: StackFactory) -> None:
    with trio.fail_after(TIMEOUT):
        s = await fakes()
        own_bucket(s)
        s.ctx.modulars.mark_stopped("metadata")
        r = await s.client.call("GET", f"{API}/buckets/mybucket")
        assert_error(r, 503, "ServiceUnavailable")
        assert "retry-after" in r.headers


# --- body streams (the design streamed routes will use) -------------------------------------


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def test_body_stream_checks_the_hash_before_it_ends() -> None:
    parts = (b"abc", b"", b"def")
    good = BodyStream(_chunks(*parts), limit=6, expected_sha256=payload_sha256(b"abcdef"))
    assert [c async for c in good] == [b"abc", b"def"]
    bad = BodyStream(_chunks(*parts), limit=6, expected_sha256=payload_sha256(b"abcdeX"))
    got: list[bytes] = []
    with pytest.raises(ServiceError) as e:
        async for chunk in bad:
            got.append(chunk)
    assert e.value.code == "ContentSha256Mismatch"
    assert got == [b"abc", b"def"]  # every chunk, then the error instead of the end
    big = BodyStream(_chunks(b"abcd", b"efg"), limit=6, expected_sha256=None)
    with pytest.raises(ServiceError) as e:
        await big.read()
    assert (e.value.code, e.value.status) == ("EntityTooLarge", 413)
    unsigned = BodyStream(_chunks(b"x"), limit=6, expected_sha256=None)
    assert await unsigned.read() == b"x"


async def _trickle(gaps: list[float]) -> AsyncIterator[bytes]:
    for gap in gaps:
        await trio.sleep(gap)  # virtual time (autojump_clock): the client under test
        yield b"x"


@pytest.mark.parametrize("read", ["iterate", "into"])
async def test_a_body_that_stalls_is_a_request_timeout(autojump_clock: Any, read: str) -> None:
    """No chunk for ``idle_timeout`` seconds: 400 RequestTimeout, at that time (found in
    review: a client sending nothing held its upload slot, buffers and lease for good)."""
    slow = BodyStream(_trickle([59.0, 59.0, 61.0]), limit=10, expected_sha256=None,
                      idle_timeout=60.0)
    t0 = trio.current_time()
    got: list[bytes] = []
    with pytest.raises(ServiceError) as e:
        if read == "iterate":
            async for chunk in slow:
                got.append(chunk)
        else:
            await slow.read_into_unverified(memoryview(bytearray(10)))
    assert (e.value.code, e.value.status) == ("RequestTimeout", 400)
    assert trio.current_time() - t0 == pytest.approx(59 + 59 + 60)
    assert got == ([b"x", b"x"] if read == "iterate" else [])
    steady = BodyStream(_trickle([59.0] * 3), limit=10, expected_sha256=None,
                        idle_timeout=60.0)
    assert await steady.read() == b"xxx"


@pytest.fixture
def keep_receive_size() -> Iterator[None]:
    """Gater.serve sets hypercorn's process-wide receive size and connection server: put the
    old ones back."""
    before, server = hypercorn.trio.tcp_server.MAX_RECV, hypercorn.trio.run.TCPServer
    yield
    hypercorn.trio.tcp_server.MAX_RECV = before
    hypercorn.trio.run.TCPServer = server  # type: ignore[misc]


async def test_bodies_arrive_in_reads_of_recv_bytes(nursery: trio.Nursery,
                                                    keep_receive_size: None) -> None:
    """A connection is read ``gater.recv_bytes`` at a time (hypercorn's own reads are 64 KiB:
    a body went through h11 and the ASGI channel every 64 KiB)."""
    sizes: list[int] = []

    async def count(call: Call) -> Any:
        async for chunk in call.body:
            sizes.append(len(chunk))
        return {"received": sum(sizes)}

    route = RouteSpec("PUT", "/count", count, "count", "count the chunks", public=True,
                      body="stream")
    for recv in (256 * 1024, 16 * 1024):
        config = gater_config(recv_bytes=recv)
        ctx = NodeContext(config=config, limiter=build_limiter(config), db=None,  # type: ignore[arg-type]
                          keys=new_keyset())
        gater = Gater(ctx, routes=(route,))
        await nursery.start(gater.serve)
        assert hypercorn.trio.tcp_server.MAX_RECV == recv
        sizes.clear()
        body = secrets.token_bytes(4 << 20)
        with trio.fail_after(TIMEOUT):
            async with httpx.AsyncClient(timeout=TIMEOUT) as http:
                r = await http.put(f"{gater.endpoint}/count", content=body)
        assert r.status_code == 200, r.text
        assert r.json() == {"received": len(body)}
        # no read is over the setting (at 16 KiB this fails with hypercorn's own 64 KiB:
        # a 4 MiB body over loopback arrives in reads of 64 KiB)
        assert max(sizes) <= recv, sizes
        await gater.drain()
    with pytest.raises(ValueError):
        set_receive_size(0)


async def test_a_client_that_stops_reading_is_cut_after_send_timeout(
        nursery: trio.Nursery, keep_receive_size: None) -> None:
    """A response whose client stops reading (connected, window shut) is cut once one write
    waits ``gater.send_timeout``: the route lets go of what it holds and a drain finishes.
    hypercorn shields its writes from cancellation and has no write deadline, so one such GET
    held its download slot and segment memory for as long as the client stayed, and SIGTERM
    could not stop the node (found by a slowloris probe on a testnet)."""
    released = trio.Event()
    config = gater_config(send_timeout=0.5)
    gater, port = await bare_gater(nursery, config, (endless_route(released),))
    sock, stream = await _slow_reader(port)
    try:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(b"GET /endless HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
            await released.wait()  # never read: the server's writes stall
            await gater.drain()
    finally:  # (a stuck server write ends with the connection, so a failure ends too)
        sock.close()


def endless_route(released: trio.Event | None = None) -> RouteSpec:
    """GET /endless: 256 KiB chunks for ever (``released`` set once the body is let go)."""
    async def endless(call: Call) -> Any:
        async def body() -> AsyncIterator[bytes]:
            try:
                while True:
                    yield b"x" * (256 * 1024)
            finally:
                if released is not None:
                    released.set()

        return StreamingResponse(body(), media_type="application/octet-stream")

    return RouteSpec("GET", "/endless", endless, "endless", "an endless body", public=True)


async def _slow_reader(port: int) -> tuple[trio.socket.SocketType, trio.SocketStream]:
    """A connection with a 4 KiB receive buffer (the server's writes soon stall)."""
    sock = trio.socket.socket()
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
    with trio.fail_after(TIMEOUT):
        await sock.connect(("127.0.0.1", port))
    return sock, trio.SocketStream(sock)


async def test_a_drain_cuts_a_write_to_a_client_that_stops_reading(
        nursery: trio.Nursery, keep_receive_size: None) -> None:
    """A drain (SIGTERM) ends within ``gater.drain_timeout`` even while a response write
    waits for a client that does not read: hypercorn's cancel at the end of the drain cuts
    the write and closes that connection (found in the fault review: the node stopped only
    after ``send_timeout``, 60 s, as hypercorn shields its writes from cancellation)."""
    config = gater_config(send_timeout=3600, drain_timeout=0.5)
    gater, port = await bare_gater(nursery, config, (endless_route(),))
    sock, stream = await _slow_reader(port)
    try:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(b"GET /endless HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
            assert (await stream.receive_some(1024)).startswith(b"HTTP/1.1 200")
            # never read again: the server's writes stall once the socket buffers are full
            t0 = trio.current_time()
            await gater.drain()
            assert trio.current_time() - t0 < 5.0
    finally:
        sock.close()


async def _pong(call: Call) -> Any:
    return {"pong": True}


PING = RouteSpec("GET", "/ping", _pong, "ping", "a small answer", public=True)


async def test_connections_over_max_connections_are_closed_at_once(
        nursery: trio.Nursery, keep_receive_size: None) -> None:
    """At most ``gater.max_connections`` connections are served at once; one more is closed as
    soon as it is accepted, and is served again once one goes (found in the fault review:
    no cap, so idle connections could use up the file descriptors); an idle one is closed
    after ``gater.keep_alive_timeout``."""
    config = gater_config(max_connections=2, keep_alive_timeout=3600)
    gater, port = await bare_gater(nursery, config, (PING,))
    status = b"GET /ping HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n"
    with trio.fail_after(TIMEOUT):
        idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
        await idle[0].send_all(status)  # served: both are now surely accepted and held
        assert (await idle[0].receive_some(65536)).startswith(b"HTTP/1.1 200")
        extra = await trio.open_tcp_stream("127.0.0.1", port)
        assert await extra.receive_some(1024) == b""  # closed at once, nothing read
        await extra.aclose()
        await idle[1].aclose()
        # the server (in this run) sees idle[1] go and gives its slot back: then all wait
        await trio.testing.wait_all_tasks_blocked(cushion=0.1)
        again = await trio.open_tcp_stream("127.0.0.1", port)
        await again.send_all(status)
        answer = await again.receive_some(65536)
        assert answer.startswith(b"HTTP/1.1 200")
        await again.aclose()
        await idle[0].aclose()
        await gater.drain()


async def test_an_idle_connection_is_closed_after_keep_alive_timeout(
        nursery: trio.Nursery, keep_receive_size: None) -> None:
    config = gater_config(keep_alive_timeout=0.2)
    gater, port = await bare_gater(nursery, config, (PING,))
    with trio.fail_after(TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /ping HTTP/1.1\r\nho")  # a head never finished
        assert await stream.receive_some(1024) == b""  # closed by the server
        await stream.aclose()
        await gater.drain()


async def _three_chunks(call: Call) -> Any:
    async def body() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"x" * 1000

    return StreamingResponse(body(), media_type="application/octet-stream",
                             headers={"content-length": "3000"})


STREAMED = RouteSpec("GET", "/streamed", _three_chunks, "streamed", "a streamed body",
                     public=True)


async def _read_until_closed(stream: trio.SocketStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data



async def _streamed_gets_end_closed(port: int, headers: bytes = b"") -> None:
    """GET /streamed five times (a lost close or timer depended on the scheduler's order),
    each on a new connection, reading until the server closes it."""
    for _ in range(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(5):
            await stream.send_all(b"GET /streamed HTTP/1.1\r\nhost: 127.0.0.1\r\n" + headers
                                  + b"\r\n")
            answer = await _read_until_closed(stream)
        await stream.aclose()
        assert answer.startswith(b"HTTP/1.1 200")
        assert answer.endswith(b"\r\n\r\n" + b"x" * 3000)

async def test_a_keep_alive_connection_is_closed_after_a_streamed_response(
        nursery: trio.Nursery, keep_receive_size: None) -> None:
    """After a streamed response (every GET of an object) a keep-alive connection still
    has its idle timer: starlette cancels the task that sent the last body bytes, and the
    keep-alive timer's restart, sent from that task, was lost to the cancel (found in
    review): the idle connection then stayed, with its slot, until the client left, and
    a drain waited its whole drain_timeout for it."""
    config = gater_config(keep_alive_timeout=0.2)
    gater, port = await bare_gater(nursery, config, (STREAMED,))
    await _streamed_gets_end_closed(port)  # the answer, then closed when idle
    with trio.fail_after(TIMEOUT):
        await gater.drain()


async def test_a_drain_closes_a_connection_idle_after_a_streamed_response(
        nursery: trio.Nursery, keep_receive_size: None) -> None:
    config = gater_config(keep_alive_timeout=3600, drain_timeout=3600)
    gater, port = await bare_gater(nursery, config, (STREAMED,))
    streams = []
    with trio.fail_after(5):
        for _ in range(5):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"GET /streamed HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
            answer = b""
            while not answer.endswith(b"x" * 3000):
                answer += await stream.receive_some(65536)
            streams.append(stream)
        await gater.drain()  # idle connections are closed at once, not after drain_timeout
        for stream in streams:
            assert await stream.receive_some(1024) == b""
            await stream.aclose()


async def test_a_connection_close_streamed_response_closes_the_connection(
        nursery: trio.Nursery, keep_receive_size: None) -> None:
    """A streamed response to a "Connection: close" request ends with the connection closed
    (found in review: the close, sent from the task starlette cancels after the last body
    bytes, was lost to that cancel, and a client reading to the end of the stream waited
    for as long as it stayed)."""
    config = gater_config(keep_alive_timeout=3600)
    gater, port = await bare_gater(nursery, config, (STREAMED,))
    await _streamed_gets_end_closed(port, b"connection: close\r\n")
    with trio.fail_after(TIMEOUT):
        await gater.drain()


async def test_a_client_reset_before_its_answer_gives_its_slot_and_fd_back(
        nursery: trio.Nursery, keep_receive_size: None) -> None:
    """A client that resets its connection before its answer is written gives its
    max_connections slot back as soon as the request ends, and no file descriptor stays
    open (found in review: the read loop's end stopped the keep-alive timer, but the
    answer's end started it again, since h11 never saw an EOF after a reset and both sides
    looked done, so the slot was held for keep_alive_timeout)."""
    called = trio.Event()

    async def answer_once_gone(call: Call) -> Any:
        called.set()
        receive = call.request.receive
        while (await receive())["type"] != "http.disconnect":
            pass  # the read loop has ended once http.disconnect comes
        return {"late": True}

    route = RouteSpec("GET", "/late", answer_once_gone, "late", "answers after a disconnect",
                      public=True)
    config = gater_config(max_connections=1, keep_alive_timeout=3600)
    ctx = NodeContext(config=config, limiter=build_limiter(config), db=None,  # type: ignore[arg-type]
                      keys=new_keyset())
    gater = Gater(ctx, routes=(route, PING))
    fds = len(os.listdir("/proc/self/fd"))
    await nursery.start(gater.serve)
    port = int(str(gater.endpoint).rsplit(":", 1)[1])
    with trio.fail_after(5):
        sock = trio.socket.socket()
        await sock.connect(("127.0.0.1", port))
        await sock.send(b"GET /late HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        await called.wait()  # the request is read: the server is waiting for more
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset
        # the only slot comes back once the server (in this run) has seen the reset and
        # ended the request: then every task here waits
        await trio.testing.wait_all_tasks_blocked(cushion=0.1)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /ping HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        answer = await stream.receive_some(65536)
        await stream.aclose()
    assert answer.startswith(b"HTTP/1.1 200")
    with trio.fail_after(TIMEOUT):
        await gater.drain()
    assert len(os.listdir("/proc/self/fd")) <= fds  # the listener went too


async def test_an_early_answer_to_a_body_nobody_reads_ends_its_connection(
        nursery: trio.Nursery, keep_receive_size: None) -> None:
    """A route that answers before reading a large body (a refusal: 404, 403) while the
    body's queue is full: the answer arrives and the connection closes. hypercorn delivers
    http.disconnect into that bounded queue from inside the answer's last send, and with
    nobody reading it that send waited for ever, holding the connection and its slot (found
    in review; stock hypercorn does the same)."""
    go = trio.Event()

    async def refuse(call: Call) -> Any:
        await go.wait()
        raise AccessDenied("refused before the body")

    route = RouteSpec("PUT", "/refuse", refuse, "refuse", "refuses", public=True,
                      body="stream")
    gater, port = await bare_gater(nursery, gater_config(recv_bytes=4096), (route,))
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    size = 64 << 20

    async def send_body() -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(b"PUT /refuse HTTP/1.1\r\nhost: 127.0.0.1\r\n"
                                  b"content-length: %d\r\n\r\n" % size)
            chunk = b"x" * (1 << 20)
            for _ in range(size >> 20):
                await stream.send_all(chunk)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as client:
            client.start_soon(send_body)
            # the server stops reading once the body's queue is full, the client once the
            # socket buffers are: every task here waits
            await trio.testing.wait_all_tasks_blocked(cushion=0.1)
            go.set()
            answer = await _read_until_closed(stream)
            client.cancel_scope.cancel()
        assert answer.startswith(b"HTTP/1.1 403"), answer[:200]
        await stream.aclose()
        await gater.drain()


async def test_a_full_spdb_disk_is_507_not_500(nursery: trio.Nursery, tmp_path: Path,
                                              keep_receive_size: None) -> None:
    """A request whose SPDB write finds the disk full is 507 InsufficientStorage, as a full
    piece store is: it was a 500 InternalError with a logged traceback per request (found by
    filling a testnet node's data disk). SQLite's own "database or disk is full" (SQLITE_FULL)
    comes here from ``PRAGMA max_page_count``."""
    async with open_spdb(tmp_path / "spdb.sqlite3") as db:
        pages = await db.run(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
        await db.run(lambda c: c.execute(f"PRAGMA max_page_count = {pages}").fetchone())

        async def write(call: Call) -> Any:
            await db.run(lambda c: c.executemany(
                "INSERT INTO gc_progress (kind, update_time) VALUES (?, 0)",
                [(f"kind-{i:04d}-" + "x" * 200,) for i in range(100)]))
            return {}

        route = RouteSpec("POST", "/write", write, "write", "write to SPDB", public=True)
        config = gater_config()
        ctx = NodeContext(config=config, limiter=build_limiter(config), db=db,
                          keys=new_keyset())
        gater = Gater(ctx, routes=(route,))
        await nursery.start(gater.serve)
        with trio.fail_after(TIMEOUT):
            async with httpx.AsyncClient(timeout=TIMEOUT) as http:
                r = await http.post(f"{gater.endpoint}/write")
            assert_error(r, 507, "InsufficientStorage")
            await gater.drain()


async def test_a_trickled_json_body_is_cut_at_json_body_timeout(
        nursery: trio.Nursery, keep_receive_size: None) -> None:
    """A JSON body sent a byte now and then (never idle for body_idle_timeout) is 400
    RequestTimeout once it took gater.json_body_timeout in all. It held the request's gater
    span (one of the service's conns_inbound, and max_json_body of memory) for as long as the
    client liked: a few hundred such requests, each from a fresh account, had every other
    request refused with 503 SlowDown (found by a slowloris probe)."""
    async def echo(call: Call) -> Any:
        return {"got": len(await call.body.read())}

    route = RouteSpec("POST", "/echo", echo, "echo", "read a JSON body", public=True,
                      body="json")
    config = gater_config(json_body_timeout=0.5)
    ctx = NodeContext(config=config, limiter=build_limiter(config), db=None,  # type: ignore[arg-type]
                      keys=new_keyset())
    gater = Gater(ctx, routes=(route,))
    await nursery.start(gater.serve)

    async def trickle() -> AsyncIterator[bytes]:
        for _ in range(10_000):  # a byte every 20 ms: never idle for long, done in 200 s
            yield b" "
            await trio.sleep(0.02)

    with trio.fail_after(TIMEOUT):
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            r = await http.post(f"{gater.endpoint}/echo", content=trickle(),
                                headers={"content-length": "10000"})
        assert_error(r, 400, "RequestTimeout")
        assert ctx.limiter.used("gater").conns_inbound == 0
        await gater.drain()


# --- routes (fakes) --------------------------------------------------------------------------


async def test_approval_routes(fakes: StackFactory) -> None:
    with trio.fail_after(TIMEOUT):
        s = await fakes()
        r = await s.client.call("POST", f"{API}/approvals/create-bucket",
                                json_body={"bucket": "newbucket"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["expiry_height"] == 100
        approval = unpack(bytes.fromhex(body["approval"]))
        assert approval["type"] == chain_msgs.APPROVAL_CREATE_BUCKET
        assert approval["creator"] == s.client.key.address
        assert s.fakes["approver"].steps == ["pre", "handle", "post"]
        assert s.fakes["authorizer"].calls[-1] == (
            AuthOpType.ASK_CREATE_BUCKET_APPROVAL, s.client.key.address, "newbucket", "")

        own_bucket(s)
        obj = {"bucket": "mybucket", "object": "dir/a b.txt", "size": 10,
               "checksums": CHECKSUMS}
        r = await s.client.call("POST", f"{API}/approvals/create-object", json_body=obj)
        assert r.status_code == 200, r.text
        approval = unpack(bytes.fromhex(r.json()["approval"]))
        assert approval["object"] == "dir/a b.txt"
        assert approval["content_type"] == "application/octet-stream"
        assert approval["checksums"] == [bytes.fromhex(c) for c in CHECKSUMS]
        r = await s.client.call("POST", f"{API}/approvals/create-object",
                                json_body={**obj, "size": 10**10})
        assert_error(r, 403, "AccessDenied")  # the approver said no
        assert s.fakes["approver"].steps[-3:] == ["pre-object", "handle-object", "post-object"]
        r = await s.other.call("POST", f"{API}/approvals/create-object", json_body=obj)
        assert_error(r, 403, "AccessDenied")  # the authorizer said no


@pytest.mark.parametrize("body, code", [
    (b"{", "MalformedJSON"),
    (b"[" * 100_000, "MalformedJSON"),
    (b"\xff\xfe", "MalformedJSON"),
    (b'{"bucket": "AB"}', "InvalidArgument"),
    (b'{"bucket": "abc", "x": 1}', "InvalidArgument"),
    (b'{"bucket": 5}', "InvalidArgument"),
    (b'["abc"]', "InvalidArgument"),
    (b'{"bucket": "a\\ud800c"}', "InvalidArgument"),
])
async def test_bad_json_is_400(fakes: StackFactory, body: bytes, code: str) -> None:
    with trio.fail_after(TIMEOUT):
        s = await fakes(max_json_body=200_000)
        r = await s.client.call("POST", f"{API}/approvals/create-bucket", content=body,
                                headers={"content-type": "application/json"})
        assert_error(r, 400, code)


async def test_metadata_routes(fakes: StackFactory) -> None:
    with trio.fail_after(TIMEOUT):
        s = await fakes()
        own_bucket(s)
        meta = s.fakes["metadata"]
        for name in ("a", "b/c", "b/d", "é ü", "x/../y/."):
            meta.objects[("mybucket", name)] = {"name": name, "checksums": [b"\x01\x02"]}
        r = await s.client.call("GET", f"{API}/buckets/mybucket")
        assert r.json() == {"id": 1, "name": "mybucket", "owner": s.client.key.address}
        r = await s.client.call("GET", f"{API}/buckets/mybucket/objects",
                                query=[("prefix", "b/"), ("limit", "1")])
        assert r.json() == {"objects": [{"name": "b/c", "checksums": ["0102"]}],
                            "next_start_after": "b/c"}
        r = await s.client.call("GET", f"{API}/objects/mybucket/é ü")
        assert r.json()["name"] == "é ü"
        r = await s.client.call("GET", f"{API}/objects/mybucket/b/c")
        assert r.json()["name"] == "b/c"
        r = await s.client.call("GET", f"{API}/objects/mybucket/x/../y/.")
        assert r.json()["name"] == "x/../y/."
        r = await s.client.call("GET", f"{API}/uploads/mybucket/b/c")
        assert r.json()["state"] == "UPLOADING"
        assert s.fakes["authorizer"].calls[-1] == (
            AuthOpType.GET_UPLOADING_STATE, s.client.key.address, "mybucket", "b/c")
        r = await s.client.call("GET", f"{API}/objects/mybucket/nope")
        assert_error(r, 404, "NoSuchKey")
        r = await s.client.call("GET", f"{API}/accounts/{s.client.key.address}/buckets")
        assert r.json() == {"buckets": [{"id": 1, "name": "mybucket",
                                         "owner": s.client.key.address}]}
        r = await s.other.call("GET", f"{API}/accounts/{s.client.key.address}/buckets")
        assert_error(r, 403, "AccessDenied")
        r = await s.other.call("GET", f"{API}/buckets/mybucket")
        assert_error(r, 403, "AccessDenied")
        r = await s.client.call("GET", f"{API}/buckets/Not_A_Bucket")
        assert_error(r, 400, "InvalidBucketName")
        r = await s.client.call("GET", f"{API}/buckets/mybucket/objects",
                                query=[("limit", "-1")])
        assert_error(r, 400, "InvalidArgument")


async def test_unknown_route_and_method(fakes: StackFactory) -> None:
    with trio.fail_after(TIMEOUT):
        s = await fakes()
        r = await s.client.call("GET", f"{API}/nothing-here")
        assert_error(r, 404, "NotFound")
        r = await s.client.call("DELETE", f"{API}/status", signed=False)
        assert_error(r, 405, "MethodNotAllowed")
        # /{bucket}/{object} would match any path: an unsigned request is refused first
        r = await s.client.call("HEAD", f"{API}/nothing-here", signed=False)
        assert r.status_code == 401 and r.content == b""
        r = await s.client.call("HEAD", f"{API}/nothing-here")
        assert r.status_code == 404 and r.content == b""


async def test_a_bucket_path_without_an_object_is_an_xml_404_not_a_redirect(
        fakes: StackFactory) -> None:
    """Found in review (a raw GET of ``/bucket``): starlette answered 307 with no body and a
    Location built from the Host header, ``/bucket/``, a path that is always refused (no
    object name) and that the request was not signed for; an S3 client follows a 307 and
    re-sends a PUT's body there. No route matches a path without an object name: a 404."""
    with trio.fail_after(TIMEOUT):
        s = await fakes()
        own_bucket(s)
        for method in ("GET", "HEAD", "PUT"):
            r = await s.client.call(method, "/mybucket", content=b"x" * 10)
            assert r.status_code == 404, (method, r.status_code, r.headers)
            assert "location" not in r.headers
            if method != "HEAD":
                assert_error(r, 404, "NotFound")


async def test_unexpected_error_is_500_logged_once(fakes: StackFactory,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(TIMEOUT):
        s = await fakes()
        own_bucket(s)
        s.fakes["metadata"].boom = True
        with caplog.at_level(logging.ERROR):
            r = await s.client.call("GET", f"{API}/buckets/mybucket")
        err = assert_error(r, 500, "InternalError")
        assert "secret" not in r.text and "Traceback" not in r.text
        records = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
        assert len(records) == 1
        assert err["RequestId"] in records[0].getMessage()
        assert records[0].exc_info is not None


# --- graceful drain --------------------------------------------------------------------------


async def test_drain_finishes_in_flight_and_refuses_new_connections(
        fakes: StackFactory) -> None:
    with trio.fail_after(TIMEOUT):
        s = await fakes()
        own_bucket(s)
        meta = s.fakes["metadata"]
        meta.gate = trio.Event()
        result: list[httpx.Response] = []
        drained = trio.Event()

        async def slow_request() -> None:
            result.append(await s.client.call("GET", f"{API}/buckets/mybucket"))

        async def drain() -> None:
            await s.gater.drain()
            drained.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_request)
            await meta.entered.wait()
            nursery.start_soon(drain)
            while True:  # the listening socket closes promptly once drain begins
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", s.port)
                except OSError:
                    break
                await stream.aclose()
                await trio.sleep(0.01)
            assert not drained.is_set()
            with pytest.raises(httpx.ConnectError):
                async with httpx.AsyncClient() as fresh:
                    await fresh.get(f"{s.gater.endpoint}{API}/status")
            meta.gate.set()
        assert drained.is_set()
        assert result[0].status_code == 200
        assert result[0].json()["name"] == "mybucket"


async def test_drain_cuts_requests_after_drain_timeout(fakes: StackFactory) -> None:
    with trio.fail_after(TIMEOUT):
        s = await fakes(drain_timeout=0.2)
        own_bucket(s)
        meta = s.fakes["metadata"]
        meta.gate = trio.Event()  # never set
        errors: list[BaseException] = []

        async def stuck_request() -> None:
            try:
                await s.client.call("GET", f"{API}/buckets/mybucket")
            except httpx.HTTPError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stuck_request)
            await meta.entered.wait()
            await s.gater.drain()  # returns after ~drain_timeout
        assert errors and isinstance(errors[0], httpx.RemoteProtocolError)


# --- the real modulars, end to end -----------------------------------------------------------


async def _create_bucket(s: Stack, name: str) -> None:
    chain = s.ctx.chain
    assert chain is not None and s.sp is not None
    r = await s.client.call("POST", f"{API}/approvals/create-bucket", json_body={"bucket": name})
    assert r.status_code == 200, r.text
    approval = unpack(bytes.fromhex(r.json()["approval"]))
    assert approval["expiry_height"] == r.json()["expiry_height"]
    key = s.client.key
    await chain.broadcast(chain_msgs.sign(key, chain_msgs.create_bucket_tx(
        pubkey=key.public_key, seq=await chain.account_seq(key.address), bucket=name,
        primary_sp=s.sp.address, approval=approval)))


async def _create_object(s: Stack, bucket: str, name: str) -> int:
    chain = s.ctx.chain
    assert chain is not None
    params = await chain.params()
    sums = [secrets.token_hex(32) for _ in range(1 + params.total_shards)]
    body = {"bucket": bucket, "object": name, "size": 5, "content_type": "text/plain",
            "checksums": sums}
    r = await s.client.call("POST", f"{API}/approvals/create-object", json_body=body)
    assert r.status_code == 200, r.text
    approval = unpack(bytes.fromhex(r.json()["approval"]))
    key = s.client.key
    result = await chain.broadcast(chain_msgs.sign(key, chain_msgs.create_object_tx(
        pubkey=key.public_key, seq=await chain.account_seq(key.address), bucket=bucket,
        object=name, size=5, content_type="text/plain",
        checksums=[bytes.fromhex(c) for c in sums], approval=approval)))
    return int(result["object_id"])


async def test_real_modulars_end_to_end(real: StackFactory) -> None:
    with trio.fail_after(TIMEOUT):
        s = await real()
        await _create_bucket(s, "realbucket")
        r = await s.client.call("GET", f"{API}/buckets/realbucket")
        assert r.status_code == 200, r.text
        assert r.json()["owner"] == s.client.key.address
        assert r.json()["primary_sp"] == s.sp.address  # type: ignore[union-attr]
        await _create_object(s, "realbucket", "docs/hello world.txt")
        await _create_object(s, "realbucket", "docs/second")
        r = await s.client.call("GET", f"{API}/objects/realbucket/docs/hello world.txt")
        assert r.status_code == 200, r.text
        meta = r.json()
        assert meta["status"] == "CREATED" and meta["size"] == 5
        assert all(re.fullmatch(r"[0-9a-f]{64}", c) for c in meta["checksums"])
        r = await s.client.call("GET", f"{API}/buckets/realbucket/objects",
                                query=[("prefix", "docs/"), ("limit", "1")])
        assert r.status_code == 200, r.text
        assert [o["name"] for o in r.json()["objects"]] == ["docs/hello world.txt"]
        assert r.json()["next_start_after"] == "docs/hello world.txt"
        r = await s.client.call("GET", f"{API}/uploads/realbucket/docs/second")
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "NOT_STARTED"
        r = await s.client.call("GET", f"{API}/accounts/{s.client.key.address}/buckets")
        assert [b["name"] for b in r.json()["buckets"]] == ["realbucket"]
        r = await s.client.call("GET", f"{API}/status", signed=False)
        assert isinstance(r.json()["height"], int)
        # Refusals of the real modulars come through with their codes.
        r = await s.other.call("GET", f"{API}/buckets/realbucket")
        assert_error(r, 403, "AccessDenied")
        r = await s.client.call("GET", f"{API}/buckets/nosuchbucket")
        assert_error(r, 404, "NoSuchBucket")
        r = await s.client.call("POST", f"{API}/approvals/create-bucket",
                                json_body={"bucket": "realbucket"})
        assert_error(r, 409, "BucketAlreadyExists")


async def test_challenges_are_for_the_owner_and_sps_in_service(real: StackFactory) -> None:
    """Found in review: any account could challenge any object (ids are sequential) and get
    the primary's raw segment with index -1, bypassing GET's owner check and accounting."""
    with trio.fail_after(TIMEOUT):
        s = await real()
        await _create_bucket(s, "chbucket")
        oid = await _create_object(s, "chbucket", "obj")
        path = f"{API}/challenge/{oid}/0/-1"
        r = await s.other.call("GET", path)  # a stranger: refused before anything is read
        err = assert_error(r, 403, "AccessDenied")
        assert "chbucket" not in err["Message"] and "obj" not in err["Message"]
        # the owner and a registered SP (this one's operator) get past the authorizer; the
        # object is not sealed yet
        assert_error(await s.client.call("GET", path), 409, "InvalidObjectState")
        r = await s.client.call("GET", path, key=s.ctx.keys.operator)
        assert_error(r, 409, "InvalidObjectState")


# --- the schema-driven fuzz run --------------------------------------------------------------

#: Examples of the fuzz run, and its time budget (examples past it are skipped).
FUZZ_EXAMPLES = 5000
FUZZ_SECONDS = 25
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")
AUTH_MODES = ("signed", "signed", "signed", "unsigned", "garbled", "wrong-key", "expired",
              "unsigned-payload", "far-expiry")


def strategy_for(schema: dict[str, Any], known: list[Any]) -> st.SearchStrategy[Any]:
    """Values for a schema: conforming ones, known good ones, and plain junk."""
    kind = schema.get("type")
    junk = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                     st.text(max_size=20))
    if kind == "string":
        if "pattern" in schema and "\\u" not in schema["pattern"]:
            good: st.SearchStrategy[Any] = st.from_regex(schema["pattern"], fullmatch=True)
        else:
            good = st.text(min_size=schema.get("minLength", 0),
                           max_size=min(schema.get("maxLength", 40), 40))
    elif kind == "integer":
        good = st.integers(min_value=schema.get("minimum"), max_value=schema.get("maximum"))
    elif kind == "array":
        good = st.lists(strategy_for(schema["items"], []), min_size=schema.get("minItems", 0),
                        max_size=min(schema.get("maxItems", 5), 5))
    elif kind == "object":
        props = schema.get("properties", {})
        required = list(schema.get("required", []))
        good = st.fixed_dictionaries(
            {k: strategy_for(props[k], []) for k in required},
            optional={k: strategy_for(v, []) for k, v in props.items() if k not in required})
    else:
        good = junk
    options = [good, good, junk]
    if known:
        options.append(st.sampled_from(known))
    return st.one_of(options)


async def test_fuzz_no_5xx_and_still_serving(real: StackFactory) -> None:
    with trio.fail_after(FUZZ_SECONDS + 90):
        s = await real(rate_limit=1e6, rate_burst=1_000_000)
        await _create_bucket(s, "fuzzbucket")
        await _create_object(s, "fuzzbucket", "some/object")
        doc = (await s.client.call("GET", f"{API}/openapi.json", signed=False)).json()
        known = {"bucket": ["fuzzbucket", "nosuchbucket"], "object": ["some/object", "x"],
                 "address": [s.client.key.address, s.other.key.address]}
        operations = []
        for path, item in doc["paths"].items():
            for method, op in item.items():
                body = op.get("requestBody", {}).get("content", {}).get(
                    "application/json", {}).get("schema")
                operations.append((method.upper(), path, op["parameters"], body))
        fuzz_ops = st.sampled_from(operations)
        token = trio.lowlevel.current_trio_token()
        seen: list[int] = []

        @st.composite
        def requests(draw: st.DrawFn) -> dict[str, Any]:
            method, path, params, body_schema = draw(fuzz_ops)
            if draw(st.integers(0, 9)) == 0:
                method = draw(st.sampled_from(METHODS))
            query: list[tuple[str, str]] = []
            for p in params:
                value = draw(strategy_for(p["schema"], known.get(p["name"], [])))
                if p["in"] == "path":
                    text = "" if value is None else str(value)
                    if p["name"] == "object" and draw(st.booleans()):
                        text = draw(st.text(min_size=1, max_size=30))
                    path = path.replace("{" + p["name"] + "}", text)
                elif draw(st.booleans()):
                    query.append((p["name"], "" if value is None else str(value)))
            if draw(st.integers(0, 5)) == 0:
                path = draw(st.sampled_from(["/", API, f"{API}/", "/x/../gfsp/v1/status"])) \
                    + draw(st.text(max_size=20))
            query += draw(st.lists(st.tuples(st.text(max_size=8), st.text(max_size=8)),
                                   max_size=2))
            content: bytes | None = None
            if body_schema is not None or draw(st.integers(0, 4)) == 0:
                choice = draw(st.integers(0, 3))
                if choice == 0:
                    content = draw(st.binary(max_size=64))
                else:
                    value = draw(strategy_for(body_schema or {"type": "object"}, []))
                    content = json.dumps(value).encode()
            return {"method": method, "path": path, "query": query, "content": content,
                    "auth": draw(st.sampled_from(AUTH_MODES))}

        async def send(req: dict[str, Any]) -> httpx.Response:
            request = s.client.build(req["method"], req["path"], query=req["query"],
                                     content=req["content"])
            now = int(time.time())
            auth = req["auth"]
            if auth != "unsigned":
                s.client.sign(
                    request, key=s.other.key if auth == "wrong-key" else None,
                    payload=None if auth == "unsigned-payload" else "body",
                    expiry={"expired": now - 10, "far-expiry": now + 8 * 86400}.get(
                        auth, now + 300))
            if auth == "wrong-key":  # the other key's signature, the client's identity
                request.headers["authorization"] = re.sub(
                    r"Account=[^,]+,PubKey=[^,]+", f"Account={s.client.key.address},"
                    f"PubKey={s.client.key.public_key.hex()}", request.headers["authorization"])
            elif auth == "garbled":
                request.headers["authorization"] = request.headers["authorization"][:-7] + "zz"
            return await s.client.http.send(request)

        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck),
                  phases=[Phase.generate, Phase.shrink])
        @given(req=requests())
        def fuzz(req: dict[str, Any]) -> None:
            if time.monotonic() > stop_at:
                return  # over the time budget: let hypothesis finish quickly
            response = trio.from_thread.run(send, req, trio_token=token)
            assert response.status_code < 500, (req, response.status_code, response.text)
            assert "x-gfsp-request-id" in response.headers
            code = ""
            if response.status_code >= 400 and req["method"] != "HEAD":
                code = xml_error(response)["Code"]
            seen.append((response.status_code, code))

        started = time.monotonic()
        stop_at = started + FUZZ_SECONDS
        await trio.to_thread.run_sync(fuzz)
        elapsed = time.monotonic() - started
        print(f"fuzz: {len(seen)} requests in {elapsed:.1f} s:",
              sorted(Counter(seen).items()))  # shown with pytest -s
        assert elapsed < FUZZ_SECONDS + 30, f"the fuzz run took {elapsed:.0f} s"
        statuses = {status for status, _ in seen}
        assert 200 in statuses, "no example got through"
        assert {401, 403, 400, 404} <= statuses
        r = await s.client.call("GET", f"{API}/status", signed=False)
        assert r.status_code == 200
        r = await s.client.call("GET", f"{API}/buckets/fuzzbucket")
        assert r.status_code == 200
