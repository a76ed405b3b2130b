"""The chain client: the only way a node reaches the chain (ARCHITECTURE §3).

:class:`ChainClient` is the interface the node uses; :class:`DevChainClient` implements it over
the devchain's HTTP API (testnet/devchain/README.md) with :mod:`httpx`. A client for a real
chain would implement the same Protocol.

* Every request runs under a deadline (``request_timeout``). A network failure, a timeout or a
  5xx becomes :class:`ChainUnavailable`; a refusal of the chain (4xx with ``{"code",
  "reason"}``) becomes :class:`ChainError` with the chain's code. Getters of one thing return
  None when the chain says it does not exist.
* The current height is cached: :meth:`DevChainClient.run` (started with ``nursery.start``)
  refreshes it every ``height_refresh_interval``; without it (or when the cache is older than
  two intervals) :meth:`DevChainClient.current_height` asks the chain.
* It implements :class:`node.spregistry.SPRegistry` (``sp_by_operator``, ``sp_by_peer_id``,
  ``list_sps``, ``current_height``) from a short-lived cache of the SP list (``sp_cache_ttl``);
  an unknown operator or peer id refreshes the list at most every ``sp_miss_ttl`` seconds, so a
  newly registered SP is found at once and unknown peers cannot hammer the chain.
* Transactions are built and signed with :mod:`node.chain_msgs` and sent by :meth:`broadcast`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

import httpx
import trio

from node.chain_msgs import ChainError
from node.config import ChainSection
from node.crypto import pack
from node.errors import ServiceError, ServiceUnavailable
from node.spregistry import SPInfo
from node.tasks import BucketInfo, ObjectInfo, StorageParams

if TYPE_CHECKING:
    from node.modular import NodeContext

__all__ = [
    "ChainBucket",
    "ChainClient",
    "ChainError",
    "ChainEvent",
    "ChainObject",
    "ChainUnavailable",
    "DevChainClient",
]

log = logging.getLogger("gfsp.chain")

MSGPACK = "application/msgpack"
#: Refusal codes that mean "no such thing": the getters return None for them.
_ABSENT = frozenset({"SP_NOT_FOUND", "BUCKET_NOT_FOUND", "OBJECT_NOT_FOUND", "ACCOUNT_NOT_FOUND"})


class ChainUnavailable(ChainError):
    """The chain could not be reached or did not answer in time (code ``UNAVAILABLE``)."""

    def __init__(self, reason: str) -> None:
        super().__init__("UNAVAILABLE", reason)


@dataclass(frozen=True, kw_only=True)
class ChainBucket:
    """A bucket as the chain knows it."""

    id: int
    name: str
    owner: str
    primary_sp: str
    create_height: int

    @property
    def info(self) -> BucketInfo:
        """The task-level view of the bucket."""
        return BucketInfo(id=self.id, name=self.name, owner=self.owner,
                          primary_sp=self.primary_sp)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ChainBucket:
        return cls(id=int(d["id"]), name=str(d["name"]), owner=str(d["owner"]),
                   primary_sp=str(d["primary_sp"]), create_height=int(d["create_height"]))


@dataclass(frozen=True, kw_only=True)
class ChainObject:
    """An object as the chain knows it: status ``CREATED`` or ``SEALED``.

    ``checksums``: the primary integrity hash, then one per EC piece index. Once sealed,
    ``secondaries[i]`` holds piece index ``i`` and ``secondary_sigs[i]`` is its integrity
    signature.
    """

    id: int
    bucket: str
    name: str
    owner: str
    size: int
    content_type: str
    checksums: tuple[bytes, ...]
    status: str
    create_height: int
    seal_height: int | None
    secondaries: tuple[str, ...]
    secondary_sigs: tuple[bytes, ...]

    @property
    def sealed(self) -> bool:
        return self.status == "SEALED"

    @property
    def info(self) -> ObjectInfo:
        """The task-level view of the object."""
        return ObjectInfo(id=self.id, bucket=self.bucket, name=self.name, owner=self.owner,
                          size=self.size, checksums=self.checksums,
                          content_type=self.content_type, create_height=self.create_height)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ChainObject:
        seal = d.get("seal_height")
        return cls(id=int(d["id"]), bucket=str(d["bucket"]), name=str(d["name"]),
                   owner=str(d["owner"]), size=int(d["size"]),
                   content_type=str(d["content_type"]),
                   checksums=tuple(bytes.fromhex(c) for c in d["checksums"]),
                   status=str(d["status"]), create_height=int(d["create_height"]),
                   seal_height=None if seal is None else int(seal),
                   secondaries=tuple(str(s) for s in d["secondaries"]),
                   secondary_sigs=tuple(bytes.fromhex(s) for s in d["secondary_sigs"]))


@dataclass(frozen=True, kw_only=True)
class ChainEvent:
    """One entry of the chain's event log (``kind``: bucket_created, bucket_deleted,
    object_created, object_sealed, object_deleted); ``index`` grows by one per event."""

    index: int
    height: int
    kind: str
    bucket: str
    bucket_id: int
    object: str
    object_id: int | None

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ChainEvent:
        oid = d.get("object_id")
        return cls(index=int(d["index"]), height=int(d["height"]), kind=str(d["kind"]),
                   bucket=str(d["bucket"]), bucket_id=int(d["bucket_id"]),
                   object=str(d.get("object", "")), object_id=None if oid is None else int(oid))


def sp_from_json(d: Mapping[str, Any]) -> SPInfo:
    """An :class:`SPInfo` from the chain's JSON (keys as hex)."""
    return SPInfo.from_json(dict(d))


class ChainClient(Protocol):
    """What the node needs from the chain (the devchain or any other)."""

    async def current_height(self) -> int: ...

    async def params(self) -> StorageParams: ...

    async def get_sp(self, operator: str) -> SPInfo | None: ...

    async def list_sps(self) -> list[SPInfo]: ...

    async def get_bucket(self, name: str) -> ChainBucket | None: ...

    async def list_buckets(self, owner: str) -> list[ChainBucket]: ...

    async def get_object(self, bucket: str, name: str) -> ChainObject | None: ...

    async def get_object_by_id(self, object_id: int) -> ChainObject | None: ...

    async def list_objects(self, bucket: str, *, prefix: str = "", start_after: str = "",
                           limit: int = 100) -> list[ChainObject]: ...

    async def events_since(self, height: int, *, after: int = 0,
                           limit: int = 100) -> list[ChainEvent]: ...

    async def account_seq(self, address: str) -> int: ...

    async def broadcast(self, tx: Mapping[str, Any]) -> dict[str, Any]: ...


def _segment(text: str) -> str:
    """``text`` as one percent-encoded path segment: ``/`` encoded too, and ``.`` / ``..``
    as ``%2E`` / ``%2E%2E``, so that no HTTP client resolves dot segments (httpx does) and
    looks up another name. The server decodes it back to ``text``."""
    return "%2E" * len(text) if text in (".", "..") else quote(text, safe="")


class DevChainClient:
    """:class:`ChainClient` and :class:`~node.spregistry.SPRegistry` over the devchain's HTTP API.

    Use ``async with DevChainClient(...) as chain`` (or call :meth:`aclose`), and start
    :meth:`run` in a nursery to keep the height fresh.
    """

    def __init__(self, endpoint: str, *, request_timeout: float = 5.0,
                 height_refresh_interval: float = 1.0, sp_cache_ttl: float = 2.0,
                 sp_miss_ttl: float = 0.25, transport: httpx.AsyncBaseTransport | None = None
                 ) -> None:
        if request_timeout <= 0 or height_refresh_interval <= 0:
            raise ValueError("request_timeout and height_refresh_interval must be > 0")
        self.endpoint = endpoint.rstrip("/")
        self.request_timeout = request_timeout
        self.height_refresh_interval = height_refresh_interval
        self.sp_cache_ttl = sp_cache_ttl
        self.sp_miss_ttl = sp_miss_ttl
        self._http = httpx.AsyncClient(base_url=self.endpoint, timeout=request_timeout,
                                       transport=transport)
        self._height: int | None = None
        self._height_at = -math.inf
        self._params: StorageParams | None = None
        self._sps: dict[str, SPInfo] = {}
        self._sps_at = -math.inf
        self._sps_lock = trio.Lock()

    @classmethod
    def from_config(cls, section: ChainSection) -> DevChainClient:
        """A client for the ``[chain]`` section of the node's config."""
        return cls(section.endpoint, request_timeout=float(section.request_timeout),
                   height_refresh_interval=float(section.height_refresh_interval))

    def __repr__(self) -> str:
        return f"DevChainClient({self.endpoint})"

    async def __aenter__(self) -> DevChainClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self._http.aclose()

    # --- transport ------------------------------------------------------------------------

    async def _request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                       content: bytes | None = None) -> Any:
        headers = {"content-type": MSGPACK} if content is not None else None
        try:
            with trio.fail_after(self.request_timeout):
                try:
                    response = await self._http.request(method, path, params=params,
                                                        content=content, headers=headers)
                except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
                    if method != "GET" or self._http.is_closed:
                        raise
                    # a kept-alive connection the server had just closed: a read is safe to
                    # send once more, on a new connection
                    response = await self._http.request(method, path, params=params,
                                                        headers=headers)
        except trio.TooSlowError:
            raise ChainUnavailable(f"{method} {path}: no answer within "
                                   f"{self.request_timeout} s") from None
        except httpx.HTTPError as exc:
            raise ChainUnavailable(f"{method} {path}: {type(exc).__name__}: {exc}") from None
        if response.status_code >= 500:
            raise ChainUnavailable(f"{method} {path}: HTTP {response.status_code}")
        try:
            body = response.json()
        except ValueError:
            raise ChainError("BAD_RESPONSE", f"{method} {path}: HTTP {response.status_code}, "
                             "not JSON") from None
        if response.status_code >= 400:
            if isinstance(body, dict) and isinstance(body.get("code"), str):
                raise ChainError(body["code"], str(body.get("reason", "")))
            raise ChainError("BAD_RESPONSE", f"{method} {path}: HTTP {response.status_code}")
        return body

    async def _get_or_none(self, path: str) -> Any:
        try:
            return await self._request("GET", path)
        except ChainError as exc:
            if exc.code in _ABSENT:
                return None
            raise

    # --- height and params ----------------------------------------------------------------

    async def fetch_height(self) -> int:
        """Ask the chain for its height now (and update the cache)."""
        body = await self._request("GET", "/height")
        self._height = int(body["height"])
        self._height_at = trio.current_time()
        return self._height

    async def current_height(self) -> int:
        """The cached height; asks the chain when the cache is older than two intervals."""
        if (self._height is None
                or trio.current_time() - self._height_at > 2 * self.height_refresh_interval):
            return await self.fetch_height()
        return self._height

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Refresh the cached height every ``height_refresh_interval`` until cancelled.

        Starts after the first attempt; a failed refresh is logged and retried on the next tick
        (the cache then ages out, and :meth:`current_height` raises if the chain stays down).
        """
        started = False
        while True:
            try:
                await self.fetch_height()
            except ChainError as exc:
                log.warning("chain height refresh failed: %s", exc)
            if not started:
                task_status.started()
                started = True
            await trio.sleep(self.height_refresh_interval)

    async def params(self) -> StorageParams:
        """The chain's storage parameters (fixed for a chain's life, so cached forever)."""
        if self._params is None:
            body = await self._request("GET", "/status")
            p = body["params"]
            self._params = StorageParams(
                segment_size=int(p["segment_size"]), data_shards=int(p["data_shards"]),
                parity_shards=int(p["parity_shards"]), max_payload=int(p["max_payload"]))
        return self._params

    # --- SPs (also the SPRegistry interface) ----------------------------------------------

    async def _refresh_sps(self) -> dict[str, SPInfo]:
        body = await self._request("GET", "/sps")
        self._sps = {sp.operator: sp for sp in map(sp_from_json, body["sps"])}
        self._sps_at = trio.current_time()
        return self._sps

    def _sps_stale(self, miss: bool) -> bool:
        age = trio.current_time() - self._sps_at
        return age > self.sp_cache_ttl or (miss and age > self.sp_miss_ttl)

    async def _sp_cache(self, *, miss: bool = False) -> dict[str, SPInfo]:
        if self._sps_stale(miss):
            # one refresh at a time: the tasks that find the cache stale together (a burst of
            # pings from unknown operators, or any load when it expires) share it
            async with self._sps_lock:
                if self._sps_stale(miss):
                    return await self._refresh_sps()
        return self._sps

    async def get_sp(self, operator: str) -> SPInfo | None:
        """One SP, asked of the chain now (no cache)."""
        body = await self._get_or_none(f"/sps/{quote(operator, safe='')}")
        return None if body is None else sp_from_json(body)

    async def list_sps(self) -> list[SPInfo]:
        """Every registered SP (from the short cache)."""
        return list((await self._sp_cache()).values())

    async def sp_by_operator(self, operator: str) -> SPInfo | None:
        """The SP with this operator address (cached; a miss refreshes the cache)."""
        sp = (await self._sp_cache()).get(operator)
        if sp is None:
            sp = (await self._sp_cache(miss=True)).get(operator)
        return sp

    async def sp_by_peer_id(self, peer_id: str) -> SPInfo | None:
        """The SP with this libp2p peer id (cached; a miss refreshes the cache)."""
        def find(sps: dict[str, SPInfo]) -> SPInfo | None:
            return next((sp for sp in sps.values() if sp.peer_id == peer_id), None)
        sp = find(await self._sp_cache())
        if sp is None:
            sp = find(await self._sp_cache(miss=True))
        return sp

    # --- buckets, objects, events, accounts -----------------------------------------------

    async def get_bucket(self, name: str) -> ChainBucket | None:
        body = await self._get_or_none(f"/buckets/{quote(name, safe='')}")
        return None if body is None else ChainBucket.from_json(body)

    async def list_buckets(self, owner: str) -> list[ChainBucket]:
        body = await self._request("GET", "/buckets", params={"owner": owner})
        return [ChainBucket.from_json(b) for b in body["buckets"]]

    async def get_object(self, bucket: str, name: str) -> ChainObject | None:
        body = await self._get_or_none(
            f"/objects/{quote(bucket, safe='')}/{_segment(name)}")
        return None if body is None else ChainObject.from_json(body)

    async def get_object_by_id(self, object_id: int) -> ChainObject | None:
        body = await self._get_or_none(f"/objects/by-id/{int(object_id)}")
        return None if body is None else ChainObject.from_json(body)

    async def list_objects(self, bucket: str, *, prefix: str = "", start_after: str = "",
                           limit: int = 100) -> list[ChainObject]:
        body = await self._request("GET", "/objects", params={
            "bucket": bucket, "prefix": prefix, "start_after": start_after, "limit": limit})
        return [ChainObject.from_json(o) for o in body["objects"]]

    async def events_since(self, height: int, *, after: int = 0,
                           limit: int = 100) -> list[ChainEvent]:
        """Events at height >= ``height`` (and index > ``after``, for paging), oldest first."""
        body = await self._request("GET", "/events", params={
            "since": height, "after": after, "limit": limit})
        return [ChainEvent.from_json(e) for e in body["events"]]

    async def account_seq(self, address: str) -> int:
        """The next sequence number of ``address`` (0 for an account never seen)."""
        body = await self._get_or_none(f"/accounts/{quote(address, safe='')}")
        return 0 if body is None else int(body["seq"])

    async def broadcast(self, tx: Mapping[str, Any]) -> dict[str, Any]:
        """Send a signed transaction; its result, or :class:`ChainError` with the refusal.

        A :class:`ChainUnavailable` leaves it unknown whether the transaction was applied:
        check the account's sequence number before sending it again.
        """
        result = await self._request("POST", "/tx", content=pack(dict(tx)))
        if not isinstance(result, dict):
            raise ChainError("BAD_RESPONSE", "a transaction result is a JSON object")
        return result


# --- for modulars: chain failures as the user-facing errors the gater understands ------


@contextmanager
def chain_errors(what: str) -> Iterator[None]:
    """Map chain client errors to the typed service errors the gater understands.

    :class:`ChainUnavailable` becomes :class:`ServiceUnavailable` (503); a ``MALFORMED``
    refusal is the caller's bad argument (``InvalidArgument``, 400); any other refusal of a
    query is unexpected (``InternalError``, 500).
    """
    try:
        yield
    except ChainUnavailable as exc:
        raise ServiceUnavailable(f"{what}: the chain is unavailable: {exc.reason}") from exc
    except ChainError as exc:
        if exc.code == "MALFORMED":
            raise ServiceError("InvalidArgument", f"{what}: {exc.reason}", 400) from exc
        raise ServiceError("InternalError", f"{what}: the chain refused: {exc}", 500) from exc


def require_chain(ctx: NodeContext) -> ChainClient:
    """The node's chain client, or :class:`ServiceUnavailable` when none is configured."""
    if ctx.chain is None:
        raise ServiceUnavailable("no chain client is configured")
    return ctx.chain
