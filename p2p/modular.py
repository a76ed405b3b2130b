"""The P2P modular (the seed's P2P): the libp2p host, discovery and the approval quorum.

READY (``task_status.started()``) only once the host listens and the peer table is loaded.
Every inbound stream reserves one inbound connection and its largest frame from the shared
limiter (over the limit: the stream is reset); every outbound ping or approval ask reserves
outbound connections the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Any

import trio

from node.capacity import ReceiveCapacity
from node.errors import ConfigError, GfspError
from node.modular import ModularBase, NodeContext
from node.spregistry import SPRegistry
from node.tasks import ReplicatePieceApprovalTask, Task
from p2p.approval import ApprovalService, task_from_request
from p2p.discovery import Discovery
from p2p.guard import ReplayGuard
from p2p.host import ListenError, P2PHost, Stream, open_host
from p2p.messages import APPROVAL_PROTOCOL, PING_PROTOCOL, ApprovalRequest, ApprovalResponse
from p2p.peers import PeerRecord, PeerTable

log = logging.getLogger("gfsp.p2p")


class P2PModular(ModularBase):
    name = "p2p"
    requires = ("signer",)

    def __init__(self, ctx: NodeContext) -> None:
        super().__init__(ctx)
        self.cfg = ctx.config.p2p
        self.host: P2PHost | None = None
        self.table: PeerTable | None = None
        self.discovery: Discovery | None = None
        self.approvals: ApprovalService | None = None
        self.capacity = ReceiveCapacity(ctx.config, ctx.limiter)

    @property
    def registry(self) -> SPRegistry:
        if self.ctx.sp_registry is None:
            raise ConfigError("p2p needs an SP registry: set chain.registry_file "
                              "(or run against a chain)")
        return self.ctx.sp_registry

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        registry = self.registry
        signer = self.ctx.modulars.signer
        operator = signer.operator_address
        guard = ReplayGuard(self.cfg.max_clock_skew)
        handlers = {PING_PROTOCOL: self._inbound(self._handle_ping, self.cfg.max_ping_frame),
                    APPROVAL_PROTOCOL: self._inbound(self._handle_approval,
                                                     self.cfg.max_approval_frame)}
        for attempt in range(self.cfg.listen_retries + 1):
            try:
                await self._serve_host(registry, signer, operator, guard, handlers,
                                       task_status)
                return
            except ListenError as exc:
                # a restarted SP may find its port not yet released by the old process
                if attempt == self.cfg.listen_retries:
                    raise
                log.warning("%s; retrying in %.1fs", exc, self.cfg.listen_retry_interval)
                await trio.sleep(self.cfg.listen_retry_interval)

    async def _serve_host(self, registry: SPRegistry, signer: Any, operator: str,
                          guard: ReplayGuard,
                          handlers: dict[str, Callable[[Stream], Awaitable[None]]],
                          task_status: trio.TaskStatus[None]) -> None:
        async with open_host(self.ctx.keys.p2p, self.cfg.listen,
                             connect_timeout=self.cfg.connect_timeout, handlers=handlers,
                             max_inbound_streams=self.cfg.max_inbound_streams,
                             max_inbound_per_peer=self.cfg.max_inbound_per_peer,
                             admit=self._admit) as host:
            self.host = host
            self.table = PeerTable(self.ctx.db, self_peer_id=host.peer_id,
                                   max_peers=self.cfg.max_peers)
            self.discovery = Discovery(host=host, table=self.table, registry=registry,
                                       signer=signer, config=self.cfg, operator=operator,
                                       guard=guard, reserve=self._outbound_ping)
            self.approvals = ApprovalService(
                host=host, table=self.table, registry=registry, signer=signer, config=self.cfg,
                operator=operator, guard=guard, decide=self._decide,
                endpoint=self._own_endpoint)
            log.info("p2p listening on %s as %s", ", ".join(host.listen_addrs)
                     or f"{self.cfg.listen} (peers dial the addresses in the SP registry)",
                     host.peer_id)
            async with trio.open_nursery() as nursery:
                await nursery.start(self.discovery.run)
                task_status.started()

    def _inbound(self, handler: Callable[[Stream], Awaitable[None]], max_frame: int
                 ) -> Callable[[Stream], Awaitable[None]]:
        async def limited(stream: Stream) -> None:
            with self.ctx.limiter.span(self.name, conns_inbound=1, memory=max_frame):
                await handler(stream)
        return limited

    async def _admit(self, peer_id: str) -> bool:
        """Only SPs the registry lists (and in service) may open streams to us: a throwaway
        peer id is reset before it negotiates anything or holds a stream slot."""
        sp = await self.registry.sp_by_peer_id(peer_id)
        return sp is not None and sp.in_service

    def _outbound_ping(self) -> AbstractContextManager[object]:
        return self.ctx.limiter.span(self.name, conns_outbound=1,
                                     memory=self.cfg.max_ping_frame)

    async def _handle_ping(self, stream: Stream) -> None:
        assert self.discovery is not None
        await self.discovery.handle_ping(stream)

    async def _handle_approval(self, stream: Stream) -> None:
        assert self.approvals is not None
        await self.approvals.handle_approval(stream)

    async def _own_endpoint(self) -> str:
        sp = await self.registry.sp_by_operator(self.ctx.modulars.signer.operator_address)
        return sp.endpoint if sp else ""

    # --- the seed's P2P interface ---------------------------------------------------------

    async def handle_replicate_piece_approval(self, task: ReplicatePieceApprovalTask,
                                              min_approvals: int, max_approvals: int,
                                              timeout: float | None = None
                                              ) -> list[ApprovalResponse]:
        if self.approvals is None or self.table is None:
            raise RuntimeError("p2p is not started")
        peers = len(self.table.trusted())
        with self.ctx.limiter.span(self.name, conns_outbound=peers,
                                   memory=peers * self.cfg.max_approval_frame,
                                   task_priority=task.priority):
            return await self.approvals.handle_replicate_piece_approval(
                task, min_approvals, max_approvals,
                self.cfg.approval_timeout if timeout is None else timeout)

    def handle_query_bootstrap(self) -> list[str]:
        return self.discovery.handle_query_bootstrap() if self.discovery else []

    def query_tasks(self, prefix: str = "") -> list[Task]:
        return self.approvals.query_tasks(prefix) if self.approvals else []

    def peers(self) -> list[PeerRecord]:
        return self.table.all() if self.table else []

    # --- the responder's decision ---------------------------------------------------------

    async def _decide(self, req: ApprovalRequest) -> tuple[bool, str, int]:
        """The approver modular's pre/handle/post when it runs; else :meth:`default_policy`."""
        height = await self.registry.current_height()
        expiry = height + self.ctx.config.approver.replicate_approval_blocks
        if not self.ctx.modulars.is_running("approver"):
            approved, reason = self.default_policy(req)
            return approved, reason, expiry
        approver = self.ctx.modulars.approver
        task = task_from_request(req, expiry)
        try:
            await approver.pre_replicate_piece_approval(task)
            approved = await approver.handle_replicate_piece_approval(task)
        except GfspError as exc:
            return False, str(exc), expiry
        finally:
            approver.post_replicate_piece_approval(task)
        return approved, "" if approved else (task.error or "refused by policy"), expiry

    def default_policy(self, req: ApprovalRequest) -> tuple[bool, str]:
        """Approve while the limiter and free disk allow receiving this object's pieces."""
        return self.capacity.check(size=req.object.size, segment_size=req.params.segment_size,
                                   data_shards=req.params.data_shards)
