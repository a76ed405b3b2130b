"""Replicate-piece approval on ``/gfsp/approval/1.0.0``: broadcast with a min/max/timeout quorum.

Asker (:meth:`ApprovalService.handle_replicate_piece_approval`, the seed's method): one signed
request goes to every trusted peer at once, inside one nursery; each answer is verified against
the SP registry; it returns as soon as ``max`` valid approvals are in, or when every peer has
answered with at least ``min``; at ``timeout`` it returns what it has if that is at least
``min``, else raises :class:`InsufficientApprovals` with the counts of approved, refused,
invalid and silent peers.

Responder (:meth:`ApprovalService.handle_approval`): verifies the request, lets the approver
decide (the approver modular's pre/handle/post when it runs, else :func:`default_policy`), and
has the signer sign the answer with the approval key and an expiry height.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from node.chain_msgs import ChainError
from node.config import P2PSection
from node.errors import GfspError
from node.spregistry import SPRegistry
from node.tasks import ObjectInfo, ReplicatePieceApprovalTask, StorageParams, Task
from p2p.guard import ReplayGuard
from p2p.host import FrameTooLarge, P2PError, P2PHost, Stream
from p2p.messages import (
    APPROVAL_PROTOCOL,
    ApprovalRequest,
    ApprovalResponse,
    InvalidMessage,
    ObjectRef,
    Params,
    decode,
    encode,
    new_nonce,
    verify,
)
from p2p.peers import PeerTable

log = logging.getLogger("gfsp.p2p.approval")

# decide(request) -> (approved, reason, expiry_height)
Decide = Callable[[ApprovalRequest], Awaitable[tuple[bool, str, int]]]


@dataclass
class QuorumCounts:
    asked: int = 0
    approved: int = 0
    refused: int = 0
    invalid: int = 0
    silent: int = 0
    reasons: dict[str, str] = field(default_factory=dict)


class InsufficientApprovals(GfspError):
    """Fewer than ``min`` valid approvals by the timeout; carries the per-outcome counts."""

    def __init__(self, needed: int, counts: QuorumCounts) -> None:
        super().__init__(
            f"insufficient approvals: {counts.approved} of {needed} needed "
            f"(asked {counts.asked}: refused {counts.refused}, invalid {counts.invalid}, "
            f"silent {counts.silent})")
        self.needed = needed
        self.counts = counts


def request_from_task(task: ReplicatePieceApprovalTask, asker: str) -> ApprovalRequest:
    obj, params = task.object, task.params
    return ApprovalRequest(
        object=ObjectRef(obj.id, obj.bucket, obj.name, obj.size, tuple(obj.checksums)),
        params=Params(params.segment_size, params.data_shards, params.parity_shards),
        asker=asker, ts=0, nonce=new_nonce())


def task_from_request(req: ApprovalRequest, expiry_height: int) -> ReplicatePieceApprovalTask:
    """The seed's ApprovalReplicatePieceTask for a request, as the approver modular sees it."""
    o, p = req.object, req.params
    return ReplicatePieceApprovalTask(
        object=ObjectInfo(id=o.id, bucket=o.bucket, name=o.name, owner="", size=o.size,
                          checksums=tuple(o.checksums)),
        params=StorageParams(segment_size=p.segment_size, data_shards=p.data_shards,
                             parity_shards=p.parity_shards, max_payload=max(o.size, 1)),
        expiry_height=expiry_height, user_address=req.asker)


class ApprovalService:
    def __init__(self, *, host: P2PHost, table: PeerTable, registry: SPRegistry, signer: Any,
                 config: P2PSection, operator: str, guard: ReplayGuard, decide: Decide,
                 endpoint: Callable[[], Awaitable[str]]) -> None:
        self.host = host
        self.table = table
        self.registry = registry
        self.signer = signer
        self.cfg = config
        self.operator = operator
        self.guard = guard
        self.decide = decide
        self.endpoint = endpoint
        self._tasks: dict[str, Task] = {}
        #: Cumulative outcomes (exported by node.metrics): "asker.approved|refused|invalid|
        #: silent" per peer answer, "asker.quorum_met|quorum_insufficient" per ask,
        #: "responder.approved|refused|invalid" per request received.
        self.stats: collections.Counter[str] = collections.Counter()

    def query_tasks(self, prefix: str = "") -> list[Task]:
        """In-flight approval tasks whose key starts with ``prefix``."""
        return [t for k, t in self._tasks.items() if k.startswith(prefix)]

    # --- the asker ----------------------------------------------------------------------

    async def handle_replicate_piece_approval(self, task: ReplicatePieceApprovalTask,
                                              min_approvals: int, max_approvals: int,
                                              timeout: float) -> list[ApprovalResponse]:
        if not 0 < min_approvals <= max_approvals:
            raise ValueError(f"need 0 < min ({min_approvals}) <= max ({max_approvals})")
        request = request_from_task(task, self.operator)
        request = dataclasses.replace(request, ts=self.guard.now_ms())
        request = dataclasses.replace(request, sig=self.signer.sign_p2p_approval_request(request))
        frame = encode(request)
        peers = [p for p in self.table.trusted() if p.peer_id != self.host.peer_id]
        counts = QuorumCounts(asked=len(peers))
        approvals: dict[str, ApprovalResponse] = {}
        pending = {p.peer_id for p in peers}
        self._tasks[task.key] = task
        try:
            with trio.move_on_after(timeout):
                async with trio.open_nursery() as nursery:
                    for peer in peers:
                        nursery.start_soon(self._ask_one, peer.peer_id, peer.addrs, frame,
                                           request, counts, approvals, pending, max_approvals,
                                           nursery.cancel_scope, timeout)
        finally:
            self._tasks.pop(task.key, None)
        if len(approvals) < max_approvals:
            for peer_id in pending:
                counts.reasons.setdefault(peer_id, f"silent: no answer within {timeout}s")
            counts.silent += len(pending)
        result = list(approvals.values())[:max_approvals]
        for outcome in ("approved", "refused", "invalid", "silent"):
            self.stats[f"asker.{outcome}"] += getattr(counts, outcome)
        self.stats["asker.quorum_met" if len(result) >= min_approvals
                   else "asker.quorum_insufficient"] += 1
        log.info("approval quorum for %s: %d approved, %d refused, %d invalid, %d silent",
                 task.key, counts.approved, counts.refused, counts.invalid, counts.silent)
        if len(result) < min_approvals:
            raise InsufficientApprovals(min_approvals, counts)
        return result

    async def _ask_one(self, peer_id: str, addrs: tuple[str, ...], frame: bytes,
                       request: ApprovalRequest, counts: QuorumCounts,
                       approvals: dict[str, ApprovalResponse], pending: set[str],
                       max_approvals: int, scope: trio.CancelScope, timeout: float) -> None:
        try:
            data = await self.host.request(peer_id, addrs, APPROVAL_PROTOCOL, frame,
                                           max_response=self.cfg.max_approval_frame,
                                           timeout=min(timeout, self.cfg.request_timeout))
        except FrameTooLarge as exc:
            pending.discard(peer_id)
            counts.invalid += 1
            counts.reasons[peer_id] = f"invalid: {exc}"
            return
        except P2PError as exc:
            pending.discard(peer_id)
            counts.silent += 1
            counts.reasons[peer_id] = f"silent: {type(exc).__name__}"
            return
        try:  # still pending until checked: cut off here by the timeout, it counts as silent
            resp = await self._check_response(data, request, peer_id)
        except ChainError as exc:  # the registry could not answer: cannot verify this one
            pending.discard(peer_id)
            counts.invalid += 1
            counts.reasons[peer_id] = f"unverifiable: {exc}"
            return
        except InvalidMessage as exc:
            pending.discard(peer_id)
            counts.invalid += 1
            counts.reasons[peer_id] = f"invalid: {exc}"
            return
        pending.discard(peer_id)
        if not resp.approved:
            counts.refused += 1
            counts.reasons[peer_id] = f"refused: {resp.reason}"
        elif resp.approver in approvals:
            counts.invalid += 1
            counts.reasons[peer_id] = "invalid: duplicate approval"
        else:
            approvals[resp.approver] = resp
            counts.approved += 1
            if len(approvals) >= max_approvals:
                scope.cancel()

    async def _check_response(self, data: bytes, request: ApprovalRequest,
                              peer_id: str) -> ApprovalResponse:
        resp = decode(data, ApprovalResponse)
        if resp.request_nonce != request.nonce or resp.asker != self.operator:
            raise InvalidMessage("approval answers another request or asker")
        if resp.object_id != request.object.id:
            raise InvalidMessage("approval is for another object")
        if resp.approver == self.operator:
            raise InvalidMessage("approval from ourselves")
        sp = await self.registry.sp_by_operator(resp.approver)
        if sp is None or not sp.in_service or sp.peer_id != peer_id:
            raise InvalidMessage(f"approver {resp.approver} is not the registered SP of "
                                 f"peer {peer_id}")
        verify(resp, sp.approval_key)
        self.guard.check_ts(resp.ts, "approval")
        if resp.approved and resp.expiry_height <= await self.registry.current_height():
            raise InvalidMessage("approval already expired")
        return resp

    # --- the responder ------------------------------------------------------------------

    async def handle_approval(self, stream: Stream) -> None:
        """Verify a request, decide, answer with a signed response; invalid -> reset."""
        with trio.fail_after(self.cfg.request_timeout):
            try:
                req = decode(await stream.read_frame(self.cfg.max_approval_frame),
                             ApprovalRequest)
                sp = await self.registry.sp_by_operator(req.asker)
                if sp is None or not sp.in_service or sp.peer_id != stream.remote_peer_id:
                    raise InvalidMessage(f"approval request: {req.asker} is not the registered "
                                         "SP of the remote peer")
                verify(req, sp.operator_key)
                self.guard.check(req.asker, req.nonce, req.ts, "approval request")
            except (InvalidMessage, FrameTooLarge):
                self.stats["responder.invalid"] += 1
                raise
            approved, reason, expiry = await self.decide(req)
            self.stats["responder.approved" if approved else "responder.refused"] += 1
            resp = ApprovalResponse(
                request_nonce=req.nonce, object_id=req.object.id, asker=req.asker,
                approver=self.operator, approved=approved, reason="" if approved else reason,
                endpoint=await self.endpoint(), expiry_height=expiry, ts=self.guard.now_ms())
            resp = dataclasses.replace(resp, sig=self.signer.sign_replicate_piece_approval(resp))
            await stream.write_frame(encode(resp), last=True)
            await stream.close()
