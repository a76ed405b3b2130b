"""Logging setup: journald under systemd, readable lines on a terminal, JSON lines otherwise.

- Under systemd (``$JOURNAL_STREAM`` names our stderr): records go to journald over its native
  protocol (``/run/systemd/journal/socket``, one datagram of ``KEY=VALUE`` fields per record)
  with ``MESSAGE``, ``PRIORITY``, ``SYSLOG_IDENTIFIER=gfsp-node``, ``LOGGER``, ``NODE_NAME`` and,
  ``MODULAR`` (from ``extra={"modular": ...}``, else from the logger: ``gfsp.p2p.discovery``
  is the p2p modular's) and, when the record carries it, ``TASK_KEY``, so
  ``journalctl -u gfsp-node MODULAR=executor`` works. If that socket is missing,
  plain ``<priority>``-prefixed lines go to stderr (which journald reads as a stream).
- On a terminal: readable lines. Otherwise (a file, a pipe): one JSON object per line.

No dependency: the journal protocol is a few lines (see :func:`journal_fields`).
"""

from __future__ import annotations

import array
import errno
import fcntl
import json
import logging
import os
import socket
import struct
import sys
import time
from collections.abc import Mapping
from typing import TextIO

from node.registry import CANONICAL_ORDER

# Third-party loggers that are noisy at INFO (py-libp2p logs redial warnings: P2P-NOTES #10).
QUIET_LOGGERS = ("libp2p", "multiaddr", "hypercorn.access", "httpx", "httpcore")

JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_IDENTIFIER = "gfsp-node"
def modular_of(record: logging.LogRecord) -> str | None:
    """The modular a record is about: its ``modular`` extra, else the one its logger belongs
    to (``gfsp.<modular>[.<part>]``), else None."""
    given = getattr(record, "modular", None)
    if given is not None:
        return str(given)
    parts = record.name.split(".", 2)
    if len(parts) > 1 and parts[0] == "gfsp" and parts[1] in CANONICAL_ORDER:
        return parts[1]
    return None


def _extras(record: logging.LogRecord) -> dict[str, str]:
    out = {}
    modular = modular_of(record)
    if modular is not None:
        out["modular"] = modular
    task_key = getattr(record, "task_key", None)
    if task_key is not None:
        out["task_key"] = str(task_key)
    return out


def syslog_priority(levelno: int) -> int:
    """A logging level as a syslog priority (journald's PRIORITY)."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(_extras(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def _field(name: str, value: object) -> bytes:
    """One field of journald's native protocol (binary-safe form when the value has a newline)."""
    data = str(value).encode("utf-8", "replace")
    if b"\n" in data:
        return name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return name.encode() + b"=" + data + b"\n"


class JournalFormatter(logging.Formatter):
    """A record as journald fields (:meth:`fields`) or one native-protocol datagram."""

    def __init__(self, *, identifier: str = SYSLOG_IDENTIFIER, node_name: str = "") -> None:
        super().__init__()
        self.identifier = identifier
        self.node_name = node_name

    def fields(self, record: logging.LogRecord) -> dict[str, str]:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        out = {"MESSAGE": message, "PRIORITY": str(syslog_priority(record.levelno)),
               "SYSLOG_IDENTIFIER": self.identifier, "LOGGER": record.name,
               "CODE_FILE": record.pathname, "CODE_LINE": str(record.lineno),
               "CODE_FUNC": record.funcName}
        if self.node_name:
            out["NODE_NAME"] = self.node_name
        for name, value in _extras(record).items():
            out[name.upper()] = value
        return out

    def encode(self, record: logging.LogRecord) -> bytes:
        return b"".join(_field(k, v) for k, v in self.fields(record).items())

    def format(self, record: logging.LogRecord) -> str:  # for handlers that want text
        return self.encode(record).decode("utf-8", "replace")


class PrefixFormatter(logging.Formatter):
    """Plain lines with a ``<priority>`` prefix, as journald reads them from a stream."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{syslog_priority(record.levelno)}>" + super().format(record)


class JournalHandler(logging.Handler):
    """Sends each record to journald's native socket; on a send error writes a plain line to
    ``fallback`` (stderr) instead, so no record is lost silently."""

    def __init__(self, address: str = JOURNAL_SOCKET, *, node_name: str = "",
                 identifier: str = SYSLOG_IDENTIFIER, fallback: TextIO | None = None) -> None:
        super().__init__()
        self.address = address
        self.journal_formatter = JournalFormatter(identifier=identifier, node_name=node_name)
        self.setFormatter(self.journal_formatter)
        self._fallback = fallback
        self._fallback_fmt = PrefixFormatter("%(levelname)s %(name)s: %(message)s")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._send(self.journal_formatter.encode(record))
        except OSError:
            self._write_fallback(record)
        except Exception:  # noqa: BLE001 - logging's contract: report via handleError, never raise
            self.handleError(record)

    def _send(self, data: bytes) -> None:
        try:
            self._sock.sendto(data, self.address)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_memfd(data)  # too big for one datagram: pass a sealed memfd

    def _send_memfd(self, data: bytes) -> None:
        fd = os.memfd_create("gfsp-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                        | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
            self._sock.sendmsg([], rights, 0, self.address)
        finally:
            os.close(fd)

    def _write_fallback(self, record: logging.LogRecord) -> None:
        stream = self._fallback or sys.stderr
        try:
            stream.write(self._fallback_fmt.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging's contract: report via handleError, never raise
            self.handleError(record)

    def close(self) -> None:
        try:
            self._sock.close()
        finally:
            super().close()


def journal_stream_matches(value: str, stream: TextIO) -> bool:
    """Is ``stream`` the journald stream named by ``$JOURNAL_STREAM`` (``"<dev>:<inode>"``)?

    systemd sets the variable for a service whose stderr goes to the journal; a child whose
    stderr was redirected elsewhere inherits it, hence the check against the stream itself.
    """
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def build_handler(*, stream: TextIO | None = None, node_name: str = "",
                  env: Mapping[str, str] | None = None,
                  journal_socket: str = JOURNAL_SOCKET) -> logging.Handler:
    """The handler :func:`setup_logging` installs (journald, terminal or JSON lines)."""
    env = os.environ if env is None else env
    stream = stream or sys.stderr
    if journal_stream_matches(env.get("JOURNAL_STREAM", ""), stream):
        if os.path.exists(journal_socket):
            return JournalHandler(journal_socket, node_name=node_name, fallback=stream)
        handler: logging.Handler = logging.StreamHandler(stream)
        handler.setFormatter(PrefixFormatter("%(levelname)s %(name)s: %(message)s"))
        return handler
    handler = logging.StreamHandler(stream)
    if stream.isatty():
        prefix = f"{node_name} " if node_name else ""
        fmt = logging.Formatter(f"%(asctime)s {prefix}%(levelname)-7s %(name)s: %(message)s",
                                "%H:%M:%S")
        fmt.converter = time.localtime
        handler.setFormatter(fmt)
    else:
        handler.setFormatter(JsonFormatter())
    return handler


def setup_logging(level: str = "info", *, stream: TextIO | None = None,
                  node_name: str = "", env: Mapping[str, str] | None = None,
                  journal_socket: str = JOURNAL_SOCKET) -> None:
    handler = build_handler(stream=stream, node_name=node_name, env=env,
                            journal_socket=journal_socket)
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, JournalHandler):  # ours: release its socket
            old.close()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
