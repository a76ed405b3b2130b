"""SPDB: the node's SQLite store (ARCHITECTURE.md §6).

One stdlib :mod:`sqlite3` connection in WAL mode, owned by one dedicated worker thread that is
started when the store is opened and joined when it is closed (PERF-NOTES: a dedicated thread is
about 4x faster per call than ``trio.to_thread.run_sync``). aiosqlite is asyncio-only, so it is
not used.

The unit of work is ``await db.run(fn)``: ``fn(conn)`` runs inside ``BEGIN ... COMMIT`` in a single
hop to the worker thread; any exception rolls the transaction back. Jobs run one at a time, in the
order they were submitted. Results travel back to trio through the trio token (no polling).

Cancellation: when the awaiting task is cancelled, the job is marked cancelled; if it is running,
its current statement is interrupted (``conn.interrupt()``) and a progress handler aborts any
further statement of that job, and the worker rolls the transaction back. The caller gets
:class:`trio.Cancelled` at once without waiting for the thread. A cancelled job that has not
started yet is skipped. (As with any cancellation, a cancel that races with the final ``COMMIT``
may arrive after the commit already happened.)

Schema changes are the numbered scripts in :data:`MIGRATIONS`; ``PRAGMA user_version`` records
how many have been applied, and opening the store applies the missing ones, each in its own
transaction.

Usage::

    async with open_spdb(path) as db:
        n = await db.run(lambda conn: conn.execute("SELECT count(*) FROM tasks").fetchone()[0])
"""

from __future__ import annotations

import functools
import queue
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final, Generic, TypeVar

import trio

from node.errors import DBError

__all__ = ["MIGRATIONS", "SPDB", "open_spdb"]

T = TypeVar("T")

#: Numbered schema migrations. ``MIGRATIONS[n - 1]`` takes a database from ``user_version``
#: ``n - 1`` to ``n``. Append only: never edit a migration that has shipped.
MIGRATIONS: tuple[str, ...] = (
    # 1: initial schema.
    """
    CREATE TABLE tasks (
        key         TEXT    NOT NULL PRIMARY KEY,
        type        TEXT    NOT NULL,
        priority    INTEGER NOT NULL DEFAULT 0,
        state       TEXT    NOT NULL,
        payload     BLOB    NOT NULL,          -- msgpack of the task
        create_time REAL    NOT NULL,
        update_time REAL    NOT NULL,
        retry       INTEGER NOT NULL DEFAULT 0 CHECK (retry >= 0),
        max_retry   INTEGER NOT NULL DEFAULT 0 CHECK (max_retry >= 0),
        error       TEXT    NOT NULL DEFAULT ''
    );
    CREATE INDEX tasks_type_state_priority ON tasks (type, state, priority);
    CREATE INDEX tasks_update_time ON tasks (update_time);

    CREATE TABLE upload_progress (
        object_id     INTEGER NOT NULL PRIMARY KEY,
        bucket        TEXT    NOT NULL,
        object        TEXT    NOT NULL,
        state         TEXT    NOT NULL,
        segments_done INTEGER NOT NULL DEFAULT 0 CHECK (segments_done >= 0),
        bytes_done    INTEGER NOT NULL DEFAULT 0 CHECK (bytes_done >= 0),
        error         TEXT    NOT NULL DEFAULT '',
        update_time   REAL    NOT NULL
    );
    CREATE INDEX upload_progress_state ON upload_progress (state, update_time);

    CREATE TABLE integrity_meta (
        object_id        INTEGER NOT NULL,
        redundancy_index INTEGER NOT NULL CHECK (redundancy_index >= -1),  -- -1 = primary
        integrity_hash   BLOB    NOT NULL CHECK (length(integrity_hash) = 32),
        checksums        BLOB    NOT NULL,  -- msgpack list of 32-byte segment hashes
        signature        BLOB,              -- NULL until signed
        PRIMARY KEY (object_id, redundancy_index)
    );

    CREATE TABLE piece_hashes (
        object_id        INTEGER NOT NULL,
        segment          INTEGER NOT NULL CHECK (segment >= 0),
        redundancy_index INTEGER NOT NULL CHECK (redundancy_index >= -1),
        checksum         BLOB    NOT NULL CHECK (length(checksum) = 32),
        PRIMARY KEY (object_id, segment, redundancy_index)
    ) WITHOUT ROWID;

    CREATE TABLE peers (
        peer_id    TEXT    NOT NULL PRIMARY KEY,
        operator   TEXT    NOT NULL,
        addrs      TEXT    NOT NULL DEFAULT '[]',  -- JSON list of multiaddrs
        first_seen REAL    NOT NULL,
        last_seen  REAL    NOT NULL,
        missed     INTEGER NOT NULL DEFAULT 0 CHECK (missed >= 0),
        state      TEXT    NOT NULL
    );
    CREATE INDEX peers_operator ON peers (operator);

    CREATE TABLE gc_progress (
        kind        TEXT    NOT NULL PRIMARY KEY,
        last_height INTEGER NOT NULL DEFAULT 0,
        last_key    TEXT    NOT NULL DEFAULT '',
        update_time REAL    NOT NULL
    );

    CREATE TABLE read_records (
        id        INTEGER PRIMARY KEY AUTOINCREMENT,
        bucket    TEXT    NOT NULL,
        object_id INTEGER NOT NULL,
        account   TEXT    NOT NULL,
        bytes     INTEGER NOT NULL CHECK (bytes >= 0),
        ts        REAL    NOT NULL
    );
    CREATE INDEX read_records_bucket_ts ON read_records (bucket, ts);
    CREATE INDEX read_records_ts ON read_records (ts);
    """,
)

_SYNCHRONOUS_MODES: Final = frozenset({"OFF", "NORMAL", "FULL", "EXTRA"})
#: The progress handler runs every this many SQLite VM instructions.
_PROGRESS_OPS: Final = 100
_ROLLBACK_ATTEMPTS: Final = 3


class _Job(Generic[T]):
    """One unit of work for the worker thread, and the slot its outcome comes back in."""

    __slots__ = ("abort", "begin", "done", "error", "fn", "result", "token")

    def __init__(
        self, fn: Callable[[], T], begin: str | None, token: trio.lowlevel.TrioToken
    ) -> None:
        self.fn = fn
        #: ``"BEGIN"``/``"BEGIN IMMEDIATE"``, or None to run ``fn`` without a wrapping transaction.
        self.begin = begin
        self.token = token
        self.done = trio.Event()
        #: Why the job must stop (``"cancelled"``/``"closed"``); guarded by ``SPDB._lock``.
        self.abort: str | None = None
        self.result: T | None = None
        self.error: BaseException | None = None


class _Stop:
    """Queue sentinel: the worker thread exits when it dequeues this."""


_STOP: Final = _Stop()


class SPDB:
    """The node's SQLite store. Open it with :func:`open_spdb`, not directly."""

    def __init__(self, path: Path, *, busy_timeout: float, synchronous: str) -> None:
        """Prepare (but do not open) a store at ``path``; :func:`open_spdb` opens it."""
        self._path = Path(path)
        self._busy_timeout = busy_timeout
        self._synchronous = synchronous
        self._queue: queue.SimpleQueue[_Job[Any] | _Stop] = queue.SimpleQueue()
        self._lock = threading.Lock()
        # Guarded by _lock: the job the worker is executing, and whether its statements must abort.
        self._current: _Job[Any] | None = None
        self._abort = False
        self._closing = False  # guarded by _lock; set once close began
        self._closed = False  # trio side: no new jobs accepted
        self._conn: sqlite3.Connection | None = None
        self._thread: threading.Thread | None = None
        self._stopped = trio.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._close_error: sqlite3.Error | None = None

    # ------------------------------------------------------------------ public API

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    @property
    def closed(self) -> bool:
        """True once the store has been (or is being) closed."""
        return self._closed

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` as one transaction on the worker thread and return its result.

        ``BEGIN``; ``fn(conn)``; ``COMMIT``. On any exception the transaction is rolled back and
        the exception re-raised: :class:`sqlite3.Error` becomes :class:`DBError` (with the
        sqlite3 error as ``__cause__``), anything else propagates unchanged. ``fn`` must not
        commit or roll back itself, nor keep ``conn`` beyond the call.

        Raises :class:`DBError` if the store is closed.
        """
        conn = self._conn
        if self._closed or conn is None:
            raise DBError(f"SPDB {self._path} is closed")
        return await self._submit(functools.partial(fn, conn), begin="BEGIN")

    async def user_version(self) -> int:
        """The schema version recorded in ``PRAGMA user_version`` (number of migrations applied)."""
        return await self.run(_read_user_version)

    async def aclose(self) -> None:
        """Stop the worker thread and close the connection. Idempotent.

        A job still running is interrupted and rolled back and jobs not yet started are not run:
        their callers get :class:`DBError`. Waiting for the thread is shielded from cancellation,
        so the connection is always closed.
        """
        if self._closed:
            if self._thread is not None:
                with trio.CancelScope(shield=True):
                    await self._stopped.wait()
            return
        self._closed = True
        if self._thread is None:
            return
        with self._lock:
            self._closing = True
            current = self._current
            if current is not None and self._conn is not None:
                current.abort = "closed"
                self._abort = True
                self._conn.interrupt()
        self._queue.put(_STOP)
        with trio.CancelScope(shield=True):
            await self._stopped.wait()
        self._thread.join()
        if self._close_error is not None:
            raise DBError(f"closing SPDB {self._path} failed: {self._close_error}") from (
                self._close_error
            )

    # ------------------------------------------------------------------ trio side

    async def _start(self, migrations: tuple[str, ...] | None = None) -> None:
        """Start the worker thread, open the connection and apply missing migrations."""
        self._token = trio.lowlevel.current_trio_token()
        self._thread = threading.Thread(
            target=self._worker, name=f"spdb-{self._path.name}", daemon=True
        )
        self._thread.start()
        try:
            await self._submit(self._connect, begin=None)
            await self._migrate(migrations)
        except BaseException:
            await self.aclose()
            raise

    async def _migrate(self, migrations: tuple[str, ...] | None = None) -> None:
        """Apply the migrations that ``PRAGMA user_version`` says are missing."""
        conn = self._conn
        assert conn is not None
        if migrations is None:
            migrations = MIGRATIONS  # read at call time, so tests can extend it
        version = await self._submit(functools.partial(_read_user_version, conn), begin=None)
        if version > len(migrations):
            raise DBError(
                f"SPDB {self._path} has schema version {version}, newer than this code "
                f"({len(migrations)} migrations)"
            )
        for number in range(version + 1, len(migrations) + 1):
            apply = functools.partial(_apply_migration, conn, number, migrations[number - 1])
            try:
                await self._submit(apply, begin="BEGIN IMMEDIATE")
            except DBError as exc:
                raise DBError(f"SPDB {self._path}: migration {number} failed: {exc}") from (
                    exc.__cause__ or exc
                )

    async def _submit(self, fn: Callable[[], T], *, begin: str | None) -> T:
        """Queue ``fn`` for the worker thread and wait for its outcome."""
        if self._closing:
            raise DBError(f"SPDB {self._path} is closed")
        job: _Job[T] = _Job(fn, begin, trio.lowlevel.current_trio_token())
        self._queue.put(job)
        try:
            await job.done.wait()
        except BaseException:
            self._abandon(job)
            raise
        error, job.error = job.error, None
        if error is not None:
            if isinstance(error, sqlite3.Error):
                raise DBError(f"{type(error).__name__}: {error}") from error
            raise error
        return job.result  # type: ignore[return-value]

    def _abandon(self, job: _Job[Any]) -> None:
        """Mark ``job`` cancelled; interrupt it if (and only if) it is the one running."""
        with self._lock:
            if job.abort is None:
                job.abort = "cancelled"
            if self._current is job and self._conn is not None:
                self._abort = True
                self._conn.interrupt()

    # ------------------------------------------------------------------ worker thread

    def _connect(self) -> None:
        """Open and configure the connection (runs on the worker thread)."""
        conn = sqlite3.connect(
            self._path,
            timeout=self._busy_timeout,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise DBError(f"SPDB {self._path}: cannot enable WAL (journal_mode={mode})")
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            conn.set_progress_handler(self._progress, _PROGRESS_OPS)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _progress(self) -> int:
        """SQLite progress handler: non-zero aborts the running statement of an aborted job."""
        return 1 if self._abort else 0

    def _worker(self) -> None:
        """Thread body: run queued jobs one at a time until the stop sentinel."""
        try:
            while True:
                job = self._queue.get()
                if isinstance(job, _Stop):
                    return
                with self._lock:
                    skip = job.abort
                    if skip is None and self._closing:
                        skip = "closed"
                    if skip is None:
                        self._current = job
                        self._abort = False
                if skip is not None:
                    job.error = DBError(f"SPDB job not run: {skip}")
                else:
                    try:
                        job.result = self._execute(job)
                    except BaseException as exc:  # noqa: BLE001 - re-raised in the awaiting task
                        job.error = exc
                _notify(job.token, job.done.set)
        finally:
            self._shutdown()

    def _execute(self, job: _Job[T]) -> T:
        """Run one job in its transaction; roll back on any exception."""
        conn = self._conn
        try:
            if job.begin is not None:
                assert conn is not None
                conn.execute(job.begin)
            result = job.fn()
            if job.begin is not None:
                assert conn is not None
                with self._lock:
                    reason = job.abort
                if reason is not None:
                    raise DBError(f"SPDB transaction aborted: {reason}")
                conn.execute("COMMIT")
        except BaseException as exc:
            self._release_current()
            self._rollback(exc)
            raise
        self._release_current()
        return result

    def _release_current(self) -> None:
        """Forget the running job, so no later interrupt can reach another job's statements."""
        with self._lock:
            self._current = None
            self._abort = False

    def _rollback(self, exc: BaseException) -> None:
        """Roll back the open transaction, if any; note a failure on ``exc``."""
        conn = self._conn
        if conn is None:
            return
        last: sqlite3.Error | None = None
        for _ in range(_ROLLBACK_ATTEMPTS):
            if not conn.in_transaction:
                return
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error as rollback_exc:
                last = rollback_exc
            else:
                return
        exc.add_note(f"SPDB: ROLLBACK failed: {last!r}")

    def _shutdown(self) -> None:
        """Close the connection and tell trio the worker is gone (worker thread, at exit)."""
        conn, self._conn = self._conn, None
        try:
            if conn is not None:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                conn.close()
        except sqlite3.Error as exc:
            self._close_error = exc
        finally:
            if self._token is not None:
                _notify(self._token, self._stopped.set)


def _notify(token: trio.lowlevel.TrioToken, callback: Callable[[], object]) -> None:
    """Schedule ``callback`` on the trio run of ``token``; do nothing if that run is over."""
    try:
        token.run_sync_soon(callback)
    except trio.RunFinishedError:
        return  # the trio run that waited for this is gone: nobody to tell


def _read_user_version(conn: sqlite3.Connection) -> int:
    """``PRAGMA user_version`` of ``conn``."""
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _split_sql(script: str) -> list[str]:
    """Split an SQL script into complete statements (aware of quotes, comments, triggers)."""
    statements: list[str] = []
    buffer = ""
    for part in script.split(";"):
        buffer += part + ";"
        if sqlite3.complete_statement(buffer):
            if buffer.strip(" \t\r\n;"):
                statements.append(buffer.strip())
            buffer = ""
    rest = buffer[:-1].strip()  # the last part got one ';' too many
    if rest:
        statements.append(rest)
    return statements


def _apply_migration(conn: sqlite3.Connection, number: int, script: str) -> None:
    """Apply migration ``number`` inside the caller's transaction, unless already applied.

    ``executescript`` is not used: it would commit the open transaction first.
    """
    if _read_user_version(conn) >= number:  # another process applied it meanwhile
        return
    for statement in _split_sql(script):
        conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {int(number)}")


@asynccontextmanager
async def open_spdb(
    path: Path, *, busy_timeout: float = 5.0, synchronous: str = "NORMAL",
    migrations: tuple[str, ...] | None = None,
) -> AsyncIterator[SPDB]:
    """Open the SPDB at ``path`` (created if missing), apply migrations, and close it on exit.

    ``busy_timeout`` is how many seconds a statement waits for another process's lock;
    ``synchronous`` is SQLite's ``PRAGMA synchronous`` (OFF, NORMAL, FULL or EXTRA; NORMAL is
    crash-safe in WAL mode, a power loss may lose the last transactions). ``migrations`` replaces
    the node's schema (:data:`MIGRATIONS`, read at call time when None) by another store's own
    numbered migrations (the devchain uses this). Leaving the block, also
    by exception or cancellation, stops the worker thread and closes the connection.

    Raises :class:`DBError` if the database cannot be opened or migrated.
    """
    mode = synchronous.upper()
    if mode not in _SYNCHRONOUS_MODES:
        raise ValueError(
            f"synchronous must be one of {sorted(_SYNCHRONOUS_MODES)}, not {synchronous!r}"
        )
    if busy_timeout < 0:
        raise ValueError(f"busy_timeout must be >= 0, not {busy_timeout!r}")
    db = SPDB(Path(path), busy_timeout=busy_timeout, synchronous=mode)
    await db._start(migrations)
    try:
        yield db
    finally:
        await db.aclose()
