"""The Gater modular: the starlette app served by hypercorn's trio worker in the node's nursery.

:meth:`Gater.serve` binds ``gater.listen`` (port 0 allowed; the bound address is
:attr:`Gater.endpoint`, e.g. ``"http://127.0.0.1:43117"``) and calls ``task_status.started()``
once the socket listens. :meth:`Gater.drain` (SIGTERM) stops accepting at once (the listening
socket is closed, so new connections are refused), closes idle keep-alive connections, and
lets requests in flight finish for up to ``gater.drain_timeout`` seconds (hypercorn's
``graceful_timeout``); serve() then returns.

Each connection reads up to ``gater.recv_bytes`` (512 KiB) at a time. hypercorn's own 64 KiB
(``hypercorn.trio.tcp_server.MAX_RECV``) made every 64 KiB of a body a trip through h11,
hypercorn's stream and the ASGI channel: about 1.5-1.9 ms of CPU per MiB received against
0.76-0.95 ms at 512 KiB (bench figures in the commit). hypercorn reads that module constant on
every read, so :func:`set_receive_size` sets it for the whole process (the admin server too).
Reads stay under node/malloc.py's 1 MiB mmap threshold so that their buffers come from the
(warm) heap: 1 MiB reads were fresh mappings, page-faulted in on every read, and slower.

A response write waits at most ``gater.send_timeout`` seconds (:class:`GaterTCPServer`):
hypercorn shields each write from cancellation and has no deadline of its own, so a client
that stops reading a GET (connected, its window shut) held the request's download slot and
segment memory for as long as it stayed, and neither ``drain_timeout`` nor the node's grace
period could end it (SIGTERM hung). Past the deadline the connection is closed, which ends
the request as a client disconnect would; the writes are not shielded either, so the cancel
at the end of a drain cuts them (and closes their connections). The same server class
serves at most ``gater.max_connections`` connections at once (one more is closed as soon as
it is accepted: without a cap, idle or slow connections could use up the process's file
descriptors), and ``gater.keep_alive_timeout`` closes a connection idle for that long (also
one whose request head does not come whole). The class replaces hypercorn's in
``hypercorn.trio.run`` for the whole process, as the receive size does; its values come from
each server's own config (:class:`ServerConfig`).

Limits from the config: ``max_header_bytes`` is hypercorn's ``h11_max_incomplete_size`` (a
head that arrives in pieces and grows past it is refused by hypercorn itself with a plain 400,
before the app runs); since h11 checks that only while a head is incomplete, the app checks
the size of every head again (431 ``RequestHeaderSectionTooLarge``). Body limits, the
per-account token bucket and the replay cache are the app's (:mod:`modulars.gater.app`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import hypercorn.config
import hypercorn.trio
import hypercorn.trio.run
import hypercorn.trio.tcp_server
import trio
from hypercorn.events import Closed, Event, RawData, Updated

from modulars.gater.app import ROUTES, BodyKind, RouteSpec, build_app, replay_cache
from modulars.gater.data import DATA_ROUTES
from modulars.gater.hosts import HostCheck
from modulars.gater.openapi import openapi_document
from modulars.gater.ratelimit import RateLimiter
from node.errors import ListenFailed
from node.modular import ModularBase, NodeContext

log = logging.getLogger("gfsp.gater")


def set_receive_size(nbytes: int) -> None:
    """Read up to ``nbytes`` from a connection at a time, in every hypercorn server of this
    process."""
    if nbytes < 1:
        raise ValueError(f"receive size {nbytes} is not positive")
    hypercorn.trio.tcp_server.MAX_RECV = nbytes


class ServerConfig(hypercorn.config.Config):
    """hypercorn's config, plus what :class:`GaterTCPServer` reads from it (a server whose
    config is hypercorn's own, e.g. the admin server's, has no connection cap and no write
    deadline; it shares the rest: cancellable writes, a close and keep-alive timer a cancel
    cannot lose)."""

    #: Seconds one write to a client may take (past it the connection is closed).
    send_timeout: float = math.inf
    #: Connections served at once (more are closed as soon as accepted); None: no limit.
    connections: trio.Semaphore | None = None


class GaterTCPServer(hypercorn.trio.tcp_server.TCPServer):
    """hypercorn's connection server with a limit on connections and a deadline on each
    write (:class:`ServerConfig`), and writes a cancel can cut (hypercorn shields them): a
    write past its deadline, or cut half-way by a cancel (the end of a drain), closes the
    connection, whose stream would carry a broken response anyway."""

    async def run(self) -> None:
        slots = getattr(self.config, "connections", None)
        if slots is None:
            await super().run()
            return
        try:
            slots.acquire_nowait()
        except trio.WouldBlock:  # over the limit: closed at once, before any byte is read
            log.debug("a connection closed at once: max_connections are served")
            with trio.CancelScope(shield=True):
                await self.stream.aclose()
            return
        try:
            await super().run()
        finally:
            slots.release()

    #: True once the read loop has ended: nothing more can come from this connection.
    _read_ended: bool = False

    async def _read_data(self) -> None:
        await super()._read_data()
        # the client is gone (or the stream closed): hypercorn's keep-alive timer would hold
        # this connection's task, and its slot, until keep_alive_timeout
        self._read_ended = True
        await self.idle_task.stop()

    async def protocol_send(self, event: Event) -> None:
        # Closed (close the socket) and Updated (restart or stop the keep-alive timer) must
        # not be lost to a cancel: a starlette StreamingResponse sends them from its body
        # task, inside its last send, and the http.disconnect that send delivers makes
        # starlette cancel that very task (hypercorn's first checkpoint there raised
        # Cancelled). A "Connection: close" response then never closed its connection, and
        # a keep-alive one had no idle timer: neither keep_alive_timeout nor a drain closed
        # it, and it kept its slot. (Only the socket's close is shielded for Closed: telling
        # the protocol may wait for the app's queue, and a drain's cancel must still cut it.)
        if isinstance(event, Updated):
            if event.idle and self._read_ended:
                # an answer that ends after its client reset the connection (h11 never saw
                # an EOF, so both sides look done and hypercorn would wait for a next
                # request): no timer, the connection ends with its request task
                return
            with trio.CancelScope(shield=True):
                await super().protocol_send(event)
            return
        if isinstance(event, Closed):
            with trio.CancelScope(shield=True):
                await self._close()
            await self.protocol.handle(Closed())
            return
        if not isinstance(event, RawData):
            await super().protocol_send(event)
            return
        async with self.send_lock:
            try:
                with trio.fail_after(getattr(self.config, "send_timeout", math.inf)):
                    await self.stream.send_all(event.data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await self.protocol.handle(Closed())
            except trio.TooSlowError:
                # the socket first, shielded; then the protocol, which may wait for the app's
                # queue and so must stay cancellable (by a drain)
                with trio.CancelScope(shield=True):
                    await self.stream.aclose()
                await self.protocol.handle(Closed())
            except trio.Cancelled:  # a write cut half-way: the stream is of no further use
                with trio.CancelScope(shield=True):
                    await self.stream.aclose()
                raise


def use_gater_server() -> None:
    """Serve every hypercorn connection of this process with :class:`GaterTCPServer`
    (hypercorn has no hook for it; see :class:`ServerConfig` for a server without its
    values)."""
    hypercorn.trio.run.TCPServer = GaterTCPServer  # type: ignore[misc]


class Gater(ModularBase):
    name = "gater"
    #: What the routes call (the signer only through the approver and authorizer).
    requires = ("authorizer", "approver", "metadata")

    def __init__(self, ctx: NodeContext,
                 routes: tuple[RouteSpec, ...] = ROUTES + DATA_ROUTES) -> None:
        super().__init__(ctx)
        self.cfg = ctx.config.gater
        self.routes = routes
        self.endpoint: str | None = None
        self.replay = replay_cache(self.cfg)
        self.hosts = HostCheck(self.cfg.hosts, registered=self._registered_endpoint)
        self.rate = RateLimiter(self.cfg.rate_limit, self.cfg.rate_burst, clock=ctx.clock)
        #: Unix seconds for signature expiries; tests may replace it.
        self.wall_clock: Callable[[], float] = time.time
        self.app = build_app(self, routes)
        self._openapi: dict[str, Any] | None = None
        self._shutdown = trio.Event()
        self._stopped = trio.Event()
        self._serving = False

    def __repr__(self) -> str:
        return f"Gater(endpoint={self.endpoint})"

    async def _registered_endpoint(self) -> str | None:
        """This SP's endpoint in the SP registry (cached there), None without a registry."""
        registry = self.ctx.sp_registry
        if registry is None:
            return None
        sp = await registry.sp_by_operator(self.ctx.keys.operator.address)
        return None if sp is None else sp.endpoint

    def body_limit(self, kind: BodyKind) -> int:
        return int(self.cfg.max_body if kind == "stream" else self.cfg.max_json_body)

    def openapi_document(self) -> dict[str, Any]:
        if self._openapi is None:
            self._openapi = openapi_document(self.routes, server_url=self.endpoint)
        return self._openapi

    def hypercorn_config(self) -> ServerConfig:
        config = ServerConfig()
        config.bind = [self.cfg.listen]
        config.send_timeout = float(self.cfg.send_timeout)
        config.connections = trio.Semaphore(int(self.cfg.max_connections))
        config.keep_alive_timeout = float(self.cfg.keep_alive_timeout)
        config.h11_max_incomplete_size = int(self.cfg.max_header_bytes)
        config.graceful_timeout = float(self.cfg.drain_timeout)
        config.include_server_header = False
        config.accesslog = None
        config.errorlog = logging.getLogger("gfsp.gater.hypercorn")
        return config

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        set_receive_size(int(self.cfg.recv_bytes))
        use_gater_server()
        try:
            async with trio.open_nursery() as nursery:
                try:
                    binds: list[str] = await nursery.start(partial(
                        hypercorn.trio.serve, self.app, self.hypercorn_config(),
                        shutdown_trigger=self._shutdown.wait, mode="asgi"))
                except (OSError, BaseExceptionGroup) as exc:
                    raise ListenFailed("gater.listen", self.cfg.listen, exc) from None
                self.endpoint = binds[0] if binds else None
                for bound in binds:
                    self.hosts.bind(bound)
                self._serving = True
                log.info("gater listening on %s", self.endpoint)
                task_status.started()
        finally:
            self._serving = False
            self._stopped.set()

    async def drain(self) -> None:
        """Stop accepting; wait for requests in flight (up to ``gater.drain_timeout``)."""
        self._shutdown.set()
        if self._serving:
            await self._stopped.wait()
