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

A response write waits at most ``gater.send_timeout`` seconds (:func:`set_send_timeout`):
hypercorn shields each write from cancellation and has no deadline of its own, so a client
that stops reading a GET (connected, its window shut) held the request's download slot and
segment memory for as long as it stayed, and neither ``drain_timeout`` nor the node's grace
period could end it (SIGTERM hung). Past the deadline the connection is closed, which ends
the request as a client disconnect would; the writes are not shielded either, so the cancel
at the end of a drain cuts them (and closes their connections). The server class that does
this replaces hypercorn's in ``hypercorn.trio.run`` for the whole process, as the receive
size does.

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
from hypercorn.events import Closed, Event, RawData

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


class _DeadlineTCPServer(hypercorn.trio.tcp_server.TCPServer):
    """hypercorn's connection server with a deadline on each write (:func:`set_send_timeout`),
    and writes a cancel can cut (hypercorn shields them): a write past its deadline, or cut
    half-way by a cancel (the end of a drain), closes the connection, whose stream would
    carry a broken response anyway."""

    send_timeout: float = math.inf

    async def protocol_send(self, event: Event) -> None:
        if not isinstance(event, RawData):
            await super().protocol_send(event)
            return
        async with self.send_lock:
            try:
                with trio.fail_after(self.send_timeout):
                    await self.stream.send_all(event.data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await self.protocol.handle(Closed())
            except trio.TooSlowError:
                with trio.CancelScope(shield=True):
                    await self._initiate_server_close()
            except trio.Cancelled:
                with trio.CancelScope(shield=True):
                    await self._initiate_server_close()
                raise


def set_send_timeout(seconds: float) -> None:
    """Let one response write wait at most ``seconds``, in every hypercorn server of this
    process."""
    if not seconds > 0:
        raise ValueError(f"send timeout {seconds} is not positive")
    _DeadlineTCPServer.send_timeout = seconds
    hypercorn.trio.run.TCPServer = _DeadlineTCPServer  # type: ignore[misc]


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

    def hypercorn_config(self) -> hypercorn.config.Config:
        config = hypercorn.config.Config()
        config.bind = [self.cfg.listen]
        config.h11_max_incomplete_size = int(self.cfg.max_header_bytes)
        config.graceful_timeout = float(self.cfg.drain_timeout)
        config.include_server_header = False
        config.accesslog = None
        config.errorlog = logging.getLogger("gfsp.gater.hypercorn")
        return config

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        set_receive_size(int(self.cfg.recv_bytes))
        set_send_timeout(float(self.cfg.send_timeout))
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
