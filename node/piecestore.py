"""Piece store: the interface the data path uses, and the local directory backend.

Keys are made only of numbers: ``{object_id}_s{segment}`` for a primary (replicated) segment and
``{object_id}_s{segment}_p{index}`` for an erasure-coded piece. :func:`parse_key` checks a key
against a strict pattern (non-negative decimal integers, no leading zeros, ASCII digits only)
before any backend turns it into a path, so no user text ever reaches the file system and no path
traversal is possible.

:class:`LocalPieceStore` keeps each piece in its own file::

    <root>/<ab>/<cd>/<object_id>_s<segment>[_p<index>]

where ``ab``, ``cd``... are the first ``shard_levels`` pairs of hex digits of
``sha256(str(object_id))``: every piece of one object lives in one leaf folder, so one listing
finds them all (:meth:`~LocalPieceStore.delete_object`, :meth:`~LocalPieceStore.keys`).

A put writes a ``.tmp-<random>`` file in that leaf folder, fsyncs it (when ``fsync`` is on),
renames it over the key and fsyncs the folder: a reader sees the old piece or the new one, never
a torn one, and a crash mid-write leaves only a temporary file, which :meth:`~LocalPieceStore.open`
removes. All file IO runs in worker threads (``trio.to_thread.run_sync``), never on the event loop.

With ``fsync`` on, the temporary file is written with ``O_DIRECT`` (Linux), bypassing the page
cache: straight from the caller's buffer when it is page-aligned (:meth:`~LocalPieceStore.buffer`
gives such buffers, reused: at most :data:`DIRECT_IDLE_BYTES` idle per store), else copied
:data:`DIRECT_CHUNK` bytes at a time through one; the last partial block is written through the
page cache, then the file is ``fdatasync``-ed. :meth:`~LocalPieceStore.read_into` reads such a
store with ``O_DIRECT`` too, into a buffer from :meth:`~LocalPieceStore.buffer`. Buffered
writes followed by an fsync run at a fraction of the speed on some disks (the kernel writes back
the dirty pages only when asked). :meth:`LocalPieceStore.open` probes once whether the file
system takes ``O_DIRECT`` (tmpfs and others refuse it with EINVAL) and falls back to buffered
writes when it does not; ``direct_io=False`` turns it off.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import logging
import mmap
import os
import re
import secrets
import shutil
import threading
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import trio

from node.errors import GfspError, ServiceError, unwrap

if TYPE_CHECKING:
    from node.config import Config

log = logging.getLogger("gfsp.piecestore")

#: Largest object id (Greenfield object ids are uint256) and segment / piece index (uint64).
MAX_OBJECT_ID = 2**256 - 1
MAX_SEGMENT = 2**64 - 1
MAX_INDEX = 2**64 - 1

#: Prefix of temporary files; never a valid key, so never listed nor counted.
TMP_PREFIX = ".tmp-"

#: ``O_DIRECT`` IO: bytes per write through the store's own aligned buffer, the alignment, and
#: how many bytes of idle aligned buffers (:meth:`LocalPieceStore.buffer`) a store keeps for
#: reuse (four 16 MiB segments; more are unmapped when given back).
DIRECT_CHUNK = 4 << 20
DIRECT_ALIGN = 4096
DIRECT_IDLE_BYTES = 64 << 20
_O_DIRECT: int = getattr(os, "O_DIRECT", 0)

# ASCII digits only ([0-9], not \d, which matches other scripts' digits), no leading zeros,
# bounded length (the range check below is exact; this keeps file names short).
_NUM_OBJECT = r"(0|[1-9][0-9]{0,77})"
_NUM_SMALL = r"(0|[1-9][0-9]{0,19})"
_KEY_RE = re.compile(rf"{_NUM_OBJECT}_s{_NUM_SMALL}(?:_p{_NUM_SMALL})?", re.ASCII)


# --- errors -----------------------------------------------------------------------------------


class PieceStoreError(GfspError):
    """The piece store failed (OS errors are mapped to this at the boundary)."""


class InvalidPieceKey(PieceStoreError, ValueError):
    """A key is not ``{object_id}_s{segment}`` nor ``{object_id}_s{segment}_p{index}``."""


class InvalidPieceRange(PieceStoreError, ValueError):
    """A read's ``offset`` / ``length`` is negative or not an int."""


class PieceDigestMismatch(PieceStoreError):
    """A put given the piece's SHA-256 found other bytes: nothing was stored."""

    def __init__(self, key: str, actual: bytes) -> None:
        super().__init__(f"piece {key!r}: the data's sha256 {actual.hex()} is not the one given")
        self.key = key
        self.actual = actual


class PieceStoreFull(PieceStoreError, ServiceError):
    """The disk (or the store's quota) is full: 507 InsufficientStorage, nothing stored."""

    def __init__(self, message: str) -> None:
        ServiceError.__init__(self, "InsufficientStorage", message, 507)


def _write_failed(message: str, error: OSError) -> PieceStoreError:
    """The error of a failed write: :class:`PieceStoreFull` when the disk is full."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return PieceStoreFull(f"{message}: the disk is full ({error})")
    return PieceStoreError(f"{message}: {error}")


class PieceNotFound(PieceStoreError):
    """No piece is stored under that key."""

    def __init__(self, key: str) -> None:
        super().__init__(f"piece {key!r} not found")
        self.key = key


# --- keys -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PieceKey:
    """A parsed key; ``index`` is None for a primary segment, the EC piece index otherwise."""

    object_id: int
    segment: int
    index: int | None = None

    @property
    def key(self) -> str:
        if self.index is None:
            return segment_key(self.object_id, self.segment)
        return piece_key(self.object_id, self.segment, self.index)

    def __str__(self) -> str:
        return self.key


def _check_int(name: str, value: object, hi: int) -> int:
    if type(value) is not int:  # bool is an int subclass: refuse it too
        raise InvalidPieceKey(f"{name} must be an int, not {type(value).__name__}")
    if not 0 <= value <= hi:
        raise InvalidPieceKey(f"{name} out of range: {value}")
    return value


def segment_key(object_id: int, segment: int) -> str:
    """The key of a primary segment: ``{object_id}_s{segment}``."""
    _check_int("object_id", object_id, MAX_OBJECT_ID)
    _check_int("segment", segment, MAX_SEGMENT)
    return f"{object_id}_s{segment}"


def piece_key(object_id: int, segment: int, index: int) -> str:
    """The key of an erasure-coded piece: ``{object_id}_s{segment}_p{index}``."""
    _check_int("object_id", object_id, MAX_OBJECT_ID)
    _check_int("segment", segment, MAX_SEGMENT)
    _check_int("index", index, MAX_INDEX)
    return f"{object_id}_s{segment}_p{index}"


def parse_key(key: str) -> PieceKey:
    """Parse and validate a key; anything but a canonical key raises :class:`InvalidPieceKey`."""
    if not isinstance(key, str):
        raise InvalidPieceKey(f"piece key must be a str, not {type(key).__name__}")
    m = _KEY_RE.fullmatch(key)
    if m is None:
        raise InvalidPieceKey(f"invalid piece key {key[:100]!r}")
    object_id, segment = int(m.group(1)), int(m.group(2))
    index = None if m.group(3) is None else int(m.group(3))
    if object_id > MAX_OBJECT_ID or segment > MAX_SEGMENT or (
        index is not None and index > MAX_INDEX
    ):
        raise InvalidPieceKey(f"piece key out of range: {key!r}")
    return PieceKey(object_id, segment, index)


def _is_key(name: str) -> bool:
    try:
        parse_key(name)
    except InvalidPieceKey:
        return False
    return True


def _sort_keys(keys: Iterable[str]) -> list[str]:
    def order(k: str) -> tuple[int, int, int]:
        p = parse_key(k)
        return (p.object_id, p.segment, -1 if p.index is None else p.index)

    return sorted(keys, key=order)


# --- interface --------------------------------------------------------------------------------


@runtime_checkable
class PieceStore(Protocol):
    """What the uploader, receiver, downloader, executor and GC need of a piece store.

    Every method that takes a key validates it with :func:`parse_key` first
    (:class:`InvalidPieceKey`). Backend failures raise :class:`PieceStoreError`.
    """

    async def put(self, key: str, data: bytes | memoryview, *,
                  sha256: bytes | None = None) -> None:
        """Store ``data`` under ``key`` atomically, replacing any piece already there.

        With ``sha256``, the data's SHA-256 must be that digest: it is checked before the piece
        becomes visible under ``key`` (:class:`PieceDigestMismatch` otherwise, and nothing is
        stored). The caller must not modify a memoryview's buffer until ``put`` returns.
        """
        ...

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        """Read ``length`` bytes (all when None) from ``offset``.

        A range reaching past the end returns the bytes that exist (``b""`` when ``offset`` is
        at or past the end), like a file read; check :meth:`size` to tell. Raises
        :class:`PieceNotFound` when missing, :class:`InvalidPieceRange` for a negative or
        non-int ``offset``/``length``.
        """
        ...

    async def read_into(self, key: str, view: memoryview, offset: int = 0) -> int:
        """Read up to ``len(view)`` bytes from ``offset`` into ``view``; returns how many
        (fewer at the end of the piece, 0 at or past it). For large reads: with a view from
        :meth:`buffer` (and ``offset`` a multiple of 4096) a backend may read without a copy.
        Raises :class:`PieceNotFound` when missing, :class:`InvalidPieceRange` for a bad
        ``offset``.
        """
        ...

    async def size(self, key: str) -> int | None:
        """The piece's size in bytes, None when missing."""
        ...

    async def modified(self, key: str) -> float | None:
        """When the piece was last written (Unix seconds), None when missing."""
        ...

    async def exists(self, key: str) -> bool:
        ...

    async def delete(self, key: str) -> bool:
        """Remove a piece; True when something was removed."""
        ...

    async def delete_object(self, object_id: int) -> int:
        """Remove every segment and piece of an object; returns how many were removed."""
        ...

    async def keys(self, object_id: int | None = None) -> list[str]:
        """Keys of one object, or all keys (O(n)), sorted by (object, segment, index)."""
        ...

    def buffer(self, size: int) -> contextlib.AbstractContextManager[memoryview]:
        """A writable buffer of ``size`` bytes to fill and then :meth:`put`, or to
        :meth:`read_into` (a backend may do either without a copy); valid inside the ``with``
        only. Its bytes are whatever a previous user left there."""
        ...

    def used_bytes(self) -> int:
        """Bytes held by stored pieces (not counting temporary files)."""
        ...

    def free_bytes(self) -> int:
        """Free bytes on the store's file system (or quota)."""
        ...

    def has_room(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more would still leave ``min_free_bytes`` free."""
        ...


# --- local directory backend ------------------------------------------------------------------


class _KeyLock:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = trio.Lock()
        self.users = 0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _address(view: memoryview) -> int | None:
    """The address of a writable buffer's first byte (None for a read-only one)."""
    if view.readonly or not view.c_contiguous or not len(view):
        return None
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _unmap(buf: mmap.mmap) -> None:
    """Unmap now, or, while a view of it lives on (a body generator abandoned mid-send still
    holds a slice), when the last view goes: mmap refuses to close under exports."""
    try:
        buf.close()
    except BufferError:
        log.debug("aligned buffer still viewed: unmapped when the last view goes")


def _read_full(fd: int, view: memoryview, offset: int) -> int:
    """``pread`` into ``view`` until it is full or the file ends; returns the count."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


class _AlignedBuffers:
    """Page-aligned buffers (anonymous mmaps), reused (thread-safe).

    A buffer of ``n`` bytes comes from the size class ``base * 2**j`` just above ``n``; given
    back, it is kept for the next taker of its class while the idle buffers hold at most
    ``idle_bytes`` in all, and unmapped otherwise. Reuse matters beyond the mmap call: the
    pages of a fresh mapping fault in on first touch, ~2.5 us each on this VM (10 ms per
    16 MiB segment, as much CPU as reading it).
    """

    def __init__(self, base: int, idle_bytes: int) -> None:
        self.base = base
        self.idle_bytes = idle_bytes
        self._free: dict[int, list[mmap.mmap]] = {}
        self._idle = 0
        #: Buffers taken and not given back yet.
        self.in_use = 0
        self._lock = threading.Lock()

    def size_class(self, size: int) -> int:
        cls = self.base
        while cls < size:
            cls *= 2
        return cls

    @contextlib.contextmanager
    def take(self, size: int | None = None) -> Iterator[mmap.mmap]:
        """A buffer of at least ``size`` bytes (default: ``base``)."""
        cls = self.size_class(self.base if size is None else size)
        with self._lock:
            free = self._free.get(cls)
            buf = free.pop() if free else None
            if buf is not None:
                self._idle -= cls
            self.in_use += 1
        if buf is None:
            buf = mmap.mmap(-1, cls)
        try:
            yield buf
        finally:
            with self._lock:
                self.in_use -= 1
                keep = self._idle + cls <= self.idle_bytes
                if keep:
                    self._free.setdefault(cls, []).append(buf)
                    self._idle += cls
            if not keep:
                _unmap(buf)

    def idle_count(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._free.values())

    def idle(self) -> int:
        """Bytes held by idle buffers."""
        with self._lock:
            return self._idle


def _direct_probe(folder: Path) -> OSError | None:
    """Whether ``folder``'s file system takes an ``O_DIRECT`` write (None) or why not."""
    if not _O_DIRECT:
        return OSError(errno.EINVAL, "O_DIRECT is not available on this platform")
    path = folder / f"{TMP_PREFIX}probe-{secrets.token_hex(8)}"
    buf = mmap.mmap(-1, DIRECT_ALIGN)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | _O_DIRECT,
                     0o600)
        try:
            with memoryview(buf) as view:
                _write_all(fd, view)
        finally:
            os.close(fd)
    except OSError as e:
        return e
    finally:
        buf.close()
        _unlink_quietly(path)
    return None


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def _file_stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:
        return None


def _file_size(path: Path) -> int | None:
    st = _file_stat(path)
    return None if st is None else st.st_size


class LocalPieceStore:
    """A :class:`PieceStore` on a local folder; call :meth:`open` (or use
    :func:`open_piecestore`) before anything else.

    ``shard_levels`` levels of two-hex-digit folders (0: every piece in ``root``); ``fsync``
    makes each put durable before it returns (file, then folder after the rename); with
    ``fsync``, ``direct_io`` writes the file with ``O_DIRECT`` when the file system takes it
    (probed at :meth:`open`; :attr:`direct` tells);
    ``min_free_bytes`` is the floor :meth:`has_room` keeps. ``put`` does not check room itself:
    the caller decides (with :meth:`has_room`) whether to accept new data.

    Concurrent operations on one key are serialised by a per-key lock around the rename/unlink
    and the size accounting, so ``used_bytes`` stays exact; the slow part of a put (writing and
    fsyncing the temporary file) runs outside the lock, and the last rename wins.
    """

    def __init__(self, root: Path, *, shard_levels: int = 2, fsync: bool = True,
                 min_free_bytes: int = 0, direct_io: bool = True) -> None:
        if type(shard_levels) is not int or not 0 <= shard_levels <= 32:
            raise ValueError(f"shard_levels must be an int in 0..32, not {shard_levels!r}")
        if min_free_bytes < 0:
            raise ValueError(f"min_free_bytes must be >= 0, not {min_free_bytes!r}")
        self.root = Path(root)
        self.shard_levels = shard_levels
        self.fsync = bool(fsync)
        self._made_dirs: set[Path] = set()  # shard folders known to exist
        self.min_free_bytes = int(min_free_bytes)
        self._used = 0
        self._opened = False
        self._locks: dict[str, _KeyLock] = {}
        self.direct_io = bool(direct_io)
        #: Whether puts write with ``O_DIRECT`` (decided by :meth:`open`).
        self.direct = False
        self._buffers = _AlignedBuffers(DIRECT_CHUNK, DIRECT_IDLE_BYTES)

    # -- lifecycle --

    @classmethod
    async def create(cls, root: Path, *, shard_levels: int = 2, fsync: bool = True,
                     min_free_bytes: int = 0, direct_io: bool = True) -> LocalPieceStore:
        """Construct and :meth:`open` a store."""
        store = cls(root, shard_levels=shard_levels, fsync=fsync, min_free_bytes=min_free_bytes,
                    direct_io=direct_io)
        await store.open()
        return store

    async def open(self) -> LocalPieceStore:
        """Create the root, remove leftover temporary files, and count the stored bytes.

        A piece found outside its shard folder (``shard_levels`` changed) is moved into place
        unless a piece with that key is already there, in which case it is left alone, logged
        and not counted. Files that are neither keys nor temporary files are ignored.
        """
        self._used = await trio.to_thread.run_sync(self._scan_sync)
        self._opened = True
        return self

    def _scan_sync(self) -> int:
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            used = 0
            removed = 0
            for dirpath, _dirnames, filenames in os.walk(self.root):
                here = Path(dirpath)
                for name in filenames:
                    path = here / name
                    if name.startswith(TMP_PREFIX):
                        with contextlib.suppress(FileNotFoundError):
                            path.unlink()
                            removed += 1
                        continue
                    if not _is_key(name):
                        continue
                    want = self._path(name)
                    if path != want:
                        if want.exists():
                            log.warning("piece %s found at %s duplicates %s; left alone",
                                        name, path, want)
                            continue
                        self._ensure_dir(want.parent)
                        os.replace(path, want)
                        log.info("piece %s moved from %s to its shard folder", name, path)
                        path = want
                    size = _file_size(path)
                    if size is not None:
                        used += size
            if removed:
                log.info("removed %d leftover temporary file(s) under %s", removed, self.root)
            self._decide_direct()
            return used
        except OSError as e:
            raise PieceStoreError(f"cannot open piece store at {self.root}: {e}") from e

    def _decide_direct(self) -> None:
        if not (self.fsync and self.direct_io):
            self.direct = False
            return
        refused = _direct_probe(self.root)
        self.direct = refused is None
        if refused is None:
            log.info("piece store under %s writes with O_DIRECT", self.root)
        else:
            log.info("piece store under %s: O_DIRECT refused (%s); buffered writes + fsync",
                     self.root, refused)

    def _check_open(self) -> None:
        if not self._opened:
            raise PieceStoreError("piece store is not open: call await store.open() first")

    # -- layout --

    def _shard_dir(self, object_id: int) -> Path:
        if self.shard_levels == 0:
            return self.root
        digest = hashlib.sha256(str(object_id).encode("ascii")).hexdigest()
        parts = [digest[2 * i: 2 * i + 2] for i in range(self.shard_levels)]
        return self.root.joinpath(*parts)

    def _path(self, key: str) -> Path:
        """The file of a key; the key is validated here, so no other text reaches a path."""
        pk = parse_key(key)
        return self._shard_dir(pk.object_id) / pk.key

    def _ensure_dir(self, leaf: Path) -> None:
        """Create the shard folders down to ``leaf``; fsync each new folder's parent.

        Folders are never removed by the store, so one known to exist is not asked again.
        """
        if leaf in self._made_dirs:
            return
        rel = leaf.relative_to(self.root)
        cur = self.root
        for part in rel.parts:
            cur = cur / part
            try:
                cur.mkdir()
            except FileExistsError:
                continue
            if self.fsync:
                _fsync_dir(cur.parent)
        self._made_dirs.add(leaf)  # a set.add is atomic: safe from the writer threads

    # -- per-key lock --

    @contextlib.asynccontextmanager
    async def _locked(self, key: str) -> AsyncIterator[None]:
        entry = self._locks.get(key)
        if entry is None:
            entry = self._locks[key] = _KeyLock()
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._locks[key]

    # -- operations --

    @contextlib.contextmanager
    def buffer(self, size: int) -> Iterator[memoryview]:
        """A writable buffer of ``size`` bytes to fill and then :meth:`put` without a copy:
        page-aligned, so an ``O_DIRECT`` put writes straight from it. Reused (up to
        :data:`DIRECT_CHUNK` bytes); do not keep the view beyond the ``with``."""
        if type(size) is not int or size < 0:
            raise ValueError(f"size must be an int >= 0, not {size!r}")
        with self._buffers.take(size) as buf, memoryview(buf) as whole, \
                whole[:size] as view:
            yield view

    async def put(self, key: str, data: bytes | memoryview, *,
                  sha256: bytes | None = None) -> None:
        path = self._path(key)
        self._check_open()
        view = memoryview(data)
        if sha256 is None:
            tmp = await trio.to_thread.run_sync(self._write_tmp_sync, path.parent, view)
        else:
            tmp = await self._write_tmp_checked(key, path.parent, view, sha256)
        try:
            async with self._locked(key):
                delta = await trio.to_thread.run_sync(self._commit_sync, tmp, path)
                # No checkpoint between the thread's return and this line, so a cancellation
                # cannot lose the accounting of a rename that happened.
                self._used += delta
        except BaseException:
            # Cancelled while waiting for the lock, or the rename failed: drop the temp file
            # (a no-op when the rename happened).
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_unlink_quietly, tmp)
            raise

    async def _write_tmp_checked(self, key: str, folder: Path, view: memoryview,
                                 digest: bytes) -> Path:
        """The temporary file of ``view``, written while the data is hashed (two worker
        threads); removed, and :class:`PieceDigestMismatch` raised, when the hash is not
        ``digest``."""
        out: list[object] = []

        async def hash_it() -> None:
            out.append(await trio.to_thread.run_sync(_sha256, view))

        async def write_it() -> None:
            out.insert(0, await trio.to_thread.run_sync(self._write_tmp_sync, folder, view))

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(hash_it)
                nursery.start_soon(write_it)
        except BaseException:
            # The write may have finished before the hash failed or was cancelled.
            if out and isinstance(out[0], Path):
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(_unlink_quietly, out[0])
            raise
        tmp, actual = out
        assert isinstance(tmp, Path) and isinstance(actual, bytes)
        if actual != digest:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_unlink_quietly, tmp)
            raise PieceDigestMismatch(key, actual)
        return tmp

    def _write_tmp_sync(self, folder: Path, view: memoryview) -> Path:
        tmp = folder / f"{TMP_PREFIX}{secrets.token_hex(8)}"
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        try:
            self._ensure_dir(folder)
            if not folder.is_dir():  # removed behind our back: make it again
                self._made_dirs.discard(folder)
                self._ensure_dir(folder)
            if self.direct:
                try:
                    self._write_direct(tmp, view)
                    return tmp
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    _unlink_quietly(tmp)
                    self.direct = False
                    log.info("piece store under %s: O_DIRECT write refused (%s); buffered "
                             "writes + fsync from now on", self.root, e)
            with tmp.open("xb") as f:
                f.write(view)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
        except OSError as e:
            _unlink_quietly(tmp)
            raise _write_failed(f"cannot write piece {tmp.name} under {folder}", e) from e
        return tmp

    def _write_direct(self, tmp: Path, view: memoryview) -> None:
        """Write ``view`` to the new file ``tmp`` with ``O_DIRECT`` and fdatasync it: the
        aligned prefix through a page-aligned buffer, the last partial block buffered."""
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | _O_DIRECT,
                     0o644)
        try:
            size = len(view)
            aligned = size - size % DIRECT_ALIGN
            address = _address(view) if aligned else None
            if address is not None and address % DIRECT_ALIGN == 0:
                _write_all(fd, view[:aligned])  # already aligned (:meth:`buffer`): no copy
            elif aligned:
                with self._buffers.take() as buf, memoryview(buf) as chunk:
                    offset = 0
                    while offset < aligned:
                        n = min(len(chunk), aligned - offset)
                        chunk[:n] = view[offset:offset + n]
                        _write_all(fd, chunk[:n])
                        offset += n
            if aligned < size:
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)
                _write_all(fd, view[aligned:])
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def _commit_sync(self, tmp: Path, path: Path) -> int:
        """Rename ``tmp`` over ``path``; returns the change of used bytes."""
        try:
            new = tmp.stat().st_size
            old = _file_size(path) or 0
            os.replace(tmp, path)
            if self.fsync:
                _fsync_dir(path.parent)
        except OSError as e:
            raise _write_failed(f"cannot store piece {path.name}", e) from e
        return new - old

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(key)
        if type(offset) is not int or offset < 0:
            raise InvalidPieceRange(f"offset must be an int >= 0, not {offset!r}")
        if length is not None and (type(length) is not int or length < 0):
            raise InvalidPieceRange(f"length must be None or an int >= 0, not {length!r}")
        self._check_open()
        return await trio.to_thread.run_sync(self._read_sync, key, path, offset, length)

    @staticmethod
    def _read_sync(key: str, path: Path, offset: int, length: int | None) -> bytes:
        try:
            with path.open("rb") as f:
                if length == 0:
                    return b""
                if offset:
                    f.seek(offset)
                return f.read() if length is None else f.read(length)
        except FileNotFoundError:
            raise PieceNotFound(key) from None
        except OSError as e:
            raise PieceStoreError(f"cannot read piece {key}: {e}") from e

    async def read_into(self, key: str, view: memoryview, offset: int = 0) -> int:
        path = self._path(key)
        if type(offset) is not int or offset < 0:
            raise InvalidPieceRange(f"offset must be an int >= 0, not {offset!r}")
        if view.readonly:
            raise ValueError("read_into needs a writable buffer")
        self._check_open()
        return await trio.to_thread.run_sync(self._read_into_sync, key, path, view, offset)

    def _read_into_sync(self, key: str, path: Path, view: memoryview, offset: int) -> int:
        """:meth:`read_into` in a worker thread: ``O_DIRECT`` for the aligned part when this
        store writes that way and ``view`` and ``offset`` are aligned, buffered otherwise."""
        size = len(view)
        aligned = size - size % DIRECT_ALIGN
        address = _address(view) if aligned else None
        direct = (self.direct and address is not None and address % DIRECT_ALIGN == 0
                  and offset % DIRECT_ALIGN == 0)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (_O_DIRECT if direct else 0))
        except FileNotFoundError:
            raise PieceNotFound(key) from None
        except OSError as e:
            raise PieceStoreError(f"cannot read piece {key}: {e}") from e
        try:
            got = 0
            if direct:
                got = _read_full(fd, view[:aligned], offset)
                if got < aligned:
                    return got  # the end of the piece
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)
            return got + _read_full(fd, view[got:], offset + got)
        except OSError as e:
            raise PieceStoreError(f"cannot read piece {key}: {e}") from e
        finally:
            os.close(fd)

    async def _stat(self, key: str) -> os.stat_result | None:
        path = self._path(key)
        self._check_open()
        try:
            return await trio.to_thread.run_sync(_file_stat, path)
        except OSError as e:
            raise PieceStoreError(f"cannot stat piece {key}: {e}") from e

    async def size(self, key: str) -> int | None:
        st = await self._stat(key)
        return None if st is None else st.st_size

    async def modified(self, key: str) -> float | None:
        st = await self._stat(key)
        return None if st is None else st.st_mtime

    async def exists(self, key: str) -> bool:
        return await self.size(key) is not None

    async def delete(self, key: str) -> bool:
        path = self._path(key)
        self._check_open()
        async with self._locked(key):
            removed = await self._unlink([path], f"piece {key}")
        return removed > 0

    async def _unlink(self, paths: list[Path], what: str) -> int:
        """Remove files (caller holds their key locks) and account for them; returns count."""
        try:
            freed, removed = await trio.to_thread.run_sync(self._unlink_sync, paths)
        except _PartialUnlink as e:
            self._used -= e.freed
            raise PieceStoreError(f"cannot delete {what}: {e.cause}") from e.cause
        self._used -= freed
        return removed

    def _unlink_sync(self, paths: list[Path]) -> tuple[int, int]:
        """Remove files; returns (bytes freed, files removed)."""
        freed = removed = 0
        try:
            for path in paths:
                size = _file_size(path)
                if size is None:
                    continue
                try:
                    path.unlink()
                except FileNotFoundError:
                    continue
                freed += size
                removed += 1
            if removed and self.fsync:
                _fsync_dir(paths[0].parent)
        except OSError as e:
            # Account for what was removed before the failure is reported.
            raise _PartialUnlink(freed, removed, e) from e
        return freed, removed

    async def delete_object(self, object_id: int) -> int:
        _check_int("object_id", object_id, MAX_OBJECT_ID)
        self._check_open()
        keys = await self.keys(object_id)
        if not keys:
            return 0
        async with contextlib.AsyncExitStack() as stack:
            for k in sorted(keys):  # one global order: no deadlock between two delete_objects
                await stack.enter_async_context(self._locked(k))
            return await self._unlink([self._path(k) for k in keys],
                                      f"pieces of object {object_id}")

    async def keys(self, object_id: int | None = None) -> list[str]:
        self._check_open()
        if object_id is None:
            names = await trio.to_thread.run_sync(self._all_keys_sync)
        else:
            _check_int("object_id", object_id, MAX_OBJECT_ID)
            names = await trio.to_thread.run_sync(self._object_keys_sync, object_id)
        return _sort_keys(names)

    def _object_keys_sync(self, object_id: int) -> list[str]:
        prefix = f"{object_id}_s"
        try:
            with os.scandir(self._shard_dir(object_id)) as it:
                return [e.name for e in it
                        if e.name.startswith(prefix) and _is_key(e.name) and e.is_file()]
        except FileNotFoundError:
            return []
        except OSError as e:
            raise PieceStoreError(f"cannot list pieces of object {object_id}: {e}") from e

    def _all_keys_sync(self) -> list[str]:
        out: list[str] = []
        try:
            for dirpath, _dirnames, filenames in os.walk(self.root):
                here = Path(dirpath)
                for name in filenames:
                    # Only files in their own shard folder are the store's keys.
                    if _is_key(name) and self._path(name).parent == here:
                        out.append(name)
        except OSError as e:
            raise PieceStoreError(f"cannot list pieces under {self.root}: {e}") from e
        return out

    # -- space --

    def used_bytes(self) -> int:
        return self._used

    def free_bytes(self) -> int:
        """Free bytes for an unprivileged user on the root's file system (one statvfs call)."""
        try:
            return shutil.disk_usage(self.root).free
        except OSError as e:
            raise PieceStoreError(f"cannot read free space of {self.root}: {e}") from e

    def has_room(self, nbytes: int) -> bool:
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, not {nbytes!r}")
        return self.free_bytes() - nbytes >= self.min_free_bytes


def _sha256(view: memoryview) -> bytes:
    return hashlib.sha256(view).digest()


#: Block size of :func:`read_hashed`: reading a block overlaps hashing the one before it.
HASHED_READ_BLOCK = 2 << 20


async def read_hashed(store: PieceStore, key: str, view: memoryview,
                      block: int = HASHED_READ_BLOCK) -> tuple[int, bytes]:
    """Read piece ``key`` from its start into ``view`` (as :meth:`PieceStore.read_into`:
    at most ``len(view)`` bytes) and hash what was read: ``(bytes read, SHA-256)``.

    Block ``i`` is hashed in a worker thread while block ``i + 1`` is read, so the two take
    about as long as the slower of them rather than their sum (a 16 MiB segment here:
    12-19 ms to read with ``O_DIRECT``, ~10 ms to hash). ``block`` is a multiple of 4096, so every
    block of a view from :meth:`PieceStore.buffer` stays aligned for ``O_DIRECT``.
    """
    if block <= 0 or block % DIRECT_ALIGN:
        raise ValueError(f"block must be a positive multiple of {DIRECT_ALIGN}, not {block!r}")
    hasher = hashlib.sha256()
    send, receive = trio.open_memory_channel[memoryview](1)

    async def hash_blocks() -> None:
        async with receive:
            async for part in receive:
                with part:
                    await trio.to_thread.run_sync(hasher.update, part)

    got = 0
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hash_blocks)
            async with send:
                while got < len(view):
                    want = min(block, len(view) - got)
                    with view[got:got + want] as part:
                        n = await store.read_into(key, part, got)
                    if n:
                        await send.send(view[got:got + n])
                    got += n
                    if n < want:  # the end of the piece
                        break
    except BaseExceptionGroup as group:
        raise unwrap(group) from None
    return got, hasher.digest()


class _PartialUnlink(Exception):
    """Internal: an unlink batch failed part-way; never escapes this module."""

    def __init__(self, freed: int, removed: int, cause: OSError) -> None:
        super().__init__(str(cause))
        self.freed = freed
        self.removed = removed
        self.cause = cause


async def open_piecestore(config: Config) -> LocalPieceStore:
    """Open the local piece store the node config describes (``[piecestore]``)."""
    ps = config.piecestore
    return await LocalPieceStore.create(
        config.piecestore_path, shard_levels=ps.shard_levels, fsync=ps.fsync,
        min_free_bytes=ps.min_free_bytes)
