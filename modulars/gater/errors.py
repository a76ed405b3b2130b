"""S3-style XML errors, written in one place: :class:`ErrorMiddleware`.

Every response of the gater carries an ``x-gfsp-request-id`` header; an error response's body
is::

    <?xml version="1.0" encoding="UTF-8"?>
    <Error><Code>..</Code><Message>..</Message><RequestId>..</RequestId></Error>

with ``content-type: application/xml``. Handlers (and starlette's routing, through
:func:`raise_http_exception`) only *raise*; the middleware maps what it catches:

- :class:`~node.errors.ServiceError` (and :class:`~node.auth.AuthError`): its code and status;
  401 adds ``WWW-Authenticate``, :class:`~node.errors.ServiceUnavailable` adds ``Retry-After``;
- :class:`~node.errors.ResourceLimitExceeded`: 503 ``SlowDown`` with ``Retry-After``;
- :class:`~node.errors.NilModularError`: 503 ``ServiceUnavailable`` with ``Retry-After``;
- :class:`~node.errors.TaskError`: 400 ``InvalidArgument``;
- :class:`~node.errors.DBError` caused by SQLite's SQLITE_FULL (SPDB's disk is full): 507
  ``InsufficientStorage``, as a full piece store is;
- anything else: 500 ``InternalError``, logged once with the request id and traceback (the
  body never carries a traceback).

Metrics: when the starlette app's ``state.metrics`` is set (the node sets it to its
:class:`~node.metrics.NodeMetrics`), every request is reported once it ends, on every path,
as ``observe_request(route template, method, status, seconds)``; status is ``"none"`` when no
response was started.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
import sqlite3
import time
from collections.abc import Mapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from node.auth import SCHEME
from node.errors import (
    DBError,
    NilModularError,
    ResourceLimitExceeded,
    ServiceError,
    ServiceUnavailable,
    TaskError,
)

log = logging.getLogger("gfsp.gater")

REQUEST_ID_HEADER = "x-gfsp-request-id"
XML_DECLARATION = '<?xml version="1.0" encoding="UTF-8"?>'
MAX_MESSAGE = 1024
#: The route label of a request no route matched, and the methods labelled as themselves
#: (any other method is labelled "other"), for the metrics.
UNMATCHED_ROUTE = "unmatched"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
#: Retry-After (seconds) when a limiter scope is full or a modular is not running.
LIMIT_RETRY_AFTER = 1
MODULAR_RETRY_AFTER = 5

# Characters XML 1.0 cannot carry (control characters, lone surrogates, U+FFFE/U+FFFF).
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_HTTP_CODES = {400: "BadRequest", 404: "NotFound", 405: "MethodNotAllowed",
               413: "EntityTooLarge", 415: "UnsupportedMediaType"}


def new_request_id() -> str:
    return secrets.token_hex(8)


def request_id_of(scope: Scope) -> str:
    state = scope.get("state")
    rid = state.get("request_id") if isinstance(state, dict) else None
    return rid if isinstance(rid, str) else ""


def _xml_text(s: str) -> str:
    s = _NOT_XML.sub("\ufffd", s)
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def error_body(code: str, message: str, request_id: str) -> bytes:
    """The XML error document (message cut to :data:`MAX_MESSAGE` characters)."""
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE - 3] + "..."
    return (f"{XML_DECLARATION}<Error><Code>{_xml_text(code)}</Code>"
            f"<Message>{_xml_text(message)}</Message>"
            f"<RequestId>{_xml_text(request_id)}</RequestId></Error>").encode()


def classify(exc: BaseException) -> tuple[int, str, str, dict[str, str]]:
    """(status, code, message, extra headers) for an exception; status 500 means unexpected."""
    if isinstance(exc, ServiceError):
        headers: dict[str, str] = {}
        if exc.status == 401:
            headers["www-authenticate"] = SCHEME
        if isinstance(exc, ServiceUnavailable) or exc.status == 503:
            retry = getattr(exc, "retry_after", LIMIT_RETRY_AFTER)
            headers["retry-after"] = str(max(1, math.ceil(retry)))
        headers.update(getattr(exc, "headers", None) or {})
        return exc.status, exc.code, exc.message, headers
    if isinstance(exc, ResourceLimitExceeded):
        return (503, "SlowDown", f"the node is busy ({exc.resource}); retry later",
                {"retry-after": str(LIMIT_RETRY_AFTER)})
    if isinstance(exc, NilModularError):
        return (503, "ServiceUnavailable", f"modular {exc.name!r} is not running",
                {"retry-after": str(MODULAR_RETRY_AFTER)})
    if isinstance(exc, TaskError):
        return 400, "InvalidArgument", str(exc), {}
    if isinstance(exc, DBError) and getattr(exc.__cause__, "sqlite_errorcode",
                                            None) == sqlite3.SQLITE_FULL:
        return 507, "InsufficientStorage", "the node's database disk is full", {}
    return 500, "InternalError", "internal error", {}


def _unwrap(exc: BaseException) -> BaseException:
    """The one meaningful exception inside (nested) exception groups, if there is one."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class HTTPError(ServiceError):
    """A routing refusal (404, 405) carried as a ServiceError, with optional headers."""

    def __init__(self, code: str, message: str, status: int,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(code, message, status)
        self.headers = dict(headers or {})


async def raise_http_exception(request: Request, exc: Exception) -> Any:
    """Starlette exception handler: re-raise routing errors so the middleware writes them."""
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "BadRequest" if exc.status_code < 500
                           else "InternalError")
    raise HTTPError(code, str(exc.detail), exc.status_code, exc.headers) from None


class ErrorMiddleware:
    """Pure ASGI middleware: request id on every response, every error written here."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status: int | str = "none"

        async def send_observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message.get("status", "none")
            await send(message)

        try:
            await self._handle(scope, receive, send_observed)
        finally:
            _observe(scope, status, time.perf_counter() - began)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        rid = new_request_id()
        scope.setdefault("state", {})["request_id"] = rid
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER.encode(), rid.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as raw:
            exc = _unwrap(raw)
            status, code, message, headers = classify(exc)
            if status >= 500 and code == "InternalError":
                log.error("request %s %s %s failed: %s", rid, scope.get("method"),
                          scope.get("path"), type(exc).__name__, exc_info=raw)
            if started:  # too late for an error body: the connection is closed mid-response
                if status < 500 or code != "InternalError":
                    log.warning("request %s failed after the response started: %s", rid, code)
                return
            body = error_body(code, message, rid)
            raw_headers = [(b"content-type", b"application/xml"),
                           (b"content-length", str(len(body)).encode())]
            raw_headers += [(k.lower().encode("latin-1"), v.encode("latin-1"))
                            for k, v in headers.items()]
            await send_with_id({"type": "http.response.start", "status": status,
                                "headers": raw_headers})
            if scope.get("method") == "HEAD":
                body = b""
            await send_with_id({"type": "http.response.body", "body": body})


def _observe(scope: Scope, status: int | str, seconds: float) -> None:
    """Report one request to the node's metrics hook, if any (never fails the request)."""
    app = scope.get("app")
    hook = getattr(getattr(app, "state", None), "metrics", None)
    if hook is None:
        return
    method = str(scope.get("method", ""))
    try:
        hook.observe_request(_route_template(scope, app),
                             method if method in _METHODS else "other", status, seconds)
    except Exception:
        log.exception("metrics hook failed")


def _route_template(scope: Scope, app: Any) -> str:
    """The matched route's path template (starlette sets ``scope["route"]``; older versions
    do not, so the app's routes are matched again: a full match, else a partial one)."""
    route = scope.get("route")
    if route is None:
        partial = None
        for candidate in getattr(app, "routes", ()):
            match, _ = candidate.matches(scope)
            if match == Match.FULL:
                route = candidate
                break
            if match == Match.PARTIAL and partial is None:
                partial = candidate
        route = route or partial
    return getattr(route, "path", None) or UNMATCHED_ROUTE
