"""The node's Prometheus metrics: one :class:`~prometheus_client.CollectorRegistry` per Node.

No global state: :class:`NodeMetrics` owns its registry (never the default ``REGISTRY``). Most
values are read from the node's state when scraped (:class:`NodeCollector`), so modulars carry
no metric code; the two exceptions are the gater's HTTP requests (fed by
:class:`~modulars.gater.errors.ErrorMiddleware` through :meth:`NodeMetrics.observe_request`,
found on the gater's starlette ``app.state.metrics``, set by :meth:`NodeMetrics.attach`) and
the p2p approval outcomes (``ApprovalService.stats``, a Counter). Values behind an ``await``
(the manager's task counts in SPDB, the chain height) are read by :meth:`NodeMetrics.refresh`,
which the admin server calls before every scrape; a scrape shows the last values refreshed.

Served on ``node.admin_listen`` (loopback only) at ``GET /metrics`` by :mod:`node.admin`.

=========================================  =========  =====================  =================
metric                                     type       labels                 what
=========================================  =========  =====================  =================
``gfsp_node_info``                         gauge      node, operator         always 1
``gfsp_modular_running``                   gauge      modular                1 running, 0 not
``gfsp_http_requests_total``               counter    route, method, status  gater requests
``gfsp_http_request_duration_seconds``     histogram  route, method          gater latency
``gfsp_limiter_limit``                     gauge      scope, resource        configured limit
``gfsp_limiter_used``                      gauge      scope, resource        reserved now
``gfsp_limiter_remaining``                 gauge      scope, resource        left (see below)
``gfsp_tasks``                             gauge      type, state            manager's tasks
``gfsp_task_queue_size``                   gauge      type                   pending tasks
``gfsp_manager_events_total``              counter    event                  ``Manager.stats``
``gfsp_downloader_events_total``           counter    event                  ``Downloader.stats``
``gfsp_p2p_peers``                         gauge      state                  peer table
``gfsp_p2p_ping_rtt_seconds``              gauge      peer                   last ping RTT
``gfsp_p2p_approval_outcomes_total``       counter    role, outcome          approvals
``gfsp_piecestore_used_bytes``             gauge      (none)                 stored piece bytes
``gfsp_chain_height``                      gauge      (none)                 last height seen
``gfsp_chain_reachable``                   gauge      (none)                 1 if it answered
=========================================  =========  =====================  =================

Label values:

- ``route`` is the gater's route template (``/gfsp/v1/objects/{bucket}/{object:path}``), or
  ``unmatched`` for a path no route matches; ``status`` is the response status (``none`` when
  no response was started, e.g. the client went away).
- ``scope`` is ``system`` or ``service:NAME`` (every service scope the limiter has);
  ``resource`` is one of :data:`node.rcmgr.RESOURCES`. An unlimited value
  (:data:`node.rcmgr.UNLIMITED`) is exported as ``+Inf``. ``remaining`` is what
  :meth:`~node.rcmgr.ResourceLimiter.remaining` reports: for a service, the min over the
  service and the system scope.
- ``type``/``state``: the manager's task type (``GCMeta``, ``ReplicatePiece``, ...) and state
  (``pending``, ``running``, ``done``, ``failed``); ``gfsp_task_queue_size`` is the pending
  count per type.
- ``event`` of the downloader: ``downloads``, ``bytes_served``, ``degraded_reads`` (segments
  rebuilt from the secondaries: a primary's disk losing data shows here first), ``repairs``,
  ``repair_failures``, ``repairs_skipped``, ``pieces_refused``, ``challenges``,
  ``challenge_failures``, ... (those that happened so far).
- ``state`` of a peer: ``trusted``, ``candidate``, ``evicted`` (all three always present).
- ``role``/``outcome`` of approvals: ``asker`` with ``approved``/``refused``/``invalid``/
  ``silent`` (answers per peer) and ``quorum_met``/``quorum_insufficient`` (per ask);
  ``responder`` with ``approved``/``refused``/``invalid`` (requests answered or dropped).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from node.chain import ChainError
from node.errors import DBError, TaskError
from node.rcmgr import RESOURCES, UNLIMITED

if TYPE_CHECKING:
    from node.modular import NodeContext

log = logging.getLogger("gfsp.metrics")

PREFIX = "gfsp_"
#: Task states and peer states always exported (0 when none).
TASK_STATES: tuple[str, ...] = ("pending", "running", "done", "failed")
PEER_STATES: tuple[str, ...] = ("trusted", "candidate", "evicted")
#: Route label of a request no route matched.
UNMATCHED = "unmatched"
#: How long one refresh waits for the chain height / the manager's counts.
REFRESH_TIMEOUT = 1.0

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _value(n: int) -> float:
    return math.inf if n >= UNLIMITED else float(n)


class NodeMetrics:
    """A node's registry, the gater's request hook, and the async-read snapshot."""

    def __init__(self, ctx: NodeContext, order: Iterable[str] = ()) -> None:
        self.ctx = ctx
        self.order = list(order)
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "gfsp_http_requests", "Gater HTTP requests by route template, method and status.",
            ("route", "method", "status"), registry=self.registry)
        self.latency = Histogram(
            "gfsp_http_request_duration_seconds",
            "Gater HTTP request latency (first byte in to last byte out), by route template.",
            ("route", "method"), registry=self.registry)
        #: Last values read by :meth:`refresh`.
        self.task_counts: dict[str, dict[str, int]] = {}
        self.chain_height: int | None = None
        #: This SP in the SP registry: (endpoint, p2p addrs), () when not listed, None unknown
        self.registered: tuple[str, tuple[str, ...]] | tuple[()] | None = None
        #: Whether the last refresh reached the chain (None: not asked yet, or no chain)
        self.chain_reachable: bool | None = None
        self.registry.register(NodeCollector(self))

    # --- the gater's hook -------------------------------------------------------------------

    def observe_request(self, route: str, method: str, status: int | str,
                        seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(max(0.0, seconds))

    def attach(self, modulars: Mapping[str, Any]) -> None:
        """Let the gater's middleware find this hook (on its starlette ``app.state``)."""
        gater = modulars.get("gater")
        state = getattr(getattr(gater, "app", None), "state", None)
        if state is not None:
            state.metrics = self

    # --- values behind an await -------------------------------------------------------------

    async def refresh(self) -> None:
        """Read the manager's task counts and the chain height (each bounded in time; a
        failure keeps the previous value)."""
        modulars = self.ctx.modulars
        if modulars.is_running("manager"):
            with trio.move_on_after(REFRESH_TIMEOUT):
                try:
                    self.task_counts = await modulars.manager.counts()
                except (DBError, TaskError) as exc:  # a scrape never fails for one source
                    log.warning("metrics: manager counts unavailable: %s", exc)
        registry = self.ctx.sp_registry or self.ctx.chain
        if registry is not None:
            self.chain_reachable = False  # unless both answer in time
            self.registered = None
            with trio.move_on_after(REFRESH_TIMEOUT):
                try:
                    self.chain_height = int(await registry.current_height())
                    sp = await registry.sp_by_operator(self.ctx.keys.operator.address)
                    self.registered = (sp.endpoint, tuple(sp.p2p_addrs)) if sp else ()
                    self.chain_reachable = True
                except (ChainError, OSError, ValueError) as exc:
                    log.debug("metrics: chain unavailable: %s", exc)

    async def exposition(self) -> bytes:
        """The Prometheus text format, refreshed."""
        await self.refresh()
        return generate_latest(self.registry)

    # --- plain reads (shared by the collector and /admin/status) ----------------------------

    def modular_states(self) -> dict[str, bool]:
        modulars = self.ctx.modulars
        names = self.order + [n for n in modulars.running() if n not in self.order]
        return {name: modulars.is_running(name) for name in names}

    def limiter_stats(self) -> dict[str, dict[str, dict[str, int]]]:
        """``{scope: {"limit": {...}, "used": {...}, "remaining": {...}}}``."""
        limiter = self.ctx.limiter
        out = limiter.stats()
        for scope, values in out.items():
            service = scope.removeprefix("service:") if scope != "system" else None
            values["remaining"] = limiter.remaining(service).as_dict()
        return out

    def p2p(self) -> Any:
        modulars = self.ctx.modulars
        return modulars.p2p if modulars.is_running("p2p") else None

    def peers(self) -> list[dict[str, Any]]:
        p2p = self.p2p()
        if p2p is None:
            return []
        rtts = p2p.table.rtts if p2p.table is not None else {}
        return [{"peer_id": p.peer_id, "operator": p.operator, "state": p.state,
                 "addrs": list(p.addrs), "rtt": rtts.get(p.peer_id), "missed": p.missed,
                 "last_seen": p.last_seen} for p in p2p.peers()]

    def approval_stats(self) -> dict[str, int]:
        p2p = self.p2p()
        approvals = getattr(p2p, "approvals", None)
        return dict(getattr(approvals, "stats", None) or {})

    def piecestore_used(self) -> int | None:
        store = self.ctx.piecestore
        return None if store is None else int(store.used_bytes())


class NodeCollector(Collector):
    """Reads the node's state at scrape time (see the table in :mod:`node.metrics`)."""

    def __init__(self, metrics: NodeMetrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        m, ctx = self.m, self.m.ctx
        info = GaugeMetricFamily("gfsp_node_info", "This node's name and operator address.",
                                 labels=("node", "operator"))
        info.add_metric((ctx.config.node.name, ctx.keys.operator.address), 1)
        yield info

        running = GaugeMetricFamily("gfsp_modular_running", "1 if the modular is running.",
                                    labels=("modular",))
        for name, up in m.modular_states().items():
            running.add_metric((name,), 1 if up else 0)
        yield running

        yield from self._limiter()
        yield from self._tasks()
        yield from self._p2p()

        used = m.piecestore_used()
        if used is not None:
            yield GaugeMetricFamily("gfsp_piecestore_used_bytes",
                                    "Bytes held by stored pieces.", value=used)
        if m.chain_height is not None:
            yield GaugeMetricFamily("gfsp_chain_height", "The chain height the node last saw.",
                                    value=m.chain_height)
        if m.chain_reachable is not None:
            yield GaugeMetricFamily("gfsp_chain_reachable", "1 if the chain answered the last "
                                    "refresh in time, else 0.", value=int(m.chain_reachable))

    def _limiter(self) -> Iterator[Metric]:
        families = {kind: GaugeMetricFamily(f"gfsp_limiter_{kind}", doc,
                                            labels=("scope", "resource"))
                    for kind, doc in (("limit", "The limiter's limit per scope and resource."),
                                      ("used", "Reserved now per scope and resource."),
                                      ("remaining", "What can still be reserved (a service: "
                                                    "min over service and system)."))}
        for scope, values in self.m.limiter_stats().items():
            for kind, family in families.items():
                for resource in RESOURCES:
                    family.add_metric((scope, resource), _value(values[kind][resource]))
        yield from families.values()

    def _tasks(self) -> Iterator[Metric]:
        counts = self.m.task_counts
        tasks = GaugeMetricFamily("gfsp_tasks", "The manager's tasks by type and state.",
                                  labels=("type", "state"))
        queue = GaugeMetricFamily("gfsp_task_queue_size", "Pending tasks by type.",
                                  labels=("type",))
        for type_name in sorted(counts):
            by_state = counts[type_name]
            for state in [*TASK_STATES, *sorted(set(by_state) - set(TASK_STATES))]:
                tasks.add_metric((type_name, state), by_state.get(state, 0))
            queue.add_metric((type_name,), by_state.get("pending", 0))
        yield tasks
        yield queue
        modulars = self.m.ctx.modulars
        stats = getattr(modulars.manager, "stats", None) if modulars.is_running(
            "manager") else None
        events = CounterMetricFamily("gfsp_manager_events", "The manager's event counters.",
                                     labels=("event",))
        for event, n in sorted((stats or {}).items()):
            events.add_metric((event,), n)
        yield events
        stats = getattr(modulars.downloader, "stats", None) if modulars.is_running(
            "downloader") else None
        events = CounterMetricFamily("gfsp_downloader_events", "The downloader's event "
                                     "counters (downloads, degraded reads, repairs, "
                                     "challenges).", labels=("event",))
        for event, n in sorted((stats or {}).items()):
            events.add_metric((event,), n)
        yield events

    def _p2p(self) -> Iterator[Metric]:
        peers = self.m.peers()
        family = GaugeMetricFamily("gfsp_p2p_peers", "Peers in the p2p table by state.",
                                   labels=("state",))
        by_state = {s: 0 for s in PEER_STATES}
        for p in peers:
            by_state[p["state"]] = by_state.get(p["state"], 0) + 1
        for state, n in by_state.items():
            family.add_metric((state,), n)
        yield family
        rtt = GaugeMetricFamily("gfsp_p2p_ping_rtt_seconds", "Last ping round-trip time.",
                                labels=("peer",))
        for p in peers:
            if p["rtt"] is not None:
                rtt.add_metric((p["peer_id"],), p["rtt"])
        yield rtt
        outcomes = CounterMetricFamily("gfsp_p2p_approval_outcomes",
                                       "Replicate-piece approval outcomes.",
                                       labels=("role", "outcome"))
        for key, n in sorted(self.m.approval_stats().items()):
            role, _, outcome = key.partition(".")
            outcomes.add_metric((role, outcome), n)
        yield outcomes
