"""Tests of node/piecestore.py against real files under tmp_path."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import trio
import trio.lowlevel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node import piecestore as psmod
from node.config import Config, NodeSection, PieceStoreSection
from node.errors import GfspError
from node.piecestore import (
    InvalidPieceKey,
    InvalidPieceRange,
    LocalPieceStore,
    PieceKey,
    PieceNotFound,
    PieceStore,
    open_piecestore,
    parse_key,
    piece_key,
    read_hashed,
    segment_key,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


async def _store(root: Path, **kw: object) -> LocalPieceStore:
    return await LocalPieceStore.create(root, **kw)  # type: ignore[arg-type]


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


# --- keys -------------------------------------------------------------------------------------


def test_key_helpers_round_trip() -> None:
    assert segment_key(12, 0) == "12_s0"
    assert piece_key(12, 3, 5) == "12_s3_p5"
    assert parse_key("12_s0") == PieceKey(12, 0, None)
    assert parse_key("12_s3_p5") == PieceKey(12, 3, 5)
    assert parse_key("0_s0_p0") == PieceKey(0, 0, 0)
    assert str(PieceKey(7, 1, 2)) == "7_s1_p2"
    assert PieceKey(7, 1).key == "7_s1"
    big = 2**256 - 1
    assert parse_key(segment_key(big, 2**64 - 1)).object_id == big
    with pytest.raises(AttributeError):
        PieceKey(1, 2).segment = 3  # type: ignore[misc]


@pytest.mark.parametrize("bad", [
    "hello", "my photo.jpg", "../x", "../../etc/passwd", "1_s0/../../x", "1_s01", "01_s1",
    "1_s1_p01", "-1_s0", "1_s-1", "1_s0_p-1", " 1_s0", "1_s0 ", "1 _s0", "1_s 0", "1_s0\n",
    "", "1", "1_s", "1_p0", "1_s0_p", "1_s0_p0_p0", "1_S0", "1_s0_P0", "1_s0.tmp",
    ".tmp-abc", "1_s0/", "/1_s0", "1_s\u0661", "\u0661_s0", "1_s0\x00", "+1_s0", "1.0_s0",
    "0x1_s0", f"{2**256}_s0", f"1_s{2**64}", f"1_s0_p{2**64}", "1" * 100 + "_s0",
])
def test_bad_keys_are_refused(bad: str) -> None:
    with pytest.raises(InvalidPieceKey):
        parse_key(bad)


@pytest.mark.parametrize("args", [(-1, 0), (1, -1), (True, 0), (1, 1.0), ("1", 0), (2**256, 0)])
def test_bad_key_parts_are_refused(args: tuple[object, object]) -> None:
    with pytest.raises(InvalidPieceKey):
        segment_key(*args)  # type: ignore[arg-type]
    with pytest.raises(InvalidPieceKey):
        piece_key(*args, 0)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-1, True, 1.0, "1", 2**64, None])
def test_bad_piece_index_is_refused(bad: object) -> None:
    with pytest.raises(InvalidPieceKey):
        piece_key(1, 0, bad)  # type: ignore[arg-type]


def test_invalid_key_is_a_gfsp_error() -> None:
    with pytest.raises(GfspError):
        parse_key("x")
    with pytest.raises(GfspError):
        parse_key(123)  # type: ignore[arg-type]


@given(st.text(max_size=30))
def test_parse_key_accepts_only_canonical_keys(text: str) -> None:
    try:
        pk = parse_key(text)
    except InvalidPieceKey:
        return
    assert pk.key == text  # whatever parses prints back to exactly the same text
    assert "/" not in text and ".." not in text


async def test_store_methods_refuse_bad_keys(tmp_path: Path) -> None:
    store = await _store(tmp_path / "ps")
    for bad in ("../x", "a b", "1_s01", "-1_s0"):
        with pytest.raises(InvalidPieceKey):
            await store.put(bad, b"x")
        with pytest.raises(InvalidPieceKey):
            await store.get(bad)
        with pytest.raises(InvalidPieceKey):
            await store.size(bad)
        with pytest.raises(InvalidPieceKey):
            await store.exists(bad)
        with pytest.raises(InvalidPieceKey):
            await store.delete(bad)
    with pytest.raises(InvalidPieceKey):
        await store.delete_object(-1)
    with pytest.raises(InvalidPieceKey):
        await store.keys(-1)
    assert not (tmp_path / "x").exists()
    assert _files(tmp_path) == []


# --- basic operations -------------------------------------------------------------------------


async def test_put_get_round_trip(tmp_path: Path) -> None:
    store = await _store(tmp_path / "ps")
    assert isinstance(store, PieceStore)
    data = os.urandom(100_000)
    await store.put("5_s0", data)
    await store.put("5_s0_p3", memoryview(b"piece three"))
    assert await store.get("5_s0") == data
    assert await store.get("5_s0_p3") == b"piece three"
    assert await store.size("5_s0") == len(data)
    assert await store.exists("5_s0_p3")
    assert not await store.exists("5_s1")
    assert await store.size("5_s1") is None
    with pytest.raises(PieceNotFound) as ei:
        await store.get("5_s1")
    assert isinstance(ei.value, GfspError)
    await store.put("6_s0", b"")
    assert await store.get("6_s0") == b""
    assert await store.exists("6_s0")
    assert store.used_bytes() == len(data) + len(b"piece three")


async def test_layout_is_sharded_by_object(tmp_path: Path) -> None:
    root = tmp_path / "ps"
    store = await _store(root, shard_levels=2)
    for key in ("42_s0", "42_s1", "42_s0_p0", "43_s0"):
        await store.put(key, b"x")
    files = _files(root)
    assert {f.name for f in files} == {"42_s0", "42_s1", "42_s0_p0", "43_s0"}
    parents42 = {f.parent for f in files if f.name.startswith("42_")}
    assert len(parents42) == 1  # one leaf folder per object
    leaf = parents42.pop().relative_to(root)
    assert len(leaf.parts) == 2 and all(len(p) == 2 for p in leaf.parts)
    assert all(int(p, 16) >= 0 for p in leaf.parts)
    flat = await _store(tmp_path / "flat", shard_levels=0)
    await flat.put("1_s0", b"y")
    assert _files(tmp_path / "flat") == [tmp_path / "flat" / "1_s0"]


async def test_get_with_offset_and_length(tmp_path: Path) -> None:
    store = await _store(tmp_path / "ps")
    data = bytes(range(256)) * 4  # 1024 bytes
    await store.put("1_s0", data)
    assert await store.get("1_s0", 0) == data
    assert await store.get("1_s0", 10) == data[10:]
    assert await store.get("1_s0", 10, 20) == data[10:30]
    assert await store.get("1_s0", 0, 0) == b""
    assert await store.get("1_s0", 1000, 0) == b""
    # Past the end: what exists, like a file read.
    assert await store.get("1_s0", 1000, 100) == data[1000:]
    assert await store.get("1_s0", 1024) == b""
    assert await store.get("1_s0", 5000, 10) == b""
    assert await store.get("1_s0", 1023, None) == data[1023:]
    for offset, length in [(-1, None), (0, -1), (-5, 3), (1.5, None), (0, 2.0), (None, 3),
                           (True, None)]:
        with pytest.raises(InvalidPieceRange):
            await store.get("1_s0", offset, length)  # type: ignore[arg-type]
    with pytest.raises(PieceNotFound):
        await store.get("2_s0", 0, 0)


async def test_replace_keeps_used_bytes_right(tmp_path: Path) -> None:
    store = await _store(tmp_path / "ps")
    await store.put("1_s0", b"a" * 100)
    assert store.used_bytes() == 100
    await store.put("1_s0", b"b" * 30)
    assert store.used_bytes() == 30
    assert await store.get("1_s0") == b"b" * 30
    await store.put("1_s0", b"c" * 500)
    assert store.used_bytes() == 500
    await store.put("2_s0", b"d" * 7)
    assert store.used_bytes() == 507
    assert [f.name for f in _files(tmp_path / "ps") if f.name.startswith(".tmp-")] == []


async def test_delete(tmp_path: Path) -> None:
    store = await _store(tmp_path / "ps")
    await store.put("1_s0", b"12345")
    await store.put("1_s1", b"678")
    assert await store.delete("1_s0") is True
    assert await store.delete("1_s0") is False
    assert await store.delete("9_s9_p9") is False
    assert not await store.exists("1_s0")
    assert store.used_bytes() == 3
    with pytest.raises(PieceNotFound):
        await store.get("1_s0")


async def test_delete_object_removes_only_that_object(tmp_path: Path) -> None:
    store = await _store(tmp_path / "ps", shard_levels=0)  # all objects in one folder
    mine = ["1_s0", "1_s1", "1_s0_p0", "1_s0_p5", "1_s12_p3"]
    others = ["10_s0", "11_s1_p1", "2_s0", "100_s1", "21_s0"]
    for k in mine + others:
        await store.put(k, k.encode())
    assert await store.delete_object(1) == len(mine)
    assert await store.keys(1) == []
    assert await store.keys() == ["2_s0", "10_s0", "11_s1_p1", "21_s0", "100_s1"]
    assert store.used_bytes() == sum(len(k) for k in others)
    assert await store.delete_object(1) == 0
    assert await store.delete_object(12345) == 0

    sharded = await _store(tmp_path / "sh")
    for k in mine + others:
        await sharded.put(k, b"xy")
    assert await sharded.delete_object(1) == len(mine)
    assert set(await sharded.keys()) == set(others)
    assert sharded.used_bytes() == 2 * len(others)


async def test_keys_listing(tmp_path: Path) -> None:
    root = tmp_path / "ps"
    store = await _store(root)
    assert await store.keys() == []
    assert await store.keys(3) == []
    keys = ["3_s0", "3_s0_p0", "3_s0_p1", "3_s1", "3_s10", "3_s2_p10", "3_s2_p9", "4_s0", "30_s0"]
    for k in reversed(keys):
        await store.put(k, b"z")
    assert await store.keys(3) == ["3_s0", "3_s0_p0", "3_s0_p1", "3_s1", "3_s2_p9", "3_s2_p10",
                                   "3_s10"]
    assert await store.keys(30) == ["30_s0"]
    assert await store.keys() == ["3_s0", "3_s0_p0", "3_s0_p1", "3_s1", "3_s2_p9", "3_s2_p10",
                                  "3_s10", "4_s0", "30_s0"]
    # Stray files are never listed as keys.
    leaf = (root / "x").parent
    (leaf / "notes.txt").write_text("hi")
    (leaf / ".tmp-deadbeef").write_bytes(b"partial")
    assert len(await store.keys()) == len(keys)


async def test_not_open_is_refused(tmp_path: Path) -> None:
    store = LocalPieceStore(tmp_path / "ps")
    with pytest.raises(psmod.PieceStoreError):
        await store.put("1_s0", b"x")
    with pytest.raises(psmod.PieceStoreError):
        await store.get("1_s0")
    with pytest.raises(ValueError):
        LocalPieceStore(tmp_path, shard_levels=-1)
    with pytest.raises(ValueError):
        LocalPieceStore(tmp_path, min_free_bytes=-1)


# --- crash safety and accounting --------------------------------------------------------------


async def test_leftover_temp_files_are_removed_at_open(tmp_path: Path) -> None:
    root = tmp_path / "ps"
    store = await _store(root)
    await store.put("7_s0", b"a" * 10)
    await store.put("8_s0_p1", b"b" * 20)
    leaf = store._shard_dir(7)
    (leaf / ".tmp-0123456789abcdef").write_bytes(b"x" * 1000)
    (root / ".tmp-aa").write_bytes(b"y" * 5000)
    reopened = await _store(root)
    assert reopened.used_bytes() == 30
    assert not [f for f in _files(root) if f.name.startswith(".tmp-")]
    assert await reopened.keys() == ["7_s0", "8_s0_p1"]


CRASH_SCRIPT = textwrap.dedent("""
    import os, sys, trio
    from pathlib import Path
    from node import piecestore as ps

    def crash(self, tmp, path):
        os._exit(0)   # killed after the temp file is written and fsynced, before the rename

    async def main():
        store = await ps.LocalPieceStore.create(Path(sys.argv[1]))
        await store.put("1_s0", b"old" * 10)
        ps.LocalPieceStore._commit_sync = crash
        await store.put("1_s0", b"new" * 1000)

    trio.run(main)
""")


async def test_crash_mid_put_leaves_old_piece_and_temp_file_only(tmp_path: Path) -> None:
    root = tmp_path / "ps"
    proc = await trio.run_process(
        [sys.executable, "-c", CRASH_SCRIPT, str(root)], cwd=REPO_ROOT, check=False,
        capture_stdout=True, capture_stderr=True)
    assert proc.returncode == 0, proc.stderr
    tmps = [f for f in _files(root) if f.name.startswith(".tmp-")]
    assert len(tmps) == 1 and tmps[0].stat().st_size == 3000
    store = await _store(root)
    assert await store.get("1_s0") == b"old" * 10
    assert store.used_bytes() == 30
    assert not [f for f in _files(root) if f.name.startswith(".tmp-")]


async def test_open_moves_pieces_when_shard_levels_change(tmp_path: Path) -> None:
    root = tmp_path / "ps"
    flat = await _store(root, shard_levels=0)
    await flat.put("1_s0", b"abc")
    await flat.put("2_s0_p1", b"de")
    sharded = await _store(root, shard_levels=2)
    assert sharded.used_bytes() == 5
    assert await sharded.get("1_s0") == b"abc"
    assert await sharded.keys() == ["1_s0", "2_s0_p1"]
    assert not (root / "1_s0").exists()


async def test_cancelled_put_leaves_no_temp_file(tmp_path: Path) -> None:
    root = tmp_path / "ps"
    store = await _store(root)
    await store.put("1_s0", b"old")
    release = trio.Event()

    async def hold(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with store._locked("1_s0"):  # hold the key so the put waits before its rename
            task_status.started()
            await release.wait()

    async with trio.open_nursery() as nursery:
        await nursery.start(hold)
        with trio.move_on_after(0.2) as scope:
            await store.put("1_s0", b"new" * 100)
        assert scope.cancelled_caught
        release.set()
    assert await store.get("1_s0") == b"old"
    assert store.used_bytes() == 3
    assert [f.name for f in _files(root)] == ["1_s0"]
    assert store._locks == {}


OPS = st.lists(
    st.tuples(
        st.sampled_from(["put", "put", "put", "delete", "delete_object"]),
        st.integers(0, 3),  # object
        st.integers(0, 2),  # segment
        st.one_of(st.none(), st.integers(0, 2)),  # index
        st.integers(0, 300),  # size
    ),
    max_size=25,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, levels=st.integers(0, 2))
def test_used_bytes_at_reopen_equals_incremental(
    ops: list[tuple[str, int, int, int | None, int]], levels: int
) -> None:
    async def run(root: Path) -> None:
        store = await _store(root, shard_levels=levels, fsync=False)
        model: dict[str, int] = {}
        for op, obj, seg, idx, size in ops:
            key = segment_key(obj, seg) if idx is None else piece_key(obj, seg, idx)
            if op == "put":
                await store.put(key, bytes([obj]) * size)
                model[key] = size
            elif op == "delete":
                assert await store.delete(key) == (key in model)
                model.pop(key, None)
            else:
                mine = [k for k in model if parse_key(k).object_id == obj]
                assert await store.delete_object(obj) == len(mine)
                for k in mine:
                    del model[k]
            assert store.used_bytes() == sum(model.values())
        assert set(await store.keys()) == set(model)
        reopened = await _store(root, shard_levels=levels, fsync=False)
        assert reopened.used_bytes() == store.used_bytes() == sum(model.values())

    with tempfile.TemporaryDirectory() as d:
        trio.run(run, Path(d) / "ps")


async def test_concurrent_puts_and_gets(tmp_path: Path) -> None:
    store = await _store(tmp_path / "ps", fsync=False)
    rng = random.Random(7)
    sizes = {i: rng.randrange(1, 20_000) for i in range(40)}
    errors: list[str] = []

    async def writer(i: int) -> None:
        await trio.sleep(rng.random() / 100)
        await store.put("9_s0", bytes([i]) * sizes[i])  # all writers race on one key
        await store.put(piece_key(9, 1, i), bytes([i]) * sizes[i])

    async def reader() -> None:
        for _ in range(20):
            try:
                data = await store.get("9_s0")
            except PieceNotFound:
                await trio.lowlevel.checkpoint()
                continue
            i = data[0]
            if data != bytes([i]) * sizes[i]:  # a whole piece from one writer, never torn
                errors.append(f"torn read from writer {i}: {len(data)} bytes")

    async with trio.open_nursery() as nursery:
        for i in sizes:
            nursery.start_soon(writer, i)
        for _ in range(10):
            nursery.start_soon(reader)

    assert errors == []
    final = await store.get("9_s0")
    assert final == bytes([final[0]]) * sizes[final[0]]
    expected = len(final) + sum(sizes.values())
    assert store.used_bytes() == expected
    assert len(await store.keys(9)) == 1 + len(sizes)
    assert (await _store(tmp_path / "ps")).used_bytes() == expected
    assert store._locks == {}

    # Deletes racing with puts on the same keys keep the account right too.
    async with trio.open_nursery() as nursery:
        for i in sizes:
            nursery.start_soon(store.delete, piece_key(9, 1, i))
            nursery.start_soon(store.put, piece_key(9, 1, i), b"q" * i)
        nursery.start_soon(store.delete_object, 9)
    reopened = await _store(tmp_path / "ps")
    assert reopened.used_bytes() == store.used_bytes()


# --- space ------------------------------------------------------------------------------------


async def test_free_bytes_and_has_room(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = await _store(tmp_path / "ps", min_free_bytes=1000)
    assert store.free_bytes() > 0
    monkeypatch.setattr(store, "free_bytes", lambda: 5000)
    assert store.has_room(0)
    assert store.has_room(4000)
    assert not store.has_room(4001)
    with pytest.raises(ValueError):
        store.has_room(-1)
    real = await _store(tmp_path / "real", min_free_bytes=0)
    assert real.has_room(0)
    huge = await _store(tmp_path / "huge", min_free_bytes=2**62)
    assert not huge.has_room(0)


async def test_open_piecestore_from_config(tmp_path: Path) -> None:
    cfg = Config(node=NodeSection(data_dir=tmp_path / "data"),
                 piecestore=PieceStoreSection(shard_levels=1, fsync=False, min_free_bytes=123))
    store = await open_piecestore(cfg)
    assert store.root == tmp_path / "data" / "pieces"
    assert store.root.is_dir()
    assert (store.shard_levels, store.fsync, store.min_free_bytes) == (1, False, 123)
    await store.put("1_s0", b"x")
    assert len(_files(store.root)[0].relative_to(store.root).parts) == 2


# --- O_DIRECT writes --------------------------------------------------------------------------


DIRECT_SIZES = [0, 1, 4095, 4096, 4097, psmod.DIRECT_CHUNK, 2 * psmod.DIRECT_CHUNK + 123]


def _refuse_direct(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make ``os.open`` refuse O_DIRECT with EINVAL (as tmpfs does); returns the refusals."""
    real_open = os.open
    refused: list[int] = []

    def fake_open(path: object, flags: int, *args: object, **kw: object) -> int:
        if flags & psmod._O_DIRECT:
            refused.append(flags)
            raise OSError(psmod.errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(psmod.os, "open", fake_open)
    return refused


async def test_direct_writes_round_trip(tmp_path: Path) -> None:
    store = await _store(tmp_path / "ps")
    if not store.direct:
        pytest.skip("this file system refuses O_DIRECT")
    for i, size in enumerate(DIRECT_SIZES):
        data = random.Random(i).randbytes(size)
        await store.put(segment_key(1, i), memoryview(data))
        assert await store.get(segment_key(1, i)) == data
        assert await store.size(segment_key(1, i)) == size
    assert store.used_bytes() == sum(DIRECT_SIZES)
    assert not [f for f in _files(tmp_path) if f.name.startswith(".tmp-")]
    assert store._buffers.idle_count() == 1  # one buffer, reused by every put


async def test_direct_concurrent_puts_keep_few_buffers(tmp_path: Path) -> None:
    store = await _store(tmp_path / "ps")
    blobs = {piece_key(2, 0, i): os.urandom(psmod.DIRECT_CHUNK + i) for i in range(6)}
    async with trio.open_nursery() as nursery:
        for key, data in blobs.items():
            nursery.start_soon(store.put, key, data)
    for key, data in blobs.items():
        assert await store.get(key) == data
    assert store._buffers.idle() <= psmod.DIRECT_IDLE_BYTES


async def test_direct_refused_at_open_falls_back_to_buffered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    refused = _refuse_direct(monkeypatch)
    with caplog.at_level("INFO", logger="gfsp.piecestore"):
        store = await _store(tmp_path / "ps")
    assert not store.direct and len(refused) == 1  # decided once, at open
    assert "O_DIRECT refused" in caplog.text
    await store.put("1_s0", b"x" * 5000)
    assert await store.get("1_s0") == b"x" * 5000
    assert len(refused) == 1
    assert [f.name for f in _files(tmp_path / "ps")] == ["1_s0"]


async def test_direct_refused_at_a_put_falls_back_for_good(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = await _store(tmp_path / "ps")
    if not store.direct:
        pytest.skip("this file system refuses O_DIRECT")
    refused = _refuse_direct(monkeypatch)
    await store.put("1_s0", b"y" * 9000)
    assert await store.get("1_s0") == b"y" * 9000
    assert not store.direct and len(refused) == 1
    await store.put("1_s1", b"z")
    assert len(refused) == 1
    assert sorted(f.name for f in _files(tmp_path / "ps")) == ["1_s0", "1_s1"]


async def test_direct_write_failure_leaves_no_temp_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = await _store(tmp_path / "ps")
    if not store.direct:
        pytest.skip("this file system refuses O_DIRECT")
    await store.put("1_s0", b"old")

    def full(fd: int) -> None:
        raise OSError(psmod.errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(psmod.os, "fdatasync", full)
    with pytest.raises(psmod.PieceStoreError, match="No space") as info:
        await store.put("1_s0", b"new" * 5000)
    # a full disk is the user's 507 InsufficientStorage, not a 500 (found in review)
    assert isinstance(info.value, psmod.PieceStoreFull)
    assert (info.value.code, info.value.status) == ("InsufficientStorage", 507)
    assert store.direct  # not a refusal of O_DIRECT: no fallback
    assert await store.get("1_s0") == b"old" and store.used_bytes() == 3
    assert [f.name for f in _files(tmp_path / "ps")] == ["1_s0"]
    assert store._buffers.idle_count() == 1


@pytest.mark.parametrize("kw", [{"direct_io": False}, {"fsync": False}])
async def test_direct_off(tmp_path: Path, kw: dict[str, bool]) -> None:
    store = await _store(tmp_path / "ps", **kw)
    assert not store.direct
    await store.put("1_s0", b"abc")
    assert await store.get("1_s0") == b"abc"


# --- verified puts and the aligned buffers ---------------------------------------------------


@pytest.mark.parametrize("kw", [{}, {"direct_io": False}, {"fsync": False}])
async def test_put_with_sha256_stores_only_matching_data(tmp_path: Path,
                                                         kw: dict[str, bool]) -> None:
    store = await _store(tmp_path / "ps", **kw)
    good = os.urandom(3 * psmod.DIRECT_ALIGN + 17)
    await store.put("1_s0_p2", good, sha256=hashlib.sha256(good).digest())
    assert await store.get("1_s0_p2") == good
    bad = bytes([good[0] ^ 1]) + good[1:]
    with pytest.raises(psmod.PieceDigestMismatch) as info:
        await store.put("1_s0_p2", bad, sha256=hashlib.sha256(good).digest())
    assert info.value.actual == hashlib.sha256(bad).digest()
    assert isinstance(info.value, psmod.PieceStoreError)
    with pytest.raises(psmod.PieceDigestMismatch):  # a new key: nothing appears
        await store.put("1_s1_p2", bad, sha256=hashlib.sha256(good).digest())
    assert await store.get("1_s0_p2") == good  # the old piece stays
    assert not await store.exists("1_s1_p2")
    assert store.used_bytes() == len(good)
    assert [f.name for f in _files(tmp_path / "ps")] == ["1_s0_p2"]  # no temp file left


async def test_cancelled_verified_put_leaves_no_temp_file(tmp_path: Path) -> None:
    store = await _store(tmp_path / "ps")
    data = os.urandom(psmod.DIRECT_CHUNK)
    with trio.CancelScope() as scope:
        scope.cancel()
        await store.put("1_s0_p0", data, sha256=hashlib.sha256(data).digest())
    assert not await store.exists("1_s0_p0")
    assert _files(tmp_path / "ps") == []


@pytest.mark.parametrize("size", [0, 1, psmod.DIRECT_ALIGN, psmod.DIRECT_CHUNK - 5,
                                  psmod.DIRECT_CHUNK, psmod.DIRECT_CHUNK + psmod.DIRECT_ALIGN + 3])
async def test_buffer_is_aligned_and_put_without_a_copy(tmp_path: Path, size: int) -> None:
    store = await _store(tmp_path / "ps")
    data = random.Random(size).randbytes(size)
    with store.buffer(size) as buf:
        assert len(buf) == size and not buf.readonly
        if size:
            assert psmod._address(buf) % psmod.DIRECT_ALIGN == 0  # type: ignore[operator]
        buf[:] = data
        await store.put("3_s0_p1", buf, sha256=hashlib.sha256(data).digest())
    assert await store.get("3_s0_p1") == data
    if store.direct and size <= psmod.DIRECT_CHUNK:
        # the put wrote from the caller's buffer: no second aligned buffer was taken
        assert store._buffers.idle_count() == 1
    with pytest.raises(ValueError):
        with store.buffer(-1):
            pass


async def test_shard_folder_removed_behind_its_back_is_made_again(tmp_path: Path) -> None:
    store = await _store(tmp_path / "ps")
    await store.put(segment_key(7, 0), b"a" * 5000)
    folder = store._path(segment_key(7, 1)).parent
    shutil.rmtree(folder)  # an operator cleaning up by hand
    await store.put(segment_key(7, 1), b"b" * 5000)
    assert await store.get(segment_key(7, 1)) == b"b" * 5000


# --- read_into and the aligned buffers ----------------------------------------------------------

READ_SIZES = [0, 1, 4095, 4096, 4097, 3 * 4096 + 5, psmod.DIRECT_CHUNK + 123]


@pytest.mark.parametrize("direct_io", [True, False])
async def test_read_into_whole_pieces_ranges_and_ends(tmp_path: Path, direct_io: bool) -> None:
    store = await _store(tmp_path / "ps", direct_io=direct_io)
    for i, size in enumerate(READ_SIZES):
        key = segment_key(7, i)
        data = random.Random(i).randbytes(size)
        await store.put(key, data)
        with store.buffer(size + 8192) as view:
            view[:] = b"\xee" * len(view)  # a reused buffer holds old bytes: never read back
            assert await store.read_into(key, view) == size
            assert bytes(view[:size]) == data
            for offset in (0, 1, 4096, size // 2, size, size + 4096):
                want = data[offset:offset + 5000]
                assert await store.read_into(key, view[:5000], offset) == len(want)
                assert bytes(view[:len(want)]) == want
        # into a buffer that is not page-aligned (buffered then)
        odd = bytearray(size + 3)
        assert await store.read_into(key, memoryview(odd)[3:]) == size
        assert bytes(odd[3:]) == data


async def test_read_into_errors(tmp_path: Path) -> None:
    store = await _store(tmp_path / "ps")
    with pytest.raises(PieceNotFound):
        await store.read_into(segment_key(1, 0), memoryview(bytearray(10)))
    await store.put(segment_key(1, 0), b"abc")
    with pytest.raises(InvalidPieceRange):
        await store.read_into(segment_key(1, 0), memoryview(bytearray(10)), -1)
    with pytest.raises(ValueError, match="writable"):
        await store.read_into(segment_key(1, 0), memoryview(b"0123456789"))
    with pytest.raises(InvalidPieceKey):
        await store.read_into("../etc/passwd", memoryview(bytearray(10)))


@pytest.mark.parametrize("direct_io", [True, False])
async def test_read_hashed_reads_and_hashes_block_by_block(tmp_path: Path,
                                                           direct_io: bool) -> None:
    store = await _store(tmp_path / "ps", direct_io=direct_io)
    block = 8192
    for i, size in enumerate((0, 1, block - 1, block, block + 1, 3 * block, 5 * block + 77)):
        key = segment_key(9, i)
        data = random.Random(size).randbytes(size)
        await store.put(key, data)
        for extra in (0, 4096):  # a view the piece's size, and a longer one
            with store.buffer(size + extra) as view:
                view[:] = b"\xee" * len(view)
                got, digest = await read_hashed(store, key, view, block)
                assert got == size and bytes(view[:size]) == data
                assert digest == hashlib.sha256(data).digest()
        if size > 1:  # a view shorter than the piece: that much is read and hashed
            with store.buffer(size - 1) as view:
                got, digest = await read_hashed(store, key, view, block)
                assert (got, digest) == (size - 1, hashlib.sha256(data[:-1]).digest())
    assert store._buffers.in_use == 0  # no view of a pooled buffer was kept


async def test_read_hashed_errors(tmp_path: Path) -> None:
    store = await _store(tmp_path / "ps")
    with store.buffer(10) as view:
        with pytest.raises(PieceNotFound):  # not wrapped in an exception group
            await read_hashed(store, segment_key(1, 0), view)
        for bad in (0, -4096, 4097):
            with pytest.raises(ValueError, match="multiple of 4096"):
                await read_hashed(store, segment_key(1, 0), view, bad)


def test_aligned_buffers_reuse_by_size_class_within_the_idle_limit() -> None:
    pool = psmod._AlignedBuffers(1 << 20, idle_bytes=6 << 20)
    assert [pool.size_class(n) for n in (0, 1, 1 << 20, (1 << 20) + 1, 3 << 20)] == \
        [1 << 20, 1 << 20, 1 << 20, 2 << 20, 4 << 20]
    with pool.take(3 << 20) as a:
        first = id(a)
        assert len(a) == 4 << 20
    with pool.take(4 << 20) as b:
        assert id(b) == first  # the same mapping again: its pages are already there
    with pool.take(100) as small, pool.take(4 << 20), pool.take(4 << 20):
        assert len(small) == 1 << 20
    # given back: 1 MiB + 4 MiB fit the 6 MiB idle limit, the second 4 MiB one did not
    assert pool.idle() == 5 << 20 and pool.idle_count() == 2
