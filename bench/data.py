"""Data-path benchmark: ingest, upload-done -> sealed, GET (normal, degraded), the primary's
peak RSS, and the erasure codecs (zfec vs pyeclib ``isa_l_rs_vand``).

Run from the work tree: ``.venv/bin/python -m bench.data [--quick] [--keep]``. Prints one table
(what | value | ratio | target | ok); every ratio is to a ceiling measured in this same run.

Setup: a devchain process (``python -m testnet.devchain``; 16 MiB segments, 4+2) and 7 SPs as
``gfsp-node run`` processes (``tests.p2pnet.make_chain_sps`` / ``register_on_chain`` /
``node_command``), plus a *discard server* child process (``--discard-server``): the same
hypercorn trio worker + starlette stack as the gater, with a PUT route that reads the body and
drops it and a GET route that streams bytes from memory (16 MiB chunks, like the downloader). The
bench process is the client (:class:`testnet.client.GfspClient`); client and servers share the
machine's cores.

* ingest: ``put_object`` of an N MiB file to the primary (UNSIGNED-PAYLOAD, 1 MiB reads; the
  time runs until the SP's answer, i.e. every segment hashed and written) vs the same file PUT
  into the discard route (same reader, same httpx);
* upload-done -> sealed: from the PUT's answer until the chain's object is SEALED (polled every
  50 ms) vs the CPU bound, measured in the bench process on the object in memory: per 16 MiB
  segment sha256(segment) + zfec encode (:class:`node.ec.Codec`) + sha256 of each of the 6
  pieces (the secondaries' hashing), segments spread over 2 threads (this machine's cores). No
  disk, no network, no event loop: a lower bound of the CPU work, not of what the node does;
* GET: ``get_object`` of the whole object, normal and degraded (the primary's segment files
  deleted first, so every segment is rebuilt from the secondaries' challenge route) vs a
  StreamingResponse of as many bytes from the discard server;
* RSS: the primary's ``VmHWM`` (peak reset with ``/proc/<pid>/clear_refs`` = 5 just before the
  PUT) at the sealed mark, minus its ``VmRSS`` before the PUT, for an N MiB and a 4N MiB upload
  on the same primary, after one warm-up object;
* codecs: 16 MiB segments, 4+2, one thread, encode and decode (2 data pieces lost);
* disk: every SP of the cluster stores on the one disk of this machine, and acknowledges
  nothing before it is durable. The uploader's pattern (16 MiB segments put one at a time,
  fsync'd) bounds ingest from above: its rate over the ingest ceiling says whether the ingest
  target is within reach in this run. The secondaries' pattern (6 stores putting 4 MiB pieces
  at once, fsync'd) bounds the seal from below: (k+m)/k x the object over that rate, against
  the CPU bound, says whether the seal target is.

Children are SIGTERMed then SIGKILLed in ``finally`` and die with the bench (PR_SET_PDEATHSIG);
the temp folder is removed unless ``--keep``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import re
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx
import hypercorn.config
import hypercorn.trio
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from bench.p2p import (
    Child,
    ChildDied,
    Fleet,
    Row,
    fleet,
    print_table,
    proc_cpu,
    proc_cpu_split,
    work_folder,
)
from modulars.downloader import decode_challenge, encode_challenge
from modulars.gater.server import set_receive_size
from node.config import GaterSection, render_config
from node.crypto import PrivateKey
from node.ec import Codec
from node.malloc import release_large_buffers
from node.piecestore import LocalPieceStore, piece_key, segment_key
from testnet.client import GfspClient, _file_chunks
from tests.p2pnet import SPDir, make_chain_sps, node_command, register_on_chain

MiB = 1 << 20
SEGMENT = 16 * MiB
DATA_SHARDS, PARITY_SHARDS = 4, 2
N_SPS = 7
N_SECONDARIES = DATA_SHARDS + PARITY_SHARDS
MAX_PAYLOAD = 1 << 34
BUCKET = "bench"
POLL = 0.05  # the sealed poll
BLOCK_INTERVAL = 1.0  # devchain; txs apply at once, blocks only move the height
HEIGHT_REFRESH = 1.0  # nodes (make_chain_sps sets 0.2: keep idle chain traffic low)
PING_INTERVAL = 2.0  # discovery (convergence before the first upload; little idle traffic)
CPU_THREADS = 2
STREAM_CHUNK = SEGMENT
RSS_LIMIT_MIB = 150
FLAT_LIMIT = 1.25

log = logging.getLogger("bench.data")


def progress(msg: str) -> None:
    print(f"[bench.data] {msg}", file=sys.stderr, flush=True)


def mib_s(nbytes: int, seconds: float) -> float:
    return nbytes / MiB / seconds if seconds > 0 else float("inf")


# --- the discard server (child process) -------------------------------------------------------


def discard_app() -> Starlette:
    block = os.urandom(STREAM_CHUNK)

    async def discard(request: Request) -> JSONResponse:
        n = 0
        async for chunk in request.stream():
            n += len(chunk)
        return JSONResponse({"received": n})

    async def source(request: Request) -> StreamingResponse:
        size = int(request.query_params["size"])

        async def body() -> AsyncIterator[bytes]:
            left = size
            while left > 0:
                n = min(left, len(block))
                yield block if n == len(block) else block[:n]
                left -= n

        return StreamingResponse(body(), headers={"content-length": str(size)},
                                 media_type="application/octet-stream")

    return Starlette(routes=[Route("/discard/{name}", discard, methods=["PUT"]),
                             Route("/source", source, methods=["GET"])])


def server_config() -> hypercorn.config.Config:
    """The gater's hypercorn settings (modulars/gater/server.py, defaults of GaterSection)."""
    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.h11_max_incomplete_size = 16 * 1024
    config.graceful_timeout = 1.0
    config.include_server_header = False
    config.accesslog = None
    config.errorlog = logging.getLogger("bench.data.hypercorn")
    return config


async def discard_server_main() -> None:
    """Child mode: READY=1 and ADDR=<http endpoint> go to NOTIFY_SOCKET. The process is set
    up as a node's is (malloc thresholds, hypercorn's receive size)."""
    release_large_buffers()
    set_receive_size(int(GaterSection().recv_bytes))
    shutdown = trio.Event()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(partial(hypercorn.trio.serve, discard_app(),
                                                server_config(), shutdown_trigger=shutdown.wait,
                                                mode="asgi"))
            addr = os.environ.get("NOTIFY_SOCKET", "")
            if addr:
                with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                    s.sendto(f"READY=1\nADDR={binds[0]}".encode(), addr)
            async for _ in signals:
                shutdown.set()
                break


# --- /proc helpers ----------------------------------------------------------------------------


def proc_status_kib(pid: int, key: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM); 0 if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_hwm(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, own processes)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


# --- in-process CPU figures ------------------------------------------------------------------


def _median_time(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclass
class CodecFigures:
    sha256: float  # seconds per 16 MiB, one thread
    wire: float  # seconds per 4 MiB piece: the challenge answer rendered and decoded
    zfec_enc: float
    zfec_dec: float
    pyeclib_enc: float | None = None
    pyeclib_dec: float | None = None
    pyeclib_note: str = ""


LOST = (0, 1, 4, 5)  # the pieces a decode gets: data pieces 2 and 3 are lost


def codec_figures(reps: int) -> CodecFigures:
    seg = os.urandom(SEGMENT)
    codec = Codec(DATA_SHARDS, PARITY_SHARDS)
    pieces = codec.encode(seg)
    some = {i: pieces[i] for i in LOST}
    if codec.decode(some, len(seg)) != seg:
        raise RuntimeError("zfec decode gave other bytes")
    sums = [hashlib.sha256(p).digest() for p in pieces]

    def wire() -> None:
        body = JSONResponse(encode_challenge(pieces[0], sums, sums[0])).body
        decode_challenge(bytes(body))

    figs = CodecFigures(
        sha256=_median_time(lambda: hashlib.sha256(seg).digest(), reps),
        wire=_median_time(wire, reps),
        zfec_enc=_median_time(lambda: codec.encode(seg), reps),
        zfec_dec=_median_time(lambda: codec.decode(some, len(seg)), reps))
    try:
        from pyeclib.ec_iface import ECDriver

        driver = ECDriver(k=DATA_SHARDS, m=PARITY_SHARDS, ec_type="isa_l_rs_vand")
        frags = driver.encode(seg)
        chosen = [frags[i] for i in LOST]
        if driver.decode(chosen) != seg:
            raise RuntimeError("pyeclib decode gave other bytes")
        figs.pyeclib_enc = _median_time(lambda: driver.encode(seg), reps)
        figs.pyeclib_dec = _median_time(lambda: driver.decode(chosen), reps)
        import importlib.metadata as md
        figs.pyeclib_note = (f"pyeclib {md.version('pyeclib')} isa_l_rs_vand: fragments of "
                             f"{len(frags[0])} B for {len(pieces[0])} B zfec pieces "
                             f"(+{len(frags[0]) - len(pieces[0])} B header)")
    except Exception as exc:  # noqa: BLE001 - not installed / no ISA-L backend: skip the rows
        figs.pyeclib_note = (f"pyeclib rows skipped: {type(exc).__name__}: {exc} "
                             "(install with .venv/bin/pip install pyeclib)")
    return figs


def cpu_bound(data: bytes, threads: int) -> float:
    """Seconds for sha256(segment) + zfec encode + sha256(each piece) of every segment, the
    segments spread over ``threads`` threads (hashlib and zfec release the GIL)."""
    codec = Codec(DATA_SHARDS, PARITY_SHARDS)
    view = memoryview(data)
    segments = [view[i:i + SEGMENT] for i in range(0, len(data), SEGMENT)]

    def one(segment: memoryview) -> None:
        hashlib.sha256(segment).digest()
        for piece in codec.encode(segment):
            hashlib.sha256(piece).digest()

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, segments[:1]))  # start the threads outside the timing
        t0 = time.perf_counter()
        list(pool.map(one, segments))
        return time.perf_counter() - t0


async def disk_put(root: Path, segments: int, fsync: bool = True) -> tuple[float, float]:
    """Seconds, and CPU-s of this process, to put ``segments`` 16 MiB segments one after the
    other through :class:`LocalPieceStore` (the uploader's writer, without its hashing)."""
    store = await LocalPieceStore.create(root, fsync=fsync)
    data = os.urandom(SEGMENT)
    await store.put(segment_key(1, 0), data)  # folders made, threads started
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    for i in range(segments):
        await store.put(segment_key(2, i), data)
    dt = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    await store.delete_object(1)
    await store.delete_object(2)
    return dt, cpu


async def disk_put_pieces(root: Path, writers: int, pieces: int) -> tuple[float, float]:
    """Seconds, and CPU-s of this process (the writes' system time), for ``writers`` piece
    stores (one folder each, like the secondaries of the
    cluster, which share this disk) to put ``pieces`` pieces of ``SEGMENT / DATA_SHARDS``
    bytes each, all writers at once (the receivers' pattern: fsync'd, one piece at a time per
    store)."""
    data = os.urandom(SEGMENT // DATA_SHARDS)
    stores = [await LocalPieceStore.create(root / f"w{i}") for i in range(writers)]
    for store in stores:
        await store.put(piece_key(1, 0, 0), data)  # folders made, threads started

    async def writer(store: LocalPieceStore) -> None:
        for i in range(pieces):
            await store.put(piece_key(2, i, 0), data)

    cpu0 = time.process_time()
    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for store in stores:
            nursery.start_soon(writer, store)
    dt = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    for store in stores:
        await store.delete_object(1)
        await store.delete_object(2)
    return dt, cpu


# --- the cluster ------------------------------------------------------------------------------


@dataclass
class Cluster:
    endpoint: str
    chain: Child
    sps: list[SPDir]
    nodes: list[Child]

    @property
    def primary_pid(self) -> int:
        return self.nodes[0].proc.pid

    def pids(self) -> dict[str, list[int]]:
        return {"primary": [self.primary_pid],
                "secondaries": [c.proc.pid for c in self.nodes[1:]],
                "devchain": [self.chain.proc.pid]}

    def check_alive(self) -> None:
        dead = [c for c in [self.chain, *self.nodes] if c.proc.poll() is not None]
        if dead:
            raise ChildDied(f"{', '.join(c.name for c in dead)} exited:\n{dead[0].log_tail()}")


async def wait_devchain(child: Child, directory: Path, timeout: float) -> str:
    info = directory / "devchain.json"
    with trio.fail_after(timeout):
        while True:
            if child.proc.poll() is not None:
                raise ChildDied(f"devchain exited with {child.proc.returncode}:\n"
                                f"{child.log_tail()}")
            try:
                data = json.loads(info.read_text())
            except (OSError, ValueError):
                data = {}
            if data.get("pid") == child.proc.pid and data.get("endpoint"):
                return str(data["endpoint"])
            await trio.sleep(POLL)


def _trusted(conn: sqlite3.Connection) -> set[str]:
    try:
        return {r[0] for r in conn.execute("SELECT peer_id FROM peers WHERE state = 'trusted'")}
    except sqlite3.Error:
        return set()


async def wait_trust(sps: list[SPDir], timeout: float) -> None:
    """Until every node's SPDB trusts every other node (read-only polling)."""
    everyone = {sp.peer_id for sp in sps}
    conns = [sqlite3.connect(f"file:{sp.config().db_path}?mode=ro", uri=True, timeout=0.2)
             for sp in sps]
    try:
        with trio.fail_after(timeout):
            while not all(_trusted(c) >= everyone - {sp.peer_id}  # noqa: ASYNC110 - other
                          for c, sp in zip(conns, sps, strict=True)):  # processes' SPDBs
                await trio.sleep(0.1)
    finally:
        for c in conns:
            c.close()


async def start_cluster(root: Path, fl: Fleet) -> Cluster:
    chain_dir = root / "chain"
    chain_dir.mkdir(parents=True, exist_ok=True)
    chain = fl.spawn("devchain", [
        sys.executable, "-m", "testnet.devchain", "--dir", str(chain_dir),
        "--block-interval", str(BLOCK_INTERVAL), "--segment-size", str(SEGMENT),
        "--data-shards", str(DATA_SHARDS), "--parity-shards", str(PARITY_SHARDS),
        "--max-payload", str(MAX_PAYLOAD)])
    endpoint = await wait_devchain(chain, chain_dir, 60.0)
    sps = make_chain_sps(root / "sps", N_SPS, endpoint, p2p={"ping_interval": PING_INTERVAL})
    for sp in sps:
        cfg = sp.config()
        cfg = dataclasses.replace(cfg, chain=dataclasses.replace(
            cfg.chain, height_refresh_interval=HEIGHT_REFRESH))
        sp.config_path.write_text(render_config(cfg))
    await register_on_chain(endpoint, sps)
    nodes = [fl.spawn(sp.dir.name, [*node_command(sp), "--log-level", "warning"])
             for sp in sps]
    await fl.wait_ready(nodes, 120.0)
    await wait_trust(sps, 60.0)
    return Cluster(endpoint, chain, sps, nodes)


# --- measurements against the cluster ---------------------------------------------------------


@dataclass
class Upload:
    size: int
    put: float  # seconds of the PUT
    sealed: float  # PUT answer -> SEALED seen
    rss_before: int  # KiB
    hwm_put: int  # KiB, peak from the reset to the PUT's answer
    hwm_sealed: int  # KiB, peak from the reset to SEALED
    hwm_reset: bool
    cpu_put: dict[str, float] = field(default_factory=dict)
    cpu_seal: dict[str, float] = field(default_factory=dict)
    object_id: int = 0

    @property
    def growth_mib(self) -> float:
        return (self.hwm_sealed - self.rss_before) / 1024

    @property
    def growth_put_mib(self) -> float:
        return (self.hwm_put - self.rss_before) / 1024


class Bench:
    def __init__(self, cluster: Cluster, client: GfspClient, http: httpx.AsyncClient,
                 discard: Child) -> None:
        self.cluster = cluster
        self.discard_pid = discard.proc.pid
        self.discard_cpu: list[float] = []  # CPU-s of the discard server per ceiling PUT
        self.sender_cpu: list[float] = []  # CPU-s of this process (the sender) per ceiling PUT
        self.client = client
        self.http = http
        self.discard = discard.info["ADDR"].rstrip("/")
        self.store = cluster.sps[0].config().piecestore_path
        self.seq = 0
        #: ``--py-spy``: (py-spy binary, output folder); the next upload is profiled.
        self.pyspy: tuple[str, Path] | None = None

    def _spy(self, pid: int, out: Path) -> subprocess.Popen[bytes] | None:
        if self.pyspy is None:
            return None
        rate = os.environ.get("PY_SPY_RATE", "200")
        return subprocess.Popen([self.pyspy[0], "record", "-p", str(pid), "-d", "600",
                                 "--threads", "-r", rate, "-f", "raw", "-o", str(out),
                                 "--nonblocking"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    @staticmethod
    async def _unspy(proc: subprocess.Popen[bytes] | None) -> None:
        if proc is None:
            return
        proc.send_signal(signal.SIGINT)  # py-spy writes its profile on SIGINT
        with trio.move_on_after(30.0):
            while proc.poll() is None:  # noqa: ASYNC110 - a child process
                await trio.sleep(0.1)
        if proc.poll() is None:
            proc.kill()

    def _cpu(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for k, pids in self.cluster.pids().items():
            split = [proc_cpu_split(p) for p in pids]
            out[k] = sum(u + s for u, s in split)
            out[k + " sys"] = sum(s for _, s in split)
            out[k + " loop"] = sum(sum(proc_cpu_split(p, p)) for p in pids)  # the event loops
        out["bench"] = time.process_time()
        return out

    @staticmethod
    def _diff(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
        return {k: b[k] - a[k] for k in a}

    async def put_discard(self, path: Path, size: int) -> float:
        cpu0 = proc_cpu(self.discard_pid)
        own0 = time.process_time()
        t0 = time.perf_counter()
        r = await self.http.put(f"{self.discard}/discard/x", content=_file_chunks(path),
                                headers={"content-length": str(size)})
        dt = time.perf_counter() - t0
        self.sender_cpu.append(time.process_time() - own0)
        self.discard_cpu.append(proc_cpu(self.discard_pid) - cpu0)
        if r.status_code != 200 or r.json().get("received") != size:
            raise RuntimeError(f"discard PUT: HTTP {r.status_code} {r.text[:200]}")
        return dt

    async def get_source(self, size: int) -> float:
        n = 0
        t0 = time.perf_counter()
        async with self.http.stream("GET", f"{self.discard}/source",
                                    params={"size": str(size)}) as r:
            async for chunk in r.aiter_bytes():
                n += len(chunk)
        dt = time.perf_counter() - t0
        if n != size:
            raise RuntimeError(f"source GET gave {n} of {size} bytes")
        return dt

    async def upload(self, path: Path, size: int) -> tuple[str, Upload]:
        self.seq += 1
        name = f"obj-{self.seq}-{size // MiB}m"
        created = await self.client.create_object_from_file(BUCKET, name, path)
        pid = self.cluster.primary_pid
        await trio.sleep(0.5)  # let the create settle (approval, chain) before the baseline
        rss0 = proc_status_kib(pid, "VmRSS")
        reset = reset_hwm(pid)
        spy = self.pyspy
        put_spy = self._spy(pid, spy[1] / "primary-put.txt") if spy else None
        cpu0 = self._cpu()
        t0 = time.perf_counter()
        answer = await self.client.put_object(BUCKET, name, path)
        t1 = time.perf_counter()
        hwm_put = proc_status_kib(pid, "VmHWM")
        cpu1 = self._cpu()
        await self._unspy(put_spy)
        seal_spies = [self._spy(self.cluster.primary_pid, spy[1] / "primary-seal.txt"),
                      self._spy(self.cluster.nodes[1].proc.pid, spy[1] / "secondary-seal.txt")
                      ] if spy else []
        if answer.get("size") != size:
            raise RuntimeError(f"PUT answered {answer!r}")
        with trio.fail_after(max(120.0, size / MiB)):
            while True:
                obj = await self.client.chain.get_object(BUCKET, name)
                if obj is not None and obj.sealed:
                    break
                self.cluster.check_alive()
                await trio.sleep(POLL)
        t2 = time.perf_counter()
        hwm_sealed = proc_status_kib(pid, "VmHWM")
        cpu2 = self._cpu()
        for p in seal_spies:
            await self._unspy(p)
        self.pyspy = None
        return name, Upload(size, t1 - t0, t2 - t1, rss0, hwm_put, hwm_sealed, reset,
                            self._diff(cpu0, cpu1), self._diff(cpu1, cpu2), created.id)

    async def get(self, name: str, size: int, digest: bytes, spy_as: str = "") -> float:
        chunks: list[bytes] = []
        spy = self._spy(self.cluster.primary_pid, self.pyspy[1] / spy_as) \
            if self.pyspy and spy_as else None
        t0 = time.perf_counter()
        async for chunk in self.client.get_object(BUCKET, name):
            chunks.append(chunk)
        dt = time.perf_counter() - t0
        await self._unspy(spy)
        h = hashlib.sha256()
        for c in chunks:
            h.update(c)
        if sum(map(len, chunks)) != size or h.digest() != digest:
            raise RuntimeError(f"GET {name}: other bytes than were put")
        return dt

    def segment_files(self, object_id: int) -> list[Path]:
        pattern = re.compile(rf"{object_id}_s[0-9]+")
        return [p for p in self.store.rglob(f"{object_id}_s*") if pattern.fullmatch(p.name)]

    async def wait_repaired(self, object_id: int, count: int, timeout: float) -> bool:
        with trio.move_on_after(timeout):
            while len(self.segment_files(object_id)) < count:  # noqa: ASYNC110 - files
                await trio.sleep(0.1)
            return True
        return False


# --- the run ----------------------------------------------------------------------------------


@dataclass
class Sizes:
    small: int  # the object of ingest / sealed / GET, and the first RSS row
    big: int  # the second RSS row
    reps: int
    codec_reps: int
    warmup: int = 24 * MiB
    disk_segments: int = 8
    disk_pieces: int = 8  # per writer (the secondaries of one 128 MiB object)
    #: ``--py-spy``: (py-spy binary, output folder) to profile rep 1 with.
    pyspy: tuple[str, Path] | None = None


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def write_random(path: Path, size: int) -> bytes:
    """A file of ``size`` random bytes; returns its sha256."""
    h = hashlib.sha256()
    with open(path, "wb") as fh:
        left = size
        while left:
            block = os.urandom(min(left, SEGMENT))
            h.update(block)
            fh.write(block)
            left -= len(block)
    return h.digest()


def fmt_cpu(cpu: dict[str, float]) -> str:
    """``name total (sys s, loop l)`` per process group: the kernel's share (copies, TCP,
    disk) and the event loops' (the main threads: what the worker threads leave)."""
    parts = []
    for k, v in cpu.items():
        if k.endswith((" sys", " loop")):
            continue
        extra = [f"{what} {cpu[f'{k} {what}']:.2f}" for what in ("sys", "loop")
                 if f"{k} {what}" in cpu]
        parts.append(f"{k} {v:.2f}" + (f" ({', '.join(extra)})" if extra else ""))
    return ", ".join(parts)


def ratio(value: float, ceiling: float) -> str:
    return f"{value / ceiling:.2f}x" if ceiling > 0 else "n/a"


def codec_rows(figs: CodecFigures, res: Results) -> None:
    def rate(s: float | None) -> float:
        return SEGMENT / MiB / s if s else 0.0

    sha = rate(figs.sha256)
    res.rows.append(Row("sha256 of a 16 MiB segment, 1 thread (in-process)",
                        f"{sha:.0f} MiB/s", "1.00x", "ceiling"))
    for what, z, p in (("encode", figs.zfec_enc, figs.pyeclib_enc),
                       ("decode (data pieces 2, 3 lost)", figs.zfec_dec, figs.pyeclib_dec)):
        res.rows.append(Row(f"zfec 4+2 {what}, 16 MiB, 1 thread", f"{rate(z):.0f} MiB/s",
                            f"{rate(z) / sha:.2f}x sha256"))
        if p is None:
            res.rows.append(Row(f"pyeclib isa_l_rs_vand 4+2 {what}", "skipped", "-", "-", "-"))
        else:
            res.rows.append(Row(f"pyeclib isa_l_rs_vand 4+2 {what}, 16 MiB, 1 thread",
                                f"{rate(p):.0f} MiB/s", f"{rate(p) / rate(z):.2f}x zfec"))
    piece = SEGMENT // DATA_SHARDS
    wire = piece / MiB / figs.wire
    res.rows.append(Row(f"challenge answer of a {piece // MiB} MiB piece: JSONResponse (base64) "
                        "render + decode_challenge, 1 thread", f"{wire:.0f} MiB/s",
                        f"{wire / sha:.2f}x sha256"))
    res.notes.append(figs.pyeclib_note)


async def run_all(sizes: Sizes, root: Path, res: Results) -> None:
    progress("codecs and sha256 in-process ...")
    figs = await trio.to_thread.run_sync(codec_figures, sizes.codec_reps)
    codec_rows(figs, res)

    progress("payload files ...")
    files = root / "files"
    files.mkdir()
    small_path, big_path, warm_path = (files / "small.bin", files / "big.bin",
                                       files / "warm.bin")
    small_sum = write_random(small_path, sizes.small)
    big_sum = write_random(big_path, sizes.big)
    write_random(warm_path, sizes.warmup)
    small_data = small_path.read_bytes()

    with fleet(root / "run") as fl:
        t0 = time.perf_counter()
        discard = fl.spawn("discard", [sys.executable, "-m", "bench.data", "--discard-server"])
        progress("devchain + 7 SPs ...")
        cluster = await start_cluster(root, fl)
        await fl.wait_ready([discard], 30.0)
        progress(f"cluster up and converged in {time.perf_counter() - t0:.1f}s")
        primary = cluster.sps[0].keys.operator.address
        async with GfspClient(PrivateKey.generate(), chain=cluster.endpoint,
                              timeout=900.0) as client, \
                httpx.AsyncClient(timeout=httpx.Timeout(900.0, write=None)) as http:
            bench = Bench(cluster, client, http, discard)
            await client.create_bucket(BUCKET, primary_sp=primary)

            progress("warm-up ...")
            await bench.put_discard(warm_path, sizes.warmup)
            await bench.get_source(sizes.warmup)
            name, _ = await bench.upload(warm_path, sizes.warmup)
            await bench.get(name, sizes.warmup,
                            hashlib.sha256(warm_path.read_bytes()).digest())

            ceil_put: list[float] = []
            ceil_get: list[float] = []
            ups: list[Upload] = []
            gets: list[float] = []
            degraded: list[float] = []
            bounds: list[float] = []
            disk: list[float] = []
            discard_cpu: list[float] = []
            disk_nosync: list[float] = []
            disk_pieces: list[float] = []
            disk_pieces_cpu: list[float] = []
            disk_cpu: list[float] = []
            sender_cpu: list[float] = []
            big: Upload | None = None
            big_ceiling = 0.0
            for rep in range(sizes.reps):
                progress(f"{sizes.small // MiB} MiB, rep {rep + 1}/{sizes.reps} ...")
                ceil_put.append(await bench.put_discard(small_path, sizes.small))
                discard_cpu.append(bench.discard_cpu[-1])
                sender_cpu.append(bench.sender_cpu[-1])
                if rep == 0 and sizes.pyspy is not None:
                    bench.pyspy = sizes.pyspy
                name, up = await bench.upload(small_path, sizes.small)
                ups.append(up)
                ceil_get.append(await bench.get_source(sizes.small))
                if rep == 0 and sizes.pyspy is not None:
                    bench.pyspy = sizes.pyspy
                gets.append(await bench.get(name, sizes.small, small_sum, "primary-get.txt"))
                segs = bench.segment_files(up.object_id)
                count = len(segs)
                for p in segs:
                    p.unlink()
                degraded.append(await bench.get(name, sizes.small, small_sum,
                                                "primary-degraded.txt"))
                bench.pyspy = None
                if not await bench.wait_repaired(up.object_id, count, 60.0):
                    res.notes.append(f"rep {rep + 1}: the primary's segments were not all "
                                     "repaired within 60 s of the degraded GET")
                bounds.append(await trio.to_thread.run_sync(cpu_bound, small_data, CPU_THREADS))
                dt, cpu = await disk_put(root / "disk", sizes.disk_segments)
                disk.append(dt)
                disk_cpu.append(cpu)
                disk_nosync.append((await disk_put(root / "disk", sizes.disk_segments,
                                                   False))[0])
                dt, cpu = await disk_put_pieces(root / "disk-pieces", N_SECONDARIES,
                                                sizes.disk_pieces)
                disk_pieces.append(dt)
                disk_pieces_cpu.append(cpu)
                if rep == 0:
                    progress(f"{sizes.big // MiB} MiB upload (RSS) ...")
                    big_ceiling = await bench.put_discard(big_path, sizes.big)
                    bname, big = await bench.upload(big_path, sizes.big)
                    await bench.get(bname, sizes.big, big_sum)  # checks the bytes (untimed)
            one_thread = await trio.to_thread.run_sync(cpu_bound, small_data, 1)
            await trio.sleep(1.0)  # let repairs and read records settle
            rss_end = proc_status_kib(cluster.primary_pid, "VmRSS")
        cluster.check_alive()

    assert big is not None
    small_mib = sizes.small // MiB
    n = sizes.reps
    med = statistics.median
    tag = f"median of {n}" if n > 1 else "1 run"
    ceiling_put = mib_s(sizes.small, med(ceil_put))
    ingest = mib_s(sizes.small, med(u.put for u in ups))
    res.rows.append(Row(f"ingest ceiling: PUT {small_mib} MiB into a discard route (same "
                        f"hypercorn-trio stack, child process; {tag})",
                        f"{ceiling_put:.0f} MiB/s", "1.00x", "ceiling"))
    r = ingest / ceiling_put
    res.rows.append(Row(f"ingest: PUT {small_mib} MiB to the primary of 7 SPs ({tag})",
                        f"{ingest:.0f} MiB/s", f"{r:.2f}x", ">= 0.6x", "yes" if r >= 0.6 else "NO"))
    disk_rate = mib_s(sizes.disk_segments * SEGMENT, med(disk))
    r = disk_rate / ceiling_put
    res.rows.append(Row(f"disk: LocalPieceStore.put of 16 MiB segments with fsync, one at a "
                        f"time (the uploader's writes: no PUT is answered faster; in-process, "
                        f"same filesystem; {tag})", f"{disk_rate:.0f} MiB/s", f"{r:.2f}x",
                        "room for 0.6x?", "yes" if r >= 0.6 else "NO"))
    # The least CPU a PUT costs this machine, measured in this run: the client's sending and
    # the server's receiving (the ceiling PUT's CPU-s at both ends), the segments' sha256 and
    # their durable writes; over the cores, the fastest that PUT could go.
    segments = sizes.small / SEGMENT
    put_work = {"HTTP": med(sender_cpu) + med(discard_cpu),
                "sha256": segments * figs.sha256,
                "writes": segments / sizes.disk_segments * med(disk_cpu)}
    cores = os.cpu_count() or 1
    put_floor = sum(put_work.values()) / cores
    r = med(ceil_put) / put_floor
    res.rows.append(Row(f"ingest CPU floor: the work no PUT skips "
                        f"({', '.join(f'{k} {v:.2f}' for k, v in put_work.items())} CPU-s) over "
                        f"{cores} cores, nothing else", f"{mib_s(sizes.small, put_floor):.0f} "
                        f"MiB/s", f"{r:.2f}x", "room for 0.6x?", "yes" if r >= 0.6 else "NO"))
    bound = med(bounds)
    res.rows.append(Row(f"CPU bound {small_mib} MiB: sha256 + zfec encode + sha256 of pieces, "
                        f"{CPU_THREADS} threads (in-process; {tag})", f"{bound:.2f} s", "1.00x",
                        "ceiling"))
    sealed = med(u.sealed for u in ups)
    r = sealed / bound
    res.rows.append(Row(f"upload-done -> sealed, {small_mib} MiB, 7 SPs ({tag})",
                        f"{sealed:.2f} s", f"{r:.2f}x", "<= 2x", "yes" if r <= 2 else "NO"))
    piece_bytes = N_SECONDARIES * sizes.disk_pieces * (SEGMENT // DATA_SHARDS)
    pieces_rate = mib_s(piece_bytes, med(disk_pieces))
    stored = sizes.small * N_SECONDARIES / DATA_SHARDS
    floor = stored / MiB / pieces_rate
    res.rows.append(Row(f"disk: {N_SECONDARIES} stores put {SEGMENT // DATA_SHARDS // MiB} MiB "
                        f"pieces with fsync at once (the secondaries' writes; {tag})",
                        f"{pieces_rate:.0f} MiB/s"))
    res.rows.append(Row(f"upload-done -> sealed floor: the secondaries store "
                        f"{stored / MiB:.0f} MiB durably on this one disk (k+m)/k x the object",
                        f"{floor:.2f} s", f"{floor / bound:.2f}x", "room for 2x?",
                        "yes" if floor <= 2 * bound else "NO"))
    # The work no replication can skip, as CPU-s measured in this run, over this machine's
    # cores: the parity of every segment; each piece hashed by the primary (its hash is signed
    # into the request) and again by its secondary (which checks it); every piece sent and
    # received over HTTP, at the discard PUT's CPU per byte at both ends; every piece written
    # durably, at the piece-write test's CPU per byte.
    stored_mib = stored / MiB
    per_mib = (med(discard_cpu) + med(sender_cpu)) / small_mib
    work = {"encode": segments * figs.zfec_enc,
            "sha256 x2": 2 * stored / SEGMENT * figs.sha256,
            "HTTP": stored_mib * per_mib,
            "writes": stored_mib / (piece_bytes / MiB) * med(disk_pieces_cpu)}
    cpu_floor = sum(work.values()) / cores
    res.rows.append(Row(f"upload-done -> sealed CPU floor: the work no replication skips "
                        f"({', '.join(f'{k} {v:.2f}' for k, v in work.items())} CPU-s) over "
                        f"{cores} cores, nothing else", f"{cpu_floor:.2f} s",
                        f"{cpu_floor / bound:.2f}x", "room for 2x?",
                        "yes" if cpu_floor <= 2 * bound else "NO"))
    res.notes.append(f"sealed CPU floor: {sum(work.values()):.2f} CPU-s of required work against "
                     f"{2 * bound * cores:.2f} CPU-s that 2x the CPU bound gives {cores} cores: "
                     f"{2 * bound * cores - sum(work.values()):.2f} CPU-s left for everything "
                     f"else (requests, signatures, SQLite, event loops, the seal transaction), "
                     f"if every core were busy all the time")
    ceiling_get = mib_s(sizes.small, med(ceil_get))
    res.rows.append(Row(f"GET ceiling: {small_mib} MiB StreamingResponse from memory (same "
                        f"stack; {tag})", f"{ceiling_get:.0f} MiB/s", "1.00x", "ceiling"))
    g = mib_s(sizes.small, med(gets))
    d = mib_s(sizes.small, med(degraded))
    res.rows.append(Row(f"GET {small_mib} MiB, normal ({tag})", f"{g:.0f} MiB/s",
                        ratio(g, ceiling_get)))
    res.rows.append(Row(f"GET {small_mib} MiB, degraded: primary's segments deleted ({tag})",
                        f"{d:.0f} MiB/s", ratio(d, ceiling_get)))
    big_mib = sizes.big // MiB
    bi = mib_s(sizes.big, big.put)
    res.rows.append(Row(f"ingest: PUT {big_mib} MiB to the primary (1 run; vs discard PUT of it)",
                        f"{bi:.0f} MiB/s", ratio(bi, mib_s(sizes.big, big_ceiling)),
                        "(>= 0.6x)", "yes" if bi / mib_s(sizes.big, big_ceiling) >= 0.6
                        else "NO"))
    big_bound = bound * sizes.big / sizes.small
    res.rows.append(Row(f"upload-done -> sealed, {big_mib} MiB (1 run; vs the CPU bound scaled "
                        f"x{sizes.big / sizes.small:g})", f"{big.sealed:.2f} s",
                        ratio(big.sealed, big_bound), "(<= 2x)",
                        "yes" if big.sealed <= 2 * big_bound else "NO"))
    first = ups[0]
    for what, up in ((f"{small_mib} MiB", first), (f"{big_mib} MiB", big)):
        gr = up.growth_mib
        res.rows.append(Row(f"primary peak RSS growth, {what} upload (VmHWM at sealed - VmRSS "
                            f"before PUT)", f"{gr:.0f} MiB", f"{gr * MiB / SEGMENT:.2f} segments",
                            f"<= {RSS_LIMIT_MIB} MiB", "yes" if gr <= RSS_LIMIT_MIB else "NO"))
    flat = big.growth_mib / first.growth_mib if first.growth_mib > 0 else float("inf")
    res.rows.append(Row(f"RSS growth {big_mib} MiB / {small_mib} MiB (object x"
                        f"{sizes.big / sizes.small:g})", f"{big.growth_mib - first.growth_mib:+.0f}"
                        " MiB", f"{flat:.2f}x", f"<= {FLAT_LIMIT:g}x",
                        "yes" if flat <= FLAT_LIMIT else "NO"))
    befores = [u.rss_before for u in (*ups, big)]
    kept = (max(befores) - first.rss_before) / 1024
    res.rows.append(Row(
        f"primary VmRSS retained between uploads (MiB before the first {first.rss_before // 1024},"
        f" highest before a later one {max(befores) // 1024}, end of run {rss_end // 1024})",
        f"{kept:+.0f} MiB", f"{kept * MiB / SEGMENT:.2f} segments"))

    ingest_cpu = [u.cpu_put["primary"] / (u.size / MiB) * 1000 for u in ups]
    res.notes.append(
        "CPU per MiB received: discard server " + ", ".join(
            f"{c / (sizes.small / MiB) * 1000:.2f}" for c in discard_cpu)
        + " ms; primary during the PUT " + ", ".join(f"{c:.2f}" for c in ingest_cpu)
        + " ms (per rep); disk per rep " + ", ".join(
            f"{mib_s(sizes.disk_segments * SEGMENT, x):.0f}" for x in disk)
        + " MiB/s, the same without fsync (page cache only) " + ", ".join(
            f"{mib_s(sizes.disk_segments * SEGMENT, x):.0f}" for x in disk_nosync) + " MiB/s")
    res.notes.append(f"CPU bound, 1 thread: {one_thread:.2f} s ({one_thread / bound:.2f}x the "
                     f"{CPU_THREADS}-thread figure); per rep, {CPU_THREADS} threads: "
                     + ", ".join(f"{b:.2f}" for b in bounds) + " s")
    res.notes.append("per rep: ingest " + ", ".join(
        f"{mib_s(u.size, u.put):.0f}" for u in ups) + " MiB/s (discard " + ", ".join(
        f"{mib_s(sizes.small, c):.0f}" for c in ceil_put) + "); sealed " + ", ".join(
        f"{u.sealed:.2f}" for u in ups) + " s; GET " + ", ".join(
        f"{mib_s(sizes.small, x):.0f}" for x in gets) + " / degraded " + ", ".join(
        f"{mib_s(sizes.small, x):.0f}" for x in degraded) + " MiB/s")
    for label, up in [*((f"{small_mib} MiB rep {i + 1}", u) for i, u in enumerate(ups)),
                      (f"{big_mib} MiB", big)]:
        res.notes.append(
            f"{label}: primary RSS before {up.rss_before / 1024:.0f} MiB, peak growth during "
            f"the PUT {up.growth_put_mib:.0f} MiB, to sealed {up.growth_mib:.0f} MiB"
            + ("" if up.hwm_reset else " (VmHWM could not be reset: peak since start)")
            + f"; CPU-s during the PUT ({up.put:.2f} s): {fmt_cpu(up.cpu_put)}; during "
            f"done->sealed ({up.sealed:.2f} s): {fmt_cpu(up.cpu_seal)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.data",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="32 MiB / 64 MiB objects, 1 rep (a smoke check)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (logs, SPs)")
    parser.add_argument("--object-mib", type=int, help="object size of the ingest / sealed / GET"
                        " rows and the first RSS row (default 256; --quick 32)")
    parser.add_argument("--big-mib", type=int,
                        help="object size of the second RSS row (default 1024; --quick 64)")
    parser.add_argument("--reps", type=int, help="repetitions (default 3; --quick 1)")
    parser.add_argument("--py-spy", metavar="DIR", type=Path,
                        help="profile rep 1 with py-spy (PY_SPY env: its binary, default "
                        "/tmp/pyspy/bin/py-spy; PY_SPY_RATE: samples/s, default 200) into "
                        "DIR: the primary during the PUT, the primary and one secondary "
                        "from the PUT's answer to sealed, the primary during the normal "
                        "and the degraded GET (raw folded stacks)")
    parser.add_argument("--discard-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.discard_server:
        trio.run(discard_server_main)
        return 0
    sizes = (Sizes(small=32 * MiB, big=64 * MiB, reps=1, codec_reps=3, disk_segments=4,
                   disk_pieces=2)
             if args.quick
             else Sizes(small=256 * MiB, big=1024 * MiB, reps=3, codec_reps=10))
    if args.object_mib:
        sizes.small = args.object_mib * MiB
    if args.big_mib:
        sizes.big = args.big_mib * MiB
    if args.reps:
        sizes.reps = args.reps
    if args.py_spy:
        args.py_spy.mkdir(parents=True, exist_ok=True)
        sizes.pyspy = (os.environ.get("PY_SPY", "/tmp/pyspy/bin/py-spy"), args.py_spy)
    res = Results()
    load_before = _loadavg()
    t0 = time.perf_counter()
    failed = False
    with work_folder("gfsp-bench-data-", keep=args.keep) as root:
        try:
            trio.run(_guarded, sizes, root, res)
        except Exception as exc:  # print what we have, then the failure
            failed = True
            res.notes.append(f"the run failed: {type(exc).__name__}: {exc}")
            log.exception("the run failed")
    print(f"gfsp data bench{' --quick' if args.quick else ''}: {os.cpu_count()} cpus, loopback; "
          f"{N_SPS} SP processes + devchain process, {SEGMENT // MiB} MiB segments, "
          f"{DATA_SHARDS}+{PARITY_SHARDS}, fsync on (node default); loadavg before "
          f"{load_before}, after {_loadavg()}")
    print_table(res.rows)
    print("ratio: to the row marked ceiling above it, measured in this run (GET rows: to the "
          "GET ceiling; RSS rows: growth / segment size). Rows in parentheses: same targets, "
          "informative (one run).")
    print("disk: every SP of the cluster stores on this one disk, and nothing is acknowledged "
          "before it is durable (fsync), so the uploader's write rate bounds ingest, and the "
          "secondaries' write rate bounds the seal from below (the primary's reads of its "
          "segments come on top); a 'NO' in a 'room for' row puts that target out of reach "
          "in this run, whatever the node's CPU costs.")
    print("CPU bound: per segment sha256(segment) + node.ec.Codec.encode + sha256 of each of "
          "the 6 pieces, in memory, segments over 2 threads; it leaves out the body's own "
          "sha256 in the gater, the primary's piece hashes for signing, the receivers' body "
          "hashes, disk, HTTP and the event loops.")
    for note in res.notes:
        print(f"note: {note}")
    print(f"total {time.perf_counter() - t0:.1f}s")
    return 1 if failed or any(r.ok == "NO" for r in res.rows) else 0


async def _guarded(sizes: Sizes, root: Path, res: Results) -> None:
    """run_all, cancelled by SIGTERM (the rows so far are still printed)."""
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            async def on_sigterm() -> None:
                async for _ in signals:
                    res.notes.append("interrupted by SIGTERM: the remaining rows were skipped")
                    nursery.cancel_scope.cancel()
                    return
            nursery.start_soon(on_sigterm)
            await run_all(sizes, root, res)
            nursery.cancel_scope.cancel()


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
