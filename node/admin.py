"""The node's admin server: ``GET /metrics`` and ``GET /admin/status`` on ``node.admin_listen``.

A minimal ASGI app served by hypercorn's trio worker in the node's nursery, started once every
modular is up (:meth:`AdminServer.serve`, via ``nursery.start``; ``started()`` once the socket
listens). The address must be loopback (``127.0.0.0/8``, ``::1`` or ``localhost``): anything else
is refused before the node opens its data (:class:`~node.errors.ModularStartError` naming
``admin``). Port 0 is allowed: the bound URL (``http://127.0.0.1:PORT``) is written to
``<data_dir>/admin.addr`` (:data:`ADDR_FILE`), which ``gfsp-node status`` reads, and removed
when the server stops.

- ``GET /metrics``: the node's registry (:mod:`node.metrics`) in the Prometheus text format.
- ``GET /admin/status``: JSON (:func:`status_document`): node name, operator, state, modulars
  in start order (running or not), limiter stats with remaining, the manager's tasks by type and
  state and its queue sizes, p2p peers with state and last RTT, approval outcomes, piece store
  bytes, the chain height last seen, and the gater's and this server's endpoints.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hypercorn.config
import hypercorn.trio
import trio
from starlette.types import Receive, Scope, Send

from node.errors import ConfigError, ListenFailed, ModularStartError
from node.metrics import CONTENT_TYPE, NodeMetrics

if TYPE_CHECKING:
    from node.app import Node

log = logging.getLogger("gfsp.admin")

NAME = "admin"
ADDR_FILE = "admin.addr"
METRICS_PATH = "/metrics"
STATUS_PATH = "/admin/status"
#: Seconds in-flight admin requests may finish once the server is told to stop.
GRACEFUL_TIMEOUT = 1.0


def split_host_port(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:0"`` / ``"[::1]:9100"`` / ``"localhost:0"`` -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"node.admin_listen: {listen!r} is not HOST:PORT")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"node.admin_listen: bad port in {listen!r}") from None
    if not 0 <= number <= 65535:
        raise ConfigError(f"node.admin_listen: port out of range in {listen!r}")
    return host, number


def check_loopback(listen: str) -> str:
    """``listen`` if its host is a loopback address; else ModularStartError('admin', ...)."""
    try:
        host, _ = split_host_port(listen)
        if host != "localhost":
            try:
                loopback = ipaddress.ip_address(host).is_loopback
            except ValueError:
                loopback = False
            if not loopback:
                raise ConfigError(f"node.admin_listen = {listen!r}: the admin server serves "
                                  "only on a loopback address (127.0.0.1, ::1 or localhost)")
    except ConfigError as exc:
        raise ModularStartError(NAME, exc) from None
    return listen


def addr_file(data_dir: Path) -> Path:
    return data_dir / ADDR_FILE


def read_admin_url(data_dir: Path) -> str | None:
    """The admin URL a running node wrote, or None when there is none."""
    try:
        url = addr_file(data_dir).read_text().strip()
    except OSError:
        return None
    return url or None


async def status_document(node: Node, metrics: NodeMetrics) -> dict[str, Any]:
    """What ``GET /admin/status`` answers (refreshes the metrics' async values first)."""
    await metrics.refresh()
    ctx = metrics.ctx
    modulars = ctx.modulars
    counts = metrics.task_counts
    gater = modulars.gater if modulars.is_running("gater") else None
    return {
        "node": ctx.config.node.name,
        "operator": ctx.keys.operator.address,
        "state": "stopping" if node.stopping else "running",
        "modulars": [{"name": name, "running": up}
                     for name, up in metrics.modular_states().items()],
        "limiter": metrics.limiter_stats(),
        "tasks": counts,
        "queues": {t: by_state.get("pending", 0) for t, by_state in sorted(counts.items())},
        "peers": metrics.peers(),
        "approvals": metrics.approval_stats(),
        "piecestore": {"used_bytes": metrics.piecestore_used()},
        "chain": {"height": metrics.chain_height, "reachable": metrics.chain_reachable,
                  "registered": _registered(metrics)},
        "endpoints": {"gater": getattr(gater, "endpoint", None),
                      "admin": getattr(node, "admin_endpoint", None)},
    }


def _registered(metrics: NodeMetrics) -> dict[str, Any] | bool | None:
    """This SP's SP-registry entry ({"endpoint", "p2p_addrs"}), False when it is not listed,
    None when the registry could not be asked."""
    entry = metrics.registered
    if entry is None:
        return None
    if not entry:
        return False
    return {"endpoint": entry[0], "p2p_addrs": list(entry[1])}


class AdminServer:
    """The admin HTTP server of one node (construct it early: it validates the address)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.listen = check_loopback(node.config.node.admin_listen)
        self.addr_path = addr_file(node.config.data_dir)
        self.endpoint: str | None = None
        self.metrics: NodeMetrics | None = None
        self._shutdown = trio.Event()

    def hypercorn_config(self) -> hypercorn.config.Config:
        config = hypercorn.config.Config()
        config.bind = [self.listen]
        config.graceful_timeout = GRACEFUL_TIMEOUT
        config.include_server_header = False
        config.accesslog = None
        config.errorlog = logging.getLogger("gfsp.admin.hypercorn")
        return config

    async def serve(self, metrics: NodeMetrics, *,
                    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled or :meth:`stop`; ``started(url)`` once listening."""
        self.metrics = metrics
        try:
            async with trio.open_nursery() as nursery:
                try:
                    binds: list[str] = await nursery.start(partial(
                        hypercorn.trio.serve, self.app, self.hypercorn_config(),
                        shutdown_trigger=self._shutdown.wait, mode="asgi"))
                except (OSError, BaseExceptionGroup) as exc:
                    raise ModularStartError(NAME, ListenFailed(
                        "node.admin_listen", self.listen, exc)) from None
                self.endpoint = binds[0] if binds else None
                if self.endpoint:
                    _write_atomic(self.addr_path, self.endpoint + "\n")
                log.info("admin server listening on %s", self.endpoint)
                task_status.started(self.endpoint)
        finally:
            self._remove_addr_file()

    def stop(self) -> None:
        self._shutdown.set()

    def _remove_addr_file(self) -> None:
        if self.endpoint and read_admin_url(self.addr_path.parent) == self.endpoint:
            try:
                self.addr_path.unlink()
            except OSError as exc:
                log.warning("cannot remove %s: %s", self.addr_path, exc)

    # --- the ASGI app ---------------------------------------------------------------------

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        headers: list[tuple[bytes, bytes]] = []
        if path not in (METRICS_PATH, STATUS_PATH):
            status, ctype, body = 404, "text/plain; charset=utf-8", b"not found\n"
        elif method not in ("GET", "HEAD"):
            status, ctype, body = 405, "text/plain; charset=utf-8", b"method not allowed\n"
            headers.append((b"allow", b"GET, HEAD"))
        else:
            try:
                status, ctype, body = 200, *await self._render(path)
            except Exception:
                log.exception("admin %s failed", path)
                status, ctype, body = 500, "text/plain; charset=utf-8", b"internal error\n"
        headers += [(b"content-type", ctype.encode()),
                    (b"content-length", str(len(body)).encode()),
                    (b"cache-control", b"no-store")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})

    async def _render(self, path: str) -> tuple[str, bytes]:
        metrics = self.metrics
        assert metrics is not None
        if path == METRICS_PATH:
            return CONTENT_TYPE, await metrics.exposition()
        doc = await status_document(self.node, metrics)
        return "application/json", json.dumps(doc, allow_nan=False).encode()


def _write_atomic(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file and a rename. A failure (e.g. a full disk:
    a write error names no file) raises an OSError naming ``path``, the temp file removed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
