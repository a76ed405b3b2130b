"""The devchain service: block producer + HTTP API (starlette on hypercorn's trio worker).

:class:`DevChain` owns one SPDB (``<dir>/devchain.sqlite3``, the devchain's own migrations),
a block-producer task that increments the height every ``block_interval`` seconds, and the HTTP
server. ``await nursery.start(chain.serve)`` returns the endpoint once it listens (port 0 picks a
free port; the real one is reported) and has written ``<dir>/devchain.json``
(``{"endpoint", "pid", "block_interval"}``). :meth:`DevChain.shutdown` (or cancelling) stops it:
a shutdown lets in-flight requests finish (hypercorn's graceful timeout).

Responses are JSON; byte strings are lowercase hex. Errors are 4xx with
``{"code": ..., "reason": ...}``; a malformed request never gives a 5xx. Transactions are
POSTed to ``/tx`` as canonical msgpack (``application/msgpack``), at most
:data:`MAX_TX_BYTES`. See README.md for every route.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import hypercorn.config
import hypercorn.trio
import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from node.chain_msgs import CODES, MAX_INT, ChainError
from node.crypto import unpack
from node.db import SPDB, open_spdb
from node.errors import SignatureError
from node.tasks import StorageParams
from testnet.devchain import state

__all__ = ["DB_NAME", "INFO_NAME", "MAX_TX_BYTES", "DevChain"]

log = logging.getLogger("gfsp.devchain")

DB_NAME = "devchain.sqlite3"
INFO_NAME = "devchain.json"
MAX_TX_BYTES = 256 * 1024
DEFAULT_LIMIT = 100
#: An oversized body is read and dropped up to this size before the 413 answer.
DRAIN_BYTES = 16 * 1024 * 1024

T = TypeVar("T")


def _error(exc: ChainError) -> JSONResponse:
    return JSONResponse(exc.to_json(), status_code=CODES.get(exc.code, 400))


def _int_param(request: Request, name: str, default: int, *, hi: int = state.MAX_LIST) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ChainError("MALFORMED", f"{name} must be an integer") from None
    if not 0 <= value <= hi:
        raise ChainError("MALFORMED", f"{name} must be in 0..{hi}")
    return value


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes (``TOO_LARGE``).

    An oversized body is still read and dropped up to :data:`DRAIN_BYTES`, so the client gets
    the 413 answer instead of a connection reset while it is still sending; a body declared or
    found larger than that is answered at once.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and (
            int(declared) > DRAIN_BYTES):
        raise ChainError("TOO_LARGE", f"a transaction has at most {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > DRAIN_BYTES:
            break
        if size <= limit:
            chunks.append(chunk)
    if size > limit:
        raise ChainError("TOO_LARGE", f"a transaction has at most {limit} bytes")
    return b"".join(chunks)


class DevChain:
    """One devchain: its state directory, block interval and (on first start) storage params."""

    def __init__(self, directory: Path, *, host: str = "127.0.0.1", port: int = 0,
                 block_interval: float = 1.0, params: StorageParams | None = None,
                 graceful_timeout: float = 5.0) -> None:
        if block_interval <= 0:
            raise ValueError(f"block_interval must be > 0, not {block_interval}")
        self.directory = Path(directory)
        self.host = host
        self.port = port
        self.block_interval = block_interval
        self._requested_params = params
        self._graceful_timeout = graceful_timeout
        self._db: SPDB | None = None
        self._params: StorageParams | None = None
        self._stop = trio.Event()
        self.endpoint: str | None = None

    def __repr__(self) -> str:
        return f"DevChain({self.directory}, endpoint={self.endpoint})"

    @property
    def params(self) -> StorageParams:
        """The chain's storage parameters (known once it started)."""
        if self._params is None:
            raise RuntimeError("the devchain is not running")
        return self._params

    def shutdown(self) -> None:
        """Ask a running devchain to stop gracefully."""
        self._stop.set()

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        """Run until :meth:`shutdown` or cancellation; ``task_status.started(endpoint)``."""
        self.directory.mkdir(parents=True, exist_ok=True)
        async with open_spdb(self.directory / DB_NAME, migrations=state.MIGRATIONS) as db:
            self._db = db
            self._params = await db.run(partial(state.init_chain,
                                                params=self._requested_params))
            config = hypercorn.config.Config()
            config.bind = [f"{self.host}:{self.port}"]
            config.graceful_timeout = self._graceful_timeout
            config.accesslog = None
            config.errorlog = logging.getLogger("gfsp.devchain.http")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._produce_blocks, db)
                binds: list[str] = await nursery.start(
                    self._serve_http, self._app(), config, nursery.cancel_scope)
                self.endpoint = binds[0]
                self._write_info()
                log.info("devchain listening on %s (state %s)", self.endpoint, self.directory)
                task_status.started(self.endpoint)
            self._db = None

    async def _serve_http(self, app: Starlette, config: hypercorn.config.Config,
                          scope: trio.CancelScope, *,
                          task_status: trio.TaskStatus[list[str]]) -> None:
        """Serve HTTP until :meth:`shutdown`; then stop the whole devchain (``scope``)."""
        await hypercorn.trio.serve(app, config, shutdown_trigger=self._stop.wait,
                                   task_status=task_status)
        scope.cancel()

    def _write_info(self) -> None:
        info = {"endpoint": self.endpoint, "pid": os.getpid(),
                "block_interval": self.block_interval}
        path = self.directory / INFO_NAME
        tmp = path.with_name(f".{INFO_NAME}.tmp")
        tmp.write_text(json.dumps(info) + "\n")
        tmp.replace(path)

    async def _produce_blocks(self, db: SPDB) -> None:
        while True:
            await trio.sleep(self.block_interval)
            await db.run(state.next_block)

    # --- HTTP -----------------------------------------------------------------------------

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        db = self._db
        if db is None:
            raise ChainError("UNAVAILABLE", "the devchain is stopping")
        return await db.run(fn)

    def _app(self) -> Starlette:
        def route(path: str, handler: Callable[[Request], Any], methods: list[str]) -> Route:
            async def endpoint(request: Request) -> Response:
                try:
                    return JSONResponse(await handler(request))
                except ChainError as exc:
                    return _error(exc)
            return Route(path, endpoint, methods=methods)

        async def http_error(request: Request, exc: Exception) -> Response:
            status = exc.status_code if isinstance(exc, HTTPException) else 400
            code = "NOT_FOUND" if status == 404 else "MALFORMED"
            return JSONResponse({"code": code, "reason": f"{request.method} {request.url.path}: "
                                 f"{getattr(exc, 'detail', exc)}"}, status_code=status)

        return Starlette(exception_handlers={HTTPException: http_error}, routes=[
            route("/status", self._status, ["GET"]),
            route("/height", self._height, ["GET"]),
            route("/sps", self._sps, ["GET"]),
            route("/sps/by-peer/{peer_id}", self._sp_by_peer, ["GET"]),
            route("/sps/{operator}", self._sp, ["GET"]),
            route("/accounts/{address}", self._account, ["GET"]),
            route("/buckets", self._buckets, ["GET"]),
            route("/buckets/{bucket}", self._bucket, ["GET"]),
            route("/objects", self._objects, ["GET"]),
            route("/objects/by-id/{object_id}", self._object_by_id, ["GET"]),
            route("/objects/{bucket}/{name:path}", self._object, ["GET"]),
            route("/events", self._events, ["GET"]),
            route("/tx", self._tx, ["POST"]),
        ])

    async def _status(self, request: Request) -> dict[str, Any]:
        p = self.params
        return {"height": await self._read(state.height), "block_interval": self.block_interval,
                "params": {"segment_size": p.segment_size, "data_shards": p.data_shards,
                           "parity_shards": p.parity_shards, "max_payload": p.max_payload}}

    async def _height(self, request: Request) -> dict[str, Any]:
        return {"height": await self._read(state.height)}

    async def _sps(self, request: Request) -> dict[str, Any]:
        return {"sps": await self._read(state.list_sps)}

    async def _sp(self, request: Request) -> dict[str, Any]:
        operator = request.path_params["operator"]
        sp = await self._read(partial(state.get_sp, operator=operator))
        if sp is None:
            raise ChainError("SP_NOT_FOUND", f"no SP with operator {operator}")
        return sp

    async def _sp_by_peer(self, request: Request) -> dict[str, Any]:
        peer_id = request.path_params["peer_id"]
        sp = await self._read(partial(state.get_sp_by_peer, peer_id=peer_id))
        if sp is None:
            raise ChainError("SP_NOT_FOUND", f"no SP with peer id {peer_id}")
        return sp

    async def _account(self, request: Request) -> dict[str, Any]:
        address = request.path_params["address"]
        seq = await self._read(partial(state.account_seq, address=address))
        if seq is None:
            raise ChainError("ACCOUNT_NOT_FOUND", f"no account {address}")
        return {"address": address, "seq": seq}

    async def _buckets(self, request: Request) -> dict[str, Any]:
        owner = request.query_params.get("owner")
        if owner is None:
            raise ChainError("MALFORMED", "owner is required")
        return {"buckets": await self._read(partial(state.list_buckets, owner=owner))}

    async def _bucket(self, request: Request) -> dict[str, Any]:
        name = request.path_params["bucket"]
        bucket = await self._read(partial(state.get_bucket, name=name))
        if bucket is None:
            raise ChainError("BUCKET_NOT_FOUND", f"no bucket {name}")
        return bucket

    async def _objects(self, request: Request) -> dict[str, Any]:
        q = request.query_params
        bucket = q.get("bucket")
        if bucket is None:
            raise ChainError("MALFORMED", "bucket is required")
        limit = _int_param(request, "limit", DEFAULT_LIMIT)
        objects = await self._read(partial(
            state.list_objects, bucket=bucket, prefix=q.get("prefix", ""),
            start_after=q.get("start_after", ""), limit=limit))
        return {"objects": objects}

    async def _object(self, request: Request) -> dict[str, Any]:
        bucket, name = request.path_params["bucket"], request.path_params["name"]
        obj = await self._read(partial(state.get_object, bucket=bucket, name=name))
        if obj is None:
            raise ChainError("OBJECT_NOT_FOUND", f"no object {bucket}/{name}")
        return obj

    async def _object_by_id(self, request: Request) -> dict[str, Any]:
        raw = request.path_params["object_id"]
        if not (raw.isascii() and raw.isdigit()) or int(raw) > MAX_INT:
            raise ChainError("MALFORMED", "an object id is a non-negative integer")
        obj = await self._read(partial(state.get_object_by_id, object_id=int(raw)))
        if obj is None:
            raise ChainError("OBJECT_NOT_FOUND", f"no object with id {raw}")
        return obj

    async def _events(self, request: Request) -> dict[str, Any]:
        since = _int_param(request, "since", 0, hi=MAX_INT)
        after = _int_param(request, "after", 0, hi=MAX_INT)
        limit = _int_param(request, "limit", DEFAULT_LIMIT)

        def read(conn: sqlite3.Connection) -> dict[str, Any]:
            return {"height": state.height(conn),
                    "events": state.events_since(conn, since, after, limit)}
        return await self._read(read)

    async def _tx(self, request: Request) -> dict[str, Any]:
        body = await _read_body(request, MAX_TX_BYTES)
        try:
            tx = unpack(body)
        except SignatureError as exc:
            raise ChainError("MALFORMED", f"the body is not msgpack: {exc}") from None
        params = self.params
        result = await self._read(partial(state.apply_tx, raw=tx, params=params))
        log.info("tx %s from %s seq %s at height %s", result["type"], result["from"],
                 result["seq"], result["height"])
        return result
