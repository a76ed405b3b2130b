"""Authorizer: who may do what, checked against the chain (the seed's Authorizer).

:meth:`Authorizer.verify_authorize` returns True when ``account`` may perform ``op`` on
``bucket``/``object`` here, and otherwise raises the typed :class:`~node.errors.ServiceError`
the gater turns into an S3 error; it never returns False.

Checks run in a fixed order, so the first failing one names the error: the account is not
empty, the bucket exists (:class:`NoSuchBucket`), the account owns it (:class:`AccessDenied`),
this SP is its primary (:class:`AccessDenied`, "not the primary SP"), then the object checks
(:class:`NoSuchKey`, ``ObjectAlreadyExists`` 409, :class:`InvalidObjectState` 409). Ownership
and primary are checked before the object, so a stranger learns nothing about a bucket's
objects. CHALLENGE_PIECE has its own rule, as a challenge answers with a raw piece (a whole
segment from the primary) outside GET's accounting: the account must own the bucket or be the
operator of an SP registered on the chain and in service (the primary's degraded reads and the
SPs' challenges are signed with their operator keys), otherwise :class:`AccessDenied`; then the
object must be sealed and stored here, as primary or as one of its secondaries.

Chain lookups (a bucket by name, an object by bucket and name, an SP by operator: from
``ctx.sp_registry`` when there is one) are cached per instance for
``authorizer.cache_ttl`` seconds of ``ctx.clock``; concurrent lookups of the same key share one
request to the chain. A refusal is never based on a cached answer alone: when a check fails on
data fetched before the call began, the data is fetched again and the checks rerun (so a bucket
or object created, or an object sealed, a moment ago is seen at once). Allowed requests are
thus served from the cache; each refused request costs at most one fresh lookup per key.
An unreachable chain is :class:`ServiceUnavailable` (503).
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import trio

from node.chain import ChainBucket, ChainObject, chain_errors, require_chain
from node.errors import (
    AccessDenied,
    InvalidObjectState,
    NoSuchBucket,
    NoSuchKey,
    ServiceError,
    ServiceUnavailable,
)
from node.modular import ModularBase, NodeContext
from node.spregistry import SPInfo

__all__ = ["AuthOpType", "Authorizer"]

#: The cache is pruned of expired entries when it grows past this many keys.
MAX_CACHE_ENTRIES = 10_000


class AuthOpType(enum.IntEnum):
    """The seed's AuthOpType: the operation being authorized."""

    UNKNOWN = 0
    ASK_CREATE_BUCKET_APPROVAL = 1
    ASK_CREATE_OBJECT_APPROVAL = 2
    CHALLENGE_PIECE = 3
    PUT_OBJECT = 4
    GET_OBJECT = 5
    GET_UPLOADING_STATE = 6
    GET_BUCKET_QUOTA = 7
    LIST_BUCKET_READ_RECORD = 8


@dataclass
class _Entry:
    fetched_at: float  # when the lookup that produced it started
    value: Any


@dataclass
class _Fetch:
    """A lookup in flight; waiters share its outcome."""

    started_at: float
    done: trio.Event = field(default_factory=trio.Event)
    ok: bool = False
    value: Any = None
    unavailable: str | None = None


class _Call:
    """One verification: which cached data it accepts, and whether it used older data."""

    def __init__(self, fresh_since: float, began: float) -> None:
        self.fresh_since = fresh_since
        self.began = began
        self.used_older = False


class Authorizer(ModularBase):
    """Verifies an account's authority for an operation, against the chain."""

    name = "authorizer"
    requires = ("signer",)

    def __init__(self, ctx: NodeContext) -> None:
        super().__init__(ctx)
        self._cache: dict[Hashable, _Entry] = {}
        self._inflight: dict[Hashable, _Fetch] = {}

    def __repr__(self) -> str:
        return f"Authorizer(cached={len(self._cache)})"

    @property
    def cache_ttl(self) -> float:
        return float(self.ctx.config.authorizer.cache_ttl)

    def clear_cache(self) -> None:
        """Forget every cached chain answer."""
        self._cache.clear()

    # --- the seed's VerifyAuthorize --------------------------------------------------------

    async def verify_authorize(self, op: AuthOpType | int, account: str, bucket: str,
                               object: str = "") -> bool:
        """True when ``account`` may perform ``op``; otherwise the typed ServiceError."""
        try:
            op = AuthOpType(op)
        except ValueError:
            raise AccessDenied(f"unknown operation {op!r}") from None
        if op is AuthOpType.UNKNOWN:
            raise AccessDenied("unknown operation")
        if not account:
            raise AccessDenied("anonymous requests are not allowed")
        now = self.ctx.clock()
        call = _Call(fresh_since=now - self.cache_ttl, began=now)
        try:
            await self._check(call, op, account, bucket, object)
        except ServiceUnavailable:
            raise
        except ServiceError:
            if not call.used_older:
                raise
            # The refusal relied on data older than this call: confirm it with fresh data.
            call = _Call(fresh_since=now, began=now)
            await self._check(call, op, account, bucket, object)
        return True

    async def _check(self, call: _Call, op: AuthOpType, account: str, bucket: str,
                     object: str) -> None:
        if op is AuthOpType.ASK_CREATE_BUCKET_APPROVAL:
            if await self._bucket(call, bucket) is not None:
                raise ServiceError("BucketAlreadyExists",
                                   f"bucket {bucket!r} already exists", 409)
            return
        b = await self._bucket(call, bucket)
        if b is None:
            raise NoSuchBucket(bucket)
        me = self.ctx.modulars.signer.operator_address
        if op is AuthOpType.CHALLENGE_PIECE:
            if not _same(b.owner, account):
                sp = await self._sp(call, account)
                if sp is None or not sp.in_service:
                    raise AccessDenied(f"account {account} may not challenge pieces: only the "
                                       "bucket owner and SPs in service may")
            obj = await self._sealed_object(call, bucket, object)
            if not (_same(b.primary_sp, me) or any(_same(s, me) for s in obj.secondaries)):
                raise AccessDenied(f"this SP ({me}) stores no piece of object "
                                   f"{bucket!r}/{object!r}")
            return
        if not _same(b.owner, account):
            raise AccessDenied(f"account {account} is not the owner of bucket {bucket!r}")
        if not _same(b.primary_sp, me):
            raise AccessDenied(f"this SP ({me}) is not the primary SP of bucket {bucket!r} "
                               f"(the primary SP is {b.primary_sp})")
        if op is AuthOpType.ASK_CREATE_OBJECT_APPROVAL:
            if await self._object(call, bucket, object) is not None:
                raise ServiceError("ObjectAlreadyExists",
                                   f"object {object!r} already exists in bucket {bucket!r}", 409)
        elif op is AuthOpType.PUT_OBJECT:
            obj = await self._existing_object(call, bucket, object)
            if obj.sealed:
                raise InvalidObjectState(f"object {bucket!r}/{object!r} is already sealed")
            if obj.status != "CREATED":
                raise InvalidObjectState(f"object {bucket!r}/{object!r} is {obj.status}")
        elif op is AuthOpType.GET_OBJECT:
            await self._sealed_object(call, bucket, object)
        elif op is AuthOpType.GET_UPLOADING_STATE:
            await self._existing_object(call, bucket, object)
        # GET_BUCKET_QUOTA, LIST_BUCKET_READ_RECORD: the bucket checks are all.

    async def _existing_object(self, call: _Call, bucket: str, object: str) -> ChainObject:
        obj = await self._object(call, bucket, object)
        if obj is None:
            raise NoSuchKey(bucket, object)
        return obj

    async def _sealed_object(self, call: _Call, bucket: str, object: str) -> ChainObject:
        obj = await self._existing_object(call, bucket, object)
        if not obj.sealed:
            raise InvalidObjectState(f"object {bucket!r}/{object!r} is not sealed "
                                     f"(status {obj.status})")
        return obj

    # --- cached chain lookups --------------------------------------------------------------

    async def _bucket(self, call: _Call, bucket: str) -> ChainBucket | None:
        chain = require_chain(self.ctx)
        value: ChainBucket | None = await self._lookup(
            call, ("bucket", bucket), lambda: chain.get_bucket(bucket), f"get bucket {bucket!r}")
        return value

    async def _object(self, call: _Call, bucket: str, object: str) -> ChainObject | None:
        chain = require_chain(self.ctx)
        value: ChainObject | None = await self._lookup(
            call, ("object", bucket, object), lambda: chain.get_object(bucket, object),
            f"get object {bucket!r}/{object!r}")
        return value

    async def _sp(self, call: _Call, operator: str) -> SPInfo | None:
        registry = self.ctx.sp_registry
        if registry is not None:
            def fetch() -> Awaitable[SPInfo | None]:
                return registry.sp_by_operator(operator)
        else:
            chain = require_chain(self.ctx)

            def fetch() -> Awaitable[SPInfo | None]:
                return chain.get_sp(operator)
        value: SPInfo | None = await self._lookup(call, ("sp", operator), fetch,
                                                  f"get SP {operator}")
        return value

    async def _lookup(self, call: _Call, key: Hashable, fetch: Callable[[], Awaitable[Any]],
                      what: str) -> Any:
        """The value for ``key``: cached if fetched since ``call.fresh_since``, else fetched
        (sharing a fetch in flight that started late enough)."""
        while True:
            entry = self._cache.get(key)
            if entry is not None and entry.fetched_at >= call.fresh_since:
                if entry.fetched_at < call.began:
                    call.used_older = True
                return entry.value
            pending = self._inflight.get(key)
            if pending is not None and pending.started_at >= call.fresh_since:
                await pending.done.wait()
                if pending.unavailable is not None:
                    raise ServiceUnavailable(pending.unavailable)
                if pending.ok:
                    if pending.started_at < call.began:
                        call.used_older = True
                    return pending.value
                continue  # that fetch was cancelled or refused: look again
            return await self._fetch(key, fetch, what)

    async def _fetch(self, key: Hashable, fetch: Callable[[], Awaitable[Any]], what: str
                     ) -> Any:
        pending = _Fetch(started_at=self.ctx.clock())
        self._inflight[key] = pending
        try:
            try:
                with chain_errors(what):
                    value = await fetch()
            except ServiceUnavailable as exc:
                pending.unavailable = exc.message
                raise
            pending.ok, pending.value = True, value
            current = self._cache.get(key)
            if current is None or current.fetched_at <= pending.started_at:
                self._cache.pop(key, None)  # re-insert: the dict stays ordered by fetch time
                self._cache[key] = _Entry(pending.started_at, value)
                self._prune()
            return value
        finally:
            if self._inflight.get(key) is pending:
                del self._inflight[key]
            pending.done.set()

    def _prune(self) -> None:
        if len(self._cache) <= MAX_CACHE_ENTRIES:
            return
        oldest_kept = self.ctx.clock() - self.cache_ttl
        for key in [k for k, e in self._cache.items() if e.fetched_at < oldest_kept]:
            del self._cache[key]
        if len(self._cache) > MAX_CACHE_ENTRIES:  # all fresh: drop the oldest half
            for key in list(self._cache)[:len(self._cache) - MAX_CACHE_ENTRIES // 2]:
                del self._cache[key]


def _same(a: str, b: str) -> bool:
    """Addresses compare case-insensitively (hex)."""
    return a.lower() == b.lower()

