"""The gater's starlette application: the route table and one handler per route.

Every route is a :class:`RouteSpec` in :data:`ROUTES`; :func:`build_app` wraps each handler in
the same steps, in this order:

1. the request head against ``max_header_bytes`` (431) and the declared Content-Length
   against the route's body limit (413), nothing read;
2. authentication (:mod:`node.auth`; public routes skip it), then the per-account token
   bucket (503 SlowDown), then the replay cache (so a request refused with SlowDown may be
   retried as is);
3. a span of the node's resource limiter (``gater`` service: one inbound connection and the
   route's body limit in memory for buffered bodies; over a limit: 503 SlowDown);
4. the handler, given a :class:`Call`: the verified account, the modulars, and the body as a
   :class:`~modulars.gater.body.BodyStream` that enforces the limit and the signed hash while
   streaming.

Handlers return a JSON-able value (dataclasses, bytes as hex) or a starlette Response, and
raise ServiceErrors for refusals; :mod:`modulars.gater.errors` writes every error. Routes with
streamed bodies (``body="stream"``, issue 5: put/get object, challenge, replicate piece) use
``call.body`` directly and the ``max_body`` limit.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from modulars.authorizer import AuthOpType
from modulars.gater import schemas
from modulars.gater.body import (
    BodyStream,
    UnreadBodyGuard,
    check_declared_length,
    check_head_size,
)
from modulars.gater.errors import ErrorMiddleware, raise_http_exception, request_id_of
from node.auth import AuthError, ReplayCache, VerifiedRequest, parse_query, verify_request
from node.chain import ChainError
from node.config import GaterSection
from node.crypto import pack
from node.errors import AccessDenied, ServiceError
from node.tasks import CreateBucketApprovalTask, CreateObjectApprovalTask, ObjectInfo

if TYPE_CHECKING:
    from modulars.gater.server import Gater

log = logging.getLogger("gfsp.gater")

API_PREFIX = "/gfsp/v1"
#: How long the status route waits for the chain height.
STATUS_HEIGHT_TIMEOUT = 0.5

Handler = Callable[["Call"], Awaitable[Any]]
BodyKind = Literal["none", "json", "stream"]


@dataclass(frozen=True)
class Param:
    """A path or query parameter, as the OpenAPI document describes it."""

    name: str
    location: Literal["path", "query"]
    schema: dict[str, Any]
    description: str = ""
    required: bool = False


@dataclass(frozen=True)
class RouteSpec:
    """One route: how it is called, what it needs, and how the OpenAPI document shows it."""

    method: str
    path: str
    handler: Handler
    operation_id: str
    summary: str
    public: bool = False
    body: BodyKind = "none"
    params: tuple[Param, ...] = ()
    request_schema: dict[str, Any] | None = None
    response_schema: dict[str, Any] = field(default_factory=dict)
    response_type: str = "application/json"


class Call:
    """What a handler gets: the request, the verified account, the modulars, the body."""

    def __init__(self, gater: Gater, spec: RouteSpec, request: Request,
                 auth: VerifiedRequest | None, limit: int) -> None:
        self.gater = gater
        self.spec = spec
        self.request = request
        self.auth = auth
        self.request_id = request_id_of(request.scope)
        self.body = BodyStream(request.stream(), limit=limit,
                               expected_sha256=auth.payload_sha256 if auth else None,
                               idle_timeout=float(gater.cfg.body_idle_timeout),
                               read_timeout=float(gater.cfg.json_body_timeout))

    @property
    def account(self) -> str:
        if self.auth is None:
            raise AccessDenied("this route needs a signed request")
        return self.auth.account

    @property
    def modulars(self) -> Any:
        return self.gater.ctx.modulars

    def path(self, name: str) -> str:
        return str(self.request.path_params[name])

    def query(self, name: str) -> str | None:
        return self.request.query_params.get(name)

    async def json(self, schema: dict[str, Any]) -> Any:
        """The body parsed as JSON and validated against ``schema`` (400 otherwise)."""
        raw = await self.body.read()
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            raise ServiceError("MalformedJSON", "the body is not valid JSON", 400) from None
        return schemas.validate(value, schema)

    async def authorize(self, op: AuthOpType, bucket: str, object: str = "") -> None:
        """The authorizer's verdict for the caller; AccessDenied when it says no."""
        ok = await _maybe_await(self.modulars.authorizer.verify_authorize(
            op, self.account, bucket, object))
        if ok is False:
            raise AccessDenied(f"{self.account} may not do this on bucket {bucket!r}")


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def to_jsonable(value: Any) -> Any:
    """Dataclasses as dicts, bytes as hex, tuples as lists, enums as their value."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value)
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in value]
    return value


class JSONResponse(Response):
    """JSON with ASCII escapes (so no string can fail to encode) and no NaN."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return json.dumps(to_jsonable(content), ensure_ascii=True, allow_nan=False,
                          separators=(",", ":")).encode("ascii")


# --- handlers -------------------------------------------------------------------------------


async def status(call: Call) -> Any:
    gater = call.gater
    ctx = gater.ctx
    height: int | None = None
    registry = ctx.sp_registry or ctx.chain
    if registry is not None:
        with trio.move_on_after(STATUS_HEIGHT_TIMEOUT):
            try:
                height = int(await registry.current_height())
            except (ChainError, OSError, ValueError):
                height = None
    return {"node": ctx.config.node.name, "operator": ctx.keys.operator.address,
            "modulars": ctx.modulars.running(), "height": height, "endpoint": gater.endpoint}


async def openapi(call: Call) -> Any:
    return call.gater.openapi_document()


async def ask_create_bucket(call: Call) -> Any:
    data = await call.json(schemas.CREATE_BUCKET_REQUEST)
    await call.authorize(AuthOpType.ASK_CREATE_BUCKET_APPROVAL, data["bucket"])
    approver = call.modulars.approver
    task = CreateBucketApprovalTask(bucket=data["bucket"], account=call.account,
                                    user_address=call.account)
    await _maybe_await(approver.pre_create_bucket_approval(task))
    try:
        ok = await _maybe_await(approver.handle_create_bucket_approval_task(task))
    except Exception as exc:
        task.set_error(exc)
        raise
    finally:
        await _post(approver.post_create_bucket_approval, task)
    return _approval(approver, task, ok)


async def ask_create_object(call: Call) -> Any:
    data = await call.json(schemas.CREATE_OBJECT_REQUEST)
    await call.authorize(AuthOpType.ASK_CREATE_OBJECT_APPROVAL, data["bucket"], data["object"])
    approver = call.modulars.approver
    info = ObjectInfo(id=0, bucket=data["bucket"], name=data["object"], owner=call.account,
                      size=data["size"], content_type=data["content_type"],
                      checksums=tuple(bytes.fromhex(c) for c in data["checksums"]))
    task = CreateObjectApprovalTask(object=info, user_address=call.account)
    await _maybe_await(approver.pre_create_object_approval(task))
    try:
        ok = await _maybe_await(approver.handle_create_object_approval_task(task))
    except Exception as exc:
        task.set_error(exc)
        raise
    finally:
        await _post(approver.post_create_object_approval, task)
    return _approval(approver, task, ok)


async def _post(post: Callable[[Any], Any], task: Any) -> None:
    """The approver's post_ step runs whatever happened in handle_; its failure is logged,
    never hiding the handle_ outcome."""
    try:
        await _maybe_await(post(task))
    except Exception:
        log.exception("approver post step failed for %s", task.key)


def _approval(approver: Any, task: Any, ok: Any) -> Any:
    if not ok:
        raise AccessDenied(task.error or "the approver refused this request")
    message = approver.approval_message(task)
    return {"approval": pack(message).hex(), "expiry_height": task.expiry_height}


async def bucket_meta(call: Call) -> Any:
    bucket = schemas.check_bucket(call.path("bucket"))
    await call.authorize(AuthOpType.GET_BUCKET_QUOTA, bucket)
    return await _maybe_await(call.modulars.metadata.get_bucket_meta(bucket))


async def list_objects(call: Call) -> Any:
    bucket = schemas.check_bucket(call.path("bucket"))
    prefix = schemas.query_string(call.query("prefix"), "prefix")
    start_after = schemas.query_string(call.query("start_after"), "start_after")
    limit = schemas.query_int(call.query("limit"), "limit", schemas.QUERY_LIMIT)
    await call.authorize(AuthOpType.GET_BUCKET_QUOTA, bucket)
    objects, next_start = await _maybe_await(call.modulars.metadata.list_objects(
        bucket, prefix=prefix, start_after=start_after, limit=limit))
    return {"objects": objects, "next_start_after": next_start}


async def object_meta(call: Call) -> Any:
    bucket = schemas.check_bucket(call.path("bucket"))
    name = schemas.check_object(call.path("object"))
    await call.authorize(AuthOpType.GET_BUCKET_QUOTA, bucket, name)
    return await _maybe_await(call.modulars.metadata.get_object_meta(bucket, name))


async def upload_progress(call: Call) -> Any:
    bucket = schemas.check_bucket(call.path("bucket"))
    name = schemas.check_object(call.path("object"))
    await call.authorize(AuthOpType.GET_UPLOADING_STATE, bucket, name)
    return await _maybe_await(call.modulars.metadata.get_upload_progress(bucket, name))


async def account_buckets(call: Call) -> Any:
    address = call.path("address")
    if address != call.account:
        raise AccessDenied("an account may list only its own buckets")
    return {"buckets": await _maybe_await(call.modulars.metadata.list_buckets(address))}


# --- the route table ------------------------------------------------------------------------

_BUCKET = Param("bucket", "path", schemas.BUCKET, "bucket name", required=True)
_OBJECT = Param("object", "path", schemas.OBJECT_NAME,
                "object name, percent-encoded; may contain '/'", required=True)

ROUTES: tuple[RouteSpec, ...] = (
    RouteSpec("GET", f"{API_PREFIX}/status", status, "getStatus",
              "Node name, operator address, running modulars, chain height (public)",
              public=True, response_schema=schemas.STATUS),
    RouteSpec("GET", f"{API_PREFIX}/openapi.json", openapi, "getOpenAPI",
              "This document (public)", public=True,
              response_schema={"type": "object"}),
    RouteSpec("POST", f"{API_PREFIX}/approvals/create-bucket", ask_create_bucket,
              "askCreateBucketApproval", "Ask this SP (as primary) to approve a new bucket",
              body="json", request_schema=schemas.CREATE_BUCKET_REQUEST,
              response_schema=schemas.APPROVAL_RESPONSE),
    RouteSpec("POST", f"{API_PREFIX}/approvals/create-object", ask_create_object,
              "askCreateObjectApproval", "Ask the bucket's primary SP to approve a new object",
              body="json", request_schema=schemas.CREATE_OBJECT_REQUEST,
              response_schema=schemas.APPROVAL_RESPONSE),
    RouteSpec("GET", f"{API_PREFIX}/buckets/{{bucket}}", bucket_meta, "getBucketMeta",
              "A bucket's metadata (owner only)", params=(_BUCKET,),
              response_schema=schemas.BUCKET_META),
    RouteSpec("GET", f"{API_PREFIX}/buckets/{{bucket}}/objects", list_objects, "listObjects",
              "One page of a bucket's objects by name (owner only)",
              params=(_BUCKET,
                      Param("prefix", "query", schemas.QUERY_PREFIX, "name prefix"),
                      Param("start_after", "query", schemas.QUERY_PREFIX,
                            "list names after this one (next_start_after of a page)"),
                      Param("limit", "query", schemas.QUERY_LIMIT,
                            "page size (capped at metadata.max_page)")),
              response_schema=schemas.OBJECT_LIST),
    RouteSpec("GET", f"{API_PREFIX}/objects/{{bucket}}/{{object:path}}", object_meta,
              "getObjectMeta", "An object's metadata (bucket owner only)",
              params=(_BUCKET, _OBJECT), response_schema=schemas.OBJECT_META),
    RouteSpec("GET", f"{API_PREFIX}/uploads/{{bucket}}/{{object:path}}", upload_progress,
              "getUploadProgress", "How far this SP got with an object's upload",
              params=(_BUCKET, _OBJECT), response_schema=schemas.UPLOAD_PROGRESS),
    RouteSpec("GET", f"{API_PREFIX}/accounts/{{address}}/buckets", account_buckets,
              "listAccountBuckets", "The buckets an account owns (that account only)",
              params=(Param("address", "path", schemas.ADDRESS, "account address",
                            required=True),),
              response_schema=schemas.BUCKET_LIST),
)


# --- the application ------------------------------------------------------------------------


def _endpoint(gater: Gater, spec: RouteSpec) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        check_head_size(request.scope, int(gater.cfg.max_header_bytes))
        limit = gater.body_limit(spec.body)
        check_declared_length(request.headers, limit)
        auth = None if spec.public else await authenticate(gater, request, spec)
        if spec.public:
            client = request.client
            gater.rate.take(f"ip:{client.host if client else ''}")
        memory = limit if spec.body == "json" else 0
        async with gater.ctx.limiter.span("gater", memory=memory, conns_inbound=1):
            result = await spec.handler(Call(gater, spec, request, auth, limit))
        if isinstance(result, Response):
            return result
        return JSONResponse(result)

    endpoint.__name__ = spec.operation_id
    return endpoint


async def authenticate(gater: Gater, request: Request, spec: RouteSpec) -> VerifiedRequest:
    """Verify the signature, check that it was signed for this SP's host (421
    ``MisdirectedRequest``, :mod:`modulars.gater.hosts`), refuse a replay, take a rate-limit
    token, record the nonce.

    The replay cache refuses an account's request (503 SlowDown) when that account has too
    many unexpired requests, or when its own evicted ones could not be told from this one;
    a flood from a few accounts never gets others' requests refused (see
    :class:`~node.auth.ReplayCache`).
    """
    scope = request.scope
    raw_path = (scope.get("raw_path") or scope["path"].encode("utf-8")).decode("latin-1")
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
    now = gater.wall_clock()
    verified = verify_request(method=scope["method"], raw_path=raw_path,
                              query=parse_query(scope.get("query_string", b"")),
                              headers=headers, now=now,
                              max_age=float(gater.cfg.max_signature_age))
    if spec.body == "json" and verified.payload_sha256 is None:
        raise AuthError("UnsignedPayloadNotAllowed",
                        "this route acts on its body: sign its sha256, not UNSIGNED-PAYLOAD")
    host = next((v for k, v in headers if k.lower() == "host"), "")
    await gater.hosts.check(host)
    # a replay is refused before it costs the signer a rate-limit token (else replaying one
    # captured request would keep its account at SlowDown)
    gater.replay.check(verified.account, verified.nonce, verified.expiry, now)
    gater.rate.take(verified.account)
    gater.replay.check_and_add(verified.account, verified.nonce, verified.expiry, now)
    return verified


def replay_cache(cfg: GaterSection) -> ReplayCache:
    """The gater's replay cache, bounded by its config."""
    return ReplayCache(max_entries=int(cfg.replay_entries),
                       max_per_account=int(cfg.replay_per_account))


def build_app(gater: Gater, routes: tuple[RouteSpec, ...] = ROUTES) -> Starlette:
    """The application; a path no route matches is a 404 (starlette's default would answer
    ``/bucket`` with a bodiless 307 to ``/bucket/``, a path the request was not signed for,
    always refused, where an S3 client following it re-sends a PUT's body)."""
    app = Starlette(
        routes=[Route(spec.path, _endpoint(gater, spec), methods=[spec.method],
                      name=spec.operation_id) for spec in routes],
        middleware=[Middleware(UnreadBodyGuard), Middleware(ErrorMiddleware)],
        exception_handlers={HTTPException: raise_http_exception},
    )
    app.router.redirect_slashes = False
    return app
