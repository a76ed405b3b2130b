"""The Node: one trio nursery that starts every modular in order and stops them cleanly.

Start: open SPDB, build the shared limiter, load keys, construct the modulars, then
``await nursery.start(...)`` each in dependency order; a modular that fails to start stops the
node with :class:`~node.errors.ModularStartError`. Once all are up: ``READY=1``.

Stop (SIGTERM/SIGINT): ``STOPPING=1``; every modular that has ``drain()`` gets up to
``node.grace_period`` seconds to finish in-flight work (a second signal skips the wait); then
the nursery is cancelled. While running, ``WATCHDOG=1`` goes out at half of ``WATCHDOG_USEC``.

Observability: one :class:`~node.metrics.NodeMetrics` (its own Prometheus registry) per run;
once the modulars are up, the admin server (:mod:`node.admin`: ``/metrics``, ``/admin/status``
on the loopback ``node.admin_listen``) starts in the same nursery and goes with it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
from collections.abc import Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from node.admin import AdminServer
from node.chain import ChainError, DevChainClient
from node.config import Config, LimitValues
from node.crypto import KeySet, load_keys
from node.db import open_spdb
from node.errors import ConfigError, GfspError, ModularStartError, describe, unwrap
from node.lockfile import data_dir_lock
from node.metrics import NodeMetrics
from node.modular import Modular, Modulars, NodeContext
from node.notify import Notifier
from node.piecestore import open_piecestore
from node.rcmgr import Limit, ResourceLimiter
from node.registry import build_modulars, resolve_factories, start_order
from node.spregistry import SPRegistry, StaticSPRegistry, wall_clock_height

log = logging.getLogger("gfsp.node")


class ModularFailed(GfspError):
    """A running modular raised; the node stops and exits non-zero with this message."""

    def __init__(self, name: str, cause: BaseException) -> None:
        cause = unwrap(cause) if isinstance(cause, BaseExceptionGroup) else cause
        super().__init__(f"modular {name!r} failed: {describe(cause)}")
        self.name = name
        self.cause = cause


def limit_of(values: LimitValues) -> Limit:
    return Limit(**{f.name: int(getattr(values, f.name)) for f in dataclasses.fields(values)})


def build_limiter(config: Config) -> ResourceLimiter:
    return ResourceLimiter(
        system=limit_of(config.limits.system),
        service_default=limit_of(config.limits.service),
        services={name: limit_of(v) for name, v in config.limits.services.items()},
    )


def load_node_keys(config: Config, env: Mapping[str, str]) -> KeySet:
    creds = env.get("CREDENTIALS_DIRECTORY")
    return load_keys(config.keys_dir, credentials_dir=Path(creds) if creds else None)


def load_sp_registry(config: Config) -> SPRegistry | None:
    """The static registry named by ``chain.registry_file``; None means "ask the chain"."""
    if not config.chain.registry_file:
        return None
    return StaticSPRegistry.from_file(
        config.resolve(Path(config.chain.registry_file)),
        height=wall_clock_height(config.chain.block_interval))


class _Started:
    """Wraps a task_status so the container learns when a modular is up."""

    def __init__(self, modular: Modular, modulars: Modulars,
                 task_status: trio.TaskStatus[None]) -> None:
        self._modular, self._modulars, self._status = modular, modulars, task_status
        self.started_ok = False

    def started(self, value: Any = None) -> None:
        self._modulars.mark_running(self._modular)
        self.started_ok = True
        self._status.started(value)


class Node:
    def __init__(self, config: Config, *, env: Mapping[str, str] | None = None,
                 handle_signals: bool = True) -> None:
        self.config = config
        self.env = os.environ if env is None else env
        self.notifier = Notifier(self.env)
        self.handle_signals = handle_signals
        self.ctx: NodeContext | None = None
        self.order: list[str] = []
        self.metrics: NodeMetrics | None = None
        self.admin_endpoint: str | None = None
        self._stop_requested = trio.Event()
        self._force_stop = trio.Event()

    @property
    def stopping(self) -> bool:
        return self._stop_requested.is_set()

    def request_stop(self) -> None:
        """Begin a graceful stop (what SIGTERM does); a second call skips the grace period."""
        if self._stop_requested.is_set():
            self._force_stop.set()
        self._stop_requested.set()

    @asynccontextmanager
    async def _context(self):  # type: ignore[no-untyped-def]
        """Shared services: keys, limiter, SPDB, and the chain (or a static SP registry)."""
        cfg = self.config
        try:
            cfg.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # user objects
        except OSError as exc:  # a path that cannot be: the config's fault (exit 2)
            raise ConfigError(f"node.data_dir = '{cfg.data_dir}': cannot create it: "
                              f"{exc.strerror or exc}") from None
        keys = load_node_keys(cfg, self.env)
        limiter = build_limiter(cfg)
        static = load_sp_registry(cfg)
        with data_dir_lock(cfg.data_dir):  # before SPDB and the store: one node per folder
            async with self._services(cfg, keys, limiter, static) as ctx:
                yield ctx

    @asynccontextmanager
    async def _services(self, cfg: Config, keys: KeySet, limiter: ResourceLimiter,
                        static: SPRegistry | None):  # type: ignore[no-untyped-def]
        async with (open_spdb(cfg.db_path, busy_timeout=cfg.db.busy_timeout,
                              synchronous=cfg.db.synchronous) as db,
                    trio.open_nursery() as background):
            chain: DevChainClient | None = None
            if static is None:
                chain = DevChainClient.from_config(cfg.chain)
                try:
                    await chain.fetch_height()
                except ChainError as exc:
                    await chain.aclose()
                    raise ModularStartError("chain", exc) from None
                await background.start(chain.run)
            try:
                yield NodeContext(config=cfg, limiter=limiter, db=db, keys=keys,
                                  sp_registry=static or chain, chain=chain,
                                  piecestore=await open_piecestore(cfg))
            finally:
                background.cancel_scope.cancel()
                if chain is not None:
                    with trio.CancelScope(shield=True):
                        await chain.aclose()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Run until stopped. Raises ModularStartError / ModularFailed / ConfigError."""
        factories = resolve_factories(self.config)
        admin = AdminServer(self)  # refuses a non-loopback admin_listen before anything opens
        try:
            async with self._context() as ctx:
                self.ctx = ctx
                modulars = build_modulars(ctx, factories)
                self.order = start_order(modulars)
                self.metrics = NodeMetrics(ctx, self.order)
                self.metrics.attach(modulars)  # the gater's request counter/latency hook
                async with trio.open_nursery() as nursery:
                    if self.handle_signals:  # before starting: SIGTERM mid-start is graceful
                        await nursery.start(self._signals)
                    await self._start_all(nursery, ctx, modulars)
                    self.admin_endpoint = await nursery.start(admin.serve, self.metrics)
                    log.info("node %s ready: %s", self.config.node.name, ", ".join(self.order))
                    await self._check_registered(ctx)
                    self._notify("READY=1")
                    task_status.started()
                    if self.notifier.watchdog_interval:
                        nursery.start_soon(self._watchdog, self.notifier.watchdog_interval)
                    await self._stop_requested.wait()
                    self._notify("STOPPING=1")
                    log.info("stopping: draining for up to %.1fs", self.config.node.grace_period)
                    await self._drain(modulars)
                    admin.stop()
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise unwrap(group) from None
        finally:
            if self.ctx is not None:
                for name in self.ctx.modulars.running():
                    self.ctx.modulars.mark_stopped(name)

    async def _check_registered(self, ctx: NodeContext) -> None:
        """Warn when the chain does not list this SP: no client or SP can find it then."""
        if ctx.chain is None:
            return
        operator = ctx.keys.operator.address
        try:
            sp = await ctx.chain.sp_by_operator(operator)
        except ChainError as exc:
            log.warning("cannot tell whether SP %s is registered on the chain: %s", operator, exc)
            return
        if sp is None:
            log.warning("SP %s is not registered on the chain at %s: clients and other SPs "
                        "cannot find it; run 'gfsp-node register --config <this config>'",
                        operator, self.config.chain.endpoint)

    async def _start_all(self, nursery: trio.Nursery, ctx: NodeContext,
                         modulars: Mapping[str, Modular]) -> None:
        for name in self.order:
            modular = modulars[name]
            try:
                await nursery.start(self._serve_one, modular, ctx.modulars)
            except ModularFailed as failed:
                raise ModularStartError(name, failed.cause) from failed.cause
            except Exception as exc:
                raise ModularStartError(name, exc) from exc
            log.info("modular %s started", name)

    async def _serve_one(self, modular: Modular, registry: Modulars,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        status = _Started(modular, registry, task_status)
        try:
            await modular.serve(task_status=status)  # type: ignore[arg-type]
        except Exception as exc:
            registry.mark_stopped(modular.name)
            raise ModularFailed(modular.name, exc) from exc
        except BaseException:
            # Cancelled: the node is stopping, which cancels every modular at once. It stays
            # registered until all are done (run() then clears the registry): a modular still
            # finishing a step must not find a peer gone (NilModularError would make a clean
            # stop a failure; found by test_delete_then_gc_collects_every_sp in CI).
            raise
        registry.mark_stopped(modular.name)
        if status.started_ok and not self._stop_requested.is_set():
            raise ModularFailed(modular.name, RuntimeError("serve() returned while running"))

    async def _drain(self, modulars: Mapping[str, Modular]) -> None:
        drainers = [m for name in reversed(self.order)
                    if callable(getattr(m := modulars[name], "drain", None))]
        if not drainers:
            return
        with trio.move_on_after(self.config.node.grace_period) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_on, self._force_stop, nursery.cancel_scope)
                async with trio.open_nursery() as inner:
                    for m in drainers:
                        inner.start_soon(m.drain)  # type: ignore[attr-defined]
                nursery.cancel_scope.cancel()
        if scope.cancelled_caught:
            log.warning("grace period over; cancelling in-flight work")

    def _notify(self, state: str) -> None:
        """sd_notify; an unreachable NOTIFY_SOCKET is logged, never fatal to the node."""
        try:
            self.notifier.notify(state)
        except OSError as exc:
            log.warning("cannot send %s to NOTIFY_SOCKET: %s", state, exc)

    async def _watchdog(self, interval: float) -> None:
        while True:
            self._notify("WATCHDOG=1")
            await trio.sleep(interval)

    async def _signals(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                       ) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                log.info("received %s", signal.Signals(signum).name)
                self.request_stop()


async def _cancel_on(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
