"""systemd integration: the unit files (systemd-analyze verify, required directives, the
ExecStartPre= key initialisation), the daemon's sd_notify protocol as a Type=notify service
sees it (READY=1, WATCHDOG=1 at half of WATCHDOG_USEC, STOPPING=1), keys from
$CREDENTIALS_DIRECTORY, and logging to journald's native socket.

The daemon tests run ``gfsp-node run`` as a child process with a NOTIFY_SOCKET the test binds.
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from node.crypto import ROLES, load_keys
from node.log import (
    JournalFormatter,
    JournalHandler,
    JsonFormatter,
    PrefixFormatter,
    build_handler,
    journal_stream_matches,
)
from tests.p2pnet import free_port

ROOT = Path(__file__).resolve().parent.parent
UNITS = {"gfsp-node.service": ROOT / "systemd" / "gfsp-node.service",
         "gfsp-node@.service": ROOT / "systemd" / "gfsp-node@.service"}
BIN = Path(sys.executable).parent
GFSP_NODE = BIN / "gfsp-node"
INSTALLED_PATH = "/usr/local/bin/gfsp-node"
INSTALL_HINT = ("systemd-analyze is missing: install it with `apt-get install -y systemd` "
                "(make test does this)")


# --- unit files -------------------------------------------------------------------------------


def unit_directives(path: Path) -> dict[str, list[str]]:
    """``Key`` -> every value it is given in the [Service] and [Unit] sections."""
    out: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def local_copy(unit: Path, dest: Path) -> Path:
    """The unit with ExecStart= pointing at this venv's gfsp-node (verify needs it to exist)."""
    dest.write_text(unit.read_text().replace(INSTALLED_PATH, str(GFSP_NODE)))
    return dest


@pytest.mark.parametrize("name", sorted(UNITS))
def test_systemd_analyze_verify(tmp_path: Path, name: str) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.fail(INSTALL_HINT)
    assert GFSP_NODE.exists(), f"{GFSP_NODE} missing: pip install -e . first"
    copy = local_copy(UNITS[name], tmp_path / name)
    targets = [copy]
    if name.endswith("@.service"):  # the template and one instance of it
        targets.append(local_copy(UNITS[name], tmp_path / name.replace("@", "@sp1")))
    result = subprocess.run([tool, "verify", "--man=no", *map(str, targets)],
                            capture_output=True, text=True, timeout=60, check=False)
    ours = [line for line in (result.stdout + result.stderr).splitlines()
            if str(tmp_path) in line or name in line]
    assert result.returncode == 0, result.stdout + result.stderr
    assert not ours, "systemd-analyze complained:\n" + "\n".join(ours)


@pytest.mark.parametrize("name", sorted(UNITS))
def test_unit_has_the_required_directives(name: str) -> None:
    d = unit_directives(UNITS[name])

    def one(key: str) -> str:
        assert key in d, f"{name}: no {key}="
        return d[key][-1]

    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert one("WatchdogSec").rstrip("s").isdigit()
    assert one("Restart") == "on-failure"
    assert one("RestartPreventExitStatus") == "2"
    # a chain down at boot must not end in start-limit-hit (found in review)
    assert one("StartLimitIntervalSec") == "0"
    assert "gfsp-node init" in one("ExecStartPre") and "test -e" in one("ExecStartPre")
    assert " run --config " in one("ExecStart")
    for key in ("StateDirectory", "ConfigurationDirectory", "LogsDirectory"):
        assert one(key).startswith("gfsp")
    assert one("DynamicUser") == "yes"
    assert one("ProtectSystem") == "strict"
    for key in ("ProtectHome", "PrivateTmp", "PrivateDevices", "NoNewPrivileges"):
        assert one(key) == "yes", key
    assert one("CapabilityBoundingSet") == ""
    assert set(one("RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert one("SystemCallFilter") == "@system-service"
    loaded = {v.split(":", 1)[0] for v in d["LoadCredential"]}
    assert loaded == {f"{role}.key" for role in ROLES}
    assert {v.split(":", 1)[0] for v in d["SetCredential"]} == loaded  # first-start fallback
    if "@" in name:
        assert "%i" in one("StateDirectory") and "%i" in one("ExecStart")
        assert all("%i" in v for v in d["LoadCredential"])


def _expand(command: str, state_root: Path, instance: str) -> list[str]:
    """An ExecStartPre= line with systemd's specifiers filled in (as systemd would)."""
    for spec, value in (("%S", str(state_root)), ("%i", instance), ("%H", "testhost"),
                        ("%E", str(state_root / "etc"))):
        command = command.replace(spec, value)
    return shlex.split(command.replace(INSTALLED_PATH, str(GFSP_NODE)))


@pytest.mark.parametrize("name", sorted(UNITS))
def test_exec_start_pre_creates_keys_only_if_missing(tmp_path: Path, name: str) -> None:
    (pre,) = unit_directives(UNITS[name])["ExecStartPre"]
    argv = _expand(pre, tmp_path, "sp1")
    state = tmp_path / ("gfsp/sp1" if "@" in name else "gfsp")
    first = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert first.returncode == 0, first.stderr
    keys_dir = state / "keys"
    assert keys_dir.stat().st_mode & 0o777 == 0o700
    for role in ROLES:
        assert (keys_dir / f"{role}.key").stat().st_mode & 0o777 == 0o600
    before = {p.name: p.read_bytes() for p in keys_dir.iterdir()}
    # The credential paths the unit loads are the files just created.
    for v in unit_directives(UNITS[name])["LoadCredential"]:
        cred, _, src = v.partition(":")
        assert Path(_expand(src, tmp_path, "sp1")[0]) == keys_dir / cred
    second = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert second.returncode == 0, second.stderr
    assert {p.name: p.read_bytes() for p in keys_dir.iterdir()} == before
    # keys removed (to make new ones), the sample config left: new keys (found by an
    # operator review: init refused, the config being there, and the unit could not start)
    shutil.rmtree(keys_dir)
    third = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert third.returncode == 0, third.stderr
    assert {p.name for p in keys_dir.iterdir()} == set(before)
    assert {p.name: p.read_bytes() for p in keys_dir.iterdir()} != before


# --- the daemon under a test NOTIFY_SOCKET ----------------------------------------------------


def init_node(folder: Path) -> int:
    """``gfsp-node init`` a node with its own static registry; returns its gater port."""
    port = free_port()
    subprocess.run([str(GFSP_NODE), "init", "--dir", str(folder), "--seed", folder.name,
                    "--gater-listen", f"127.0.0.1:{port}",
                    "--p2p-listen", f"/ip4/127.0.0.1/tcp/{free_port()}"],
                   check=True, capture_output=True, timeout=60)
    return port


def node_env(notify: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
                        "CREDENTIALS_DIRECTORY", "JOURNAL_STREAM")}
    return {**env, "NOTIFY_SOCKET": notify, **extra}


class NotifyListener:
    """An abstract AF_UNIX datagram socket playing systemd's side of sd_notify."""

    def __init__(self) -> None:
        self.name = f"gfsp-test-sd-{os.getpid()}-{secrets.token_hex(6)}"
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    async def __aenter__(self) -> NotifyListener:
        await self.sock.bind("\0" + self.name)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.sock.close()

    @property
    def address(self) -> str:
        return "@" + self.name

    async def next(self) -> list[str]:
        return (await self.sock.recv(4096)).decode().splitlines()


async def _run_node(config: Path, env: dict[str, str], log: Path) -> trio.Process:
    with log.open("wb") as out:
        return await trio.lowlevel.open_process(
            [str(GFSP_NODE), "run", "--config", str(config)], env=env,
            stdin=subprocess.DEVNULL, stdout=out, stderr=out)


async def _reap(proc: trio.Process) -> None:
    if proc.returncode is None:
        proc.kill()
    with trio.move_on_after(5):
        await proc.wait()


async def test_daemon_sends_ready_watchdog_and_stopping(tmp_path: Path) -> None:
    init_node(tmp_path / "sp")
    log = tmp_path / "node.log"
    async with NotifyListener() as sd:
        env = node_env(sd.address, WATCHDOG_USEC="400000")  # WATCHDOG=1 every 0.2 s
        proc = await _run_node(tmp_path / "sp" / "config.toml", env, log)
        try:
            with trio.fail_after(30):
                seen: list[str] = []
                while "READY=1" not in seen:
                    seen += await sd.next()
                assert "WATCHDOG=1" not in seen, "watchdog pings start once ready"
                start = trio.current_time()
                for _ in range(4):
                    assert await sd.next() == ["WATCHDOG=1"]
                took = trio.current_time() - start
                assert 0.4 <= took <= 3.0, f"4 pings at 0.2 s took {took:.2f}s"
                proc.send_signal(signal.SIGTERM)
                while "STOPPING=1" not in (msg := await sd.next()):
                    assert msg == ["WATCHDOG=1"], msg
                assert await proc.wait() == 0, log.read_text()
        finally:
            await _reap(proc)


async def test_watchdog_pid_of_another_process_is_ignored(tmp_path: Path) -> None:
    """WATCHDOG_PID names the process systemd watches: a child that is not it stays quiet."""
    init_node(tmp_path / "sp")
    async with NotifyListener() as sd:
        env = node_env(sd.address, WATCHDOG_USEC="200000", WATCHDOG_PID="1")
        proc = await _run_node(tmp_path / "sp" / "config.toml", env, tmp_path / "node.log")
        try:
            with trio.fail_after(30):
                while "READY=1" not in await sd.next():
                    pass
                with trio.move_on_after(0.6):
                    msg = await sd.next()
                    pytest.fail(f"unexpected {msg}")
                proc.send_signal(signal.SIGTERM)
                assert "STOPPING=1" in await sd.next()
                assert await proc.wait() == 0
        finally:
            await _reap(proc)


def _as_credentials(keys_dir: Path, creds: Path) -> None:
    """Move the key files where systemd would put them (read-only, private)."""
    creds.mkdir(mode=0o700)
    for f in keys_dir.iterdir():
        target = creds / f.name
        shutil.copyfile(f, target)
        target.chmod(0o400)
    shutil.rmtree(keys_dir)


async def test_daemon_reads_keys_from_credentials_directory(tmp_path: Path) -> None:
    folder = tmp_path / "sp"
    port = init_node(folder)
    expected = load_keys(folder / "keys").operator.address
    creds = tmp_path / "credentials"
    _as_credentials(folder / "keys", creds)
    log = tmp_path / "node.log"
    async with NotifyListener() as sd:
        # Without $CREDENTIALS_DIRECTORY the keys are nowhere: a usage error (exit 2).
        proc = await _run_node(folder / "config.toml", node_env(sd.address), log)
        try:
            with trio.fail_after(30):
                assert await proc.wait() == 2
        finally:
            await _reap(proc)
        assert "key file not found" in log.read_text()

        env = node_env(sd.address, CREDENTIALS_DIRECTORY=str(creds))
        proc = await _run_node(folder / "config.toml", env, log)
        try:
            with trio.fail_after(30):
                while "READY=1" not in await sd.next():
                    pass
                async with httpx.AsyncClient() as client:
                    r = await client.get(f"http://127.0.0.1:{port}/gfsp/v1/status")
                assert r.status_code == 200, r.text
                assert r.json()["operator"] == expected
                proc.send_signal(signal.SIGTERM)
                assert await proc.wait() == 0, log.read_text()
        finally:
            await _reap(proc)
    assert not (folder / "keys").exists()


# --- journald logging -------------------------------------------------------------------------


def parse_journal(data: bytes) -> dict[str, str]:
    """Journald's native protocol: KEY=VALUE lines, or KEY\\n<u64 le length><bytes>\\n."""
    out: dict[str, str] = {}
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            out[key.decode()] = value.decode()
            i = nl + 1
        else:
            (size,) = struct.unpack("<Q", data[nl + 1:nl + 9])
            out[line.decode()] = data[nl + 9:nl + 9 + size].decode()
            assert data[nl + 9 + size:nl + 10 + size] == b"\n"
            i = nl + 10 + size
    return out


@pytest.fixture
def journal_socket(tmp_path: Path):
    path = str(tmp_path / "journal.sock")
    assert len(path) < 100
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield path, sock
    sock.close()


def _logger(handler: logging.Handler) -> logging.Logger:
    log = logging.getLogger(f"gfsp.test.journal.{secrets.token_hex(4)}")
    log.propagate = False
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG)
    return log


def test_journal_handler_sends_native_fields(journal_socket) -> None:
    path, sock = journal_socket
    handler = JournalHandler(path, node_name="sp3")
    try:
        log = _logger(handler)
        log.warning("replicate %s failed", "obj-7",
                    extra={"modular": "executor", "task_key": "Replicate-id:7"})
        fields = parse_journal(sock.recv(65536))
        assert fields["MESSAGE"] == "replicate obj-7 failed"
        assert fields["PRIORITY"] == "4"
        assert fields["SYSLOG_IDENTIFIER"] == "gfsp-node"
        assert fields["MODULAR"] == "executor"
        assert fields["TASK_KEY"] == "Replicate-id:7"
        assert fields["NODE_NAME"] == "sp3"
        assert fields["LOGGER"] == log.name
        assert fields["CODE_FUNC"] == "test_journal_handler_sends_native_fields"

        log.info("plain")  # no extras: no MODULAR/TASK_KEY fields
        fields = parse_journal(sock.recv(65536))
        assert fields["PRIORITY"] == "6" and "MODULAR" not in fields and "TASK_KEY" not in fields

        # found in review: no code set the modular extra, so MODULAR=p2p matched nothing;
        # a modular's own logger (gfsp.<modular>[.<part>]) names it
        for name, modular in (("gfsp.p2p.discovery", "p2p"), ("gfsp.executor", "executor"),
                              ("gfsp.chain", None)):
            handler.handle(logging.LogRecord(name, logging.INFO, __file__, 1, "m", (), None))
            fields = parse_journal(sock.recv(65536))
            assert fields.get("MODULAR") == modular, (name, fields)

        try:
            raise ValueError("bad piece")
        except ValueError:
            log.exception("multi\nline")
        fields = parse_journal(sock.recv(65536))  # binary-safe form for newlines
        assert fields["MESSAGE"].startswith("multi\nline\nTraceback")
        assert "ValueError: bad piece" in fields["MESSAGE"]
        assert fields["PRIORITY"] == "3"
    finally:
        handler.close()


def test_journal_handler_passes_a_huge_record_as_a_sealed_memfd(journal_socket) -> None:
    path, sock = journal_socket
    fallback = io.StringIO()
    handler = JournalHandler(path, fallback=fallback)
    try:
        big = "x" * (4 << 20)  # larger than any datagram
        _logger(handler).error(big)
        assert fallback.getvalue() == ""
        data, fds, _, _ = socket.recv_fds(sock, 65536, 1)
        assert data == b"" and len(fds) == 1
        seals = fcntl.fcntl(fds[0], fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SEAL  # journald insists
        with os.fdopen(fds[0], "rb") as f:
            f.seek(0)  # journald maps it; the offset is the writer's
            fields = parse_journal(f.read())
        assert fields["MESSAGE"] == big
    finally:
        handler.close()


def test_journal_handler_falls_back_to_stderr_lines(tmp_path: Path) -> None:
    fallback = io.StringIO()
    handler = JournalHandler(str(tmp_path / "gone.sock"), fallback=fallback)
    try:
        _logger(handler).error("lost?", extra={"modular": "gater"})
    finally:
        handler.close()
    assert fallback.getvalue().startswith("<3>ERROR ")
    assert "lost?" in fallback.getvalue()


def test_journal_stream_selects_the_handler(tmp_path: Path, journal_socket) -> None:
    path, _ = journal_socket
    with (tmp_path / "stderr").open("w") as stream:
        st = os.fstat(stream.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert journal_stream_matches(env["JOURNAL_STREAM"], stream)
        handler = build_handler(stream=stream, env=env, journal_socket=path)
        assert isinstance(handler, JournalHandler)
        assert isinstance(handler.formatter, JournalFormatter)
        handler.close()
        # Journal socket missing: <priority>-prefixed lines on stderr (journald reads them).
        handler = build_handler(stream=stream, env=env,
                                journal_socket=str(tmp_path / "missing.sock"))
        assert isinstance(handler.formatter, PrefixFormatter)
        # JOURNAL_STREAM inherited but stderr is elsewhere (redirected): JSON lines.
        other = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}
        assert isinstance(build_handler(stream=stream, env=other, journal_socket=path).formatter,
                          JsonFormatter)
        assert isinstance(build_handler(stream=stream, env={}, journal_socket=path).formatter,
                          JsonFormatter)


def test_json_lines_carry_modular_and_task_key() -> None:
    stream = io.StringIO()
    handler = build_handler(stream=stream, env={})
    _logger(handler).info("hi", extra={"modular": "p2p", "task_key": "k"})
    line = json.loads(stream.getvalue())
    assert (line["msg"], line["modular"], line["task_key"]) == ("hi", "p2p", "k")
