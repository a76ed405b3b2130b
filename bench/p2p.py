"""P2P benchmark: request ceiling, signed ping RTT, approval quorum, discovery convergence.

Run from the work tree: ``.venv/bin/python -m bench.p2p [--quick] [--keep]``. Prints one table
(what | value | ratio | target | ok). Every responder is a separate OS process on 127.0.0.1:

* the ceiling: :meth:`P2PHost.request` (one frame each way on a new stream) to an echo host run
  by this same module in a child process (``--echo-responder``); the in-process figure (both
  hosts in this process) is shown for comparison;
* ping RTT: :meth:`Discovery.ping_peer` of an in-process node (the bench) to node processes,
  and the bare signed Ping -> Pong request (sign, request, decode, verify; no peer-table write);
* approval quorum: an in-process node asks 6 ``gfsp-node run`` processes
  (``handle_replicate_piece_approval``), min=4/max=6 and min=6/max=6;
* discovery convergence of 8/16/32 node processes bootstrapping from sp0 only, ping_interval
  1.0 s: from the last READY=1 (sd_notify, one AF_UNIX datagram socket per process) until every
  node's SPDB ``peers`` table lists every other node as trusted (polled every 50 ms, read-only).

Children are SIGTERMed then SIGKILLed in ``finally`` blocks, and each one also gets
``PR_SET_PDEATHSIG=SIGKILL`` so that it dies with the bench even if the bench is SIGKILLed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import hashlib
import logging
import math
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import trio

from node.config import P2PSection
from node.crypto import PrivateKey
from node.tasks import ObjectInfo, ReplicatePieceApprovalTask, StorageParams
from p2p.approval import InsufficientApprovals
from p2p.host import P2PHost, Stream, open_host, peer_id_from_public_key
from p2p.messages import MAX_ADDRS, PING_PROTOCOL, Ping, Pong, decode, encode, new_nonce, verify
from tests.p2pnet import (
    RunningNode,
    SPDir,
    make_sps,
    node_command,
    node_process_env,
    wait_until,
)

REPO = Path(__file__).resolve().parent.parent
ECHO_PROTOCOL = "/gfsp-bench/echo/1.0.0"
ECHO_MAX = 64 * 1024
ECHO_PAYLOAD = 256  # about the size of an encoded signed Ping
ECHO_RESPONDER_SEED = "gfsp-bench-echo-responder"
CONVERGENCE_PING_INTERVAL = 1.0
CLUSTER_PING_INTERVAL = 60.0  # rows 1-3: keep background discovery traffic out of the figures
QUORUM_TIMEOUT = 5.0
QUORUM_PEERS = 6  # node processes asked for approval
POLL = 0.05
STOP_GRACE = 5.0

log = logging.getLogger("bench.p2p")


# --- child processes ------------------------------------------------------------------------

_LIVE: list[subprocess.Popen[bytes]] = []  # every child ever started, for last-resort cleanup
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    def preexec() -> None:
        # runs in the child between fork and exec: SIGKILL us when the bench dies. Popen is
        # only ever called from the main thread (the death signal follows the forking thread).
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the bench died before prctl took effect
            os._exit(1)
    return preexec


def terminate(procs: list[subprocess.Popen[bytes]], grace: float = STOP_GRACE) -> None:
    """SIGTERM every live process, wait up to ``grace`` s in total, then SIGKILL the rest."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait()


class ChildDied(RuntimeError):
    pass


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    sock: trio.socket.SocketType
    log_path: Path
    ready_at: float | None = None
    info: dict[str, str] = field(default_factory=dict)

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    async def wait_ready(self) -> None:
        """Until the child sends READY=1 to its notify socket; ChildDied if it exits first."""
        while True:
            if self.proc.poll() is not None:
                raise ChildDied(f"{self.name} exited with {self.proc.returncode} before READY:"
                                f"\n{self.log_tail()}")
            with trio.move_on_after(POLL):
                data = await self.sock.recv(4096)
                for line in data.decode(errors="replace").splitlines():
                    key, _, value = line.partition("=")
                    self.info[key] = value
                if self.info.get("READY") == "1":
                    self.ready_at = time.perf_counter()
                    return


class Fleet:
    """Child processes, each with its own NOTIFY_SOCKET; ``close()`` stops them all."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.children: list[Child] = []
        (root / "notify").mkdir(parents=True, exist_ok=True)
        (root / "logs").mkdir(parents=True, exist_ok=True)

    def spawn(self, name: str, cmd: list[str]) -> Child:
        """Start cmd with NOTIFY_SOCKET set to a fresh datagram socket of ours.

        Synchronous on purpose: Popen must run in the main thread (PR_SET_PDEATHSIG fires when
        the forking *thread* ends, and trio's own open_process forks in a worker thread).
        """
        sock_path = self.root / "notify" / f"{name}.sock"
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            raw.bind(str(sock_path))
            env = node_process_env()
            env["NOTIFY_SOCKET"] = str(sock_path)
            for var in ("WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID"):
                env.pop(var, None)
            log_path = self.root / "logs" / f"{name}.log"
            with open(log_path, "wb") as out:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                        close_fds=True, preexec_fn=_die_with_parent(os.getpid()))
        except BaseException:
            raw.close()
            raise
        _LIVE.append(proc)
        child = Child(name, proc, trio.socket.from_stdlib_socket(raw), log_path)
        self.children.append(child)
        return child

    async def wait_ready(self, children: list[Child], timeout: float) -> float:
        """Wait for READY=1 from each; returns the perf_counter time of the last one."""
        try:
            with trio.fail_after(timeout):
                async with trio.open_nursery() as nursery:
                    for c in children:
                        nursery.start_soon(c.wait_ready)
        except trio.TooSlowError:
            late = [c.name for c in children if c.ready_at is None]
            raise ChildDied(f"no READY after {timeout:.0f}s from {', '.join(late)}") from None
        return max(c.ready_at or 0.0 for c in children)

    def close(self) -> None:
        terminate([c.proc for c in self.children])
        for c in self.children:
            c.sock.close()  # only now: a stopping node sends STOPPING=1 to it


@contextlib.contextmanager
def work_folder(prefix: str, *, keep: bool) -> Iterator[Path]:
    """A temp folder for one benchmark run; on the way out every child ever started is
    stopped and the folder removed (or kept, and said so)."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield root
    finally:
        terminate(_LIVE)
        if keep:
            progress(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def fleet(root: Path) -> Iterator[Fleet]:
    f = Fleet(root)
    try:
        yield f
    finally:
        f.close()


# --- statistics and the table -----------------------------------------------------------------


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(xs)
    return s[max(0, math.ceil(q * len(s)) - 1)]


@dataclass
class Row:
    what: str
    value: str
    ratio: str = "-"
    target: str = "-"
    ok: str = "-"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def ratio_row(what: str, value: float, ceiling: float | None, limit: float | None) -> Row:
    if ceiling is None or ceiling <= 0:
        return Row(what, ms(value), "n/a", f"<= {limit:g}x" if limit else "-",
                   "n/a" if limit else "-")
    r = value / ceiling
    if limit is None:
        return Row(what, ms(value), f"{r:.2f}x")
    return Row(what, ms(value), f"{r:.2f}x", f"<= {limit:g}x", "yes" if r <= limit else "NO")


def quorum_floor_row(echo_cpu: tuple[float, float], ceiling: float) -> Row:
    """A quorum of :data:`QUORUM_PEERS` approvals is at least that many new-stream requests
    (PROTOCOL.md: one request per stream, one stream per peer), each costing at least the
    CPU an echo request costs its two ends; on this machine's cores they take no less than
    ``peers * (asker + responder) / cores`` (the asker's share alone, ``peers * asker``,
    when that is larger). Signing, verifying, the approver and wake-ups come on top."""
    cores = os.cpu_count() or 1
    asker, responder = echo_cpu
    floor = max(QUORUM_PEERS * asker, QUORUM_PEERS * (asker + responder) / cores)
    return Row(f"approval quorum floor: {QUORUM_PEERS} x CPU of an echo request (both ends) "
               f"over {cores} cores", ms(floor), f"{floor / ceiling:.2f}x",
               "below 3x?", "yes" if floor / ceiling <= 3 else "NO")


def print_table(rows: list[Row]) -> None:
    head = Row("what", "value", "ratio", "target", "ok")
    cols = [[getattr(r, f.name) for r in [head, *rows]] for f in dataclasses.fields(Row)]
    widths = [max(len(v) for v in col) for col in cols]

    def line(r: Row) -> str:
        vals = [getattr(r, f.name) for f in dataclasses.fields(Row)]
        return "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths, strict=True)) + " |"

    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))


async def timed(n: int, warmup: int, fn: Callable[[int], Awaitable[bool]]
                ) -> tuple[list[float], int]:
    """Run fn(i) warmup+n times; the durations of the n measured calls that returned True."""
    out: list[float] = []
    failed = 0
    for i in range(warmup + n):
        t0 = time.perf_counter()
        ok = await fn(i)
        dt = time.perf_counter() - t0
        if i >= warmup:
            if ok:
                out.append(dt)
            else:
                failed += 1
    return out, failed


def progress(msg: str) -> None:
    print(f"[bench.p2p] {msg}", file=sys.stderr, flush=True)


_TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a (child) process so far, from /proc (0 if gone)."""
    return sum(proc_cpu_split(pid))


def proc_cpu_split(pid: int, tid: int | None = None) -> tuple[float, float]:
    """(user, system) CPU seconds of a (child) process so far, or of its thread ``tid`` (the
    process's main thread: ``tid=pid``), from /proc (0s if gone)."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        with open(path) as fh:
            stat = fh.read()
    except OSError:
        return 0.0, 0.0
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


class CpuMeter:
    """CPU used by this process and by some children between start and per_call()."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.own0 = time.process_time()
        self.kids0 = sum(proc_cpu(p) for p in pids)

    def per_call(self, calls: int) -> tuple[float, float]:
        own = time.process_time() - self.own0
        kids = sum(proc_cpu(p) for p in self.pids) - self.kids0
        return own / calls, kids / calls


def cpu_note(what: str, own: float, kids: float, who: str) -> str:
    cores = os.cpu_count() or 1
    floor = max(own, (own + kids) / cores)
    return (f"CPU per call, {what}: bench process {own * 1000:.1f} ms + {who} "
            f"{kids * 1000:.1f} ms -> wall-time floor on {cores} cores "
            f"max(own, total/{cores}) = {floor * 1000:.1f} ms")


# --- the echo responder (child process) -------------------------------------------------------


async def _echo(stream: Stream) -> None:
    await stream.write_frame(await stream.read_frame(ECHO_MAX), last=True)


async def echo_responder_main() -> None:
    """Child mode: an echo host; READY=1 and ADDR=<multiaddr> go to NOTIFY_SOCKET."""
    key = PrivateKey.from_passphrase(ECHO_RESPONDER_SEED, "p2p")
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with open_host(key, "/ip4/127.0.0.1/tcp/0", connect_timeout=5.0,
                             handlers={ECHO_PROTOCOL: _echo}) as host:
            addr = os.environ.get("NOTIFY_SOCKET", "")
            if addr:
                with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                    s.sendto(f"READY=1\nADDR={host.listen_addrs[0]}".encode(), addr)
            async for _ in signals:
                return


# --- the benchmark sections -------------------------------------------------------------------


@dataclass
class Counts:
    requests: int
    pings: int
    asks: int
    sizes: tuple[int, ...]
    warmup: int = 10
    ping_interval: float = CONVERGENCE_PING_INTERVAL
    default_interval_row: bool = False  # the largest size again at the node's default period


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ceiling: tuple[float, float] | None = None  # (median, p99) of the process request
    #: CPU-s per echo request: (asker, responder), both processes' whole use during the run
    echo_cpu: tuple[float, float] | None = None


async def echo_requests(host: P2PHost, peer_id: str, addr: str, counts: Counts
                        ) -> tuple[list[float], int]:
    payload = os.urandom(ECHO_PAYLOAD)

    async def one(_: int) -> bool:
        data = await host.request(peer_id, [addr], ECHO_PROTOCOL, payload, max_response=ECHO_MAX,
                                  timeout=5.0)
        return data == payload

    return await timed(counts.requests, counts.warmup, one)


async def bench_ceiling(root: Path, counts: Counts, res: Results) -> None:
    asker_key = PrivateKey.from_passphrase("gfsp-bench-echo-asker", "p2p")
    local_key = PrivateKey.from_passphrase("gfsp-bench-echo-local", "p2p")
    responder_id = peer_id_from_public_key(
        PrivateKey.from_passphrase(ECHO_RESPONDER_SEED, "p2p").public_key)
    with fleet(root / "echo") as f:
        child = f.spawn("echo", [sys.executable, "-m", "bench.p2p", "--echo-responder"])
        await f.wait_ready([child], 30.0)
        addr = child.info["ADDR"]
        async with open_host(asker_key, "/ip4/127.0.0.1/tcp/0", connect_timeout=5.0,
                             handlers={}) as asker:
            meter = CpuMeter([child.proc.pid])
            samples, failed = await echo_requests(asker, responder_id, addr, counts)
            res.echo_cpu = meter.per_call(counts.warmup + counts.requests)
            res.notes.append(cpu_note("echo request", *res.echo_cpu, "echo process"))
            med, p99 = statistics.median(samples), pct(samples, 0.99)
            res.ceiling = (med, p99)
            tag = f"n={len(samples)}" + (f", {failed} failed" if failed else "")
            res.rows.append(Row(f"request on a new stream, median (echo process; {tag})",
                                ms(med), "1.00x", "ceiling"))
            res.rows.append(Row("request on a new stream, p99 (echo process)", ms(p99),
                                "1.00x", "ceiling"))
            res.rows.append(quorum_floor_row(res.echo_cpu, med))
            # for comparison: both hosts in this process
            async with open_host(local_key, "/ip4/127.0.0.1/tcp/0", connect_timeout=5.0,
                                 handlers={ECHO_PROTOCOL: _echo}) as local:
                samples, failed = await echo_requests(
                    asker, local.peer_id, local.listen_addrs[0], counts)
            med2, p992 = statistics.median(samples), pct(samples, 0.99)
            res.rows.append(ratio_row("request on a new stream, median (in-process responder)",
                                      med2, med, None))
            res.rows.append(ratio_row("request on a new stream, p99 (in-process responder)",
                                      p992, p99, None))


def _quorum_bootstrap(i: int, sps: list[SPDir]) -> list[str]:
    if i == 0:
        return []
    if i < QUORUM_PEERS:
        return [sps[0].bootstrap_entry]
    return [sp.bootstrap_entry for sp in sps[:QUORUM_PEERS]]  # the in-process asker: all


def _task(k: int, owner: str) -> ReplicatePieceApprovalTask:
    params = StorageParams(segment_size=16 << 20, data_shards=4, parity_shards=2,
                           max_payload=64 << 30)
    sums = [hashlib.sha256(f"obj-{k}-{i}".encode()).digest() for i in range(7)]
    obj = ObjectInfo(id=1_000_000 + k, bucket="bench", name=f"obj-{k}", owner=owner,
                     size=8 << 20, checksums=sums)
    return ReplicatePieceApprovalTask(object=obj, params=params)


async def bench_cluster(root: Path, counts: Counts, res: Results) -> None:
    """Rows 1 and 3: six node processes, one in-process node asking them."""
    sps = make_sps(root / "quorum", QUORUM_PEERS + 1,
                   p2p={"ping_interval": CLUSTER_PING_INTERVAL}, bootstrap=_quorum_bootstrap,
                   tag="q")
    procs, asker_sp = sps[:QUORUM_PEERS], sps[QUORUM_PEERS]
    peers = [sp.peer_id for sp in procs]
    with fleet(root / "quorum-run") as f:
        children = [f.spawn(sp.dir.name, [*node_command(sp), "--log-level", "warning"])
                    for sp in procs]
        await f.wait_ready(children, 60.0)
        progress("6 node processes READY; starting the in-process asker")
        async with trio.open_nursery() as nursery:
            asker = RunningNode(asker_sp)
            await nursery.start(asker._run)
            try:
                with trio.fail_after(15.0):
                    await wait_until(lambda: asker.trusted() >= set(peers))
                await _ping_rows(asker, procs, counts, res)
                pids = [c.proc.pid for c in children]
                for mn, mx in ((4, 6), (6, 6)):
                    await _quorum_rows(asker, mn, mx, counts, res, pids)
                for c in children:
                    if c.proc.poll() is not None:
                        res.notes.append(f"{c.name} exited ({c.proc.returncode}) during the run")
            finally:
                with trio.move_on_after(10.0):
                    await asker.stop()
                nursery.cancel_scope.cancel()


async def _ping_rows(asker: RunningNode, procs: list[SPDir], counts: Counts,
                     res: Results) -> None:
    p2p = asker.p2p
    disc, host, cfg = p2p.discovery, p2p.host, p2p.cfg
    signer = asker.node.ctx.modulars.signer
    peers = [sp.peer_id for sp in procs]
    op_keys = {sp.peer_id: sp.keys.operator.public_key for sp in procs}
    addrs = {sp.peer_id: (sp.addr,) for sp in procs}
    ceiling_med, ceiling_p99 = res.ceiling or (None, None)

    async def ping_peer(i: int) -> bool:
        return await disc.ping_peer(peers[i % len(peers)])

    samples, failed = await timed(counts.pings, counts.warmup, ping_peer)
    tag = f"n={len(samples)}" + (f", {failed} failed" if failed else "")
    res.rows.append(ratio_row(f"ping RTT, Discovery.ping_peer, median ({tag})",
                              statistics.median(samples), ceiling_med, None))
    res.rows.append(ratio_row("ping RTT, Discovery.ping_peer, p99",
                              pct(samples, 0.99), ceiling_p99, None))

    async def bare_ping(i: int) -> bool:
        peer = peers[i % len(peers)]
        ping = Ping(operator=disc.operator, peer_id=host.peer_id,
                    addrs=tuple(host.listen_addrs[:MAX_ADDRS]), ts=disc.guard.now_ms(),
                    nonce=new_nonce())
        ping = dataclasses.replace(ping, sig=signer.sign_p2p_ping_msg(ping))
        data = await host.request(peer, addrs[peer], PING_PROTOCOL, encode(ping),
                                  max_response=cfg.max_ping_frame, timeout=cfg.ping_timeout)
        pong = decode(data, Pong)
        verify(pong, op_keys[peer])
        return pong.ping_nonce == ping.nonce and pong.peer_id == peer

    samples, failed = await timed(counts.pings, counts.warmup, bare_ping)
    tag = f"n={len(samples)}" + (f", {failed} failed" if failed else "")
    res.rows.append(ratio_row(f"ping RTT, signed Ping->Pong request only, median ({tag})",
                              statistics.median(samples), ceiling_med, None))
    res.rows.append(ratio_row("ping RTT, signed Ping->Pong request only, p99",
                              pct(samples, 0.99), ceiling_p99, None))


async def _quorum_rows(asker: RunningNode, mn: int, mx: int, counts: Counts,
                       res: Results, pids: list[int]) -> None:
    p2p = asker.p2p
    owner = asker.node.ctx.modulars.signer.operator_address
    base = 100_000 * mn + 1_000 * mx
    short = 0
    errors: list[str] = []

    async def ask(i: int) -> bool:
        nonlocal short
        try:
            got = await p2p.handle_replicate_piece_approval(_task(base + i, owner), mn, mx,
                                                            QUORUM_TIMEOUT)
        except InsufficientApprovals as exc:
            errors.append(str(exc))
            return False
        short += len(got) < mx
        return True

    meter = CpuMeter(pids)
    samples, failed = await timed(counts.asks, counts.warmup, ask)
    res.notes.append(cpu_note(f"quorum min={mn} max={mx}",
                              *meter.per_call(counts.warmup + counts.asks), "6 node processes"))
    if not samples:
        raise RuntimeError(f"quorum min={mn} max={mx}: every ask failed: {errors[:1]}")
    ceiling_med, ceiling_p99 = res.ceiling or (None, None)
    tag = f"n={len(samples)}" + (f", {failed} failed" if failed else "") + (
        f", {short} under max" if short else "")
    res.rows.append(ratio_row(f"approval quorum 6 procs min={mn} max={mx}, median ({tag})",
                              statistics.median(samples), ceiling_med, 3))
    res.rows.append(ratio_row(f"approval quorum 6 procs min={mn} max={mx}, p99",
                              pct(samples, 0.99), ceiling_p99, 5))
    if errors:
        res.notes.append(f"quorum min={mn} max={mx}: first failure: {errors[0]}")


def _trusted(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT peer_id FROM peers WHERE state = 'trusted'")}


def _peer_states(conns: list[sqlite3.Connection]) -> dict[str, int]:
    out: dict[str, int] = {}
    for conn in conns:
        with contextlib.suppress(sqlite3.Error):
            for state, count in conn.execute("SELECT state, count(*) FROM peers GROUP BY state"):
                out[state] = out.get(state, 0) + count
    return out


def _missing(sps: list[SPDir], conns: list[sqlite3.Connection], everyone: set[str]) -> int:
    """Trust links still missing: sum over nodes of the other nodes it does not trust."""
    missing = 0
    for sp, conn in zip(sps, conns, strict=True):
        try:
            missing += len((everyone - {sp.peer_id}) - _trusted(conn))
        except sqlite3.Error:
            missing += len(sps) - 1  # busy or not yet readable: count as nothing trusted
    return missing


async def bench_convergence(root: Path, n: int, res: Results, interval: float) -> None:
    sps = make_sps(root / f"conv{n}-{interval:g}s", n, p2p={"ping_interval": interval},
                   tag=f"c{n}-")
    everyone = {sp.peer_id for sp in sps}
    conns: list[sqlite3.Connection] = []
    limit = 30 * interval + 10.0
    converged_at: float | None = None
    trajectory: list[str] = []
    try:
        with fleet(root / f"conv{n}-{interval:g}s-run") as f:
            t_spawn = time.perf_counter()
            seed = f.spawn(sps[0].dir.name, [*node_command(sps[0]), "--log-level", "warning"])
            await f.wait_ready([seed], 60.0)
            rest = [f.spawn(sp.dir.name, [*node_command(sp), "--log-level", "warning"])
                    for sp in sps[1:]]
            t_ready = await f.wait_ready(rest, 30.0 + 2.0 * n)
            startup = t_ready - t_spawn
            meter = CpuMeter([c.proc.pid for c in f.children])
            for sp in sps:
                conns.append(sqlite3.connect(f"file:{sp.config().db_path}?mode=ro", uri=True,
                                             timeout=0.2))
            marks = [m for m in (1, 2, 3, 5, 10, 20, 40) if m * interval < limit]
            missing = n * (n - 1)
            while (elapsed := time.perf_counter() - t_ready) < limit:
                missing = _missing(sps, conns, everyone)
                if missing == 0:
                    converged_at = time.perf_counter()
                    break
                while marks and elapsed >= marks[0] * interval:
                    st = _peer_states(conns)
                    absent = n * (n - 1) - sum(st.values())
                    trajectory.append(f"{marks.pop(0):g}p:{missing} (candidate "
                                      f"{st.get('candidate', 0)}, evicted {st.get('evicted', 0)},"
                                      f" unknown {absent})")
                dead = [c.name for c in f.children if c.proc.poll() is not None]
                if dead:
                    raise ChildDied(f"{', '.join(dead)} exited during convergence")
                await trio.sleep(POLL)
            wall = time.perf_counter() - t_ready
            kids = meter.per_call(1)[1]
            states = _peer_states(conns)
            if converged_at is not None:  # the cost of keeping the mesh: 3 quiet periods
                steady = CpuMeter([c.proc.pid for c in f.children])
                await trio.sleep(3 * interval)
                keep = steady.per_call(1)[1] / (3 * interval)
                res.notes.append(f"{n} converged nodes then used {keep:.2f} CPU-s/s "
                                 f"({keep / (os.cpu_count() or 1):.0%} of the cores) to keep "
                                 f"the mesh (pings every {interval:g} s)")
    finally:
        for conn in conns:
            conn.close()
    cores = os.cpu_count() or 1
    res.notes.append(
        f"convergence of {n}: node processes used {kids / wall / cores:.0%} of {cores} cores "
        f"while converging ({kids:.1f} CPU-s in {wall:.1f}s); peer rows at the end "
        f"{dict(sorted(states.items()))} (of {n * (n - 1)} links)"
        + ("; missing links after " + ", ".join(trajectory) if trajectory else ""))
    what = (f"discovery convergence, {n} procs, ping every {interval:g} s "
            f"(READY after {startup:.1f}s)")
    if converged_at is None:
        res.rows.append(Row(what, f"> {limit:.0f} s ({missing} trust links missing)",
                            f"> {limit / interval:.0f} periods", "<= 3 periods", "NO"))
        return
    took = converged_at - t_ready
    periods = took / interval
    res.rows.append(Row(what, f"{took:.2f} s", f"{periods:.2f} periods", "<= 3 periods",
                        "yes" if periods <= 3 else "NO"))


# --- main -------------------------------------------------------------------------------------


async def run_all(counts: Counts, root: Path, only_convergence: bool) -> Results:
    res = Results()
    sections: list[tuple[str, Callable[[], Awaitable[None]]]] = [] if only_convergence else [
        ("new-stream request ceiling", lambda: bench_ceiling(root, counts, res)),
        ("ping RTT and approval quorum", lambda: bench_cluster(root, counts, res)),
    ]
    for n in counts.sizes:
        sections.append((f"convergence of {n}",
                         lambda n=n: bench_convergence(root, n, res, counts.ping_interval)))  # type: ignore[misc]
    default = P2PSection().ping_interval
    if counts.default_interval_row and counts.sizes and default != counts.ping_interval:
        # what an operator runs: the largest size again at the node's default period
        n = max(counts.sizes)
        sections.append((f"convergence of {n}, ping every {default:g} s",
                         lambda: bench_convergence(root, n, res, default)))
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            async def on_sigterm() -> None:
                async for _ in signals:
                    res.notes.append("interrupted by SIGTERM: the remaining rows were skipped")
                    nursery.cancel_scope.cancel()
                    return
            nursery.start_soon(on_sigterm)
            for name, section in sections:
                progress(f"{name} ...")
                t0 = time.perf_counter()
                try:
                    await section()
                except Exception as exc:  # noqa: BLE001 - report it, go on with the rest
                    res.rows.append(Row(name, f"ERROR: {type(exc).__name__}", ok="NO"))
                    res.notes.append(f"{name} failed: {exc!r}")
                progress(f"{name} done in {time.perf_counter() - t0:.1f}s")
            nursery.cancel_scope.cancel()
    return res


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.p2p", description=__doc__.split("\n")[0])
    parser.add_argument("--ping-interval", type=float,
                        help=f"discovery period of the convergence runs (default "
                             f"{CONVERGENCE_PING_INTERVAL:g} s)")
    parser.add_argument("--quick", action="store_true", help="small counts (a smoke check)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (logs, SPs)")
    parser.add_argument("--sizes", help="convergence sizes, comma-separated (default 8,16,32;"
                        " --quick: 8)")
    parser.add_argument("--only-convergence", action="store_true",
                        help="skip the latency rows (1-3)")
    parser.add_argument("--echo-responder", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.echo_responder:
        trio.run(echo_responder_main)
        return 0
    counts = (Counts(requests=50, pings=30, asks=20, sizes=(8,), warmup=5) if args.quick
              else Counts(requests=500, pings=300, asks=100, sizes=(8, 16, 32),
                          default_interval_row=True))
    if args.ping_interval:
        counts.ping_interval = args.ping_interval
    if args.sizes:
        counts.sizes = tuple(int(x) for x in args.sizes.split(",") if x.strip())
    load_before = _loadavg()
    t0 = time.perf_counter()
    with work_folder("gfsp-bench-p2p-", keep=args.keep) as root:
        res = trio.run(run_all, counts, root, args.only_convergence)
    print(f"gfsp p2p bench{' --quick' if args.quick else ''}: {os.cpu_count()} cpus, loopback, "
          f"Noise+Yamux; requests n={counts.requests}, pings n={counts.pings}, "
          f"asks n={counts.asks} per quorum (after {counts.warmup} warm-up calls each); "
          f"loadavg before {load_before}, after {_loadavg()}")
    print_table(res.rows)
    print("ratio: to the echo-process request in the same run (median to median, p99 to p99);"
          " convergence rows: seconds / the row's ping interval.")
    print(f"rows 1-3: the responders are node processes (ping_interval {CLUSTER_PING_INTERVAL:g}"
          " s so that discovery stays quiet), the asker a node inside the bench process;"
          " quorum timeout"
          f" {QUORUM_TIMEOUT:g} s. Convergence: each node bootstraps from sp0 only, sp0 is"
          " started first, timed from the last READY=1 to all-trusted in every SPDB.")
    print(f"quorum floor: {QUORUM_PEERS} approvals are at least {QUORUM_PEERS} new-stream"
          " requests (one stream per peer, one request per stream: PROTOCOL.md), each at least"
          " the CPU the echo request costs its two ends (measured above); on this machine's"
          " cores no quorum of that many can be faster, whatever the approval logic, so a"
          " floor above 3x puts the quorum median target out of reach here.")
    for note in res.notes:
        print(f"note: {note}")
    print(f"total {time.perf_counter() - t0:.1f}s")
    return 0 if all(r.ok != "NO" for r in res.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
