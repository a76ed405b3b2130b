"""Logging setup: readable lines on a terminal, JSON lines otherwise (one object per line)."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TextIO

# Third-party loggers that are noisy at INFO (py-libp2p logs redial warnings: P2P-NOTES #10).
QUIET_LOGGERS = ("libp2p", "multiaddr", "hypercorn.access", "httpx", "httpcore")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for extra in ("modular", "task_key"):
            if hasattr(record, extra):
                out[extra] = getattr(record, extra)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "info", *, stream: TextIO | None = None,
                  node_name: str = "") -> None:
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if stream.isatty():
        prefix = f"{node_name} " if node_name else ""
        fmt = logging.Formatter(f"%(asctime)s {prefix}%(levelname)-7s %(name)s: %(message)s",
                                "%H:%M:%S")
        fmt.converter = time.localtime
        handler.setFormatter(fmt)
    else:
        handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
