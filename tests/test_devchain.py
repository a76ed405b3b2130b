"""Tests of testnet/devchain against a real devchain on 127.0.0.1 (port 0).

The devchain runs in-process (``nursery.start(DevChain.serve)``) and once as a subprocess
(``python -m testnet.devchain --dir D``). Transactions are POSTed as raw msgpack with httpx,
so these tests check the HTTP contract itself; tests/test_chain_client.py covers the client.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
import trio

from node import chain_msgs as msgs
from node.crypto import PrivateKey, pack, sign_message
from testnet.devchain import DevChain
from testnet.devchain.server import MAX_TX_BYTES
from testnet.devchain.testing import Account, TestSP, seal_tx

REPO_ROOT = Path(__file__).resolve().parents[1]
BLOCK = 0.2
TOTAL = 6  # default params: 4 data + 2 parity secondaries


@dataclass
class Env:
    """A running devchain, an HTTP client to it, registered SPs and a user account."""

    chain: DevChain
    http: httpx.AsyncClient
    sps: list[TestSP]
    user: Account
    accounts: dict[str, Account] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for acct in (self.user, *(a for sp in self.sps for a in (sp.operator, sp.sealer))):
            self.accounts[acct.address] = acct

    @property
    def primary(self) -> TestSP:
        return self.sps[0]

    @property
    def secondaries(self) -> list[TestSP]:
        return self.sps[1:1 + TOTAL]

    async def post(self, tx: Any) -> httpx.Response:
        body = tx if isinstance(tx, bytes) else pack(tx)
        return await self.http.post("/tx", content=body,
                                    headers={"content-type": "application/msgpack"})

    async def ok(self, tx: Any) -> dict[str, Any]:
        r = await self.post(tx)
        assert r.status_code == 200, r.text
        if tx["from"] in self.accounts:
            self.accounts[tx["from"]].seq = tx["seq"] + 1
        return r.json()

    async def refused(self, tx: Any, code: str) -> dict[str, Any]:
        r = await self.post(tx)
        assert 400 <= r.status_code < 500, (r.status_code, r.text)
        body = r.json()
        assert body["code"] == code, body
        assert body["reason"]
        # a refusal consumes no sequence number: resync the sender's account
        if isinstance(tx, dict) and tx.get("from") in self.accounts:
            self.accounts[tx["from"]].seq = await self.seq(tx["from"])
        return body

    async def height(self) -> int:
        return int((await self.http.get("/height")).json()["height"])

    async def wait_height(self, target: int) -> int:
        # polling another service (no event to wait on); bounded by the caller's fail_after
        while (h := await self.height()) < target:  # noqa: ASYNC110
            await trio.sleep(BLOCK / 4)
        return h

    async def seq(self, address: str) -> int:
        r = await self.http.get(f"/accounts/{address}")
        return 0 if r.status_code == 404 else int(r.json()["seq"])

    # --- builders --------------------------------------------------------------------------

    def bucket_tx(self, bucket: str, *, user: Account | None = None, expiry: int = 10**6,
                  approver: TestSP | None = None, primary: TestSP | None = None,
                  seq: int | None = None) -> dict[str, Any]:
        user = user or self.user
        primary = primary or self.primary
        approver = approver or primary
        approval = msgs.sign(approver.keys.approval, msgs.create_bucket_approval(
            creator=user.address, bucket=bucket, primary_sp=primary.address,
            expiry_height=expiry))
        return msgs.sign(user.key, msgs.create_bucket_tx(
            pubkey=user.pubkey, seq=user.take_seq() if seq is None else seq, bucket=bucket,
            primary_sp=primary.address, approval=approval))

    def object_tx(self, bucket: str, name: str, *, size: int = 1000,
                  checksums: Sequence[bytes] | None = None, expiry: int = 10**6,
                  approver: TestSP | None = None, user: Account | None = None
                  ) -> dict[str, Any]:
        user = user or self.user
        approver = approver or self.primary
        checksums = list(checksums) if checksums is not None else make_checksums(name)
        approval = approver.object_approval(user.address, bucket, name, size, checksums,
                                            expiry)
        return msgs.sign(user.key, msgs.create_object_tx(
            pubkey=user.pubkey, seq=user.take_seq(), bucket=bucket, object=name, size=size,
            content_type="application/octet-stream", checksums=checksums, approval=approval))

    async def bucket(self, bucket: str) -> dict[str, Any]:
        return await self.ok(self.bucket_tx(bucket))

    async def object(self, bucket: str, name: str) -> dict[str, Any]:
        return await self.ok(self.object_tx(bucket, name))


def make_checksums(seed: str, n: int = 1 + TOTAL) -> list[bytes]:
    return [hashlib.sha256(f"{seed}:{i}".encode()).digest() for i in range(n)]


async def start_chain(nursery: trio.Nursery, directory: Path, **kw: Any) -> DevChain:
    chain = DevChain(directory, block_interval=kw.pop("block_interval", BLOCK), **kw)
    await nursery.start(chain.serve)
    return chain


async def register(env_http: httpx.AsyncClient, sps: Sequence[TestSP]) -> None:
    for sp in sps:
        r = await env_http.post("/tx", content=pack(sp.register_tx()))
        assert r.status_code == 200, r.text


@pytest.fixture
async def env(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Env]:
    chain = await start_chain(nursery, tmp_path / "chain")
    assert chain.endpoint is not None
    sps = [TestSP.create(i) for i in range(TOTAL + 2)]
    async with httpx.AsyncClient(base_url=chain.endpoint, timeout=10) as http:
        await register(http, sps)
        yield Env(chain, http, sps, Account(PrivateKey.generate()))


# --- SPs, accounts, params -----------------------------------------------------------------


async def test_status_and_sp_registry(env: Env) -> None:
    with trio.fail_after(10):
        status = (await env.http.get("/status")).json()
        assert status["params"] == {"segment_size": 16 * 1024 * 1024, "data_shards": 4,
                                    "parity_shards": 2, "max_payload": 64 * 1024**3}
        assert status["block_interval"] == BLOCK
        sps = (await env.http.get("/sps")).json()["sps"]
        assert {sp["operator"] for sp in sps} == {sp.address for sp in env.sps}
        one = (await env.http.get(f"/sps/{env.primary.address}")).json()
        assert one == {**env.primary.info.to_json(), "register_height": one["register_height"]}
        by_peer = (await env.http.get(f"/sps/by-peer/{env.primary.peer_id}")).json()
        assert by_peer["operator"] == env.primary.address
        assert (await env.http.get("/sps/0x" + "00" * 20)).json()["code"] == "SP_NOT_FOUND"
        assert (await env.http.get("/sps/by-peer/nobody")).status_code == 404
        # re-registration by the same operator updates the entry; the seq counted both
        env.primary.endpoint = "http://127.0.0.1:1"
        await env.ok(env.primary.register_tx())
        one = (await env.http.get(f"/sps/{env.primary.address}")).json()
        assert one["endpoint"] == "http://127.0.0.1:1"
        assert await env.seq(env.primary.address) == 2
        # another operator cannot take the peer id
        other = env.sps[-1]
        other.peer_id = env.primary.peer_id
        await env.refused(other.register_tx(), "PEER_ID_IN_USE")
        acct = await env.http.get(f"/accounts/{env.user.address}")
        assert acct.status_code == 404 and acct.json()["code"] == "ACCOUNT_NOT_FOUND"


async def test_heights_advance(env: Env) -> None:
    with trio.fail_after(10):
        h0 = await env.height()
        assert await env.wait_height(h0 + 2) >= h0 + 2


# --- buckets and objects --------------------------------------------------------------------


async def test_create_bucket_and_object_accepted_and_visible(env: Env) -> None:
    with trio.fail_after(10):
        result = await env.bucket("photos")
        assert result["bucket"] == "photos" and result["seq"] == 0
        bucket = (await env.http.get("/buckets/photos")).json()
        assert bucket["owner"] == env.user.address
        assert bucket["primary_sp"] == env.primary.address
        listed = (await env.http.get("/buckets", params={"owner": env.user.address})).json()
        assert [b["name"] for b in listed["buckets"]] == ["photos"]

        checksums = make_checksums("a/b.jpg")
        created = await env.ok(env.object_tx("photos", "a/b.jpg", size=1234,
                                             checksums=checksums))
        oid = created["object_id"]
        obj = (await env.http.get("/objects/photos/a/b.jpg")).json()
        assert obj["id"] == oid and obj["status"] == "CREATED" and obj["size"] == 1234
        assert obj["checksums"] == [c.hex() for c in checksums]
        assert (await env.http.get(f"/objects/by-id/{oid}")).json()["name"] == "a/b.jpg"
        assert await env.seq(env.user.address) == 2

        for name in ("a/c", "b", "a/a"):
            await env.object("photos", name)
        page = (await env.http.get("/objects", params={"bucket": "photos", "prefix": "a/",
                                                      "limit": 2})).json()["objects"]
        assert [o["name"] for o in page] == ["a/a", "a/b.jpg"]
        page = (await env.http.get("/objects", params={"bucket": "photos", "prefix": "a/",
                                                      "start_after": "a/b.jpg"})).json()
        assert [o["name"] for o in page["objects"]] == ["a/c"]


async def test_bucket_and_object_refusals(env: Env) -> None:
    with trio.fail_after(10):
        await env.bucket("docs")
        await env.refused(env.bucket_tx("docs"), "BUCKET_EXISTS")
        await env.refused(env.bucket_tx("Bad_Name"), "MALFORMED")
        await env.refused(env.bucket_tx("by-id"), "MALFORMED")
        for name in ("a..b", "a.-b", "a-.b", "192.168.1.1"):  # S3's rules, as Greenfield's
            await env.refused(env.bucket_tx(name), "MALFORMED")
        await env.bucket("my.docs-1")
        await env.refused(env.object_tx("nothere", "x"), "BUCKET_NOT_FOUND")
        await env.object("docs", "x")
        await env.refused(env.object_tx("docs", "x"), "OBJECT_EXISTS")
        await env.refused(env.object_tx("docs", "big", size=64 * 1024**3 + 1), "TOO_LARGE")
        await env.refused(env.object_tx("docs", "few", checksums=make_checksums("f", 3)),
                          "MALFORMED")
        # only the owner may create objects in a bucket
        stranger = Account(PrivateKey.generate())
        await env.refused(env.object_tx("docs", "y", user=stranger), "PERMISSION_DENIED")
        r = await env.http.get("/objects/docs/missing")
        assert r.status_code == 404 and r.json()["code"] == "OBJECT_NOT_FOUND"
        r = await env.http.get("/buckets/missing")
        assert r.status_code == 404 and r.json()["code"] == "BUCKET_NOT_FOUND"
        tx = msgs.sign(env.user.key, msgs.delete_object_tx(
            pubkey=env.user.pubkey, seq=env.user.seq, bucket="docs", object="missing"))
        await env.refused(tx, "OBJECT_NOT_FOUND")


async def test_tampered_tx_refused(env: Env) -> None:
    with trio.fail_after(10):
        tx = env.bucket_tx("tamper")
        tampered = {**tx, "bucket": "tamperx"}
        await env.refused(tampered, "BAD_SIGNATURE")
        # a pubkey that is not the key of `from`
        other = PrivateKey.generate()
        forged = sign_message(other, {**tx, "pubkey": other.public_key, "sig": b""})
        await env.refused(forged, "BAD_SIGNATURE")
        # the untampered original still works: refusals consumed no sequence number
        await env.ok(tx)


async def test_tampered_and_wrong_sp_approvals_refused(env: Env) -> None:
    with trio.fail_after(10):
        tx = env.bucket_tx("approved")
        approval = {**tx["approval"], "expiry_height": tx["approval"]["expiry_height"] + 1}
        re_signed = msgs.sign(env.user.key, {**tx, "approval": approval, "sig": b""})
        await env.refused(re_signed, "APPROVAL_INVALID")
        # approval for another bucket name, re-wrapped
        other = env.bucket_tx("other-name")
        swapped = msgs.sign(env.user.key, {**tx, "approval": other["approval"], "sig": b""})
        await env.refused(swapped, "APPROVAL_INVALID")
        # approval of the wrong SP: signed by SP 1's approval key but naming SP 0
        await env.refused(env.bucket_tx("wrong-sp", approver=env.sps[1], seq=0),
                          "APPROVAL_INVALID")
        # an unregistered primary
        ghost = TestSP.create(99)
        await env.refused(env.bucket_tx("ghost", primary=ghost, seq=0), "SP_NOT_FOUND")
        # an approval map of the wrong shape
        bad = msgs.sign(env.user.key, {**tx, "approval": {"type": "x", "sig": b""},
                                       "sig": b""})
        await env.refused(bad, "APPROVAL_INVALID")
        # object approval of an SP that is not the bucket's primary
        await env.bucket("objs")
        await env.refused(env.object_tx("objs", "o", approver=env.sps[2]), "APPROVAL_INVALID")


async def test_expired_approval_refused(env: Env) -> None:
    with trio.fail_after(10):
        now = await env.wait_height(2)
        await env.refused(env.bucket_tx("late", expiry=now - 1, seq=0), "APPROVAL_EXPIRED")
        await env.ok(env.bucket_tx("late", expiry=now + 1000, seq=0))
        await env.refused(env.object_tx("late", "o", expiry=now - 1), "APPROVAL_EXPIRED")


async def test_replayed_and_out_of_order_refused(env: Env) -> None:
    with trio.fail_after(10):
        tx = env.bucket_tx("seqs")
        await env.ok(tx)
        body = await env.refused(tx, "BAD_SEQUENCE")
        assert "expected 1" in body["reason"]
        await env.refused(env.bucket_tx("seqs2", seq=5), "BAD_SEQUENCE")
        await env.refused(env.bucket_tx("seqs2", seq=0), "BAD_SEQUENCE")
        await env.ok(env.bucket_tx("seqs2", seq=1))
        assert await env.seq(env.user.address) == 2


async def test_sp_not_in_service(env: Env) -> None:
    with trio.fail_after(10):
        sp = env.primary
        tx = msgs.sign(sp.keys.operator, msgs.set_sp_status_tx(
            pubkey=sp.operator.pubkey, seq=sp.operator.take_seq(), status="IN_MAINTENANCE"))
        await env.ok(tx)
        assert (await env.http.get(f"/sps/{sp.address}")).json()["status"] == "IN_MAINTENANCE"
        await env.refused(env.bucket_tx("paused", seq=0), "SP_NOT_IN_SERVICE")
        bad = msgs.sign(sp.keys.operator, msgs.set_sp_status_tx(
            pubkey=sp.operator.pubkey, seq=sp.operator.seq, status="ON_VACATION"))
        await env.refused(bad, "MALFORMED")
        # an address that is no SP cannot set a status
        nobody = Account(PrivateKey.generate())
        await env.refused(msgs.sign(nobody.key, msgs.set_sp_status_tx(
            pubkey=nobody.pubkey, seq=0, status="IN_SERVICE")), "SP_NOT_FOUND")
        back = msgs.sign(sp.keys.operator, msgs.set_sp_status_tx(
            pubkey=sp.operator.pubkey, seq=sp.operator.take_seq(), status="IN_SERVICE"))
        await env.ok(back)
        await env.ok(env.bucket_tx("paused", seq=0))


# --- seal -----------------------------------------------------------------------------------


async def _created(env: Env, name: str) -> tuple[int, list[bytes]]:
    if (await env.http.get("/buckets/sealing")).status_code == 404:
        await env.bucket("sealing")
    checksums = make_checksums(name)
    result = await env.ok(env.object_tx("sealing", name, checksums=checksums))
    return result["object_id"], checksums


async def test_seal_accepted(env: Env) -> None:
    with trio.fail_after(10):
        oid, checksums = await _created(env, "sealed")
        result = await env.ok(seal_tx(env.primary, oid, env.secondaries, checksums))
        assert result["from"] == env.primary.keys.seal.address
        obj = (await env.http.get(f"/objects/by-id/{oid}")).json()
        assert obj["status"] == "SEALED"
        assert obj["secondaries"] == [sp.address for sp in env.secondaries]
        assert obj["seal_height"] >= obj["create_height"]
        # sealing twice: BAD_STATUS; an unknown id: OBJECT_NOT_FOUND
        await env.refused(seal_tx(env.primary, oid, env.secondaries, checksums), "BAD_STATUS")
        await env.refused(seal_tx(env.primary, 10**9, env.secondaries, checksums),
                          "OBJECT_NOT_FOUND")


async def test_bad_seals_refused(env: Env) -> None:
    with trio.fail_after(10):
        oid, checksums = await _created(env, "tobeseal")
        p, secs = env.primary, env.secondaries
        good = [sp.integrity_sig(oid, checksums[i + 1]) for i, sp in enumerate(secs)]
        seq = p.sealer.seq
        cases: dict[str, dict[str, Any]] = {
            "missing signature": seal_tx(p, oid, secs, checksums, sigs=good[:-1], seq=seq),
            "missing secondary": seal_tx(p, oid, secs[:-1], checksums, sigs=good[:-1],
                                         seq=seq),
            "wrong signer": seal_tx(p, oid, secs, checksums, seq=seq, sigs=[
                *good[:-1], env.sps[-1].integrity_sig(oid, checksums[-1])]),
            "wrong checksum": seal_tx(p, oid, secs, checksums, seq=seq, sigs=[
                secs[0].integrity_sig(oid, checksums[2]), *good[1:]]),
            "wrong object id": seal_tx(p, oid, secs, checksums, seq=seq, sigs=[
                secs[0].integrity_sig(oid + 1, checksums[1]), *good[1:]]),
            "duplicate secondary": seal_tx(p, oid, [*secs[:-1], secs[0]], checksums, seq=seq,
                                           sigs=good),
            "primary as secondary": seal_tx(p, oid, [*secs[:-1], p], checksums, seq=seq,
                                            sigs=good),
        }
        for what, tx in cases.items():
            body = await env.refused(tx, "BAD_SEAL")
            assert body["reason"], what
        # signed by the operator key (not the seal key) of the primary
        op = seal_tx(p, oid, secs, checksums, key=p.keys.operator,
                     seq=await env.seq(p.address))
        await env.refused(op, "BAD_SEAL")
        # signed by another SP's seal key
        other = seal_tx(p, oid, secs, checksums, key=env.sps[-1].keys.seal)
        await env.refused(other, "BAD_SEAL")
        # an unregistered secondary
        ghost = TestSP.create(77)
        ghosted = [*secs[:-1], ghost]
        await env.refused(seal_tx(p, oid, ghosted, checksums, seq=seq), "SP_NOT_FOUND")
        assert (await env.http.get(f"/objects/by-id/{oid}")).json()["status"] == "CREATED"
        p.sealer.seq = seq
        await env.ok(seal_tx(p, oid, secs, checksums))


# --- delete, events -------------------------------------------------------------------------


async def test_delete_and_events(env: Env) -> None:
    with trio.fail_after(10):
        start = await env.height()
        created = await env.bucket("trash")
        oid = (await env.object("trash", "junk"))["object_id"]
        await env.ok(seal_tx(env.primary, oid, env.secondaries, make_checksums("junk")))
        del_bucket = msgs.sign(env.user.key, msgs.delete_bucket_tx(
            pubkey=env.user.pubkey, seq=env.user.seq, bucket="trash"))
        await env.refused(del_bucket, "BUCKET_NOT_EMPTY")
        stranger = Account(PrivateKey.generate())
        await env.refused(msgs.sign(stranger.key, msgs.delete_object_tx(
            pubkey=stranger.pubkey, seq=0, bucket="trash", object="junk")),
            "PERMISSION_DENIED")
        await env.ok(msgs.sign(env.user.key, msgs.delete_object_tx(
            pubkey=env.user.pubkey, seq=env.user.take_seq(), bucket="trash", object="junk")))
        assert (await env.http.get(f"/objects/by-id/{oid}")).status_code == 404
        await env.ok(msgs.sign(env.user.key, msgs.delete_bucket_tx(
            pubkey=env.user.pubkey, seq=env.user.take_seq(), bucket="trash")))
        assert (await env.http.get("/buckets/trash")).status_code == 404
        await env.refused(msgs.sign(env.user.key, msgs.delete_bucket_tx(
            pubkey=env.user.pubkey, seq=env.user.seq, bucket="trash")), "BUCKET_NOT_FOUND")

        events = (await env.http.get("/events", params={"since": start})).json()["events"]
        kinds = [(e["kind"], e["object"]) for e in events]
        assert kinds == [("bucket_created", ""), ("object_created", "junk"),
                         ("object_sealed", "junk"), ("object_deleted", "junk"),
                         ("bucket_deleted", "")]
        assert all(e["bucket"] == "trash" and e["bucket_id"] == created["bucket_id"]
                   for e in events)
        assert events[3]["object_id"] == oid
        assert all(e["height"] >= start for e in events)
        heights = [e["height"] for e in events]
        assert heights == sorted(heights)
        # paging by index, and nothing from the future
        page = (await env.http.get("/events", params={
            "since": start, "after": events[1]["index"], "limit": 2})).json()["events"]
        assert [e["index"] for e in page] == [events[2]["index"], events[3]["index"]]
        later = (await env.http.get("/events", params={"since": 10**9})).json()
        assert later["events"] == [] and later["height"] >= heights[-1]


# --- robustness -----------------------------------------------------------------------------


async def test_garbage_gives_4xx_not_5xx(env: Env) -> None:
    rng = random.Random(1234)
    valid = env.bucket_tx("garbage")
    bodies: list[bytes] = [
        b"", b"\x00", b"\xc1", b"garbage", b"\x93\x01\x02\x03", pack([valid]), pack(7),
        pack({"type": 1}), pack({"type": "gfsp.tx.nope.v1", "sig": b""}),
        pack({**valid, "seq": -1}), pack({**valid, "seq": 2**64 - 1}),
        pack({**valid, "seq": True}), pack({**valid, "seq": 1.5}),
        pack({**valid, "pubkey": b"short"}), pack({**valid, "extra": 1}),
        pack({k: v for k, v in valid.items() if k != "primary_sp"}),
        pack(dict(reversed(list(valid.items())))),
        pack({**valid, "approval": [1, 2]}), pack({**valid, "approval": {"x": {"y": 1}}}),
        pack({**valid, "bucket": "x" * 10_000}),
        msgpack.packb({b"type": b"x"}, use_bin_type=True),
        msgpack.packb(msgpack.ExtType(5, b"abc")),
        b"\x91" * 100_000,  # deeply nested
        b"\xdd\xff\xff\xff\xff",  # a huge array header with no items
        pack({**valid, "from": "\udcff".encode("utf-8", "surrogatepass").hex()}),
    ]
    bodies += [rng.randbytes(rng.randrange(1, 200)) for _ in range(40)]
    blob = bytearray(pack(valid))
    for _ in range(40):
        mutated = bytearray(blob)
        mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        bodies.append(bytes(mutated))
    with trio.fail_after(30):
        for body in bodies:
            r = await env.post(body)
            assert r.status_code < 500, (body[:40], r.text)
            if r.status_code != 200:
                assert set(r.json()) == {"code", "reason"}
        r = await env.post(b"\x00" * (MAX_TX_BYTES + 1))
        assert r.status_code == 413 and r.json()["code"] == "TOO_LARGE"
        for path in ("/objects/by-id/abc", "/objects/by-id/99999999999999999999999",
                     "/events?since=-1", "/events?limit=x", "/objects?limit=5",
                     "/buckets", "/nowhere", "/objects?bucket=b&limit=100000"):
            r = await env.http.get(path)
            assert 400 <= r.status_code < 500, (path, r.text)
            assert "code" in r.json()
        r = await env.http.get("/tx")
        assert r.status_code == 405 and r.json()["code"] == "MALFORMED"


# --- persistence ----------------------------------------------------------------------------


async def test_state_survives_restart(tmp_path: Path) -> None:
    directory = tmp_path / "chain"
    sps = [TestSP.create(i) for i in range(TOTAL + 1)]
    user = Account(PrivateKey.generate())
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            chain = await start_chain(nursery, directory)
            assert chain.endpoint is not None
            async with httpx.AsyncClient(base_url=chain.endpoint) as http:
                env = Env(chain, http, sps, user)
                await register(http, sps)
                await env.bucket("keep")
                oid = (await env.object("keep", "me"))["object_id"]
                await env.ok(seal_tx(env.primary, oid, env.secondaries, make_checksums("me")))
                await env.wait_height(3)
                before = {p: (await http.get(p)).json() for p in (
                    "/sps", "/buckets/keep", "/objects/keep/me", f"/accounts/{user.address}",
                    "/events?since=0")}
                height_before = await env.height()
            chain.shutdown()
        assert (directory / "devchain.sqlite3").exists()

        async with trio.open_nursery() as nursery:
            chain = await start_chain(nursery, directory)
            assert chain.endpoint is not None
            async with httpx.AsyncClient(base_url=chain.endpoint) as http:
                env = Env(chain, http, sps, user)
                assert await env.height() >= height_before
                for path, body in before.items():
                    assert (await http.get(path)).json() == body, path
                # sequence numbers carried over: a replay is still refused, the next is fine
                await env.refused(env.bucket_tx("keep2", seq=0), "BAD_SEQUENCE")
                await env.ok(env.bucket_tx("keep2"))
                oid2 = (await env.object("keep2", "new"))["object_id"]
                assert oid2 > oid
            chain.shutdown()


async def test_params_fixed_at_creation(tmp_path: Path) -> None:
    from node.tasks import StorageParams

    small = StorageParams(segment_size=1024, data_shards=2, parity_shards=1, max_payload=10_000)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            chain = await start_chain(nursery, tmp_path / "c", params=small)
            assert chain.params == small
            chain.shutdown()
        async with trio.open_nursery() as nursery:
            chain = await start_chain(nursery, tmp_path / "c")  # no params: the stored ones
            assert chain.params == small
            chain.shutdown()
        changed = DevChain(tmp_path / "c", params=StorageParams(
            segment_size=2048, data_shards=2, parity_shards=1, max_payload=10_000))
        with pytest.raises(msgs.ChainError, match="cannot change"):
            await changed.serve()


# --- the command line -----------------------------------------------------------------------


def _start_process(directory: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "testnet.devchain", "--dir", str(directory),
         "--block-interval", "0.1"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line.startswith("devchain listening on http://127.0.0.1:"), (
        line, proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
    endpoint = line.rsplit(" ", 1)[1]
    info = json.loads((directory / "devchain.json").read_text())
    assert info["endpoint"] == endpoint and info["pid"] == proc.pid
    return proc, endpoint


def _stop_process(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
async def test_command_line_prints_endpoint_and_survives_restart(tmp_path: Path) -> None:
    directory = tmp_path / "proc"
    sps = [TestSP.create(i) for i in range(2)]
    user = Account(PrivateKey.generate())
    with trio.fail_after(60):
        proc, endpoint = await trio.to_thread.run_sync(_start_process, directory)
        try:
            async with httpx.AsyncClient(base_url=endpoint, timeout=10) as http:
                env = Env(DevChain(directory), http, sps, user)
                await register(http, sps)
                await env.bucket("durable")
                height = await env.wait_height(2)
        finally:
            await trio.to_thread.run_sync(_stop_process, proc)
        proc, endpoint = await trio.to_thread.run_sync(_start_process, directory)
        try:
            async with httpx.AsyncClient(base_url=endpoint, timeout=10) as http:
                env = Env(DevChain(directory), http, sps, user)
                assert await env.height() >= height
                bucket = (await http.get("/buckets/durable")).json()
                assert bucket["owner"] == user.address
                assert await env.seq(user.address) == 1
        finally:
            await trio.to_thread.run_sync(_stop_process, proc)
