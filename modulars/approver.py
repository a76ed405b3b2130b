"""Approver: decides and signs approvals (the seed's Approver), pre/handle/post per task type.

- CreateBucketApproval / CreateObjectApproval: ``pre_`` refuses an ask while the same one is
  in flight (409 ``DuplicateApprovalRequest``) and an account at
  ``approver.max_buckets_per_account`` buckets (on the chain, plus approvals handed out, not
  yet expired and not yet used, plus the account's other asks in flight); ``handle_`` sets the
  expiry height (current + ``*_approval_blocks``) and has the signer sign, except that a
  repeat of an ask within ``approver.dedup_window`` seconds gets the approval already handed
  out when it would sign the same thing and has not expired (a client retrying, or
  re-creating a bucket or object it just deleted); ``post_`` records statistics.
  :meth:`Approver.approval_message` gives the signed approval map the client embeds in its
  transaction.
- ReplicatePieceApproval (asked by other SPs through the P2P modular): approved while the
  shared limiter and free disk allow receiving the pieces (:mod:`node.capacity`).
"""

from __future__ import annotations

import heapq
from collections import Counter
from typing import Any

import trio

from node import chain_msgs
from node.capacity import ReceiveCapacity
from node.chain import ChainClient, ChainUnavailable
from node.errors import ConfigError, ServiceError, ServiceUnavailable
from node.modular import ModularBase, NodeContext
from node.tasks import (
    CreateBucketApprovalTask,
    CreateObjectApprovalTask,
    ReplicatePieceApprovalTask,
    Task,
)

#: Bucket approvals outstanding (handed out, not expired) at most, over all accounts
MAX_PENDING_BUCKETS = 100_000


class DuplicateApproval(ServiceError):
    def __init__(self, key: str, window: float) -> None:
        super().__init__("DuplicateApprovalRequest",
                         f"the same approval was asked less than {window:g} s ago ({key})", 409)


class TooManyBuckets(ServiceError):
    def __init__(self, account: str, cap: int) -> None:
        super().__init__("TooManyBuckets", f"account {account} has reached the cap of {cap} "
                                           "buckets on this SP", 400)


class Approver(ModularBase):
    name = "approver"
    requires = ("signer",)

    def __init__(self, ctx: NodeContext) -> None:
        super().__init__(ctx)
        self.cfg = ctx.config.approver
        # task key -> (time handed out, the signed approval map, its signature)
        self._recent: dict[str, tuple[float, dict[str, Any], bytes]] = {}
        # bucket approvals handed out and not yet expired: account -> {bucket: expiry height},
        # and a heap of (expiry height, account, bucket) to forget them when they expire
        self._pending: dict[str, dict[str, int]] = {}
        self._pending_heap: list[tuple[int, str, str]] = []
        # asks between pre_ and handle_ (awaiting the chain), account -> task keys: counted
        # against the cap at once, so that concurrent asks cannot all pass it
        self._asking: dict[str, set[str]] = {}
        self._in_flight: dict[str, Task] = {}
        self.stats: Counter[str] = Counter()
        self.capacity = ReceiveCapacity(ctx.config, ctx.limiter)

    @property
    def chain(self) -> ChainClient:
        if self.ctx.chain is None:
            raise ConfigError("the approver needs a chain (chain.endpoint)")
        return self.ctx.chain

    def query_tasks(self, prefix: str = "") -> list[Task]:
        return [t for k, t in self._in_flight.items() if k.startswith(prefix)]

    # --- shared steps ---------------------------------------------------------------------

    def _check_duplicate(self, task: Task) -> None:
        """409 while the same ask is in flight; else it is in flight from now on."""
        if task.key in self._in_flight:
            raise DuplicateApproval(task.key, self.cfg.dedup_window)
        self._in_flight[task.key] = task

    def _repeat(self, task: CreateBucketApprovalTask | CreateObjectApprovalTask,
                message: dict[str, Any], height: int) -> bool:
        """Give ``task`` the approval handed out for the same ask within the window, when it
        signed the same ``message`` (but the expiry) and is still valid at ``height``."""
        horizon = trio.current_time() - self.cfg.dedup_window
        for key in [k for k, (t, _, _) in self._recent.items() if t < horizon]:
            del self._recent[key]
        hit = self._recent.get(task.key)
        if hit is None:
            return False
        _, signed, signature = hit
        if {**message, "expiry_height": signed["expiry_height"]} != signed \
                or signed["expiry_height"] < height:
            return False
        task.expiry_height = signed["expiry_height"]
        task.approver_signature = signature
        self.stats["repeated"] += 1
        return True

    def _remember(self, task: CreateBucketApprovalTask | CreateObjectApprovalTask,
                  message: dict[str, Any]) -> None:
        self._recent[task.key] = (trio.current_time(), message, task.approver_signature)

    async def _height(self) -> int:
        try:
            return await self.chain.current_height()
        except ChainUnavailable as exc:
            raise ServiceUnavailable(f"chain unavailable: {exc.reason}") from None

    def _post(self, task: Task, kind: str) -> None:
        self._in_flight.pop(task.key, None)
        self.stats[f"{kind}.{'error' if task.error else 'done'}"] += 1

    # --- CreateBucketApproval -------------------------------------------------------------

    async def pre_create_bucket_approval(self, task: CreateBucketApprovalTask) -> None:
        self._check_duplicate(task)
        asking = self._asking.setdefault(task.account, set())
        asking.add(task.key)  # before any await: a concurrent ask of the account counts it
        try:
            height = await self.chain.current_height()
            owned = {b.name for b in await self.chain.list_buckets(task.account)}
            self._forget_expired(height)
            pending = self._pending.get(task.account, {})
            for name in [n for n in pending if n in owned]:  # used: counted as owned now
                del pending[name]
            others = len(pending) - (task.bucket in pending)  # a repeat is not one more
            count = len(owned) + others + len(asking) - 1  # the others in flight
            if count >= self.cfg.max_buckets_per_account:
                raise TooManyBuckets(task.account, self.cfg.max_buckets_per_account)
            if len(self._pending_heap) >= MAX_PENDING_BUCKETS:
                raise ServiceUnavailable("too many bucket approvals outstanding; retry later",
                                         10)
        except BaseException as exc:
            self._in_flight.pop(task.key, None)
            self._done_asking(task)
            if isinstance(exc, ChainUnavailable):
                raise ServiceUnavailable(f"chain unavailable: {exc.reason}") from None
            raise

    async def handle_create_bucket_approval_task(self, task: CreateBucketApprovalTask) -> bool:
        height = await self._height()
        if not self._repeat(task, self._bucket_approval(task), height):
            task.expiry_height = height + self.cfg.bucket_approval_blocks
            message = self._bucket_approval(task)
            task.approver_signature = self.ctx.modulars.signer.sign_create_bucket_approval(
                message)
            self._remember(task, message)
        pending = self._pending.setdefault(task.account, {})
        if pending.get(task.bucket) != task.expiry_height:
            pending[task.bucket] = task.expiry_height
            heapq.heappush(self._pending_heap, (task.expiry_height, task.account, task.bucket))
        self._done_asking(task)  # counted as pending from now on
        return True

    def post_create_bucket_approval(self, task: CreateBucketApprovalTask) -> None:
        self._done_asking(task)
        self._post(task, "create_bucket")

    def _done_asking(self, task: CreateBucketApprovalTask) -> None:
        asking = self._asking.get(task.account)
        if asking is not None:
            asking.discard(task.key)
            if not asking:
                del self._asking[task.account]

    def _forget_expired(self, height: int) -> None:
        """Drop the pending bucket approvals that expired below ``height``."""
        heap = self._pending_heap
        while heap and heap[0][0] < height:
            expiry, account, bucket = heapq.heappop(heap)
            buckets = self._pending.get(account)
            if buckets is not None and buckets.get(bucket) == expiry:
                del buckets[bucket]
                if not buckets:
                    del self._pending[account]

    def _bucket_approval(self, task: CreateBucketApprovalTask) -> dict[str, Any]:
        return chain_msgs.create_bucket_approval(
            creator=task.account, bucket=task.bucket,
            primary_sp=self.ctx.modulars.signer.operator_address,
            expiry_height=task.expiry_height)

    # --- CreateObjectApproval -------------------------------------------------------------

    async def pre_create_object_approval(self, task: CreateObjectApprovalTask) -> None:
        self._check_duplicate(task)

    async def handle_create_object_approval_task(self, task: CreateObjectApprovalTask) -> bool:
        height = await self._height()
        if self._repeat(task, self._object_approval(task), height):
            return True
        task.expiry_height = height + self.cfg.object_approval_blocks
        message = self._object_approval(task)
        task.approver_signature = self.ctx.modulars.signer.sign_create_object_approval(message)
        self._remember(task, message)
        return True

    def post_create_object_approval(self, task: CreateObjectApprovalTask) -> None:
        self._post(task, "create_object")

    def _object_approval(self, task: CreateObjectApprovalTask) -> dict[str, Any]:
        o = task.object
        return chain_msgs.create_object_approval(
            creator=o.owner, bucket=o.bucket, object=o.name, size=o.size,
            content_type=o.content_type, checksums=list(o.checksums),
            expiry_height=task.expiry_height)

    def approval_message(self, task: CreateBucketApprovalTask | CreateObjectApprovalTask
                         ) -> dict[str, Any]:
        """The signed approval map for the client to embed in its create transaction."""
        if not task.approver_signature:
            raise ValueError(f"{task.key} has not been approved")
        msg = (self._bucket_approval(task) if isinstance(task, CreateBucketApprovalTask)
               else self._object_approval(task))
        msg["sig"] = task.approver_signature
        return msg

    # --- ReplicatePieceApproval (asked by other SPs over p2p) -----------------------------

    async def pre_replicate_piece_approval(self, task: ReplicatePieceApprovalTask) -> None:
        self._in_flight[task.key + f"-asker:{task.user_address}"] = task

    async def handle_replicate_piece_approval(self, task: ReplicatePieceApprovalTask) -> bool:
        approved, reason = self.capacity.check(
            size=task.object.size,
            segment_size=task.params.segment_size, data_shards=task.params.data_shards)
        if not approved:
            task.set_error(reason)
        return approved

    def post_replicate_piece_approval(self, task: ReplicatePieceApprovalTask) -> None:
        self._in_flight.pop(task.key + f"-asker:{task.user_address}", None)
        self.stats[f"replicate_piece.{'refused' if task.error else 'approved'}"] += 1
