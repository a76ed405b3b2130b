"""Tests of node.tasks: keys, priorities, timeouts/retries, estimates and the wire format."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.errors import TaskError
from node.tasks import (
    HIGH_PRIORITY_FLOOR,
    LOW_PRIORITY_CEILING,
    SMALL_TASK_MEMORY,
    TASK_CLASSES,
    BucketInfo,
    ChallengePieceTask,
    CreateBucketApprovalTask,
    CreateObjectApprovalTask,
    DownloadObjectTask,
    GCMetaTask,
    GCObjectTask,
    GCZombiePieceTask,
    ObjectInfo,
    PriorityLevel,
    ReceivePieceTask,
    ReplicatePieceApprovalTask,
    ReplicatePieceTask,
    ResourceEstimate,
    SealObjectTask,
    StorageParams,
    Task,
    TaskType,
    UploadObjectTask,
    decode_task,
    encode_task,
    key_prefix,
    priority_level,
    transfer_timeout,
)

MiB = 1024 * 1024
PARAMS = StorageParams(segment_size=16 * MiB, data_shards=4, parity_shards=2, max_payload=1 << 36)
OBJ = ObjectInfo(
    id=7,
    bucket="B",
    name="O",
    owner="0xabc",
    size=100 * MiB,
    checksums=(b"\x01" * 32, *(bytes([i]) * 32 for i in range(6))),
)
BUCKET = BucketInfo(id=3, name="B", owner="0xabc", primary_sp="0xsp")


def sample_tasks() -> list[Task]:
    """One task of every type, all about object B/O id 7."""
    return [
        CreateBucketApprovalTask(bucket="B", account="0xabc", create_time=1000.0),
        CreateObjectApprovalTask(object=OBJ, create_time=1000.0),
        ReplicatePieceApprovalTask(object=OBJ, params=PARAMS, create_time=1000.0),
        UploadObjectTask(object=OBJ, params=PARAMS, create_time=1000.0),
        ReplicatePieceTask(object=OBJ, params=PARAMS, create_time=1000.0),
        SealObjectTask(object=OBJ, params=PARAMS, create_time=1000.0),
        ReceivePieceTask(object=OBJ, params=PARAMS, redundancy_index=2, create_time=1000.0),
        DownloadObjectTask(
            object=OBJ, bucket=BUCKET, params=PARAMS, low=0, high=99, create_time=1000.0
        ),
        ChallengePieceTask(
            object=OBJ, params=PARAMS, segment=3, redundancy_index=1, create_time=1000.0
        ),
        GCObjectTask(start_height=100, end_height=200, create_time=1000.0),
        GCZombiePieceTask(start_object_id=1, end_object_id=9, create_time=1000.0),
        GCMetaTask(create_time=1000.0),
    ]


# ---------------------------------------------------------------------------------------------
# Hypothesis strategies

u63 = st.integers(min_value=0, max_value=2**63 - 1)
times = st.floats(min_value=0, max_value=1e12, allow_nan=False, allow_infinity=False)
names = st.text(max_size=20)
sigs = st.binary(max_size=65)

params_st = st.builds(
    StorageParams,
    segment_size=st.integers(1, 64 * MiB),
    data_shards=st.integers(1, 16),
    parity_shards=st.integers(0, 16),
    max_payload=u63,
)
object_st = st.builds(
    ObjectInfo,
    id=u63,
    bucket=names,
    name=names,
    owner=names,
    size=st.integers(0, 2**40),
    checksums=st.lists(st.binary(min_size=32, max_size=32), max_size=8).map(tuple),
    content_type=names,
    create_height=u63,
)
bucket_st = st.builds(BucketInfo, id=u63, name=names, owner=names, primary_sp=names)


def base_kwargs() -> dict[str, st.SearchStrategy]:
    return {
        "priority": st.integers(0, 255),
        "create_time": times,
        "update_time": times,
        "timeout": times,
        "retry": st.integers(0, 100),
        "max_retry": st.integers(0, 100),
        "error": st.text(max_size=40),
        "user_address": names,
    }


@st.composite
def any_task(draw: st.DrawFn) -> Task:
    kind = draw(st.sampled_from(list(TaskType)))
    kw = {k: draw(v) for k, v in base_kwargs().items()}
    params = draw(params_st)
    obj = draw(object_st)
    if kind is TaskType.CreateBucketApproval:
        kw |= {
            "bucket": draw(names),
            "account": draw(names),
            "expiry_height": draw(u63),
            "approver_signature": draw(sigs),
        }
    elif kind is TaskType.CreateObjectApproval:
        kw |= {"object": obj, "expiry_height": draw(u63), "approver_signature": draw(sigs)}
    elif kind is TaskType.ReplicatePieceApproval:
        kw |= {
            "object": obj,
            "params": params,
            "expiry_height": draw(u63),
            "approved_sp": draw(names),
            "approved_sp_endpoint": draw(names),
            "approver_signature": draw(sigs),
        }
    elif kind is TaskType.UploadObject:
        kw |= {"object": obj, "params": params}
    elif kind in (TaskType.ReplicatePiece, TaskType.SealObject):
        kw |= {
            "object": obj,
            "params": params,
            "secondaries": draw(st.lists(names, max_size=6)),
            "secondary_signatures": draw(st.lists(sigs, max_size=6)),
        }
        if kind is TaskType.ReplicatePiece:
            kw["sealed"] = draw(st.booleans())
    elif kind is TaskType.ReceivePiece:
        kw |= {
            "object": obj,
            "params": params,
            "redundancy_index": draw(st.integers(0, params.total_shards - 1)),
            "piece_checksums": draw(st.lists(sigs, max_size=6)),
            "integrity_hash": draw(sigs),
            "signature": draw(sigs),
            "sealed": draw(st.booleans()),
        }
    elif kind is TaskType.DownloadObject:
        low = draw(u63)
        kw |= {
            "object": obj,
            "bucket": draw(bucket_st),
            "params": params,
            "low": low,
            "high": draw(st.integers(low, 2**63 - 1)),
        }
    elif kind is TaskType.ChallengePiece:
        kw |= {
            "object": obj,
            "params": params,
            "segment": draw(st.integers(0, 10_000)),
            "redundancy_index": draw(st.integers(-1, params.total_shards - 1)),
        }
    elif kind is TaskType.GCObject:
        start = draw(u63)
        kw |= {
            "start_height": start,
            "end_height": draw(st.integers(start, 2**63 - 1)),
            "current_height": draw(u63),
            "last_deleted_object_id": draw(u63),
        }
    elif kind is TaskType.GCZombiePiece:
        start = draw(u63)
        kw |= {"start_object_id": start, "end_object_id": draw(st.integers(start, 2**63 - 1))}
    else:
        kw |= {"current_idx": draw(u63), "delete_count": draw(u63)}
    return TASK_CLASSES[kind](**kw)


# ---------------------------------------------------------------------------------------------
# Round trip


@settings(max_examples=400)
@given(any_task())
def test_round_trip_every_type(task: Task) -> None:
    data = encode_task(task)
    back = decode_task(data)
    assert type(back) is type(task)
    assert back == task
    assert back.key == task.key
    assert encode_task(back) == data


def test_round_trip_keeps_container_types() -> None:
    task = ReplicatePieceTask(
        object=OBJ, params=PARAMS, secondaries=["a", "b"], secondary_signatures=[b"s", b""]
    )
    back = decode_task(encode_task(task))
    assert isinstance(back, ReplicatePieceTask)
    assert isinstance(back.object.checksums, tuple)
    assert all(isinstance(c, bytes) for c in back.object.checksums)
    assert back.secondaries == ["a", "b"] and isinstance(back.secondaries, list)
    assert back.secondary_signatures == [b"s", b""]
    assert isinstance(back.object, ObjectInfo) and isinstance(back.params, StorageParams)


def test_every_type_has_a_class() -> None:
    assert set(TASK_CLASSES) == set(TaskType)
    assert len(TaskType) == 12
    for kind, cls in TASK_CLASSES.items():
        assert cls.type is kind
    assert {t.type for t in sample_tasks()} == set(TaskType)
    for task in sample_tasks():
        assert decode_task(encode_task(task)) == task


# ---------------------------------------------------------------------------------------------
# Keys


def test_keys_match_the_go_format() -> None:
    keys = {t.type: t.key for t in sample_tasks()}
    assert keys == {
        TaskType.CreateBucketApproval: "CreateBucketApproval-bucket:B-account:0xabc",
        TaskType.CreateObjectApproval: "CreateObjectApproval-bucket:B-object:O-account:0xabc",
        TaskType.ReplicatePieceApproval: "ReplicatePieceApproval-bucket:B-object:O-id:7",
        TaskType.UploadObject: "Uploading-bucket:B-object:O-id:7",
        TaskType.ReplicatePiece: "ReplicatePiece-bucket:B-object:O-id:7",
        TaskType.SealObject: "SealObject-bucket:B-object:O-id:7",
        TaskType.ReceivePiece: "ReceivePiece-bucket:B-object:O-id:7-rIdx:2",
        TaskType.DownloadObject: "Download-bucket:B-object:O-id:7-low:0-high:99",
        TaskType.ChallengePiece: "ChallengePiece-bucket:B-object:O-id:7-segment:3-rIdx:1",
        TaskType.GCObject: "GCObject-start:100-end:200",
        TaskType.GCZombiePiece: "GCZombiePiece-start:1-end:9",
        TaskType.GCMeta: "GCMeta-time:1000",
    }


def test_keys_distinct_and_prefixes_select_one_type() -> None:
    tasks = sample_tasks()
    keys = [t.key for t in tasks]
    assert len(set(keys)) == len(keys)
    for task in tasks:
        prefix = key_prefix(task.type)
        assert [t.type for t in tasks if t.key.startswith(prefix)] == [task.type]
    assert key_prefix("UploadObject") == "Uploading-"
    with pytest.raises(TaskError):
        key_prefix("NoSuchType")


def test_key_is_stable_while_state_changes() -> None:
    task = ReplicatePieceTask(object=OBJ, params=PARAMS)
    key = task.key
    task.touch(5.0)
    task.inc_retry()
    task.set_error("boom")
    task.priority = 10
    task.sealed = True
    task.secondaries.append("0xsec")
    assert task.key == key
    gc = GCObjectTask(start_height=1, end_height=2)
    gc_key = gc.key
    gc.current_height = 2
    gc.last_deleted_object_id = 99
    assert gc.key == gc_key


# ---------------------------------------------------------------------------------------------
# Priority


@pytest.mark.parametrize("priority", [0, 1, 84, 85, 169, 170, 254, 255])
def test_valid_priorities(priority: int) -> None:
    task = UploadObjectTask(object=OBJ, params=PARAMS, priority=priority)
    assert task.priority == priority
    assert task.estimate().priority == priority


@pytest.mark.parametrize("priority", [-1, 256, 1000, 1.5, "1", True, None])
def test_invalid_priorities(priority: object) -> None:
    with pytest.raises(TaskError):
        UploadObjectTask(object=OBJ, params=PARAMS, priority=priority)  # type: ignore[arg-type]
    task = UploadObjectTask(object=OBJ, params=PARAMS)
    with pytest.raises(TaskError):
        task.priority = priority  # type: ignore[assignment]
    assert task.priority == 150


def test_priority_levels_and_defaults() -> None:
    assert priority_level(0) is PriorityLevel.LOW
    assert priority_level(LOW_PRIORITY_CEILING - 1) is PriorityLevel.LOW
    assert priority_level(LOW_PRIORITY_CEILING) is PriorityLevel.MEDIUM
    assert priority_level(HIGH_PRIORITY_FLOOR - 1) is PriorityLevel.MEDIUM
    assert priority_level(HIGH_PRIORITY_FLOOR) is PriorityLevel.HIGH
    assert priority_level(255) is PriorityLevel.HIGH
    with pytest.raises(TaskError):
        priority_level(256)
    levels = {t.type: t.level for t in sample_tasks()}
    for kind in (TaskType.GCObject, TaskType.GCZombiePiece, TaskType.GCMeta):
        assert levels[kind] is PriorityLevel.LOW
    for kind in (
        TaskType.UploadObject,
        TaskType.ReplicatePiece,
        TaskType.SealObject,
        TaskType.ReceivePiece,
    ):
        assert levels[kind] is PriorityLevel.MEDIUM
    for kind in (
        TaskType.CreateBucketApproval,
        TaskType.CreateObjectApproval,
        TaskType.ReplicatePieceApproval,
        TaskType.DownloadObject,
        TaskType.ChallengePiece,
    ):
        assert levels[kind] is PriorityLevel.HIGH


# ---------------------------------------------------------------------------------------------
# Time, retries, errors


def test_update_time_defaults_to_create_time() -> None:
    task = GCMetaTask(create_time=123.5)
    assert task.update_time == 123.5
    task = GCMetaTask(create_time=123.5, update_time=200.0)
    assert task.update_time == 200.0


def test_exceeds_timeout_with_explicit_now() -> None:
    task = SealObjectTask(object=OBJ, params=PARAMS, create_time=1000.0, timeout=30.0)
    assert not task.exceeds_timeout(now=1000.0)
    assert not task.exceeds_timeout(now=1030.0)  # strictly greater is needed
    assert task.exceeds_timeout(now=1030.001)
    task.touch(now=1025.0)
    assert task.update_time == 1025.0
    assert not task.exceeds_timeout(now=1050.0)
    assert task.exceeds_timeout(now=1056.0)


def test_exceeds_retry_uses_go_semantics() -> None:
    task = ReplicatePieceTask(object=OBJ, params=PARAMS, max_retry=2)
    seen = []
    for _ in range(4):
        seen.append((task.retry, task.exceeds_retry()))
        task.inc_retry()
    assert seen == [(0, False), (1, False), (2, False), (3, True)]
    no_retry = UploadObjectTask(object=OBJ, params=PARAMS)
    assert no_retry.max_retry == 0 and not no_retry.exceeds_retry()
    no_retry.inc_retry()
    assert no_retry.exceeds_retry()


def test_expired_needs_both_timeout_and_retries() -> None:
    task = GCObjectTask(start_height=1, end_height=2, create_time=100.0, timeout=10.0, max_retry=1)
    late = 200.0
    assert task.exceeds_timeout(late) and not task.exceeds_retry()
    assert not task.expired(now=late)
    task.retry = 2
    assert task.exceeds_retry()
    assert not task.expired(now=105.0)
    assert task.expired(now=late)


def test_set_error() -> None:
    task = GCMetaTask()
    assert task.error == ""
    task.set_error("disk full")
    assert task.error == "disk full"
    task.set_error(ValueError("bad piece"))
    assert task.error == "ValueError: bad piece"
    task.set_error(TimeoutError())
    assert task.error == "TimeoutError"
    task.set_error(None)
    assert task.error == ""


@pytest.mark.parametrize(
    "field,value",
    [("timeout", -1.0), ("create_time", float("nan")), ("retry", -1), ("max_retry", -2)],
)
def test_invalid_base_fields(field: str, value: object) -> None:
    with pytest.raises(TaskError):
        GCMetaTask(**{field: value})  # type: ignore[arg-type]


def test_invalid_specific_fields() -> None:
    with pytest.raises(TaskError):
        ReceivePieceTask(object=OBJ, params=PARAMS, redundancy_index=6)
    with pytest.raises(TaskError):
        ChallengePieceTask(object=OBJ, params=PARAMS, segment=0, redundancy_index=-2)
    with pytest.raises(TaskError):
        DownloadObjectTask(object=OBJ, bucket=BUCKET, params=PARAMS, low=10, high=9)
    with pytest.raises(TaskError):
        GCObjectTask(start_height=5, end_height=4)
    with pytest.raises(TaskError):
        UploadObjectTask(object=OBJ, params="nope")  # type: ignore[arg-type]
    with pytest.raises(TaskError):
        ObjectInfo(id=-1, bucket="B", name="O", owner="x", size=0, checksums=())
    with pytest.raises(TaskError):
        ObjectInfo(id=1, bucket="B", name="O", owner="x", size=0, checksums=("str",))


# ---------------------------------------------------------------------------------------------
# Estimates


def test_estimates() -> None:
    est = {t.type: t.estimate() for t in sample_tasks()}
    seg = PARAMS.segment_size
    assert est[TaskType.UploadObject] == ResourceEstimate(memory=2 * seg, priority=150)
    assert est[TaskType.ReplicatePiece].memory == seg * 6 // 4
    assert est[TaskType.ReceivePiece].memory == 2 * (seg // 4)
    assert est[TaskType.DownloadObject].memory == seg
    assert est[TaskType.ChallengePiece].memory == seg
    for kind in (
        TaskType.CreateBucketApproval,
        TaskType.CreateObjectApproval,
        TaskType.ReplicatePieceApproval,
        TaskType.SealObject,
        TaskType.GCObject,
        TaskType.GCZombiePiece,
        TaskType.GCMeta,
    ):
        assert est[kind].memory == SMALL_TASK_MEMORY
    assert est[TaskType.DownloadObject].level is PriorityLevel.HIGH


def test_estimates_rounding_and_small_objects() -> None:
    odd = StorageParams(segment_size=10 * MiB + 1, data_shards=3, parity_shards=1, max_payload=0)
    task = ReplicatePieceTask(object=OBJ, params=odd)
    assert task.estimate().memory == -(-(10 * MiB + 1) * 4 // 3)
    recv = ReceivePieceTask(object=OBJ, params=odd, redundancy_index=0)
    assert recv.estimate().memory == 2 * -(-(10 * MiB + 1) // 3)
    tiny = dataclasses.replace(OBJ, size=1000)
    assert UploadObjectTask(object=tiny, params=PARAMS).estimate().memory == SMALL_TASK_MEMORY
    mid = dataclasses.replace(OBJ, size=1 * MiB)
    assert UploadObjectTask(object=mid, params=PARAMS).estimate().memory == 2 * MiB
    empty = dataclasses.replace(OBJ, size=0)
    assert ReplicatePieceTask(object=empty, params=PARAMS).estimate().memory == SMALL_TASK_MEMORY


# ---------------------------------------------------------------------------------------------
# StorageParams


def test_storage_params_helpers() -> None:
    p = StorageParams(segment_size=100, data_shards=4, parity_shards=2, max_payload=10_000)
    assert p.total_shards == 6
    assert p.segment_count(0) == 0
    assert p.segment_count(1) == 1
    assert p.segment_count(100) == 1
    assert p.segment_count(101) == 2
    assert p.segment_count(250) == 3
    assert [p.segment_len(250, i) for i in range(3)] == [100, 100, 50]
    assert [p.segment_len(200, i) for i in range(2)] == [100, 100]
    with pytest.raises(TaskError):
        p.segment_len(250, 3)
    with pytest.raises(TaskError):
        p.segment_len(0, 0)
    assert p.piece_size(100) == 25
    assert p.piece_size(50) == 13
    assert p.piece_size(1) == 1
    assert p.piece_size(0) == 0
    with pytest.raises(TaskError):
        p.segment_count(-1)


@given(size=st.integers(0, 10**12), seg=st.integers(1, 10**8))
def test_segment_lengths_sum_to_size(size: int, seg: int) -> None:
    p = StorageParams(segment_size=seg, data_shards=4, parity_shards=2, max_payload=0)
    count = p.segment_count(size)
    assert (count - 1) * seg < size <= count * seg or (size == 0 and count == 0)
    if count:
        last = p.segment_len(size, count - 1)
        assert 0 < last <= seg
        assert seg * (count - 1) + last == size


@pytest.mark.parametrize(
    "kw",
    [
        {"segment_size": 0, "data_shards": 1, "parity_shards": 0, "max_payload": 0},
        {"segment_size": 1, "data_shards": 0, "parity_shards": 0, "max_payload": 0},
        {"segment_size": 1, "data_shards": 1, "parity_shards": -1, "max_payload": 0},
        {"segment_size": 1, "data_shards": 1, "parity_shards": 0, "max_payload": -1},
        {"segment_size": 1.5, "data_shards": 1, "parity_shards": 0, "max_payload": 0},
    ],
)
def test_storage_params_validation(kw: dict[str, object]) -> None:
    with pytest.raises(TaskError):
        StorageParams(**kw)  # type: ignore[arg-type]


def test_object_checksums_list_becomes_tuple() -> None:
    obj = ObjectInfo(id=1, bucket="B", name="O", owner="x", size=0, checksums=[b"a", b"b"])
    assert obj.checksums == (b"a", b"b")


def test_transfer_timeout() -> None:
    assert transfer_timeout(0) == 30.0
    assert transfer_timeout(100 * MiB) == 100.0
    assert transfer_timeout(10**15) == 3600.0
    with pytest.raises(TaskError):
        transfer_timeout(-1)


# ---------------------------------------------------------------------------------------------
# Malformed input


def _envelope(task: Task) -> dict:
    return msgpack.unpackb(encode_task(task), raw=False)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        b"garbage that is not msgpack \xff\xfe",
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"v": 1}),
        msgpack.packb({"v": 1, "type": "UploadObject", "fields": [1]}),
        msgpack.packb({"v": 1, "type": "UploadObject", "fields": {}}),
        msgpack.packb({1: 2}),
        msgpack.packb(None),
        encode_task(GCMetaTask()) + b"\x00",
    ],
)
def test_decode_garbage(data: bytes) -> None:
    with pytest.raises(TaskError):
        decode_task(data)


def test_decode_non_bytes() -> None:
    with pytest.raises(TaskError):
        decode_task("not bytes")  # type: ignore[arg-type]


def test_decode_wrong_tag_and_version() -> None:
    env = _envelope(GCMetaTask())
    for tag in ("Nope", "uploading", 5, None, b"GCMeta"):
        with pytest.raises(TaskError, match="unknown task type"):
            decode_task(msgpack.packb({**env, "type": tag}, use_bin_type=True))
    with pytest.raises(TaskError, match="version"):
        decode_task(msgpack.packb({**env, "v": 99}))
    # a valid tag but another type's fields
    env_up = _envelope(UploadObjectTask(object=OBJ, params=PARAMS))
    with pytest.raises(TaskError):
        decode_task(msgpack.packb({**env_up, "type": "GCMeta"}, use_bin_type=True))


def test_decode_missing_and_unknown_fields() -> None:
    env = _envelope(UploadObjectTask(object=OBJ, params=PARAMS))
    fields = dict(env["fields"])
    del fields["params"]
    with pytest.raises(TaskError, match=r"missing field.*params"):
        decode_task(msgpack.packb({**env, "fields": fields}, use_bin_type=True))
    nested = dict(env["fields"])
    nested["object"] = {k: v for k, v in nested["object"].items() if k != "size"}
    with pytest.raises(TaskError, match=r"object: missing field.*size"):
        decode_task(msgpack.packb({**env, "fields": nested}, use_bin_type=True))
    extra = {**env["fields"], "surprise": 1}
    with pytest.raises(TaskError, match="unknown field"):
        decode_task(msgpack.packb({**env, "fields": extra}, use_bin_type=True))


def test_a_row_written_before_a_defaulted_field_existed_still_loads() -> None:
    """An upgrade adds fields with defaults (``signed_at``, ``late_seals``): the task rows an
    older node wrote still load, the new field at its default."""
    task = SealObjectTask(object=OBJ, params=PARAMS, secondaries=["0x" + "22" * 20],
                          secondary_signatures=[b"s"], signed_at=123.5, late_seals=2)
    env = _envelope(task)
    old = {k: v for k, v in env["fields"].items()
           if k not in ("signed_at", "retry", "late_seals")}
    back = decode_task(msgpack.packb({**env, "fields": old}, use_bin_type=True))
    assert isinstance(back, SealObjectTask)
    assert (back.signed_at, back.retry, back.late_seals) == (0.0, 0, 0)
    assert back.secondaries == task.secondaries
    assert decode_task(encode_task(task)) == task
    replicate = ReplicatePieceTask(object=OBJ, params=PARAMS, late_seals=1)
    assert decode_task(encode_task(replicate)) == replicate


@pytest.mark.parametrize(
    "path,value",
    [
        (("priority",), 300),
        (("priority",), "high"),
        (("retry",), True),
        (("create_time",), "yesterday"),
        (("error",), b"bytes not str"),
        (("object",), "not a map"),
        (("object", "checksums"), "not a list"),
        (("object", "checksums"), ["str not bytes"]),
        (("object", "id"), -5),
        (("object", "size"), 1.5),
        (("params", "data_shards"), 0),
        (("secondaries",), [1, 2]),
        (("secondary_signatures",), ["x"]),
        (("sealed",), 1),
    ],
)
def test_decode_bad_field_values(path: tuple[str, ...], value: object) -> None:
    env = _envelope(ReplicatePieceTask(object=OBJ, params=PARAMS))
    target = env["fields"]
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    with pytest.raises(TaskError):
        decode_task(msgpack.packb(env, use_bin_type=True))


def test_decode_int_for_float_is_accepted() -> None:
    task = GCMetaTask(create_time=1000.0, timeout=60.0)
    env = _envelope(task)
    env["fields"]["create_time"] = 1000
    env["fields"]["update_time"] = 1000
    env["fields"]["timeout"] = 60
    back = decode_task(msgpack.packb(env, use_bin_type=True))
    assert back == task
    assert isinstance(back.create_time, float)


@given(st.binary(max_size=200))
def test_decode_random_bytes_never_crashes(data: bytes) -> None:
    try:
        decode_task(data)
    except TaskError:
        pass


def test_encode_rejects_bad_state() -> None:
    task = GCMetaTask()
    task.delete_count = "many"  # type: ignore[assignment]
    with pytest.raises(TaskError):
        encode_task(task)
    task.delete_count = 2**70
    with pytest.raises(TaskError):
        encode_task(task)
    with pytest.raises(TaskError):
        encode_task(OBJ)  # type: ignore[arg-type]


def test_replicate_read_ahead_memory() -> None:
    """The estimate is one segment's pieces (what replication needs); the executor reserves
    read_ahead_memory(n) more to keep n segments in flight."""
    def task(size: int) -> ReplicatePieceTask:
        return ReplicatePieceTask(object=ObjectInfo(id=1, bucket="b", name="o", owner="0x",
                                                    size=size, checksums=()), params=PARAMS)

    seg = PARAMS.segment_size
    big = task(5 * seg)
    assert big.estimate().memory == big.segment_memory() == seg * 6 // 4
    assert big.read_ahead_memory(2) == big.segment_memory()
    assert big.read_ahead_memory(3) == 2 * big.segment_memory()
    assert big.read_ahead_memory(9) == 4 * big.segment_memory()  # no more than it has
    assert big.read_ahead_memory(1) == 0
    assert task(seg).read_ahead_memory(3) == 0  # one segment: nothing to read ahead
    assert task(seg + 1).read_ahead_memory(3) == task(seg + 1).segment_memory()
    assert task(0).read_ahead_memory(3) == 0
