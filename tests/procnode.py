"""One SP folder run as a `python -m node.cli run` OS process, for tests that need real
signals (SIGSTOP, SIGKILL): READY=1 arrives on the child's own NOTIFY_SOCKET (an abstract
AF_UNIX datagram socket bound here); stderr is kept in ``node.stderr`` in its folder."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import sqlite3
import subprocess
from pathlib import Path

import trio

from testnet.cli import wait_notify_ready
from tests.p2pnet import SPDir, node_command, node_process_env, wait_until


class ProcNode:
    """One SP folder run as a `python -m node.cli run` child, stderr kept in a file."""

    def __init__(self, sp: SPDir) -> None:
        self.sp = sp
        self.proc: trio.Process | None = None
        self.sock: trio.socket.SocketType | None = None
        self.log = sp.dir / "node.stderr"
        self.starts = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> None:
        """Spawn the child and wait for READY=1."""
        await self.spawn()
        await self.wait_ready()

    async def spawn(self) -> None:
        """Spawn the child (READY=1 is awaited separately with :meth:`wait_ready`)."""
        assert self.proc is None or self.proc.returncode is not None, "already running"
        self.close_socket()
        name = f"gfsp-test-{os.getpid()}-{secrets.token_hex(6)}"
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        await self.sock.bind("\0" + name)
        env = {k: v for k, v in node_process_env().items()
               if k not in ("WATCHDOG_USEC", "WATCHDOG_PID", "CREDENTIALS_DIRECTORY")}
        env["NOTIFY_SOCKET"] = "@" + name
        self.starts += 1
        with self.log.open("ab") as err:
            err.write(f"--- start {self.starts} ---\n".encode())
            err.flush()
            self.proc = await trio.lowlevel.open_process(
                node_command(self.sp), cwd=str(self.sp.dir), env=env,
                stdin=subprocess.DEVNULL, stdout=err, stderr=err)

    async def wait_ready(self) -> None:
        """Until READY=1 arrives; fails at once (with the child's log) if the child exits."""
        assert self.proc is not None and self.sock is not None
        proc, sock = self.proc, self.sock
        await wait_notify_ready(proc, sock, lambda: AssertionError(
            f"{self.sp.dir.name} exited with {proc.returncode} before READY=1:\n"
            f"{self.log_tail()}"))

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "<no log>"

    def signal(self, sig: int) -> None:
        assert self.proc is not None and self.proc.returncode is None
        os.kill(self.proc.pid, sig)

    def state(self) -> str:
        """The kernel's process state letter (``T`` when stopped), ``X`` when gone."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return "X"
        return stat.rsplit(")", 1)[1].split()[0]

    async def stop_process(self) -> None:
        """SIGSTOP, and wait until the kernel reports it stopped."""
        self.signal(signal.SIGSTOP)
        await wait_until(lambda: self.state() == "T", poll=0.005)

    async def kill(self) -> None:
        """SIGCONT then SIGKILL, and reap it (shielded: also used during cleanup)."""
        if self.proc is None:
            return
        with trio.CancelScope(shield=True):
            if self.proc.returncode is None:
                for sig in (signal.SIGCONT, signal.SIGKILL):
                    try:
                        os.kill(self.proc.pid, sig)
                    except ProcessLookupError:
                        pass
                await self.proc.wait()

    def rx_queued(self) -> int:
        """Bytes waiting unread in the receive queues of this process's TCP sockets."""
        inodes = set()
        try:
            for fd in os.listdir(f"/proc/{self.pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{self.pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
            lines = Path(f"/proc/{self.pid}/net/tcp").read_text().splitlines()[1:]
        except OSError:
            return 0
        total = 0
        for line in lines:
            fields = line.split()
            if fields[9] in inodes:
                total += int(fields[4].split(":")[1], 16)
        return total

    def peer_rows(self) -> dict[str, tuple[str, float]]:
        """``peer_id -> (state, first_seen)`` from this SP's SPDB ``peers`` table."""
        db = self.sp.config().db_path
        conn = sqlite3.connect(db, timeout=5.0)
        try:
            return {r[0]: (r[1], r[2]) for r in
                    conn.execute("SELECT peer_id, state, first_seen FROM peers")}
        finally:
            conn.close()

    def close_socket(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
