"""The approver: dedup window and bucket cap on fake time, expiry heights, signed approvals,
and the replicate-piece capacity policy.

The chain here is an in-memory fake (``FakeChain``): these tests need trio's autojump clock,
which must not run with real sockets, and the approver only reads height and bucket counts.
The real devchain path is covered in tests/test_signer.py and the gater tests.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from modulars.approver import Approver, DuplicateApproval, TooManyBuckets
from modulars.signer import Signer
from node.app import build_limiter
from node.chain import ChainUnavailable
from node.config import ApproverSection, Config, LimitsSection, LimitValues
from node.crypto import verify_message
from node.db import open_spdb
from node.errors import ServiceUnavailable
from node.modular import NodeContext
from node.tasks import (
    CreateBucketApprovalTask,
    CreateObjectApprovalTask,
    ObjectInfo,
    ReplicatePieceApprovalTask,
    StorageParams,
)
from testnet.devchain.testing import new_keyset

ACCOUNT = "0x" + "ab" * 20


class FakeChain:
    """In-memory stand-in for the two chain reads the approver makes (named fake)."""

    def __init__(self) -> None:
        self.height = 100
        self.buckets: dict[str, list[str]] = {}  # owner -> bucket names
        self.down = False
        self.slow = 0.0  # seconds each read takes (concurrent asks interleave)

    async def current_height(self) -> int:
        await trio.sleep(self.slow)
        if self.down:
            raise ChainUnavailable("fake chain is down")
        return self.height

    async def list_buckets(self, owner: str) -> list[Any]:
        await trio.sleep(self.slow)
        if self.down:
            raise ChainUnavailable("fake chain is down")
        return [types.SimpleNamespace(name=n) for n in self.buckets.get(owner, [])]


@asynccontextmanager
async def approver_for(tmp_path: Path, config: Config
                       ) -> AsyncIterator[tuple[Approver, FakeChain]]:
    chain = FakeChain()
    async with open_spdb(tmp_path / "spdb.sqlite3") as db:
        ctx = NodeContext(config=config, limiter=build_limiter(config), db=db,
                          keys=new_keyset(), chain=chain)  # type: ignore[arg-type]
        signer = Signer(ctx)
        ctx.modulars.mark_running(signer)
        approver = Approver(ctx)
        ctx.modulars.mark_running(approver)
        yield approver, chain


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[Approver, FakeChain]]:
    cfg = dataclasses.replace(Config(), approver=ApproverSection(
        dedup_window=60.0, max_buckets_per_account=3, bucket_approval_blocks=10,
        object_approval_blocks=20))
    async with approver_for(tmp_path, cfg) as pair:
        yield pair


async def ask_bucket(approver: Approver, bucket: str) -> CreateBucketApprovalTask:
    task = CreateBucketApprovalTask(bucket=bucket, account=ACCOUNT)
    await approver.pre_create_bucket_approval(task)
    try:
        assert await approver.handle_create_bucket_approval_task(task)
    finally:
        approver.post_create_bucket_approval(task)
    return task


async def test_bucket_approval_is_signed_with_an_expiry(setup) -> None:
    approver, chain = setup
    task = await ask_bucket(approver, "photos")
    assert task.expiry_height == chain.height + 10
    msg = approver.approval_message(task)
    assert msg["primary_sp"] == approver.ctx.keys.operator.address
    verify_message(approver.ctx.keys.approval.public_key, msg)
    assert approver.stats["create_bucket.done"] == 1 and not approver.query_tasks()


async def test_a_repeat_within_the_window_gets_the_same_approval(setup, autojump_clock
                                                                ) -> None:
    """Found in review: a repeat was refused (409) for the whole window, so a bucket or
    object deleted and created again within a minute could not be; now a repeat gets the
    approval already handed out, as long as it is valid and the window lasts."""
    approver, chain = setup
    first = await ask_bucket(approver, "dup")
    await trio.sleep(59)
    chain.height += 3
    again = await ask_bucket(approver, "dup")
    assert (again.expiry_height, again.approver_signature) == (first.expiry_height,
                                                               first.approver_signature)
    assert approver._pending == {ACCOUNT: {"dup": first.expiry_height}}  # counted once
    assert approver.stats["repeated"] == 1
    await trio.sleep(2)  # past the window: a new approval
    third = await ask_bucket(approver, "dup")
    assert third.expiry_height == chain.height + 10 != first.expiry_height
    # an approval that expired within the window is not handed out again
    chain.height += 11
    fourth = await ask_bucket(approver, "dup")
    assert fourth.expiry_height == chain.height + 10


async def test_an_ask_in_flight_is_refused_once(setup, autojump_clock) -> None:
    approver, chain = setup
    chain.slow = 1.0
    outcomes: list[str] = []

    async def one() -> None:
        try:
            await ask_bucket(approver, "same")
            outcomes.append("ok")
        except DuplicateApproval as exc:
            assert exc.status == 409
            outcomes.append("409")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one)
        nursery.start_soon(one)
    assert sorted(outcomes) == ["409", "ok"]
    chain.slow = 0.0
    await ask_bucket(approver, "same")  # no longer in flight: the repeat is answered


async def test_a_repeat_with_other_content_is_a_new_approval(setup) -> None:
    approver, chain = setup

    async def ask(size: int) -> CreateObjectApprovalTask:
        obj = ObjectInfo(id=0, bucket="b", name="o", owner=ACCOUNT, size=size,
                         checksums=tuple(bytes([size]) * 32 for _ in range(7)))
        task = CreateObjectApprovalTask(object=obj)
        await approver.pre_create_object_approval(task)
        assert await approver.handle_create_object_approval_task(task)
        approver.post_create_object_approval(task)
        return task

    five = await ask(5)
    chain.height += 1
    assert (await ask(5)).approver_signature == five.approver_signature
    six = await ask(6)  # the same name with other content: its own approval
    assert six.approver_signature != five.approver_signature
    assert approver.approval_message(six)["size"] == 6
    verify_message(approver.ctx.keys.approval.public_key, approver.approval_message(six))


async def test_bucket_cap_counts_chain_and_pending_approvals(setup) -> None:
    approver, chain = setup
    chain.buckets[ACCOUNT] = ["b0"]
    await ask_bucket(approver, "b1")
    await ask_bucket(approver, "b2")
    with pytest.raises(TooManyBuckets):
        await ask_bucket(approver, "b3")
    # once the pending approvals expire unused, there is room again
    chain.height += 11
    await ask_bucket(approver, "b3")
    assert approver._pending == {ACCOUNT: {"b3": chain.height + 10}}  # the expired forgotten


async def test_a_used_approval_is_counted_once(setup) -> None:
    """Found in review: a bucket created with an approval counted twice (on the chain and
    as pending) until the approval expired."""
    approver, chain = setup
    await ask_bucket(approver, "b1")
    chain.buckets[ACCOUNT] = ["b1"]  # created on the chain with it
    await ask_bucket(approver, "b2")
    await ask_bucket(approver, "b3")  # 3 = the cap: b1 owned, b2 and b3 pending
    with pytest.raises(TooManyBuckets):
        await ask_bucket(approver, "b4")


async def test_concurrent_asks_cannot_pass_the_cap_together(setup, autojump_clock) -> None:
    """Found in review: every ask counted the pending approvals before any of them was
    added, so 20 asks at once for different names were all approved with a cap of 3."""
    approver, chain = setup
    chain.slow = 0.1
    outcomes: list[str] = []

    async def one(i: int) -> None:
        try:
            await ask_bucket(approver, f"c{i}")
            outcomes.append("ok")
        except TooManyBuckets:
            outcomes.append("refused")

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(one, i)
    assert outcomes.count("ok") == 3 and outcomes.count("refused") == 17
    assert approver._asking == {} and not approver.query_tasks()


async def test_an_ask_cancelled_while_it_waits_on_the_chain_leaves_nothing(
        setup, autojump_clock) -> None:
    """Found in review: only some errors removed the ask from the in-flight table; one
    cancelled during the chain reads kept its (bucket, account) refused as a duplicate."""
    approver, chain = setup
    chain.slow = 10.0
    task = CreateBucketApprovalTask(bucket="slow", account=ACCOUNT)
    with trio.move_on_after(1.0):
        await approver.pre_create_bucket_approval(task)
    assert approver._asking == {} and not approver.query_tasks()
    chain.slow = 0.0
    await ask_bucket(approver, "slow")


async def test_object_approval_expiry_and_signature(setup) -> None:
    approver, chain = setup
    obj = ObjectInfo(id=0, bucket="b", name="o", owner=ACCOUNT, size=5,
                     checksums=tuple(bytes([i]) * 32 for i in range(7)))
    task = CreateObjectApprovalTask(object=obj)
    await approver.pre_create_object_approval(task)
    assert await approver.handle_create_object_approval_task(task)
    approver.post_create_object_approval(task)
    assert task.expiry_height == chain.height + 20
    msg = approver.approval_message(task)
    assert msg["checksums"] == list(obj.checksums) and msg["size"] == 5
    verify_message(approver.ctx.keys.approval.public_key, msg)


async def test_chain_down_is_503(setup) -> None:
    approver, chain = setup
    chain.down = True
    with pytest.raises(ServiceUnavailable) as info:
        await ask_bucket(approver, "down")
    assert info.value.status == 503
    assert not approver.query_tasks()


async def test_unapproved_task_has_no_message(setup) -> None:
    approver, _ = setup
    with pytest.raises(ValueError):
        approver.approval_message(CreateBucketApprovalTask(bucket="x", account=ACCOUNT))


def replicate_task(size: int) -> ReplicatePieceApprovalTask:
    obj = ObjectInfo(id=1, bucket="b", name="o", owner="", size=size,
                     checksums=tuple(bytes([i]) * 32 for i in range(7)))
    return ReplicatePieceApprovalTask(object=obj, params=StorageParams(
        segment_size=16 << 20, data_shards=4, parity_shards=2, max_payload=1 << 40))


async def test_replicate_policy_follows_the_limiter(tmp_path: Path) -> None:
    small = LimitValues(memory=1 << 20)
    cfg = dataclasses.replace(Config(), limits=LimitsSection(services={"receiver": small}))
    async with approver_for(tmp_path, cfg) as (approver, _):
        ok = replicate_task(1 << 20)      # pieces of 256 KiB: 512 KiB reserved, fits 1 MiB
        assert await approver.handle_replicate_piece_approval(ok)
        big = replicate_task(64 << 20)    # pieces of 4 MiB: does not fit
        assert not await approver.handle_replicate_piece_approval(big)
        assert "memory" in big.error
        approver.post_replicate_piece_approval(big)
        assert approver.stats["replicate_piece.refused"] == 1
