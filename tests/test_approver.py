"""The approver: dedup window and bucket cap on fake time, expiry heights, signed approvals,
and the replicate-piece capacity policy.

The chain here is an in-memory fake (``FakeChain``): these tests need trio's autojump clock,
which must not run with real sockets, and the approver only reads height and bucket counts.
The real devchain path is covered in tests/test_signer.py and the gater tests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

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
        self.buckets: dict[str, int] = {}
        self.down = False

    async def current_height(self) -> int:
        if self.down:
            raise ChainUnavailable("fake chain is down")
        return self.height

    async def list_buckets(self, owner: str) -> list[object]:
        if self.down:
            raise ChainUnavailable("fake chain is down")
        return [object()] * self.buckets.get(owner, 0)


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


async def test_duplicate_within_the_window_is_refused_then_allowed(setup, autojump_clock
                                                                  ) -> None:
    approver, _ = setup
    await ask_bucket(approver, "dup")
    await trio.sleep(59)
    with pytest.raises(DuplicateApproval) as info:
        await ask_bucket(approver, "dup")
    assert info.value.status == 409
    await trio.sleep(2)
    await ask_bucket(approver, "dup")


async def test_bucket_cap_counts_chain_and_pending_approvals(setup) -> None:
    approver, chain = setup
    chain.buckets[ACCOUNT] = 1
    await ask_bucket(approver, "b1")
    await ask_bucket(approver, "b2")
    with pytest.raises(TooManyBuckets):
        await ask_bucket(approver, "b3")
    # once the pending approvals expire unused, there is room again
    chain.height += 11
    await ask_bucket(approver, "b3")


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
