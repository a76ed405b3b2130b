"""Metadata: bucket, object and upload-progress metadata, and read traffic (the seed's Metadata).

Buckets and objects are the chain's (asked through ``ctx.chain`` on every call, no cache: the
authorizer caches what it needs); upload progress and read records are this SP's own, in SPDB
(the ``upload_progress`` and ``read_records`` tables).

Errors are the typed :class:`~node.errors.ServiceError` family: :class:`NoSuchBucket`,
:class:`NoSuchKey`, ``InvalidArgument`` (400) for a bad argument, and
:class:`ServiceUnavailable` (503) when the chain cannot be reached.

* :meth:`Metadata.list_objects` pages by name: it returns at most ``limit`` objects (capped at
  ``metadata.max_page``) and the ``start_after`` of the next page, or None on the last page. It
  asks the chain for one more than the page to know whether another page exists (in chunks of
  at most :data:`CHAIN_MAX_LIST`, the chain's own cap per query).
* :meth:`Metadata.get_upload_progress` reports the SPDB row of the object; the chain is the
  authority on sealing, so a sealed object reports state ``SEALED`` whatever the row says.
* Read records are stamped with the wall clock (``Metadata.wall_clock``, :func:`time.time`),
  since they outlive the process; :meth:`Metadata.list_read_records` filters on it.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from node.chain import ChainBucket, ChainObject, chain_errors, require_chain
from node.errors import NoSuchBucket, NoSuchKey, ServiceError
from node.modular import ModularBase, NodeContext

__all__ = [
    "CHAIN_MAX_LIST",
    "Metadata",
    "ReadRecord",
    "UploadState",
    "chain_errors",
]

#: The most objects the chain returns for one list query (the devchain's ``MAX_LIST``).
CHAIN_MAX_LIST = 1000


class UploadState:
    """States reported by :meth:`Metadata.get_upload_progress` when SPDB has no row."""

    NOT_STARTED = "NOT_STARTED"
    SEALED = "SEALED"


@dataclass(frozen=True, kw_only=True)
class ReadRecord:
    """One read of an object: ``bytes`` served to ``account`` at wall-clock time ``ts``."""

    id: int
    bucket: str
    object_id: int
    account: str
    bytes: int
    ts: float


class Metadata(ModularBase):
    """Serves bucket, object and upload-progress metadata, and records read traffic."""

    name = "metadata"
    requires = ()

    def __init__(self, ctx: NodeContext) -> None:
        super().__init__(ctx)
        #: Clock of the read records (seconds since the epoch); tests may replace it.
        self.wall_clock: Callable[[], float] = time.time

    def __repr__(self) -> str:
        return "Metadata()"

    @property
    def max_page(self) -> int:
        return int(self.ctx.config.metadata.max_page)

    def _page_limit(self, limit: int | None) -> int:
        if limit is None:
            return self.max_page
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ServiceError("InvalidArgument", f"limit must be an integer >= 0, not {limit!r}",
                               400)
        return min(limit, self.max_page)

    # --- buckets and objects (the chain) --------------------------------------------------

    async def list_buckets(self, account: str) -> list[ChainBucket]:
        """Every bucket ``account`` owns, by name (whichever SP is its primary)."""
        chain = require_chain(self.ctx)
        with chain_errors(f"list buckets of {account!r}"):
            return await chain.list_buckets(account)

    async def get_bucket_meta(self, bucket: str) -> ChainBucket:
        """The bucket as the chain knows it; :class:`NoSuchBucket` when it does not exist."""
        chain = require_chain(self.ctx)
        with chain_errors(f"get bucket {bucket!r}"):
            found = await chain.get_bucket(bucket)
        if found is None:
            raise NoSuchBucket(bucket)
        return found

    async def get_object_meta(self, bucket: str, object: str) -> ChainObject:
        """The object as the chain knows it; :class:`NoSuchBucket` or :class:`NoSuchKey`."""
        chain = require_chain(self.ctx)
        with chain_errors(f"get object {bucket!r}/{object!r}"):
            found = await chain.get_object(bucket, object)
        if found is None:
            await self.get_bucket_meta(bucket)  # NoSuchBucket rather than NoSuchKey
            raise NoSuchKey(bucket, object)
        return found

    async def list_objects(self, bucket: str, *, prefix: str = "", start_after: str = "",
                           limit: int | None = None) -> tuple[list[ChainObject], str | None]:
        """One page of the objects of ``bucket`` whose name starts with ``prefix``, by name.

        Returns ``(objects, next_start_after)``: at most ``limit`` objects (None or more than
        ``metadata.max_page`` means ``max_page``), and the ``start_after`` that gives the next
        page, or None when this page is the last. :class:`NoSuchBucket` when the bucket does
        not exist.
        """
        chain = require_chain(self.ctx)
        page = self._page_limit(limit)
        if page == 0:
            await self.get_bucket_meta(bucket)
            return [], None
        want = page + 1  # one more than the page tells whether another page exists
        found: list[ChainObject] = []
        cursor = start_after
        with chain_errors(f"list objects of {bucket!r}"):
            while len(found) < want:
                ask = min(want - len(found), CHAIN_MAX_LIST)
                batch = await chain.list_objects(bucket, prefix=prefix, start_after=cursor,
                                                 limit=ask)
                found.extend(batch)
                if len(batch) < ask:
                    break
                cursor = batch[-1].name
        if not found:
            await self.get_bucket_meta(bucket)  # an empty page of a missing bucket is an error
            return [], None
        if len(found) > page:
            objects = found[:page]
            return objects, objects[-1].name
        return found, None

    # --- upload progress (SPDB) ------------------------------------------------------------

    async def get_upload_progress(self, bucket: str, object: str) -> dict[str, Any]:
        """How far this SP got with the object's upload.

        A dict with ``object_id``, ``state``, ``segments_done``, ``bytes_done``, ``error`` and
        ``update_time`` (wall clock, None when there is no row). Without a row the state is
        ``NOT_STARTED`` for a CREATED object and ``SEALED`` for a sealed one; a sealed object
        always reports ``SEALED`` (the chain is the authority).
        """
        obj = await self.get_object_meta(bucket, object)

        def read(conn: sqlite3.Connection) -> tuple[Any, ...] | None:
            row: tuple[Any, ...] | None = conn.execute(
                "SELECT state, segments_done, bytes_done, error, update_time "
                "FROM upload_progress WHERE object_id = ?", (obj.id,)).fetchone()
            return row

        row = await self.ctx.db.run(read)
        if row is None:
            sealed = obj.sealed
            return {"object_id": obj.id,
                    "state": UploadState.SEALED if sealed else UploadState.NOT_STARTED,
                    "segments_done": 0, "bytes_done": obj.size if sealed else 0,
                    "error": "", "update_time": None}
        state, segments_done, bytes_done, error, update_time = row
        return {"object_id": obj.id,
                "state": UploadState.SEALED if obj.sealed else str(state),
                "segments_done": int(segments_done), "bytes_done": int(bytes_done),
                "error": str(error), "update_time": float(update_time)}

    # --- read traffic (SPDB) ---------------------------------------------------------------

    async def record_read(self, bucket: str, object_id: int, account: str, nbytes: int) -> int:
        """Record that ``account`` read ``nbytes`` of object ``object_id``; the record's id."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise ValueError(f"nbytes must be an integer >= 0, not {nbytes!r}")
        ts = float(self.wall_clock())

        def write(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "INSERT INTO read_records (bucket, object_id, account, bytes, ts) "
                "VALUES (?, ?, ?, ?, ?)", (bucket, int(object_id), account, nbytes, ts))
            return int(cur.lastrowid or 0)

        return await self.ctx.db.run(write)

    async def list_read_records(self, bucket: str, *, since: float = 0,
                                limit: int | None = None) -> list[ReadRecord]:
        """Reads of ``bucket`` at wall-clock time ``>= since``, oldest first.

        At most ``limit`` records (None or more than ``metadata.max_page`` means ``max_page``);
        to page on, pass the last record's ``ts`` as ``since`` and skip the ids already seen.
        """
        count = self._page_limit(limit)

        def read(conn: sqlite3.Connection) -> list[ReadRecord]:
            rows = conn.execute(
                "SELECT id, bucket, object_id, account, bytes, ts FROM read_records "
                "WHERE bucket = ? AND ts >= ? ORDER BY ts, id LIMIT ?",
                (bucket, float(since), count)).fetchall()
            return [ReadRecord(id=int(r[0]), bucket=str(r[1]), object_id=int(r[2]),
                               account=str(r[3]), bytes=int(r[4]), ts=float(r[5]))
                    for r in rows]

        return await self.ctx.db.run(read)
