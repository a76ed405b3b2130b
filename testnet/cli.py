"""``gfsp-testnet``: a local testnet of N SP nodes and a devchain, each its own process.

Every command takes ``--dir D`` (default ``./testnet-data``)::

    gfsp-testnet init   [--nodes N] [--random-keys] [--data-shards K --parity-shards M]
                        [--segment-size BYTES] [--block-interval S] [--ping-interval S]
    gfsp-testnet up     [--nodes N] [--detach] [--timeout S] [--grace S]   (init if needed;
                        with --detach while the devchain runs: start the nodes that are down)
    gfsp-testnet status [--json]
    gfsp-testnet logs   [sp<i> | i | chain] [-f] [-n LINES]
    gfsp-testnet down   [--grace S]
    gfsp-testnet clean  [--grace S]

Layout: ``D/testnet.toml`` (the manifest, :mod:`testnet.manifest`), ``D/sp{i}/`` (config.toml,
keys/, data/, node.log), ``D/devchain/`` (state, devchain.json, devchain.log), ``D/run/``
(pid files, READY marks).

``up`` starts the devchain, registers every SP on it (operator-signed register_sp), then starts
the nodes, each with its own ``NOTIFY_SOCKET`` (a datagram socket bound here), and waits for
READY=1 on those sockets: the sd_notify path, no polling. Processes run in their own session,
so they outlive a detached ``up``; ``down`` stops them by pid file only (SIGTERM, a grace
period, then SIGKILL), never by name.

Exit codes: 0 ok, 1 a process failed (or is already running), 2 bad usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import trio

from node.chain import DevChainClient
from node.cli import number_arg
from node.config import (
    ChainSection,
    Config,
    GaterSection,
    NodeSection,
    P2PSection,
    load_config,
    render_config,
)
from node.crypto import KeySet, create_keys, load_keys
from node.errors import ConfigError, GfspError
from node.spregistry import registration_tx, sp_info_of
from testnet.manifest import (
    CHAIN_DIR,
    DEFAULT_SEGMENT_SIZE,
    MANIFEST_NAME,
    RUN_DIR,
    ChainEntry,
    Manifest,
    ManifestError,
    NodeEntry,
    default_storage_params,
    load_manifest,
    manifest_path,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_DIR = Path("testnet-data")
DEFAULT_NODES = 4
DEFAULT_GRACE = 10.0
DEFAULT_TIMEOUT = 60.0
#: Node settings the testnet writes (loopback: cheap pings, quick discovery and stops).
NODE_GRACE = 5.0
PING_INTERVAL = 2.0
HEIGHT_REFRESH = 0.5
#: Environment a child must not inherit from whoever runs gfsp-testnet (e.g. a systemd unit).
SCRUB_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "CREDENTIALS_DIRECTORY",
             "JOURNAL_STREAM", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class TestnetError(Exception):
    """A failure to report in one paragraph (which process, why, the tail of its log)."""


def say(*parts: object) -> None:
    """Print a line; a reader that went away (``up --detach | head -1``) only loses the
    output, it never stops the command (a foreground testnet must still be stopped)."""
    try:
        print(*parts, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def err(msg: str) -> None:
    print(f"gfsp-testnet: {msg}", file=sys.stderr, flush=True)


# --- init ---------------------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (bound to port 0 at once, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _node_keys(keys_dir: Path, index: int, random_keys: bool) -> KeySet:
    if (keys_dir / "operator.key").exists():  # re-init over an existing folder keeps its keys
        return load_keys(keys_dir)
    return create_keys(keys_dir, passphrase=None if random_keys else f"sp{index}")


def init_testnet(root: Path, nodes: int, *, random_keys: bool = False,
                 data_shards: int | None = None, parity_shards: int | None = None,
                 segment_size: int = DEFAULT_SEGMENT_SIZE, block_interval: float = 1.0,
                 ping_interval: float = PING_INTERVAL) -> Manifest:
    """Lay out ``root`` for ``nodes`` SPs and write the manifest (refuses an existing one)."""
    root = root.absolute()
    if manifest_path(root).exists():
        raise ManifestError(f"{manifest_path(root)} already exists "
                            "(gfsp-testnet clean first to start over)")
    if nodes < 1:
        raise ManifestError(f"--nodes must be at least 1, got {nodes}")
    data, parity = default_storage_params(nodes)
    data = data if data_shards is None else data_shards
    parity = parity if parity_shards is None else parity_shards
    if data < 1 or parity < 0:
        raise ManifestError(f"bad storage params: {data} data + {parity} parity shards")
    if nodes > 1 and data + parity > nodes - 1:
        raise ManifestError(f"--data-shards {data} + --parity-shards {parity} need "
                            f"{data + parity} secondaries; {nodes} nodes have {nodes - 1}")
    if segment_size < 1024:
        raise ManifestError(f"--segment-size must be at least 1024 bytes, got {segment_size}")
    for name, value in (("--block-interval", block_interval),
                        ("--ping-interval", ping_interval)):
        if not (value > 0 and math.isfinite(value)):
            raise ManifestError(f"{name} must be a positive number of seconds, got {value}")
    ports = free_ports(1 + 2 * nodes)
    chain_dir = root / CHAIN_DIR
    chain = ChainEntry(endpoint=f"http://127.0.0.1:{ports[0]}", dir=chain_dir,
                       pid_file=root / RUN_DIR / "devchain.pid",
                       log_file=chain_dir / "devchain.log", block_interval=block_interval)
    entries: list[NodeEntry] = []
    keysets: list[KeySet] = []
    for i in range(nodes):
        d = root / f"sp{i}"
        keys = _node_keys(d / "keys", i, random_keys)
        gater, p2p = ports[1 + 2 * i], ports[2 + 2 * i]
        endpoint, addr = f"http://127.0.0.1:{gater}", f"/ip4/127.0.0.1/tcp/{p2p}"
        info = sp_info_of(keys, endpoint=endpoint, p2p_addrs=(addr,))
        keysets.append(keys)
        entries.append(NodeEntry(index=i, name=f"sp{i}", dir=d, config=d / "config.toml",
                                 endpoint=endpoint, p2p_addr=addr, peer_id=info.peer_id,
                                 operator=keys.operator.address,
                                 pid_file=root / RUN_DIR / f"sp{i}.pid",
                                 log_file=d / "node.log",
                                 ready_file=root / RUN_DIR / f"sp{i}.ready"))
    for n in entries:  # every node bootstraps from sp0 only: discovery finds the rest
        boot = [] if n.index == 0 else [entries[0].bootstrap_entry]
        cfg = Config(node=NodeSection(name=n.name, grace_period=NODE_GRACE),
                     p2p=dataclasses.replace(P2PSection(), listen=n.p2p_addr, bootstrap=boot,
                                             ping_interval=ping_interval),
                     gater=dataclasses.replace(GaterSection(), listen=n.gater_listen),
                     chain=ChainSection(endpoint=chain.endpoint,
                                        height_refresh_interval=HEIGHT_REFRESH))
        (n.dir / "data").mkdir(mode=0o700, parents=True, exist_ok=True)
        n.config.write_text(render_config(cfg))
    chain_dir.mkdir(parents=True, exist_ok=True)
    (root / RUN_DIR).mkdir(parents=True, exist_ok=True)
    manifest = Manifest(root=root, chain=chain, nodes=entries, segment_size=segment_size,
                        data_shards=data, parity_shards=parity, random_keys=random_keys)
    manifest.write()
    return manifest


def _init_from_args(args: argparse.Namespace, nodes: int) -> Manifest:
    return init_testnet(args.dir, nodes, random_keys=args.random_keys,
                        data_shards=args.data_shards, parity_shards=args.parity_shards,
                        segment_size=args.segment_size, block_interval=args.block_interval,
                        ping_interval=args.ping_interval)


def cmd_init(args: argparse.Namespace) -> int:
    m = _init_from_args(args, DEFAULT_NODES if args.nodes is None else args.nodes)
    say(f"initialised a testnet of {len(m.nodes)} nodes in {m.root} "
        f"({m.data_shards} data + {m.parity_shards} parity shards); manifest {m.path}")
    return EXIT_OK


# --- processes ----------------------------------------------------------------------------------


def read_pid(pid_file: Path) -> int | None:
    try:
        text = pid_file.read_text().split()
        return int(text[0]) if text else None
    except (OSError, ValueError):
        return None


def proc_state(pid: int) -> str:
    """The kernel's state letter of ``pid`` ("X" when there is no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "X"
    return stat.rsplit(")", 1)[1].split()[0]


def alive(pid: int) -> bool:
    return proc_state(pid) not in ("X", "Z")  # a zombie has exited


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def chain_marker(m: Manifest) -> str:
    return str(m.chain.dir)


def node_marker(n: NodeEntry) -> str:
    return str(n.config)


def live_pid(pid_file: Path, marker: str) -> int | None:
    """The pid in ``pid_file`` if that process is alive and is ours (its command line names
    ``marker``: our config path or devchain folder), so a reused pid is never signalled."""
    pid = read_pid(pid_file)
    if pid is None or not alive(pid) or marker not in cmdline(pid):
        return None
    return pid


def targets(m: Manifest) -> list[tuple[str, Path, str]]:
    """(name, pid file, marker) of every process of the testnet, nodes first."""
    return ([(n.name, n.pid_file, node_marker(n)) for n in m.nodes]
            + [("devchain", m.chain.pid_file, chain_marker(m))])


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUB_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(PROJECT_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def chain_command(m: Manifest) -> list[str]:
    return [sys.executable, "-m", "testnet.devchain", "--dir", str(m.chain.dir),
            "--port", str(m.chain.port), "--block-interval", repr(m.chain.block_interval),
            "--segment-size", str(m.segment_size), "--data-shards", str(m.data_shards),
            "--parity-shards", str(m.parity_shards)]


def node_command(n: NodeEntry) -> list[str]:
    return [sys.executable, "-m", "node.cli", "run", "--config", str(n.config)]


async def spawn(cmd: Sequence[str], *, log_file: Path, pid_file: Path,
                env: dict[str, str], cwd: Path) -> trio.Process:
    """Start ``cmd`` in its own session (it outlives us), output appended to ``log_file``."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as out:
        out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} gfsp-testnet: "
                  f"{' '.join(cmd)}\n".encode())
        out.flush()
        proc = await trio.lowlevel.open_process(
            list(cmd), stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
            cwd=str(cwd), start_new_session=True)
    write_small_file(pid_file, f"{proc.pid}\n")
    return proc


def write_small_file(path: Path, text: str) -> None:
    """A pid file or READY mark: a few bytes on a local disk (no need for a thread)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def log_tail(path: Path, n: int = 20) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return "    <no log>"
    return "\n".join("    " + line for line in lines)


async def stop_processes(procs: Iterable[tuple[str, int]], grace: float) -> list[str]:
    """SIGTERM each, wait up to ``grace`` seconds, SIGKILL survivors; one report line each."""
    procs = [(name, pid) for name, pid in procs if alive(pid)]
    for _, pid in procs:
        _kill(pid, signal.SIGTERM)
    with trio.move_on_after(grace):
        while any(alive(pid) for _, pid in procs):  # noqa: ASYNC110 - not our children
            await trio.sleep(0.05)
    report = []
    for name, pid in procs:
        if alive(pid):
            _kill(pid, signal.SIGKILL)
            report.append(f"{name} (pid {pid}): killed (SIGKILL after {grace:g}s)")
        else:
            report.append(f"{name} (pid {pid}): stopped")
    with trio.move_on_after(5):
        while any(alive(pid) for _, pid in procs):  # noqa: ASYNC110
            await trio.sleep(0.05)
    return report


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


async def down_testnet(m: Manifest, grace: float,
                       only: list[NodeEntry] | None = None) -> list[str]:
    """Stop every node, then the devchain (by pid file); remove pid files and READY marks.
    With ``only``, stop just those nodes (``up --detach`` starts them again)."""
    chosen = m.nodes if only is None else only
    nodes = [(n.name, pid) for n in chosen if (pid := live_pid(n.pid_file, node_marker(n)))]
    # Listen where the nodes send STOPPING=1 (else each logs that nobody listens).
    socks = [s for n in chosen if (s := bind_notify(n)) is not None]
    try:
        report = await stop_processes(nodes, grace)
    finally:
        for s in socks:
            s.close()
    for n in chosen:
        n.pid_file.unlink(missing_ok=True)
        n.ready_file.unlink(missing_ok=True)
    if only is not None:
        return report
    chain_pid = live_pid(m.chain.pid_file, chain_marker(m))
    if chain_pid:
        report += await stop_processes([("devchain", chain_pid)], grace)
    m.chain.pid_file.unlink(missing_ok=True)
    return report


# --- up -----------------------------------------------------------------------------------------


async def start_chain(m: Manifest, env: dict[str, str]) -> trio.Process:
    """Start the devchain; return once it wrote devchain.json (with its own pid)."""
    info = m.chain.dir / "devchain.json"
    info.unlink(missing_ok=True)
    proc = await spawn(chain_command(m), log_file=m.chain.log_file, pid_file=m.chain.pid_file,
                       env=env, cwd=m.chain.dir)
    while True:  # the devchain has no NOTIFY_SOCKET: its info file is its READY
        if proc.poll() is not None:
            raise TestnetError(f"the devchain exited with {proc.returncode} before listening; "
                               f"{m.chain.log_file}:\n{log_tail(m.chain.log_file)}")
        try:
            if json.loads(info.read_text()).get("pid") == proc.pid:
                return proc
        except (OSError, ValueError):
            pass
        await trio.sleep(0.05)


async def register_sps(m: Manifest) -> None:
    """Send every SP's register_sp transaction (signed by its operator key) to the devchain."""
    async with DevChainClient(m.chain.endpoint) as client:
        for n in m.nodes:
            keys = load_keys(n.dir / "keys")
            seq = await client.account_seq(keys.operator.address)
            await client.broadcast(registration_tx(keys, endpoint=n.endpoint,
                                                   p2p_addrs=[n.p2p_addr], seq=seq))


def notify_name(n: NodeEntry) -> str:
    """The node's NOTIFY_SOCKET, an abstract AF_UNIX name (no path length limit, no file),
    fixed per testnet folder so that ``down`` can bind it again to take the STOPPING=1."""
    digest = hashlib.sha256(str(n.dir).encode()).hexdigest()[:16]
    return f"gfsp-testnet-{digest}-{n.name}"


def bind_notify(n: NodeEntry) -> socket.socket | None:
    """Bind the node's notify socket (None if someone, e.g. a foreground ``up``, holds it)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind("\0" + notify_name(n))
    except OSError:
        sock.close()
        return None
    return sock


async def wait_notify_ready(proc: trio.Process, sock: trio.socket.SocketType,
                            died: Callable[[], Exception]) -> None:
    """Wait for ``READY=1`` on the process's NOTIFY_SOCKET ``sock``; raise ``died()`` if the
    process exits first."""

    async def watch() -> None:
        await proc.wait()
        raise died()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        while "READY=1" not in (await sock.recv(4096)).decode(errors="replace").splitlines():
            pass
        nursery.cancel_scope.cancel()


class NodeProc:
    """One node child with the NOTIFY_SOCKET it reports to."""

    def __init__(self, entry: NodeEntry) -> None:
        self.entry = entry
        self.name = notify_name(entry)
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.proc: trio.Process | None = None
        self.ready = False

    async def start(self, env: dict[str, str]) -> None:
        await self.sock.bind("\0" + self.name)  # abstract: no path length limit, no file
        self.proc = await spawn(node_command(self.entry), log_file=self.entry.log_file,
                                pid_file=self.entry.pid_file,
                                env={**env, "NOTIFY_SOCKET": "@" + self.name},
                                cwd=self.entry.dir)

    async def wait_ready(self) -> None:
        proc = self.proc
        assert proc is not None
        await wait_notify_ready(proc, self.sock, lambda: TestnetError(
            f"{self.entry.name} exited with {proc.returncode} before READY=1; "
            f"{self.entry.log_file}:\n{log_tail(self.entry.log_file)}"))
        self.ready = True
        write_small_file(self.entry.ready_file, f"{proc.pid} {time.time():.3f}\n")

    def close(self) -> None:
        self.sock.close()


async def _start_all(m: Manifest, nodes: list[NodeProc], timeout: float, *,
                     chain: bool = True) -> None:
    """Start the devchain (unless ``chain`` is False: it runs), register every SP, start
    ``nodes`` and wait for each one's READY=1."""
    env = child_env()
    try:
        with trio.fail_after(timeout):
            if chain:
                await start_chain(m, env)
                await register_sps(m)
            for n in nodes:
                await n.start(env)
            async with trio.open_nursery() as nursery:
                for n in nodes:
                    nursery.start_soon(n.wait_ready)
    except trio.TooSlowError:
        late = [n for n in nodes if not n.ready]
        raise TestnetError(
            f"not ready within {timeout:g}s: {', '.join(n.entry.name for n in late) or '-'}\n"
            + "\n".join(f"{n.entry.log_file}:\n{log_tail(n.entry.log_file)}"
                        for n in late)) from None
    except (GfspError, OSError) as exc:
        raise TestnetError(f"cannot start the testnet: {exc}\n{m.chain.log_file}:\n"
                           f"{log_tail(m.chain.log_file)}") from None


def _first_testnet_error(group: BaseExceptionGroup) -> TestnetError | None:
    for exc in group.exceptions:
        if isinstance(exc, TestnetError):
            return exc
        if isinstance(exc, BaseExceptionGroup) and (inner := _first_testnet_error(exc)):
            return inner
    return None


def running_pids(m: Manifest) -> list[tuple[str, int]]:
    return [(name, pid) for name, pid_file, marker in targets(m)
            if (pid := live_pid(pid_file, marker))]


async def up(args: argparse.Namespace) -> int:
    root: Path = args.dir.absolute()
    if not manifest_path(root).exists():
        _init_from_args(args, DEFAULT_NODES if args.nodes is None else args.nodes)
    m = load_manifest(root)
    if args.nodes and args.nodes != len(m.nodes):
        err(f"{m.path} has {len(m.nodes)} nodes, not {args.nodes} "
            "(gfsp-testnet clean first to change the size)")
        return EXIT_USAGE
    entries = m.nodes
    chain_runs = False
    if running := running_pids(m):
        names = {name for name, _ in running}
        if not args.detach or "devchain" not in names or len(running) == len(targets(m)):
            err("already running: " + ", ".join(f"{name} (pid {pid})" for name, pid in running)
                + ("" if "devchain" in names else "; the devchain is not")
                + (" (gfsp-testnet down first" + (", or up --detach to start the nodes that "
                   "are down" if "devchain" in names and len(running) < len(targets(m))
                   else "") + ")"))
            return EXIT_FAILED
        # the devchain and some nodes run: start the others (they are registered already)
        entries = [n for n in m.nodes if n.name not in names]
        chain_runs = True
        say("starting the nodes that are down: " + ", ".join(n.name for n in entries))
    m.run_dir.mkdir(parents=True, exist_ok=True)
    for n in entries:
        n.ready_file.unlink(missing_ok=True)
    nodes = [NodeProc(n) for n in entries]
    failure: TestnetError | None = None
    interrupted = False
    started = False
    # SIGHUP too: a closed terminal must not leave the nodes (in their own sessions) running
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        try:
            async with trio.open_nursery() as nursery:

                async def on_signal() -> None:
                    nonlocal interrupted
                    async for _ in signals:
                        interrupted = True
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(on_signal)
                await _start_all(m, nodes, args.timeout, chain=not chain_runs)
                started = True
                for n in nodes:
                    n.close()
                print_endpoints(m)
                if args.detach:
                    nursery.cancel_scope.cancel()
                else:
                    say("running in the foreground; Ctrl-C stops the testnet")
                    for n in nodes:
                        nursery.start_soon(_report_exit, n)
        except TestnetError as exc:
            failure = exc
        except BaseExceptionGroup as group:
            failure = _first_testnet_error(group)
            if failure is None:
                raise
        finally:
            for n in nodes:
                n.close()
        if args.detach and started and not interrupted:
            return EXIT_OK
        if failure is not None:
            err(str(failure))
        if chain_runs:  # a start of the nodes that were down failed: stop only those
            with trio.CancelScope(shield=True):
                for n in nodes:
                    if n.proc is not None and n.proc.returncode is None:
                        n.proc.terminate()
                        with trio.move_on_after(args.grace):
                            await n.proc.wait()
                        if n.proc.returncode is None:
                            n.proc.kill()
                            await n.proc.wait()
            return EXIT_FAILED
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as stopping:
                # another Ctrl-C meanwhile is taken here (trio would re-deliver it once the
                # receiver closes: a KeyboardInterrupt traceback after a clean stop)
                stopping.start_soon(_already_stopping, signals)
                say("stopping the testnet ...")
                for line in await down_testnet(m, args.grace):
                    say("  " + line)
                for n in nodes:  # reap our children
                    if n.proc is not None:
                        with trio.move_on_after(1):
                            await n.proc.wait()
                stopping.cancel_scope.cancel()
    if failure is not None:
        return EXIT_FAILED
    return EXIT_OK if started else EXIT_FAILED


async def _already_stopping(signals: AsyncIterator[int]) -> None:
    async for signum in signals:
        say(f"{signal.Signals(signum).name}: already stopping the testnet")


async def _report_exit(n: NodeProc) -> None:
    assert n.proc is not None
    code = await n.proc.wait()
    err(f"{n.entry.name} exited with {code}; {n.entry.log_file}:\n{log_tail(n.entry.log_file)}")


def print_endpoints(m: Manifest) -> None:
    rows = [[n.name, str(read_pid(n.pid_file) or "-"), n.endpoint, n.p2p_addr, n.peer_id,
             n.operator] for n in m.nodes]
    rows.append(["devchain", str(read_pid(m.chain.pid_file) or "-"), m.chain.endpoint,
                 "-", "-", "-"])
    say(table(["node", "pid", "http", "p2p", "peer id", "operator"], rows))
    say(f"storage params: {m.data_shards} data + {m.parity_shards} parity shards, "
        f"segment {m.segment_size} bytes; manifest {m.path}")
    say(f"try: gfsp --testnet {m.root} account new && gfsp --testnet {m.root} mb demo-bucket "
        f"&& gfsp --testnet {m.root} put ./README.md demo-bucket/README.md")


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [header, *rows]]
    return "\n".join(lines)


def cmd_up(args: argparse.Namespace) -> int:
    return trio.run(up, args)


# --- down / status / logs / clean ---------------------------------------------------------------


def cmd_down(args: argparse.Namespace) -> int:
    m = load_manifest(args.dir)
    only = [_node_named(m, which) for which in args.nodes] if args.nodes else None
    report = trio.run(down_testnet, m, args.grace, only)
    for line in report or ["nothing was running"]:
        say(line)
    return EXIT_OK


def _node_named(m: Manifest, which: str) -> NodeEntry:
    """The node ``which`` names: its index or sp<i>."""
    index = which.removeprefix("sp")
    if not index.isdigit():
        raise ManifestError(f"unknown node {which!r}: give a node index or sp<i>")
    return m.node(int(index))


def _spdb_stats(n: NodeEntry) -> dict[str, Any]:
    """Trusted peers and tasks by state, read from the node's SPDB (read-only, no help from
    the node); None where the database cannot be read."""
    out: dict[str, Any] = {"peers": None, "tasks": None}
    try:
        cfg = load_config(n.config)
    except ConfigError:
        return out
    if not cfg.db_path.exists():
        return out
    try:
        conn = sqlite3.connect(cfg.db_path.as_uri() + "?mode=ro", uri=True, timeout=2)
    except sqlite3.Error:
        return out
    try:
        out["peers"] = conn.execute(
            "SELECT count(*) FROM peers WHERE state = 'trusted'").fetchone()[0]
        out["tasks"] = dict(conn.execute(
            "SELECT state, count(*) FROM tasks GROUP BY state ORDER BY state").fetchall())
    except sqlite3.Error:
        pass
    finally:
        conn.close()
    return out


def _piece_stats(n: NodeEntry) -> tuple[int | None, int | None]:
    """(files, bytes) under the node's piece store folder (temporary files excluded)."""
    try:
        folder = load_config(n.config).piecestore_path
    except ConfigError:
        return None, None
    if not folder.exists():
        return 0, 0
    files = total = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            if name.startswith(".") or name.endswith(".tmp"):
                continue
            try:
                total += os.stat(os.path.join(dirpath, name)).st_size
                files += 1
            except OSError:
                continue
    return files, total


def node_status(n: NodeEntry) -> dict[str, Any]:
    pid = read_pid(n.pid_file)
    live = live_pid(n.pid_file, node_marker(n))
    ready_pid = read_pid(n.ready_file)
    stats = _spdb_stats(n)
    objects, size = _piece_stats(n)
    return {"name": n.name, "pid": pid, "alive": live is not None,
            "ready": live is not None and ready_pid == live, "peers": stats["peers"],
            "tasks": stats["tasks"], "objects": objects, "bytes": size,
            "endpoint": n.endpoint}


def testnet_status(m: Manifest) -> dict[str, Any]:
    chain_pid = read_pid(m.chain.pid_file)
    return {"dir": str(m.root),
            "devchain": {"pid": chain_pid, "endpoint": m.chain.endpoint,
                         "alive": live_pid(m.chain.pid_file, chain_marker(m)) is not None},
            "nodes": [node_status(n) for n in m.nodes]}


def _show(v: Any) -> str:
    if v is None:
        return "?"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, dict):
        return " ".join(f"{k}:{c}" for k, c in v.items()) or "-"
    return str(v)


def cmd_status(args: argparse.Namespace) -> int:
    m = load_manifest(args.dir)
    st = testnet_status(m)
    if args.json:
        say(json.dumps(st, indent=1))
        return EXIT_OK
    rows = [[s["name"], str(s["pid"] or "-"),
             _show(s["alive"]), _show(s["ready"]), _show(s["peers"]), _show(s["tasks"]),
             _show(s["objects"]), _show(s["bytes"]), s["endpoint"]] for s in st["nodes"]]
    c = st["devchain"]
    rows.append(["devchain", str(c["pid"] or "-"), _show(c["alive"]), "-", "-", "-", "-", "-",
                 c["endpoint"]])
    say(table(["node", "pid", "alive", "ready", "peers", "tasks", "objects", "bytes", "http"],
              rows))
    say("alive: pid file + /proc; ready: READY=1 seen by 'up' for that pid; peers: trusted "
        "peers in its SPDB;\ntasks: its SPDB tasks by state; objects/bytes: files in its "
        "piece store (pieces, not user objects). '?': not readable.")
    return EXIT_OK


def _log_targets(m: Manifest, which: str | None) -> list[tuple[str, Path]]:
    if which is None:
        return [("devchain", m.chain.log_file)] + [(n.name, n.log_file) for n in m.nodes]
    if which in ("chain", "devchain"):
        return [("devchain", m.chain.log_file)]
    if not which.removeprefix("sp").isdigit():
        raise ManifestError(f"unknown log {which!r}: give a node index, sp<i> or chain")
    n = _node_named(m, which)
    return [(n.name, n.log_file)]


def cmd_logs(args: argparse.Namespace) -> int:
    m = load_manifest(args.dir)
    logs = _log_targets(m, args.which)
    prefix = len(logs) > 1
    offsets: dict[Path, int] = {}
    for name, path in logs:
        try:
            data = path.read_bytes()
        except OSError:
            data = b""
        offsets[path] = len(data)
        lines = data.decode(errors="replace").splitlines()
        for line in lines[len(lines) - args.lines:] if args.lines else []:
            say(f"[{name}] {line}" if prefix else line)
    if not args.follow:
        return EXIT_OK
    partial: dict[Path, bytes] = {}
    try:
        while True:
            for name, path in logs:
                try:
                    with path.open("rb") as f:
                        size = os.fstat(f.fileno()).st_size
                        if size < offsets[path]:  # truncated or recreated: start over
                            offsets[path] = 0
                        f.seek(offsets[path])
                        chunk = f.read()
                except OSError:
                    continue
                offsets[path] += len(chunk)
                *lines, rest = (partial.pop(path, b"") + chunk).split(b"\n")
                partial[path] = rest
                for line in lines:
                    text = line.decode(errors="replace")
                    say(f"[{name}] {text}" if prefix else text)
            time.sleep(0.25)
    except KeyboardInterrupt:
        return EXIT_OK


def cmd_clean(args: argparse.Namespace) -> int:
    root: Path = args.dir.absolute()
    if not root.exists():
        say(f"nothing to clean: {root} does not exist")
        return EXIT_OK
    if manifest_path(root).exists():
        m = load_manifest(root)
        for line in trio.run(down_testnet, m, args.grace):
            say(line)
    # Only what this tool creates: the manifest, sp<i>/, devchain/, run/.
    removed = []
    for entry in sorted(root.iterdir()):
        ours = (entry.name in (MANIFEST_NAME, CHAIN_DIR, RUN_DIR)
                or (entry.name.startswith("sp") and entry.name[2:].isdigit()))
        if not ours:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry.name)
    try:
        root.rmdir()
    except OSError:
        pass
    say(f"removed from {root}: {', '.join(removed) or 'nothing'}")
    return EXIT_OK


# --- command line -------------------------------------------------------------------------------


_SECONDS = number_arg(float, 0)
_POSITIVE_SECONDS = number_arg(float, 0, above=True)


def _add_init_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--random-keys", action="store_true",
                   help="random keys (default: keys from the seed 'sp<i>', so ids are known)")
    p.add_argument("--data-shards", type=int,
                   help="EC data shards (default: 4 with 7+ nodes, else fit to N-1)")
    p.add_argument("--parity-shards", type=int, help="EC parity shards (default: see above)")
    p.add_argument("--segment-size", type=int, default=DEFAULT_SEGMENT_SIZE,
                   help="segment size in bytes (default %(default)s)")
    p.add_argument("--block-interval", type=float, default=1.0,
                   help="devchain seconds per block (default %(default)s)")
    p.add_argument("--ping-interval", type=float, default=PING_INTERVAL,
                   help="nodes' p2p ping interval in seconds (default %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gfsp-testnet", description="A local gfsp testnet: a devchain and N SP nodes.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                        help="testnet folder (default ./%(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", parents=[common], help="lay out the testnet folder")
    p.add_argument("--nodes", type=number_arg(int, 1), default=DEFAULT_NODES,
                   help="SP nodes (default 4)")
    _add_init_options(p)
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("up", parents=[common], help="start the devchain and every node")
    p.add_argument("--nodes", type=number_arg(int, 1),
                   help="SP nodes when initialising (default 4)")
    p.add_argument("--detach", action="store_true", help="return once every node is ready")
    p.add_argument("--timeout", type=_POSITIVE_SECONDS, default=DEFAULT_TIMEOUT,
                   help="seconds to wait for every node's READY=1 (default %(default)s)")
    p.add_argument("--grace", type=_SECONDS, default=DEFAULT_GRACE,
                   help="seconds between SIGTERM and SIGKILL on stop (default %(default)s)")
    _add_init_options(p)
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("status", parents=[common], help="a table per node")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("logs", parents=[common], help="show (or follow) logs")
    p.add_argument("which", nargs="?", help="node index, sp<i> or chain (default: all)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument("-n", "--lines", type=number_arg(int, 0), default=50,
                   help="lines of each log (default 50)")
    p.set_defaults(func=cmd_logs)

    for name, func, text in (("down", cmd_down, "stop every process (by pid file), or only "
                              "the nodes named ('up --detach' starts them again)"),
                             ("clean", cmd_clean, "down, then remove what the testnet made "
                              "(account.key and files of yours stay)")):
        p = sub.add_parser(name, parents=[common], help=text)
        if name == "down":
            p.add_argument("nodes", nargs="*", metavar="NODE",
                           help="node index or sp<i> (default: every process)")
        p.add_argument("--grace", type=_SECONDS, default=DEFAULT_GRACE,
                       help="seconds between SIGTERM and SIGKILL (default %(default)s)")
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ManifestError as exc:
        err(str(exc))
        return EXIT_USAGE
    except (GfspError, OSError) as exc:
        err(str(exc))
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
