"""Tests for node.notify: sd_notify datagrams to a path or abstract socket, watchdog interval."""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

import pytest
import trio

from node.notify import Notifier


def test_without_notify_socket_is_a_noop() -> None:
    n = Notifier({})
    assert not n.enabled
    assert n.watchdog_interval is None
    n.notify("READY=1")  # nothing to send to, nothing raised
    assert not Notifier({"NOTIFY_SOCKET": ""}).enabled


def _socket_path(tmp_path: Path) -> str:
    path = str(tmp_path / "notify.sock")
    assert len(path.encode()) < 108, "tmp_path too long for an AF_UNIX address"
    return path


async def _recv(sock: trio.socket.SocketType) -> bytes:
    with trio.fail_after(5):
        return await sock.recv(4096)


async def test_path_socket_receives_ready(tmp_path: Path) -> None:
    path = _socket_path(tmp_path)
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        await sock.bind(path)
        n = Notifier({"NOTIFY_SOCKET": path})
        assert n.enabled
        n.notify("READY=1")
        n.notify("STATUS=serving\nWATCHDOG=1")
        assert await _recv(sock) == b"READY=1"
        assert await _recv(sock) == b"STATUS=serving\nWATCHDOG=1"


async def test_abstract_socket_receives_ready() -> None:
    name = f"gfsp-test-notify-{os.getpid()}-{secrets.token_hex(6)}"
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        await sock.bind("\0" + name)
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.enabled
        n.notify("READY=1")
        assert await _recv(sock) == b"READY=1"


def test_notify_to_missing_socket_raises(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": _socket_path(tmp_path)})
    with pytest.raises(OSError):
        n.notify("READY=1")


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "@whatever")
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    n = Notifier()
    assert n.enabled
    assert n.watchdog_interval == pytest.approx(1.5)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "200000"}, 0.1),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}, 0.1),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "abc"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    interval = Notifier(env).watchdog_interval
    if expected is None:
        assert interval is None
    else:
        assert interval == pytest.approx(expected)
