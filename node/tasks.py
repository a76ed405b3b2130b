"""The task types of gfsp (the seed's ``core/task``), their keys, estimates and wire format.

A task is one unit of work that a modular handles or the manager schedules. Every task has:

* a **key** (the seed's ``TKey``): a stable string naming the task, e.g.
  ``Uploading-bucket:B-object:O-id:7``. It never changes while the task changes state, two tasks of
  different types never share a key, and the manager refuses a second task with the same key.
  ``query_tasks(prefix)`` filters on key prefixes; :func:`key_prefix` gives the prefix of one type
  (it ends with the ``-`` delimiter, so ``ReplicatePiece-`` does not match
  ``ReplicatePieceApproval-...``);
* a **priority** (0-255) whose :class:`PriorityLevel` maps to the limiter's task classes;
* create/update times, a timeout, a retry counter and a maximum, and an error string;
* an :meth:`Task.estimate` of the memory it needs while it runs.

Tasks are mutable dataclasses (they change state as they move through the stages); the value types
they carry (:class:`ObjectInfo`, :class:`StorageParams`, :class:`BucketInfo`) are frozen.
:func:`encode_task` / :func:`decode_task` convert a task to and from msgpack bytes, such that
``decode_task(encode_task(t)) == t``. Anything malformed raises :class:`~node.errors.TaskError`.

Keyword-only construction is used everywhere (``UploadObjectTask(object=..., params=...)``).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import time
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

from node.errors import TaskError

__all__ = [
    "DEFAULT_PRIORITY",
    "HIGH_PRIORITY_FLOOR",
    "KEY_DELIMITER",
    "LOW_PRIORITY_CEILING",
    "MAX_PRIORITY",
    "SMALL_TASK_MEMORY",
    "TASK_CLASSES",
    "TASK_FORMAT_VERSION",
    "BucketInfo",
    "ChallengePieceTask",
    "CreateBucketApprovalTask",
    "CreateObjectApprovalTask",
    "DownloadObjectTask",
    "GCMetaTask",
    "GCObjectTask",
    "GCZombiePieceTask",
    "ObjectInfo",
    "PriorityLevel",
    "ReceivePieceTask",
    "ReplicatePieceApprovalTask",
    "ReplicatePieceTask",
    "ResourceEstimate",
    "SealObjectTask",
    "StorageParams",
    "Task",
    "TaskType",
    "UploadObjectTask",
    "decode_task",
    "encode_task",
    "key_prefix",
    "priority_level",
    "transfer_timeout",
]

#: Separator between the parts of a task key (as in the Go original).
KEY_DELIMITER = "-"
#: Highest valid priority (priorities are 0..255).
MAX_PRIORITY = 255
#: Priorities strictly below this are :attr:`PriorityLevel.LOW`.
LOW_PRIORITY_CEILING = 85
#: Priorities at or above this are :attr:`PriorityLevel.HIGH`; between the two is MEDIUM.
HIGH_PRIORITY_FLOOR = 170
#: Memory estimate (bytes) of tasks that move no payload (approvals, seal, GC).
SMALL_TASK_MEMORY = 64 * 1024
#: Version of the msgpack layout written by :func:`encode_task`.
TASK_FORMAT_VERSION = 1

_UINT64_MAX = 2**64 - 1


class TaskType(enum.StrEnum):
    """The seed's task types; the value is the type's name."""

    CreateBucketApproval = "CreateBucketApproval"
    CreateObjectApproval = "CreateObjectApproval"
    ReplicatePieceApproval = "ReplicatePieceApproval"
    UploadObject = "UploadObject"
    ReplicatePiece = "ReplicatePiece"
    SealObject = "SealObject"
    ReceivePiece = "ReceivePiece"
    DownloadObject = "DownloadObject"
    ChallengePiece = "ChallengePiece"
    GCObject = "GCObject"
    GCZombiePiece = "GCZombiePiece"
    GCMeta = "GCMeta"


class PriorityLevel(enum.StrEnum):
    """Coarse priority class of a task; the resource limiter keeps one class per level."""

    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"


#: Default priority of each task type: user-facing approvals/reads high, the upload pipeline
#: in the upper part of medium, garbage collection low.
DEFAULT_PRIORITY: Mapping[TaskType, int] = types.MappingProxyType(
    {
        TaskType.CreateBucketApproval: 200,
        TaskType.CreateObjectApproval: 200,
        TaskType.ReplicatePieceApproval: 200,
        TaskType.DownloadObject: 200,
        TaskType.ChallengePiece: 200,
        TaskType.UploadObject: 150,
        TaskType.ReplicatePiece: 150,
        TaskType.SealObject: 150,
        TaskType.ReceivePiece: 150,
        TaskType.GCObject: 20,
        TaskType.GCZombiePiece: 20,
        TaskType.GCMeta: 20,
    }
)


def priority_level(priority: int) -> PriorityLevel:
    """Map a priority (0..255) to its level: ``< 85`` low, ``>= 170`` high, else medium."""
    _check_priority(priority)
    if priority < LOW_PRIORITY_CEILING:
        return PriorityLevel.LOW
    if priority >= HIGH_PRIORITY_FLOOR:
        return PriorityLevel.HIGH
    return PriorityLevel.MEDIUM


def _check_priority(priority: object) -> None:
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise TaskError(f"priority must be an int in 0..{MAX_PRIORITY}, got {priority!r}")
    if not 0 <= priority <= MAX_PRIORITY:
        raise TaskError(f"priority must be in 0..{MAX_PRIORITY}, got {priority}")


def transfer_timeout(
    size: int,
    *,
    min_seconds: float = 30.0,
    max_seconds: float = 3600.0,
    bytes_per_second: float = 1024 * 1024,
) -> float:
    """A timeout (seconds) for moving ``size`` bytes: ``size / bytes_per_second``, clamped.

    Managers use it to size the timeout of upload/replicate/receive tasks of big objects.
    """
    if size < 0 or bytes_per_second <= 0:
        raise TaskError(f"invalid transfer: size={size}, bytes_per_second={bytes_per_second}")
    return float(min(max(size / bytes_per_second, min_seconds), max_seconds))


# ---------------------------------------------------------------------------------------------
# Value types


@dataclass(frozen=True, kw_only=True)
class StorageParams:
    """The chain's storage parameters an object was created under.

    ``segment_size``: bytes per segment (the last segment of an object may be shorter);
    ``data_shards`` / ``parity_shards``: erasure coding of each segment into
    ``data_shards + parity_shards`` pieces; ``max_payload``: largest accepted object size.
    """

    segment_size: int
    data_shards: int
    parity_shards: int
    max_payload: int

    def __post_init__(self) -> None:
        _check_types(self)
        if self.segment_size <= 0:
            raise TaskError(f"segment_size must be > 0, got {self.segment_size}")
        if self.data_shards <= 0:
            raise TaskError(f"data_shards must be > 0, got {self.data_shards}")
        if self.parity_shards < 0:
            raise TaskError(f"parity_shards must be >= 0, got {self.parity_shards}")
        if self.max_payload < 0:
            raise TaskError(f"max_payload must be >= 0, got {self.max_payload}")

    @property
    def total_shards(self) -> int:
        """Number of EC pieces per segment (data + parity), i.e. the number of secondaries."""
        return self.data_shards + self.parity_shards

    def segment_count(self, size: int) -> int:
        """Number of segments of an object of ``size`` bytes (``ceil``; 0 bytes -> 0 segments)."""
        if size < 0:
            raise TaskError(f"object size must be >= 0, got {size}")
        return -(-size // self.segment_size)

    def segment_len(self, size: int, index: int) -> int:
        """Length in bytes of segment ``index`` of an object of ``size`` bytes."""
        count = self.segment_count(size)
        if not 0 <= index < count:
            raise TaskError(f"segment index {index} out of range for {count} segments")
        if index < count - 1:
            return self.segment_size
        return size - self.segment_size * (count - 1)

    def piece_size(self, segment_len: int) -> int:
        """Size of one EC piece of a segment of ``segment_len`` bytes: ``ceil(len / data)``."""
        if segment_len < 0:
            raise TaskError(f"segment length must be >= 0, got {segment_len}")
        return -(-segment_len // self.data_shards)


@dataclass(frozen=True, kw_only=True)
class ObjectInfo:
    """An object as the chain knows it.

    ``checksums`` holds the primary integrity hash first, then one 32-byte sha256 per EC piece
    index (so ``checksums[1 + i]`` belongs to redundancy index ``i``). A list is accepted and
    stored as a tuple.
    """

    id: int
    bucket: str
    name: str
    owner: str
    size: int
    checksums: tuple[bytes, ...]
    content_type: str = "application/octet-stream"
    create_height: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.checksums, list):
            object.__setattr__(self, "checksums", tuple(self.checksums))
        _check_types(self)
        if self.id < 0:
            raise TaskError(f"object id must be >= 0, got {self.id}")
        if self.size < 0:
            raise TaskError(f"object size must be >= 0, got {self.size}")
        if self.create_height < 0:
            raise TaskError(f"create_height must be >= 0, got {self.create_height}")


@dataclass(frozen=True, kw_only=True)
class BucketInfo:
    """The minimal bucket facts a download needs (who pays for reads, who serves them)."""

    id: int
    name: str
    owner: str
    primary_sp: str = ""

    def __post_init__(self) -> None:
        _check_types(self)
        if self.id < 0:
            raise TaskError(f"bucket id must be >= 0, got {self.id}")


@dataclass(frozen=True)
class ResourceEstimate:
    """What a task needs while it runs: ``memory`` bytes, at ``priority`` (0..255)."""

    memory: int
    priority: int

    @property
    def level(self) -> PriorityLevel:
        """The limiter class of this estimate."""
        return priority_level(self.priority)


# ---------------------------------------------------------------------------------------------
# Tasks


@dataclass(kw_only=True)
class Task:
    """Base of every task. Subclasses set :attr:`type` and :attr:`KEY_PREFIX`.

    Retry semantics (as in the Go original): ``retry`` counts the attempts already made beyond
    what ``max_retry`` allows only when ``retry > max_retry``; so with ``max_retry = 3`` the task
    may be (re)tried while ``retry`` is 0, 1, 2 or 3, and :meth:`exceeds_retry` is true from
    ``retry == 4`` on. ``max_retry = 0`` means: one attempt, no retries once ``retry`` is bumped.

    ``update_time`` left at its default (0) is set to ``create_time``.
    """

    type: ClassVar[TaskType]
    KEY_PREFIX: ClassVar[str]

    priority: int = 0
    create_time: float = field(default_factory=time.time)
    update_time: float = 0.0
    timeout: float = 60.0
    retry: int = 0
    max_retry: int = 0
    error: str = ""
    user_address: str = ""

    def __setattr__(self, name: str, value: Any) -> None:
        """Validate ``priority`` on every assignment (construction included)."""
        if name == "priority":
            _check_priority(value)
        super().__setattr__(name, value)

    def __post_init__(self) -> None:
        if self.update_time == 0.0:
            self.update_time = self.create_time
        _check_types(self)
        self._validate()

    def _validate(self) -> None:
        """Check field values; subclasses extend this (and call ``super()._validate()``)."""
        for name in ("create_time", "update_time", "timeout"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise TaskError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.retry < 0 or self.max_retry < 0:
            raise TaskError(f"retry/max_retry must be >= 0, got {self.retry}/{self.max_retry}")

    # -- identity ------------------------------------------------------------------------------

    def _key_parts(self) -> list[str]:
        raise NotImplementedError

    @property
    def key(self) -> str:
        """The task's TKey, e.g. ``Uploading-bucket:B-object:O-id:7``; stable over its life."""
        return KEY_DELIMITER.join([self.KEY_PREFIX, *self._key_parts()])

    @property
    def level(self) -> PriorityLevel:
        """The priority level (limiter class) of this task."""
        return priority_level(self.priority)

    # -- time and retries ----------------------------------------------------------------------

    def exceeds_timeout(self, now: float | None = None) -> bool:
        """True when ``update_time + timeout < now`` (``now`` defaults to the wall clock)."""
        if now is None:
            now = time.time()
        return self.update_time + self.timeout < now

    def exceeds_retry(self) -> bool:
        """True when ``retry > max_retry`` (Go semantics; see the class docstring)."""
        return self.retry > self.max_retry

    def expired(self, now: float | None = None) -> bool:
        """True when the task both timed out and used up its retries (as in the Go original)."""
        return self.exceeds_timeout(now) and self.exceeds_retry()

    def touch(self, now: float | None = None) -> None:
        """Set ``update_time`` to ``now`` (default: the wall clock)."""
        self.update_time = time.time() if now is None else float(now)

    def inc_retry(self) -> None:
        """Count one more attempt."""
        self.retry += 1

    def set_error(self, err: BaseException | str | None) -> None:
        """Record an error (an exception is stored as ``"Type: message"``); None clears it."""
        if err is None:
            self.error = ""
        elif isinstance(err, BaseException):
            self.error = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        else:
            self.error = str(err)

    # -- resources -----------------------------------------------------------------------------

    def _memory(self) -> int:
        return SMALL_TASK_MEMORY

    def estimate(self) -> ResourceEstimate:
        """The resources this task needs while it runs."""
        return ResourceEstimate(memory=self._memory(), priority=self.priority)


def _object_parts(obj: ObjectInfo) -> list[str]:
    return [f"bucket:{obj.bucket}", f"object:{obj.name}", f"id:{obj.id}"]


def _buffered_segment(obj: ObjectInfo, params: StorageParams) -> int:
    """Bytes of one segment buffer: the segment size, capped by the object size."""
    return min(params.segment_size, obj.size)


@dataclass(kw_only=True)
class CreateBucketApprovalTask(Task):
    """Ask the primary SP to approve (sign) a bucket creation by ``account``."""

    type: ClassVar[TaskType] = TaskType.CreateBucketApproval
    KEY_PREFIX: ClassVar[str] = "CreateBucketApproval"

    bucket: str
    account: str
    expiry_height: int = 0
    approver_signature: bytes = b""
    priority: int = DEFAULT_PRIORITY[TaskType.CreateBucketApproval]
    timeout: float = 10.0

    def _key_parts(self) -> list[str]:
        return [f"bucket:{self.bucket}", f"account:{self.account}"]


@dataclass(kw_only=True)
class CreateObjectApprovalTask(Task):
    """Ask the primary SP to approve (sign) an object creation (``object.id`` may still be 0)."""

    type: ClassVar[TaskType] = TaskType.CreateObjectApproval
    KEY_PREFIX: ClassVar[str] = "CreateObjectApproval"

    object: ObjectInfo
    expiry_height: int = 0
    approver_signature: bytes = b""
    priority: int = DEFAULT_PRIORITY[TaskType.CreateObjectApproval]
    timeout: float = 10.0

    def _key_parts(self) -> list[str]:
        return [
            f"bucket:{self.object.bucket}",
            f"object:{self.object.name}",
            f"account:{self.object.owner}",
        ]


@dataclass(kw_only=True)
class ReplicatePieceApprovalTask(Task):
    """Ask a candidate secondary SP (``approved_sp``) to accept the pieces of an object."""

    type: ClassVar[TaskType] = TaskType.ReplicatePieceApproval
    KEY_PREFIX: ClassVar[str] = "ReplicatePieceApproval"

    object: ObjectInfo
    params: StorageParams
    expiry_height: int = 0
    approved_sp: str = ""
    approved_sp_endpoint: str = ""
    approver_signature: bytes = b""
    priority: int = DEFAULT_PRIORITY[TaskType.ReplicatePieceApproval]
    timeout: float = 10.0

    def _key_parts(self) -> list[str]:
        return _object_parts(self.object)


@dataclass(kw_only=True)
class UploadObjectTask(Task):
    """Store a user's payload on the primary SP. Memory: 2 x segment (capped by object size)."""

    type: ClassVar[TaskType] = TaskType.UploadObject
    KEY_PREFIX: ClassVar[str] = "Uploading"

    object: ObjectInfo
    params: StorageParams
    priority: int = DEFAULT_PRIORITY[TaskType.UploadObject]
    timeout: float = 300.0

    def _key_parts(self) -> list[str]:
        return _object_parts(self.object)

    def _memory(self) -> int:
        return max(2 * _buffered_segment(self.object, self.params), SMALL_TASK_MEMORY)


@dataclass(kw_only=True)
class ReplicatePieceTask(Task):
    """Send the EC pieces of an object to its secondaries and collect their signatures.

    ``secondaries[i]`` is the operator address receiving redundancy index ``i``;
    ``secondary_signatures[i]`` its signature (empty bytes while missing).
    Memory (the estimate): one segment's pieces, segment x (data + parity) / data, rounded up,
    segment capped by object size: what replication needs to run, one segment at a time. The
    executor reserves :meth:`read_ahead_memory` more when the limiter has room, to read and
    encode the next segments while earlier ones are sent.
    """

    type: ClassVar[TaskType] = TaskType.ReplicatePiece
    KEY_PREFIX: ClassVar[str] = "ReplicatePiece"

    object: ObjectInfo
    params: StorageParams
    secondaries: list[str] = field(default_factory=list)
    secondary_signatures: list[bytes] = field(default_factory=list)
    #: wall time of the earliest signature (a secondary's seal deadline starts about then)
    signed_at: float = 0.0
    sealed: bool = False
    #: how many times this object was replicated again because its seal came too late
    #: (SealTooLate); the manager stops after ``Manager.max_late_seals``
    late_seals: int = 0
    priority: int = DEFAULT_PRIORITY[TaskType.ReplicatePiece]
    timeout: float = 300.0
    max_retry: int = 3

    def _key_parts(self) -> list[str]:
        return _object_parts(self.object)

    def _memory(self) -> int:
        return max(self.segment_memory(), SMALL_TASK_MEMORY)

    def segment_memory(self) -> int:
        """Bytes of one segment's pieces (data + parity)."""
        seg = _buffered_segment(self.object, self.params)
        return -(-seg * self.params.total_shards // self.params.data_shards)

    def read_ahead_memory(self, in_flight: int) -> int:
        """What the executor reserves on top of :meth:`estimate` (when the limiter has room)
        to keep ``in_flight`` segments in flight (``executor.segments_in_flight``): 0 for a
        one-segment object."""
        segments = self.params.segment_count(self.object.size)
        return self.segment_memory() * max(0, min(in_flight, segments) - 1)


@dataclass(kw_only=True)
class SealObjectTask(Task):
    """Seal an object on chain with the secondaries' signatures (no payload in memory)."""

    type: ClassVar[TaskType] = TaskType.SealObject
    KEY_PREFIX: ClassVar[str] = "SealObject"

    object: ObjectInfo
    params: StorageParams
    secondaries: list[str] = field(default_factory=list)
    secondary_signatures: list[bytes] = field(default_factory=list)
    #: the replication's ``signed_at``: past it plus the secondaries' seal_confirm_timeout
    #: they may have dropped their pieces, and the seal must not be sent (0: unknown)
    signed_at: float = 0.0
    #: the replication's ``late_seals`` (see :class:`ReplicatePieceTask`)
    late_seals: int = 0
    priority: int = DEFAULT_PRIORITY[TaskType.SealObject]
    timeout: float = 120.0
    max_retry: int = 3

    def _key_parts(self) -> list[str]:
        return _object_parts(self.object)


@dataclass(kw_only=True)
class ReceivePieceTask(Task):
    """On a secondary: receive the pieces of one redundancy index of an object.

    ``piece_checksums[s]`` is the sha256 of the piece of segment ``s`` received so far;
    ``integrity_hash`` the hash over them and ``signature`` this SP's signature of it;
    ``sealed`` becomes true once the object is confirmed sealed on chain.
    Memory: 2 x piece size of a full segment.
    """

    type: ClassVar[TaskType] = TaskType.ReceivePiece
    KEY_PREFIX: ClassVar[str] = "ReceivePiece"

    object: ObjectInfo
    params: StorageParams
    redundancy_index: int
    piece_checksums: list[bytes] = field(default_factory=list)
    integrity_hash: bytes = b""
    signature: bytes = b""
    sealed: bool = False
    priority: int = DEFAULT_PRIORITY[TaskType.ReceivePiece]
    timeout: float = 300.0

    def _validate(self) -> None:
        super()._validate()
        if not 0 <= self.redundancy_index < self.params.total_shards:
            raise TaskError(
                f"redundancy_index must be in 0..{self.params.total_shards - 1}, "
                f"got {self.redundancy_index}"
            )

    def _key_parts(self) -> list[str]:
        return [*_object_parts(self.object), f"rIdx:{self.redundancy_index}"]

    def _memory(self) -> int:
        piece = self.params.piece_size(_buffered_segment(self.object, self.params))
        return max(2 * piece, SMALL_TASK_MEMORY)


@dataclass(kw_only=True)
class DownloadObjectTask(Task):
    """Serve bytes ``low..high`` (inclusive) of an object. Memory: one segment."""

    type: ClassVar[TaskType] = TaskType.DownloadObject
    KEY_PREFIX: ClassVar[str] = "Download"

    object: ObjectInfo
    bucket: BucketInfo
    params: StorageParams
    low: int
    high: int
    priority: int = DEFAULT_PRIORITY[TaskType.DownloadObject]
    timeout: float = 300.0

    def _validate(self) -> None:
        super()._validate()
        if self.low < 0 or self.high < self.low:
            raise TaskError(f"invalid byte range {self.low}..{self.high}")

    def _key_parts(self) -> list[str]:
        return [*_object_parts(self.object), f"low:{self.low}", f"high:{self.high}"]

    def _memory(self) -> int:
        return max(_buffered_segment(self.object, self.params), SMALL_TASK_MEMORY)


@dataclass(kw_only=True)
class ChallengePieceTask(Task):
    """Answer a challenge of one segment's piece; ``redundancy_index`` -1 means the primary
    segment itself. Memory: one segment."""

    type: ClassVar[TaskType] = TaskType.ChallengePiece
    KEY_PREFIX: ClassVar[str] = "ChallengePiece"

    object: ObjectInfo
    params: StorageParams
    segment: int
    redundancy_index: int
    priority: int = DEFAULT_PRIORITY[TaskType.ChallengePiece]
    timeout: float = 60.0

    def _validate(self) -> None:
        super()._validate()
        if self.segment < 0:
            raise TaskError(f"segment must be >= 0, got {self.segment}")
        if not -1 <= self.redundancy_index < self.params.total_shards:
            raise TaskError(
                f"redundancy_index must be in -1..{self.params.total_shards - 1}, "
                f"got {self.redundancy_index}"
            )

    def _key_parts(self) -> list[str]:
        return [
            *_object_parts(self.object),
            f"segment:{self.segment}",
            f"rIdx:{self.redundancy_index}",
        ]

    def _memory(self) -> int:
        return max(_buffered_segment(self.object, self.params), SMALL_TASK_MEMORY)


@dataclass(kw_only=True)
class GCObjectTask(Task):
    """Delete the pieces of objects deleted on chain between two block heights."""

    type: ClassVar[TaskType] = TaskType.GCObject
    KEY_PREFIX: ClassVar[str] = "GCObject"

    start_height: int
    end_height: int
    current_height: int = 0
    last_deleted_object_id: int = 0
    priority: int = DEFAULT_PRIORITY[TaskType.GCObject]
    timeout: float = 600.0
    max_retry: int = 3

    def _validate(self) -> None:
        super()._validate()
        if self.start_height < 0 or self.end_height < self.start_height:
            raise TaskError(f"invalid height range {self.start_height}..{self.end_height}")

    def _key_parts(self) -> list[str]:
        return [f"start:{self.start_height}", f"end:{self.end_height}"]


@dataclass(kw_only=True)
class GCZombiePieceTask(Task):
    """Delete stored pieces of object ids in a range that no longer exist on chain."""

    type: ClassVar[TaskType] = TaskType.GCZombiePiece
    KEY_PREFIX: ClassVar[str] = "GCZombiePiece"

    start_object_id: int
    end_object_id: int
    priority: int = DEFAULT_PRIORITY[TaskType.GCZombiePiece]
    timeout: float = 600.0
    max_retry: int = 3

    def _validate(self) -> None:
        super()._validate()
        if self.start_object_id < 0 or self.end_object_id < self.start_object_id:
            raise TaskError(f"invalid id range {self.start_object_id}..{self.end_object_id}")

    def _key_parts(self) -> list[str]:
        return [f"start:{self.start_object_id}", f"end:{self.end_object_id}"]


@dataclass(kw_only=True)
class GCMetaTask(Task):
    """Delete stale metadata rows; the key names the task by its (whole-second) create time."""

    type: ClassVar[TaskType] = TaskType.GCMeta
    KEY_PREFIX: ClassVar[str] = "GCMeta"

    current_idx: int = 0
    delete_count: int = 0
    priority: int = DEFAULT_PRIORITY[TaskType.GCMeta]
    timeout: float = 600.0
    max_retry: int = 3

    def _key_parts(self) -> list[str]:
        return [f"time:{int(self.create_time)}"]


#: The task class of each task type.
TASK_CLASSES: Mapping[TaskType, type[Task]] = types.MappingProxyType(
    {
        cls.type: cls
        for cls in (
            CreateBucketApprovalTask,
            CreateObjectApprovalTask,
            ReplicatePieceApprovalTask,
            UploadObjectTask,
            ReplicatePieceTask,
            SealObjectTask,
            ReceivePieceTask,
            DownloadObjectTask,
            ChallengePieceTask,
            GCObjectTask,
            GCZombiePieceTask,
            GCMetaTask,
        )
    }
)


def key_prefix(task_type: TaskType | str) -> str:
    """The key prefix shared by every task of ``task_type``, delimiter included.

    ``key_prefix(TaskType.UploadObject) == "Uploading-"``; use it with ``query_tasks``.
    """
    try:
        cls = TASK_CLASSES[TaskType(task_type)]
    except ValueError as exc:
        raise TaskError(f"unknown task type {task_type!r}") from exc
    return cls.KEY_PREFIX + KEY_DELIMITER


# ---------------------------------------------------------------------------------------------
# Field type checking and the msgpack wire format

_VALUE_TYPES: tuple[type, ...] = (ObjectInfo, StorageParams, BucketInfo)


def _build_schemas() -> Mapping[type, tuple[tuple[str, Any], ...]]:
    classes = (*_VALUE_TYPES, *TASK_CLASSES.values())
    return types.MappingProxyType(
        {
            cls: tuple(
                (f.name, typing.get_type_hints(cls)[f.name]) for f in dataclasses.fields(cls)
            )
            for cls in classes
        }
    )


def _schema(cls: type) -> tuple[tuple[str, Any], ...]:
    try:
        return _SCHEMAS[cls]
    except KeyError as exc:
        raise TaskError(f"{cls.__name__} is not a known task or value type") from exc


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or repr(tp)


def _check_value(tp: Any, value: Any, path: str) -> None:
    """Raise TaskError unless ``value`` is of the (simple) field type ``tp``."""
    origin = typing.get_origin(tp)
    if origin is tuple or origin is list:
        if not isinstance(value, origin):
            raise TaskError(f"{path}: expected {origin.__name__}, got {type(value).__name__}")
        (item_tp, *_) = typing.get_args(tp)
        for i, item in enumerate(value):
            _check_value(item_tp, item, f"{path}[{i}]")
        return
    if tp is float:
        ok = isinstance(value, float)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise TaskError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__}")


@functools.cache
def _is_ok(tp: Any) -> Callable[[Any], bool]:
    """A predicate for :func:`_check_value`'s rule, made once per field type (every task and
    approval is checked on construction: this is on the approval responder's path)."""
    origin = typing.get_origin(tp)
    if origin is tuple or origin is list:
        item_ok = _is_ok(typing.get_args(tp)[0])
        return lambda v: isinstance(v, origin) and all(map(item_ok, v))
    if tp is int:
        return lambda v: isinstance(v, int) and not isinstance(v, bool)
    if tp is float:
        return lambda v: isinstance(v, float)
    return lambda v: isinstance(v, tp)


def _check_types(obj: Any) -> None:
    cls = type(obj)
    for name, tp in _schema(cls):
        value = getattr(obj, name)
        if not _is_ok(tp)(value):
            _check_value(tp, value, f"{cls.__name__}.{name}")  # raises, saying where
        if tp is int and not -(2**63) <= value <= _UINT64_MAX:
            raise TaskError(f"{cls.__name__}.{name}: {value} does not fit 64 bits")


def _to_wire(tp: Any, value: Any) -> Any:
    if dataclasses.is_dataclass(tp):
        return {name: _to_wire(ftp, getattr(value, name)) for name, ftp in _schema(tp)}
    if typing.get_origin(tp) in (tuple, list):
        (item_tp, *_) = typing.get_args(tp)
        return [_to_wire(item_tp, item) for item in value]
    return value


def _from_wire(tp: Any, value: Any, path: str) -> Any:
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return tp(**_fields_from_wire(tp, value, path))
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        if not isinstance(value, list):
            raise TaskError(f"{path}: expected a list, got {type(value).__name__}")
        (item_tp, *_) = typing.get_args(tp)
        items = [_from_wire(item_tp, item, f"{path}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    _check_value(tp, value, path)
    return value


def _fields_from_wire(cls: type, value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TaskError(f"{path}: expected a map of fields, got {type(value).__name__}")
    schema = _schema(cls)
    names = {name for name, _ in schema}
    # a field with a default may be absent: a row written before that field existed
    defaulted = {f.name for f in dataclasses.fields(cls)
                 if f.default is not dataclasses.MISSING
                 or f.default_factory is not dataclasses.MISSING}
    missing = sorted(names - value.keys() - defaulted)
    if missing:
        raise TaskError(f"{path}: missing field(s) {', '.join(missing)}")
    unknown = sorted(str(k) for k in value.keys() - names)
    if unknown:
        raise TaskError(f"{path}: unknown field(s) {', '.join(unknown)}")
    return {name: _from_wire(tp, value[name], f"{path}.{name}") for name, tp in schema
            if name in value}


def encode_task(task: Task) -> bytes:
    """Serialize a task to msgpack: ``{"v": version, "type": TaskType, "fields": {...}}``."""
    if not isinstance(task, Task) or type(task) not in TASK_CLASSES.values():
        raise TaskError(f"not a task: {type(task).__name__}")
    _check_types(task)
    payload = {
        "v": TASK_FORMAT_VERSION,
        "type": str(task.type),
        "fields": _to_wire(type(task), task),
    }
    try:
        return msgpack.packb(payload, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise TaskError(f"cannot encode {task.type} task: {exc}") from exc


def decode_task(data: bytes) -> Task:
    """Parse bytes written by :func:`encode_task`. Raises TaskError on anything malformed."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TaskError(f"task data must be bytes, got {type(data).__name__}")
    try:
        payload = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        raise TaskError(f"task data is not valid msgpack: {type(exc).__name__}: {exc}") from exc
    if not isinstance(payload, dict) or set(payload) != {"v", "type", "fields"}:
        raise TaskError("task data is not a task envelope {v, type, fields}")
    if payload["v"] != TASK_FORMAT_VERSION or isinstance(payload["v"], bool):
        raise TaskError(f"unsupported task format version {payload['v']!r}")
    tag = payload["type"]
    if not isinstance(tag, str) or tag not in TaskType.__members__:
        raise TaskError(f"unknown task type {tag!r}")
    cls = TASK_CLASSES[TaskType(tag)]
    try:
        return cls(**_fields_from_wire(cls, payload["fields"], cls.__name__))
    except RecursionError as exc:  # pragma: no cover - defensive
        raise TaskError(f"task data too deeply nested: {exc}") from exc


_SCHEMAS = _build_schemas()
