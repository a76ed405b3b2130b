"""Manager: persistent task queues and dispatch by remaining resources (the seed's Manager).

**State.** SPDB's ``tasks`` table is the source of truth: one row per task key with its type,
priority, state, msgpack payload (:func:`~node.tasks.encode_task`), create/update time, retry,
max retry and error. The columns win over the same fields inside the payload (the payload is
rewritten only when a task's result fields change). States:

* ``pending``  queued; dispatchable once its backoff is over (below);
* ``running``  handed out (dispatched, or an upload admitted); *leased* until
  ``update_time + timeout``. An expired lease counts as a failed attempt with error ``timeout``.
  A dispatched task the executor could not reserve resources for is given back unrun
  (:meth:`Manager.release_task`): ``pending`` with its old ``update_time``, no attempt counted;
* ``done`` / ``failed``  terminal; kept ``manager.meta_retention`` seconds, then deleted by
  :meth:`Manager.gc_meta` (run by the executor's GCMeta task). A new task may replace a
  terminal row with the same key; a key that is pending or running is a :class:`DuplicateTask`.

**Retries and backoff.** A failed attempt (an error report, or an expired lease) sets
``retry += 1`` and records the error; past ``max_retry`` (:meth:`~node.tasks.Task.exceeds_retry`)
the task is ``failed`` with that error, else ``pending`` again but not dispatchable before
``update_time + min(timeout, 2 ** retry)`` seconds: a short exponential backoff, never longer
than the task's own timeout. The same rule is derived from the row after a restart.
Uploads are not retried by the manager (the user's PUT drives them): a failed or timed-out
upload is ``failed`` at once and the user may PUT again.

**Dispatch.** Only the executor's task types (:data:`DISPATCHED_TYPES`) are handed out. An
in-memory index (a cache of the non-terminal rows, rebuilt on start) keeps ready tasks in
heaps by (priority level, memory class), ordered priority desc, then oldest; a heap of backoff
deadlines and a heap of lease deadlines. :meth:`Manager.dispatch_task` looks at the top of each
heap whose level has a slot left and whose memory class fits ``remaining.memory``, so a
dispatch costs O(classes x log n), not O(n), and touches one payload. Memory classes are
quarter-octaves (e.g. 16-20 MiB); only the one class straddling ``remaining.memory`` is
searched item by item, at most :data:`SCAN_LIMIT` items deep.

**Stages.** :meth:`Manager.report_task` routes a reported task to the seed's Handle* method
of its type. Success moves the object along: UploadObject done -> ReplicatePiece queued;
ReplicatePiece done (with every secondary signature) -> SealObject queued with the secondaries
and signatures; SealObject done -> the lifecycle is complete (or a ReplicatePiece that reports
``sealed`` skips the seal). A SealObject failed with ``SealTooLate`` queues a fresh
ReplicatePiece, at most ``Manager.max_late_seals`` times per upload (counted in the tasks'
``late_seals``); the next one fails the upload. On a secondary, the receiver's report of a
finished receive queues a ReceivePiece task whose job is to confirm the seal (the executor's);
its report while running finishes it (sealed, or pieces collected); if it fails past its
retries a GCZombiePiece task over that object id is queued to collect the pieces. Each
transition is one SPDB transaction (the finished row, the next task, and the
``upload_progress`` state: REPLICATING, SEALING, SEALED or FAILED), so a node killed at any
point resumes exactly where it stood.

**Restart.** On start (:meth:`Manager.load`, called by ``serve``) every ``running`` row becomes
``pending`` (its lease died with the old process) without spending a retry, except uploads,
whose client connection died too: they become ``failed`` and the segments they wrote are
removed (as after an upload that failed in-process). Then the index is rebuilt from the
pending rows (reading only the few payload fields an estimate needs).

**Clock.** Persisted times are wall-clock seconds from ``Manager.clock`` (``time.time`` unless
given to the constructor), so tests move time without sleeping.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import sqlite3
import time
import types
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, TypeVar

import msgpack
import trio

from node.errors import DBError, GfspError, ServiceError, TaskError
from node.modular import ModularBase, NodeContext
from node.piecestore import parse_key
from node.rcmgr import Limit
from node.tasks import (
    TASK_CLASSES,
    ChallengePieceTask,
    DownloadObjectTask,
    GCMetaTask,
    GCObjectTask,
    GCZombiePieceTask,
    ObjectInfo,
    ReceivePieceTask,
    ReplicatePieceTask,
    SealObjectTask,
    StorageParams,
    Task,
    TaskType,
    UploadObjectTask,
    decode_task,
    encode_task,
    priority_level,
    transfer_timeout,
)

__all__ = [
    "DISPATCHED_TYPES",
    "DONE",
    "FAILED",
    "MAX_LATE_SEALS",
    "PENDING",
    "RUNNING",
    "SCAN_LIMIT",
    "STATES",
    "DuplicateTask",
    "Manager",
    "backoff",
]

log = logging.getLogger("gfsp.manager")

PENDING: Final = "pending"
RUNNING: Final = "running"
DONE: Final = "done"
FAILED: Final = "failed"
STATES: Final = (PENDING, RUNNING, DONE, FAILED)
_ACTIVE: Final = (PENDING, RUNNING)

#: The task types the manager hands out to the executor.
DISPATCHED_TYPES: Final = frozenset({
    TaskType.ReplicatePiece, TaskType.SealObject, TaskType.ReceivePiece,
    TaskType.GCObject, TaskType.GCZombiePiece, TaskType.GCMeta,
})

#: How many ready tasks of the memory class straddling ``remaining.memory`` a dispatch looks
#: at before giving up on that class.
SCAN_LIMIT: Final = 256
#: Most rows :meth:`Manager.query_tasks` returns.
QUERY_LIMIT: Final = 1000
#: Object id range of the periodic GCZombiePiece task (the whole id space).
_MAX_OBJECT_ID: Final = 2**63 - 1

# upload_progress states written by the manager (the uploader writes UPLOADING/UPLOADED/FAILED).
REPLICATING, SEALING, SEALED, UPLOAD_FAILED = "REPLICATING", "SEALING", "SEALED", "FAILED"
#: How the executor's error of a seal whose signatures are too old begins (its SealTooLate)
SEAL_TOO_LATE: Final = "SealTooLate:"
#: Default of ``Manager.max_late_seals``: how many times an object whose seal came too late is
#: replicated again before its upload is failed for good
MAX_LATE_SEALS: Final = 3

_T = TypeVar("_T")

_COLUMNS: Final = ("key, type, priority, state, payload, create_time, update_time, retry, "
                   "max_retry, error")


class DuplicateTask(ServiceError):
    """A task with this key is already pending or running (409)."""

    def __init__(self, key: str) -> None:
        super().__init__("DuplicateTask", f"task {key} is already queued or running", 409)
        self.key = key


def backoff(timeout: float, retry: int) -> float:
    """Seconds a task that failed ``retry`` times waits before its next attempt.

    ``min(timeout, 2 ** retry)`` once it failed (``retry >= 1``), else 0.
    """
    if retry <= 0:
        return 0.0
    return float(min(timeout, 2.0 ** min(retry, 62)))


# ---------------------------------------------------------------------------------------------
# The in-memory index


@dataclass(slots=True, eq=False)
class _Entry:
    """What dispatch needs to know of one pending or running task (a cache of its row)."""

    key: str
    type: TaskType
    priority: int
    create_time: float
    update_time: float
    timeout: float
    retry: int
    max_retry: int
    memory: int
    object_id: int | None
    state: str
    version: int = 0
    #: of a dispatched (running) entry: the row's ``update_time`` before the dispatch, which
    #: :meth:`Manager.release_task` puts back
    claimed_from: float = 0.0

    @property
    def level(self) -> str:
        return priority_level(self.priority).value

    @property
    def not_before(self) -> float:
        if self.retry <= 0:
            return 0.0  # never failed: dispatchable at once
        return self.update_time + backoff(self.timeout, self.retry)

    @property
    def deadline(self) -> float:
        return self.update_time + self.timeout


def _entry_of(task: Task, state: str) -> _Entry:
    obj = getattr(task, "object", None)
    return _Entry(key=task.key, type=task.type, priority=task.priority,
                  create_time=task.create_time, update_time=task.update_time,
                  timeout=task.timeout, retry=task.retry, max_retry=task.max_retry,
                  memory=task.estimate().memory,
                  object_id=obj.id if isinstance(obj, ObjectInfo) else None, state=state)


def _mem_class(memory: int) -> int:
    """Quarter-octave class of a memory amount (exact below 8 bytes)."""
    n = memory.bit_length()
    if n <= 3:
        return memory
    return (n << 2) | ((memory >> (n - 3)) & 3)


def _class_bounds(mclass: int) -> tuple[int, int]:
    """The smallest and largest memory amount of a class."""
    if mclass < 8:
        return mclass, mclass
    n, sub = mclass >> 2, mclass & 3
    shift = n - 3
    return (4 | sub) << shift, (((4 | sub) + 1) << shift) - 1


_HeapItem = tuple[int, float, int, str]  # (-priority, create_time, version, key)


class _Index:
    """Pending and running tasks by key, with heaps for dispatch (lazy deletion by version)."""

    def __init__(self) -> None:
        self.entries: dict[str, _Entry] = {}
        self.ready: dict[tuple[str, int], list[_HeapItem]] = {}
        self.delayed: list[tuple[float, int, str]] = []
        self.leases: list[tuple[float, int, str]] = []
        self.active_by_type: Counter[TaskType] = Counter()
        self._versions = itertools.count(1)

    def put(self, e: _Entry, now: float) -> None:
        """Insert or replace the entry of ``e.key`` (pending or running)."""
        old = self.entries.get(e.key)
        if old is None:
            self.active_by_type[e.type] += 1
        e.version = next(self._versions)
        self.entries[e.key] = e
        if e.state == RUNNING:
            heapq.heappush(self.leases, (e.deadline, e.version, e.key))
        elif e.type in DISPATCHED_TYPES:
            nb = e.not_before
            if nb <= now:
                self._push_ready(e)
            else:
                heapq.heappush(self.delayed, (nb, e.version, e.key))

    def discard(self, key: str) -> None:
        e = self.entries.pop(key, None)
        if e is not None:
            self.active_by_type[e.type] -= 1

    def _push_ready(self, e: _Entry) -> None:
        heap = self.ready.setdefault((e.level, _mem_class(e.memory)), [])
        heapq.heappush(heap, (-e.priority, e.create_time, e.version, e.key))

    def _valid(self, key: str, version: int, state: str) -> _Entry | None:
        e = self.entries.get(key)
        if e is None or e.version != version or e.state != state:
            return None
        return e

    def promote(self, now: float) -> int:
        """Move tasks whose backoff is over to the ready heaps; how many moved."""
        moved = 0
        while self.delayed and self.delayed[0][0] <= now:
            _, version, key = heapq.heappop(self.delayed)
            e = self._valid(key, version, PENDING)
            if e is not None:
                self._push_ready(e)
                moved += 1
        return moved

    def pop_expired(self, now: float) -> list[_Entry]:
        """Running entries whose lease ended before ``now`` (removed from the lease heap)."""
        out: list[_Entry] = []
        while self.leases and self.leases[0][0] < now:
            _, version, key = heapq.heappop(self.leases)
            e = self._valid(key, version, RUNNING)
            if e is not None:
                out.append(e)
        return out

    def restore_leases(self, entries: Iterable[_Entry]) -> None:
        for e in entries:
            if self._valid(e.key, e.version, RUNNING) is e:
                heapq.heappush(self.leases, (e.deadline, e.version, e.key))

    def next_due(self) -> float | None:
        """Earliest wall time at which a backoff or a lease ends (maybe of a stale item)."""
        times = [h[0][0] for h in (self.delayed, self.leases) if h]
        return min(times) if times else None

    def choose(self, remaining: Limit) -> _Entry | None:
        """The most urgent ready entry that fits ``remaining`` (not removed)."""
        if remaining.tasks <= 0:
            return None
        best: _HeapItem | None = None
        for (level, mclass), heap in list(self.ready.items()):
            if getattr(remaining, f"tasks_{level}") <= 0:
                continue
            lo, hi = _class_bounds(mclass)
            if lo > remaining.memory:
                continue
            while heap and self._valid(heap[0][3], heap[0][2], PENDING) is None:
                heapq.heappop(heap)
            if not heap:
                del self.ready[(level, mclass)]
                continue
            item = heap[0] if hi <= remaining.memory else self._scan(heap, remaining.memory)
            if item is not None and (best is None or item < best):
                best = item
        return None if best is None else self.entries[best[3]]

    def _scan(self, heap: list[_HeapItem], memory: int) -> _HeapItem | None:
        """The first item of ``heap`` (in order) whose memory fits, looking SCAN_LIMIT deep."""
        popped: list[_HeapItem] = []
        found: _HeapItem | None = None
        try:
            while heap and len(popped) < SCAN_LIMIT:
                item = heapq.heappop(heap)
                e = self._valid(item[3], item[2], PENDING)
                if e is None:
                    continue  # stale: drop it
                popped.append(item)
                if e.memory <= memory:
                    found = item
                    break
        finally:
            for item in popped:
                heapq.heappush(heap, item)
        return found


# ---------------------------------------------------------------------------------------------
# Rows


def _row_task(row: Sequence[Any]) -> Task:
    """A task from a full ``tasks`` row (columns in :data:`_COLUMNS` order); columns win."""
    _key, _type, priority, _state, payload, create_time, update_time, retry, max_retry, error = row
    task = decode_task(payload)
    task.priority = int(priority)
    task.create_time = float(create_time)
    task.update_time = float(update_time)
    task.retry = int(retry)
    task.max_retry = int(max_retry)
    task.error = str(error)
    return task


def _write(conn: sqlite3.Connection, task: Task, state: str, payload: bytes | None = None
           ) -> None:
    conn.execute(
        f"INSERT OR REPLACE INTO tasks ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (task.key, str(task.type), task.priority, state,
         encode_task(task) if payload is None else payload, task.create_time, task.update_time,
         task.retry, task.max_retry, task.error))


def _state_of(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT state FROM tasks WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def _set_progress(conn: sqlite3.Connection, obj: ObjectInfo, state: str, error: str,
                  now: float, params: StorageParams | None = None) -> None:
    """Upsert the object's ``upload_progress`` state (byte counts set when ``params`` given)."""
    if params is not None:
        segments, nbytes = params.segment_count(obj.size), obj.size
        conn.execute(
            "INSERT INTO upload_progress (object_id, bucket, object, state, segments_done, "
            "bytes_done, error, update_time) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(object_id) DO UPDATE SET state = excluded.state, "
            "segments_done = excluded.segments_done, bytes_done = excluded.bytes_done, "
            "error = excluded.error, update_time = excluded.update_time",
            (obj.id, obj.bucket, obj.name, state, segments, nbytes, error, now))
    else:
        conn.execute(
            "INSERT INTO upload_progress (object_id, bucket, object, state, error, update_time) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(object_id) DO UPDATE SET "
            "state = excluded.state, error = excluded.error, update_time = excluded.update_time",
            (obj.id, obj.bucket, obj.name, state, error, now))


def _fast_estimate(payload: bytes) -> tuple[int, float, int | None]:
    """(memory, timeout, object id) of a stored task without building it (10x faster).

    Runs the task class's own memory formula over the raw fields; any surprise falls back to
    a full :func:`decode_task`.
    """
    try:
        envelope = msgpack.unpackb(payload, raw=False)
        fields = dict(envelope["fields"])
        cls = TASK_CLASSES[TaskType(envelope["type"])]
        obj = fields.get("object")
        if isinstance(obj, dict):
            fields["object"] = types.SimpleNamespace(**obj)
        if isinstance(fields.get("params"), dict):
            fields["params"] = StorageParams(**fields["params"])
        ns = types.SimpleNamespace(**fields)
        memory = int(cls._memory(ns))  # type: ignore[arg-type]
        return (memory, float(fields["timeout"]),
                int(obj["id"]) if isinstance(obj, dict) else None)
    except Exception:  # noqa: BLE001 - fall back to the strict decoder
        task = decode_task(payload)
        obj = getattr(task, "object", None)
        return (task.estimate().memory, task.timeout,
                obj.id if isinstance(obj, ObjectInfo) else None)


# ---------------------------------------------------------------------------------------------
# The modular


class Manager(ModularBase):
    """Persistent task queues in SPDB, dispatch by remaining resources, the upload stages."""

    name = "manager"
    requires = ()

    def __init__(self, ctx: NodeContext, *, clock: Callable[[], float] | None = None,
                 max_late_seals: int = MAX_LATE_SEALS) -> None:
        super().__init__(ctx)
        self.cfg = ctx.config.manager
        #: Wall clock of every persisted time; tests may replace it.
        self.clock: Callable[[], float] = clock or time.time
        #: Times an object whose seal came too late (SealTooLate) is replicated again; the
        #: next SealTooLate fails its upload.
        self.max_late_seals = max_late_seals
        self.stats: Counter[str] = Counter()
        self._index = _Index()
        self._lock = trio.Lock()
        #: receives reported by the receiver while a confirm of the same key was running
        #: (the primary replicated to us again): confirmed afresh once that run reports
        self._fresh_receives: dict[str, ReceivePieceTask] = {}
        self._loaded = False
        self._work = trio.Event()

    def __repr__(self) -> str:
        return f"Manager(active={len(self._index.entries)})"

    # --- lifecycle ------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        await self.load()
        task_status.started()
        while True:
            await trio.sleep(self.cfg.gc_interval)
            try:
                await self.schedule_periodic_gc()
            except (DBError, TaskError) as exc:
                log.warning("manager: scheduling GC failed: %s", exc)

    async def load(self) -> None:
        """Recover from the previous process (once): reset running rows, rebuild the index."""
        if self._loaded:
            return
        async with self._lock:
            if self._loaded:
                return
            await self._recover()
            self._loaded = True
        self._signal()

    async def _recover(self) -> None:
        now = self.clock()

        interrupted: list[int] = []

        def tx(conn: sqlite3.Connection) -> tuple[int, int, list[Any]]:
            uploads = conn.execute(
                "SELECT payload FROM tasks WHERE state = ? AND type = ?",
                (RUNNING, str(TaskType.UploadObject))).fetchall()
            for (payload,) in uploads:
                try:
                    obj = decode_task(payload).object  # type: ignore[attr-defined]
                except TaskError:
                    continue
                _set_progress(conn, obj, UPLOAD_FAILED, "interrupted: the node restarted", now)
                interrupted.append(obj.id)
            failed = conn.execute(
                "UPDATE tasks SET state = ?, error = ?, update_time = ? "
                "WHERE state = ? AND type = ?",
                (FAILED, "interrupted: the node restarted", now, RUNNING,
                 str(TaskType.UploadObject))).rowcount
            reset = conn.execute("UPDATE tasks SET state = ? WHERE state = ?",
                                 (PENDING, RUNNING)).rowcount
            rows = conn.execute(
                "SELECT key, type, priority, create_time, update_time, retry, max_retry, "
                "payload FROM tasks WHERE state = ?", (PENDING,)).fetchall()
            return failed, reset, rows

        failed, reset, rows = await self.ctx.db.run(tx)
        await self._drop_interrupted_uploads(interrupted)
        bad: list[tuple[str, str]] = []
        for key, type_name, priority, create_time, update_time, retry, max_retry, payload in rows:
            try:
                ttype = TaskType(type_name)
                if ttype not in DISPATCHED_TYPES:
                    raise TaskError(f"{type_name} tasks are not dispatched")
                memory, timeout, object_id = _fast_estimate(payload)
            except (TaskError, ValueError) as exc:
                bad.append((key, f"unloadable task: {exc}"))
                continue
            self._index.put(_Entry(
                key=key, type=ttype, priority=int(priority), create_time=float(create_time),
                update_time=float(update_time), timeout=timeout, retry=int(retry),
                max_retry=int(max_retry), memory=memory, object_id=object_id, state=PENDING),
                now)
        if bad:
            await self.ctx.db.run(lambda c: c.executemany(
                "UPDATE tasks SET state = ?, error = ?, update_time = ? WHERE key = ?",
                [(FAILED, err, now, key) for key, err in bad]))
        self.stats["recovered.reset"] += reset
        self.stats["recovered.uploads_failed"] += failed
        self.stats["recovered.unloadable"] += len(bad)
        if reset or failed or bad:
            log.info("manager: recovered %d pending tasks (%d were running), %d interrupted "
                     "uploads failed, %d unloadable", len(rows) - len(bad), reset, failed,
                     len(bad))

    async def _drop_interrupted_uploads(self, object_ids: Iterable[int]) -> None:
        """Remove the segments an upload killed with the node had written: like an upload
        that failed in-process, a FAILED upload leaves nothing on disk (no GC would collect
        them: the object is not sealed, and the user's next PUT starts from scratch)."""
        store = self.ctx.piecestore
        if store is None:
            return
        for object_id in object_ids:
            try:
                for key in await store.keys(object_id):
                    if parse_key(key).index is None:
                        await store.delete(key)
            except GfspError as exc:  # the node still starts; the next PUT overwrites them
                log.warning("manager: cannot remove the pieces of interrupted upload %d: %s",
                            object_id, exc)

    # --- the work signal --------------------------------------------------------------------

    def _signal(self) -> None:
        self._work.set()

    async def wait_for_work(self, timeout: float) -> bool:
        """Wait until a task was added or may have become dispatchable, at most ``timeout`` s.

        True when woken by new work (or a backoff/lease ending), False on timeout. A signal
        raised while nobody waited is kept for the next waiter, so no wake-up is lost between
        a :meth:`dispatch_task` that found nothing and this call.
        """
        await self.load()
        event = self._work
        if event.is_set():
            self._work = trio.Event()
            return True
        delay = timeout
        due = self._index.next_due()
        if due is not None:
            delay = min(delay, max(0.0, due - self.clock() + 1e-3))
        with trio.move_on_after(delay):
            await event.wait()
        if event.is_set():
            if self._work is event:
                self._work = trio.Event()
            return True
        return due is not None and self.clock() >= due

    # --- queueing ---------------------------------------------------------------------------

    async def add_task(self, task: Task) -> None:
        """Persist ``task`` as pending. :class:`DuplicateTask` if its key is pending/running."""
        await self.add_tasks([task])

    async def add_tasks(self, tasks: Sequence[Task]) -> None:
        """Persist several tasks as pending in one transaction (all or none)."""
        await self._add(tasks)

    async def _add(self, tasks: Sequence[Task], *, if_idle: bool = False) -> bool:
        """Add ``tasks``; with ``if_idle``, do nothing (False) when a task of the type of
        ``tasks[0]`` is pending or running (checked under the lock)."""
        for task in tasks:
            if task.type not in DISPATCHED_TYPES:
                raise TaskError(f"the manager does not queue {task.type} tasks"
                                + (" (use handle_create_upload_object_task)"
                                   if task.type == TaskType.UploadObject else ""))
        keys = [t.key for t in tasks]
        if len(set(keys)) != len(keys):
            raise DuplicateTask(next(k for k in keys if keys.count(k) > 1))
        await self.load()
        rows = [(t, encode_task(t)) for t in tasks]
        async with self._lock:
            now = self.clock()
            await self._expire_leases(now)
            if if_idle and tasks and self._index.active_by_type[tasks[0].type] > 0:
                return False

            def tx(conn: sqlite3.Connection) -> None:
                for task, payload in rows:
                    if _state_of(conn, task.key) in _ACTIVE:
                        raise DuplicateTask(task.key)
                    _write(conn, task, PENDING, payload)

            await self._commit(tx)
            for task in tasks:
                self._index.put(_entry_of(task, PENDING), now)
            self.stats["added"] += len(tasks)
        self._signal()
        return True

    async def dispatch_task(self, remaining: Limit) -> Task | None:
        """The seed's DispatchTask: the most urgent pending task whose estimate fits.

        Fits: ``estimate().memory <= remaining.memory``, ``remaining.tasks > 0`` and a slot
        left at the task's level (``tasks_high``/``tasks_medium``/``tasks_low``). Ties of
        priority go to the oldest task. Expired leases are settled first. The task returned is
        ``running`` (``update_time`` = now) when this returns.
        """
        await self.load()
        async with self._lock:
            now = self.clock()
            await self._expire_leases(now)
            self._index.promote(now)
            while True:
                entry = self._index.choose(remaining)
                if entry is None:
                    return None
                outcome = await self._commit(lambda c, e=entry: _claim(c, e.key, now))
                kind, value = outcome
                if kind == "ok":
                    task: Task = value[0]
                    running = _entry_of(task, RUNNING)
                    running.claimed_from = value[1]
                    self._index.put(running, now)
                    self.stats["dispatched"] += 1
                    return task
                # The row disagrees with the cache: follow the row.
                self._index.discard(entry.key)
                if kind == "running":
                    self._index.put(_entry_of(value, RUNNING), now)
                elif kind == "bad":
                    self.stats["unloadable"] += 1
                    log.error("manager: task %s is unreadable, marked failed: %s",
                              entry.key, value)

    async def _commit(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """A transaction the in-memory index follows, waited for even when cancelled: a
        cancel racing with its COMMIT (db.run then raises Cancelled for a job that committed)
        would leave the index out of step with SPDB, e.g. a task pending in SPDB that is
        never dispatched until a restart (found in review). The index update right after
        has no checkpoint, so a cancellation lands after it."""
        with trio.CancelScope(shield=True):
            return await self.ctx.db.run(fn)

    async def release_task(self, task: Task) -> bool:
        """Give back a dispatched task that did not run: the executor could not reserve its
        estimate (the limiter's remaining resources changed between its ask and the
        reservation, e.g. another worker's task took them).

        Undoes the dispatch in SPDB: the row is ``pending`` again with the ``update_time`` it
        had before, its retry count and error unchanged, so no attempt is counted and no new
        backoff starts (the task is dispatchable at once, also after a restart). False, and
        nothing changes, unless ``task`` is the running dispatch (same ``update_time``)."""
        await self.load()
        async with self._lock:
            now = self.clock()
            entry = self._index.entries.get(task.key)
            if entry is None or entry.state != RUNNING or entry.update_time != task.update_time:
                return False
            before = entry.claimed_from or entry.update_time

            def tx(conn: sqlite3.Connection) -> bool:
                return conn.execute(
                    "UPDATE tasks SET state = ?, update_time = ? "
                    "WHERE key = ? AND state = ? AND update_time = ?",
                    (PENDING, before, task.key, RUNNING, task.update_time)).rowcount == 1

            released: bool = await self._commit(tx)
            if released:
                self._index.put(replace(entry, state=PENDING, update_time=before,
                                        claimed_from=0.0), now)
                self.stats[f"released.{task.type}"] += 1
        return released

    async def _expire_leases(self, now: float) -> None:
        """Settle running tasks whose lease ended: a failed attempt with error ``timeout``.

        Called with the lock held.
        """
        expired = self._index.pop_expired(now)
        if not expired:
            return

        def tx(conn: sqlite3.Connection) -> list[tuple[_Entry, str, list[Task]]]:
            out: list[tuple[_Entry, str, list[Task]]] = []
            for e in expired:
                if _state_of(conn, e.key) != RUNNING:
                    out.append((e, "", []))
                    continue
                retry = e.retry + 1
                final = e.type == TaskType.UploadObject or retry > e.max_retry
                state = FAILED if final else PENDING
                conn.execute("UPDATE tasks SET state = ?, retry = ?, error = ?, "
                             "update_time = ? WHERE key = ?",
                             (state, retry, "timeout", now, e.key))
                created: list[Task] = []
                if final:
                    task = _row_task(conn.execute(
                        f"SELECT {_COLUMNS} FROM tasks WHERE key = ?", (e.key,)).fetchone())
                    created = self._on_final_failure(conn, task, now)
                out.append((e, state, created))
            return out

        try:
            results = await self._commit(tx)
        except BaseException:
            self._index.restore_leases(expired)
            raise
        for e, state, created in results:
            self._index.discard(e.key)
            self._fresh_receives.pop(e.key, None)  # its run will not report: nothing waits
            if state == PENDING:
                e.state, e.retry, e.update_time = PENDING, e.retry + 1, now
                self._index.put(e, now)
            self._put_created(created, now)
            if state:
                self.stats[f"lease_expired.{state}"] += 1
                log.info("manager: lease of %s expired -> %s", e.key, state,
                         extra={"task_key": e.key})
        self._signal()

    def _put_created(self, created: Iterable[Task], now: float) -> None:
        for task in created:
            self._index.put(_entry_of(task, PENDING), now)

    # --- queries ----------------------------------------------------------------------------

    async def query_tasks(self, prefix: str = "", limit: int = QUERY_LIMIT) -> list[Task]:
        """The seed's QueryTasks: tasks whose key starts with ``prefix`` (any state), newest
        (last updated) first, at most ``limit`` (capped at :data:`QUERY_LIMIT`)."""
        limit = max(0, min(int(limit), QUERY_LIMIT))

        def tx(conn: sqlite3.Connection) -> list[Any]:
            if prefix:
                return conn.execute(
                    f"SELECT {_COLUMNS} FROM tasks WHERE key >= ? AND key < ? "
                    "ORDER BY update_time DESC, key LIMIT ?",
                    (prefix, prefix + "\U0010ffff", limit)).fetchall()
            return conn.execute(f"SELECT {_COLUMNS} FROM tasks ORDER BY update_time DESC, key "
                                "LIMIT ?", (limit,)).fetchall()

        out: list[Task] = []
        for row in await self.ctx.db.run(tx):
            if not str(row[0]).startswith(prefix):
                continue
            try:
                out.append(_row_task(row))
            except TaskError:
                continue
        return out

    async def get_task(self, key: str) -> Task | None:
        """The task stored under ``key`` (any state), or None."""
        row = await self.ctx.db.run(lambda c: c.execute(
            f"SELECT {_COLUMNS} FROM tasks WHERE key = ?", (key,)).fetchone())
        return None if row is None else _row_task(row)

    async def get_state(self, key: str) -> str | None:
        """The state of the task stored under ``key`` (pending/running/done/failed), or None."""
        return await self.ctx.db.run(lambda c: _state_of(c, key))

    async def counts(self) -> dict[str, dict[str, int]]:
        """Number of tasks by type and state, e.g. ``{"ReplicatePiece": {"pending": 3}}``."""
        rows = await self.ctx.db.run(lambda c: c.execute(
            "SELECT type, state, count(*) FROM tasks GROUP BY type, state").fetchall())
        out: dict[str, dict[str, int]] = {}
        for type_name, state, n in rows:
            out.setdefault(str(type_name), {})[str(state)] = int(n)
        return out

    # --- GC scheduling and meta GC ----------------------------------------------------------

    async def gc_meta(self, older_than: float | None = None) -> int:
        """Delete done/failed task rows last updated before ``older_than`` (wall time; default
        now - ``manager.meta_retention``). Returns how many rows were deleted."""
        if older_than is None:
            older_than = self.clock() - self.cfg.meta_retention
        deleted = await self.ctx.db.run(lambda c: c.execute(
            "DELETE FROM tasks WHERE state IN (?, ?) AND update_time < ?",
            (DONE, FAILED, older_than)).rowcount)
        self.stats["gc_meta.deleted"] += deleted
        return int(deleted)

    async def _add_if_idle(self, task: Task) -> bool:
        try:
            return await self._add([task], if_idle=True)
        except DuplicateTask:
            return False

    async def schedule_periodic_gc(self) -> list[Task]:
        """Queue a GCMeta and a GCZombiePiece task, each unless one of its type is active.

        ``serve`` calls this every ``manager.gc_interval``; the tasks added are returned.
        """
        now = self.clock()
        candidates: list[Task] = [
            GCMetaTask(create_time=now, max_retry=self.cfg.max_retry),
            GCZombiePieceTask(start_object_id=0, end_object_id=_MAX_OBJECT_ID,
                              create_time=now, max_retry=self.cfg.max_retry),
        ]
        return [t for t in candidates if await self._add_if_idle(t)]

    async def schedule_gc_object(self, start_height: int, end_height: int
                                 ) -> GCObjectTask | None:
        """Queue a GCObject task over ``start_height..end_height``, unless a GCObject task is
        already pending or running (then None: the caller asks again later)."""
        task = GCObjectTask(start_height=start_height, end_height=end_height,
                            create_time=self.clock(), max_retry=self.cfg.max_retry)
        return task if await self._add_if_idle(task) else None

    # --- reports ----------------------------------------------------------------------------

    async def report_task(self, task: Task, error: str | None = None) -> None:
        """The executor's ReportTask: ``error`` (if given) is recorded on the task, then the
        Handle* method of the task's type settles it."""
        if error is not None:
            task.set_error(error)
        handler = self._handlers().get(task.type)
        if handler is None:
            raise TaskError(f"the manager takes no reports of {task.type} tasks")
        await handler(task)

    def _handlers(self) -> dict[TaskType, Callable[[Any], Any]]:
        return {
            TaskType.UploadObject: self.handle_done_upload_object_task,
            TaskType.ReplicatePiece: self.handle_replicate_piece_task,
            TaskType.SealObject: self.handle_seal_object_task,
            TaskType.ReceivePiece: self.handle_receive_piece_task,
            TaskType.GCObject: self.handle_gc_object_task,
            TaskType.GCZombiePiece: self.handle_gc_zombie_piece_task,
            TaskType.GCMeta: self.handle_gc_meta_task,
            TaskType.DownloadObject: self.handle_download_object_task,
            TaskType.ChallengePiece: self.handle_challenge_piece_task,
        }

    async def handle_create_upload_object_task(self, task: UploadObjectTask) -> None:
        """Admit an upload: refuse one of an object whose upload, replication or seal is
        pending or running (:class:`DuplicateTask`); persist the upload as running, leased for
        ``max(task.timeout, transfer_timeout(size))`` seconds."""
        await self.load()
        replicate = ReplicatePieceTask(object=task.object, params=task.params)
        seal = SealObjectTask(object=task.object, params=task.params)
        async with self._lock:
            now = self.clock()
            await self._expire_leases(now)
            task.timeout = max(task.timeout, transfer_timeout(task.object.size))
            task.update_time, task.retry, task.error = now, 0, ""

            def tx(conn: sqlite3.Connection) -> None:
                for key in (task.key, replicate.key, seal.key):
                    if _state_of(conn, key) in _ACTIVE:
                        raise DuplicateTask(key)
                _write(conn, task, RUNNING)

            await self._commit(tx)
            self._index.put(_entry_of(task, RUNNING), now)
            self.stats["upload.admitted"] += 1

    async def handle_done_upload_object_task(self, task: UploadObjectTask) -> None:
        """The uploader's result: an error fails the upload (the user may PUT again); success
        marks it done and queues its ReplicatePieceTask (accepted unless already done)."""
        def next_tasks(now: float) -> list[Task]:
            return [ReplicatePieceTask(
                object=task.object, params=task.params, create_time=now,
                timeout=max(self.cfg.task_timeout, transfer_timeout(task.object.size)),
                max_retry=self.cfg.max_retry)]

        await self._settle(task, follow=next_tasks, retryable=False, accept_inactive=True,
                           progress=(REPLICATING, True))

    async def handle_replicate_piece_task(self, task: ReplicatePieceTask) -> None:
        """The executor's replication result: success with every secondary's signature queues
        the SealObjectTask (carrying secondaries and signatures); ``sealed`` ends the
        lifecycle; an error is retried."""
        if not task.error and not task.sealed:
            sigs, secs = task.secondary_signatures, task.secondaries
            if not secs or len(sigs) != len(secs) or not all(sigs) or not all(secs):
                task.set_error("replication reported done without every secondary's signature")

        def next_tasks(now: float) -> list[Task]:
            if task.sealed:
                return []
            return [SealObjectTask(
                object=task.object, params=task.params, secondaries=list(task.secondaries),
                secondary_signatures=list(task.secondary_signatures),
                signed_at=task.signed_at, late_seals=task.late_seals, create_time=now,
                max_retry=self.cfg.max_retry)]

        await self._settle(task, follow=next_tasks,
                           progress=(SEALED if task.sealed else SEALING, False))

    async def handle_seal_object_task(self, task: SealObjectTask) -> None:
        """The executor's seal result: done completes the upload's lifecycle (also when the
        executor found the object already sealed by us on the chain). Signatures too old to
        seal with (``SealTooLate``) are not retried: the object is replicated again (new
        approvals, pieces, signatures) instead, at most :attr:`max_late_seals` times."""
        await self._settle(task, progress=(SEALED, False),
                           retryable=not task.error.startswith(SEAL_TOO_LATE))

    async def handle_receive_piece_task(self, task: ReceivePieceTask) -> None:
        """Two reporters (as in the seed):

        * the receiver, when a receive finished (the row is absent, pending or terminal):
          persist the task pending, to have the executor confirm the seal later; its retries
          are sized so the backoffs cover ``executor.seal_confirm_timeout``. A failed receive
          (error set) is only counted: there is nothing to confirm;
        * the executor, with the confirm result (the row is running): done, or retried on
          error; past its retries a GCZombiePiece task over the object collects the pieces.
        """
        await self.load()
        state = await self.get_state(task.key)
        if state == RUNNING:
            entry = self._index.entries.get(task.key)
            if entry is not None and entry.update_time != task.update_time:
                # not the running confirm's report (that carries its dispatch time) but the
                # receiver's: the primary sent this index again and got a new "done" while
                # we were confirming the old one. Confirm afresh once that run reports.
                if not task.error:
                    self._fresh_receives[task.key] = task
                    self.stats["receive.again"] += 1
                return
            fresh = self._fresh_receives.pop(task.key, None)
            if fresh is None or not task.error:  # no new receive, or the seal was confirmed
                await self._settle(task)
                return
            task = replace(fresh)  # not confirmed, and pieces came again: wait anew
        if task.error:
            self.stats["receive.error"] += 1
            return
        async with self._lock:
            now = self.clock()
            replaces_run = state == RUNNING  # the run just reported: its row is ours
            task.update_time, task.retry, task.error = now, 0, ""
            if replaces_run:
                task.create_time = now  # the seal wait runs from the new "done"
            task.max_retry = max(task.max_retry, self._confirm_retries(task.timeout))
            payload = encode_task(task)

            def tx(conn: sqlite3.Connection) -> bool:
                if _state_of(conn, task.key) == RUNNING and not replaces_run:
                    return False
                _write(conn, task, PENDING, payload)
                return True

            queued = await self._commit(tx)
            if queued:
                self._index.put(_entry_of(task, PENDING), now)
                self.stats["receive.queued"] += 1
        if queued:
            self._signal()
        else:
            await self._settle(task)

    def _confirm_retries(self, timeout: float) -> int:
        """Retries whose backoffs add up to the executor's seal wait, plus ``max_retry``."""
        wait, total, n = self.ctx.config.executor.seal_confirm_timeout, 0.0, 0
        while total < wait and n < 1000:
            n += 1
            total += max(backoff(timeout, n), 1e-3)
        return n + self.cfg.max_retry

    async def handle_gc_object_task(self, task: GCObjectTask) -> None:
        await self._settle(task)

    async def handle_gc_zombie_piece_task(self, task: GCZombiePieceTask) -> None:
        await self._settle(task)

    async def handle_gc_meta_task(self, task: GCMetaTask) -> None:
        await self._settle(task)

    async def handle_download_object_task(self, task: DownloadObjectTask) -> None:
        """Statistics only (downloads are not queued)."""
        self.stats[f"download.{'error' if task.error else 'done'}"] += 1

    async def handle_challenge_piece_task(self, task: ChallengePieceTask) -> None:
        """Statistics only (challenges are not queued)."""
        self.stats[f"challenge.{'error' if task.error else 'done'}"] += 1

    # --- settling a reported task -------------------------------------------------------------

    async def _settle(self, task: Task, *,
                      follow: Callable[[float], list[Task]] | None = None,
                      retryable: bool = True, accept_inactive: bool = False,
                      progress: tuple[str, bool] | None = None) -> None:
        """Record the outcome of a reported task in one transaction.

        Error (only while the row is running; a pending row already counted its timeout):
        ``retry + 1`` and pending again after its backoff, or failed past ``max_retry`` (at
        once when not ``retryable``). Success (while pending or running, or also when absent or
        failed with ``accept_inactive``): done, plus the ``follow`` tasks (unless their key is
        active already) and the ``progress`` = (upload_progress state, set byte counts).
        Reports of tasks in any other state are stale and only counted.
        """
        await self.load()
        async with self._lock:
            now = self.clock()

            def tx(conn: sqlite3.Connection) -> tuple[str, list[Task]]:
                row = conn.execute("SELECT state, retry, max_retry FROM tasks WHERE key = ?",
                                   (task.key,)).fetchone()
                state = None if row is None else str(row[0])
                if task.error:
                    if state != RUNNING:
                        return "stale", []
                    task.retry, task.max_retry, task.update_time = row[1] + 1, row[2], now
                    final = not retryable or task.exceeds_retry()
                    _write(conn, task, FAILED if final else PENDING)
                    if final:
                        return FAILED, self._on_final_failure(conn, task, now)
                    return PENDING, []
                if state not in _ACTIVE and not (accept_inactive and state != DONE):
                    return "stale", []
                if row is not None:
                    task.retry, task.max_retry = row[1], row[2]
                task.update_time = now
                _write(conn, task, DONE)
                created: list[Task] = []
                for nxt in follow(now) if follow is not None else []:
                    if _state_of(conn, nxt.key) not in _ACTIVE:
                        _write(conn, nxt, PENDING)
                        created.append(nxt)
                obj = getattr(task, "object", None)
                if progress is not None and isinstance(obj, ObjectInfo):
                    params = getattr(task, "params", None) if progress[1] else None
                    _set_progress(conn, obj, progress[0], "", now, params)
                return DONE, created

            outcome, created = await self._commit(tx)
            if outcome == "stale":
                self.stats[f"stale.{task.type}"] += 1
                log.info("manager: stale report of %s ignored", task.key,
                         extra={"task_key": task.key})
                return
            self._index.discard(task.key)
            if outcome == PENDING:
                self._index.put(_entry_of(task, PENDING), now)
            self._put_created(created, now)
            self.stats[f"{task.type}.{outcome}"] += 1
            if outcome == FAILED:
                log.warning("manager: task %s failed: %s", task.key, task.error,
                            extra={"task_key": task.key})
        if outcome == PENDING or created:
            self._signal()

    def _on_final_failure(self, conn: sqlite3.Connection, task: Task, now: float
                          ) -> list[Task]:
        """Consequences of a task failing for good (inside its transaction); new tasks."""
        obj = getattr(task, "object", None)
        if not isinstance(obj, ObjectInfo):
            return []
        if isinstance(task, SealObjectTask) and task.error.startswith(SEAL_TOO_LATE):
            if task.late_seals >= self.max_late_seals:
                error = (f"SealObject: the seal came too late {task.late_seals + 1} times "
                         f"(replicated again {task.late_seals} times, at most "
                         f"{self.max_late_seals}); last: {task.error}")
                conn.execute("UPDATE tasks SET error = ? WHERE key = ?", (error, task.key))
                _set_progress(conn, obj, UPLOAD_FAILED, error, now)
                return []
            again = ReplicatePieceTask(object=obj, params=task.params, create_time=now,
                                       max_retry=self.cfg.max_retry,
                                       late_seals=task.late_seals + 1)
            if _state_of(conn, again.key) not in _ACTIVE:
                _write(conn, again, PENDING)
                _set_progress(conn, obj, REPLICATING, "", now)
                return [again]
            return []
        if task.type in (TaskType.UploadObject, TaskType.ReplicatePiece, TaskType.SealObject):
            _set_progress(conn, obj, UPLOAD_FAILED, f"{task.type}: {task.error}", now)
            return []
        if task.type == TaskType.ReceivePiece:
            gc = GCZombiePieceTask(start_object_id=obj.id, end_object_id=obj.id,
                                   create_time=now, max_retry=self.cfg.max_retry)
            if _state_of(conn, gc.key) not in _ACTIVE:
                _write(conn, gc, PENDING)
                return [gc]
        return []


def _claim(conn: sqlite3.Connection, key: str, now: float) -> tuple[str, Any]:
    """Mark a pending row running (in the dispatch transaction).

    ``("ok", (task, the row's update_time before))``; or, when the row is not pending,
    ``("running", task)``, ``("gone", state)``; or ``("bad", error)`` for an unreadable
    payload (the row is marked failed).
    """
    row = conn.execute(f"SELECT {_COLUMNS} FROM tasks WHERE key = ?", (key,)).fetchone()
    if row is None:
        return "gone", None
    state = str(row[3])
    try:
        task = _row_task(row)
    except TaskError as exc:
        conn.execute("UPDATE tasks SET state = ?, error = ?, update_time = ? WHERE key = ?",
                     (FAILED, f"unloadable task: {exc}", now, key))
        return "bad", str(exc)
    if state == RUNNING:
        return "running", task
    if state != PENDING:
        return "gone", state
    before = task.update_time
    conn.execute("UPDATE tasks SET state = ?, update_time = ? WHERE key = ?",
                 (RUNNING, now, key))
    task.update_time = now
    return "ok", (task, before)
