"""Helpers of the data-plane fault tests (tests/test_data_faults.py): per-SP config overrides,
a devchain that can hold seal transactions, and
read-only looks at an SP's piece folder and SPDB that work for in-process nodes and processes.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Callable
from typing import Any

import trio
from starlette.requests import Request

from node.chain_msgs import TX_SEAL_OBJECT, ChainError
from node.config import load_config, render_config
from node.crypto import unpack
from node.errors import SignatureError
from node.piecestore import parse_key
from testnet.devchain import DevChain
from tests.p2pnet import SPDir

#: Task states the manager persists for work that is not finished.
ACTIVE_STATES = ("pending", "running")


def configure(sp: SPDir, **sections: dict[str, Any] | Callable[[Any], Any]) -> None:
    """Rewrite ``sp``'s config with some fields of some sections changed, e.g.
    ``configure(sp, manager={"gc_interval": 0.5})``; a callable gets the section and returns
    the new one."""
    cfg = sp.config()
    changes: dict[str, Any] = {}
    for name, change in sections.items():
        section = getattr(cfg, name)
        changes[name] = (change(section) if callable(change)
                         else dataclasses.replace(section, **change))
    cfg = dataclasses.replace(cfg, **changes)
    sp.config_path.write_text(render_config(cfg))


# --- looking at an SP from outside ------------------------------------------------------------


def disk_keys(sp: SPDir, object_id: int) -> list[str]:
    """Piece keys of ``object_id`` in ``sp``'s piece folder (any shard folder; temporary files
    and foreign names are not keys)."""
    root = load_config(sp.config_path).piecestore_path
    out = []
    for path in root.rglob(f"{object_id}_s*"):
        try:
            key = parse_key(path.name)
        except ValueError:
            continue
        if key.object_id == object_id and path.is_file():
            out.append(path.name)
    return sorted(out)


def expected_keys(object_id: int, segments: int, index: int | None) -> list[str]:
    """What an SP should hold of a sealed object: the segments (primary, ``index`` None) or
    piece ``index`` of every segment (a secondary)."""
    if index is None:
        return sorted(f"{object_id}_s{s}" for s in range(segments))
    return sorted(f"{object_id}_s{s}_p{index}" for s in range(segments))


def spdb_rows(sp: SPDir, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows of a read-only query on ``sp``'s SPDB (the node may be running: WAL readers do not
    block it). An SPDB that is busy or not created yet gives no rows."""
    path = load_config(sp.config_path).db_path
    if not path.exists():
        return []
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error:
        return []
    try:
        return conn.execute(sql, args).fetchall()
    except sqlite3.Error:
        return []
    finally:
        conn.close()


def task_states(sp: SPDir, task_type: str, object_id: int) -> list[str]:
    """States of ``sp``'s tasks of one type about one object."""
    return [str(r[1]) for r in spdb_rows(
        sp, "SELECT key, state FROM tasks WHERE type = ?", (task_type,))
        if _about(str(r[0]), object_id)]


def active_tasks(conn: sqlite3.Connection, object_id: int) -> list[str]:
    """Keys of pending or running tasks about ``object_id`` (for ``db.run`` or a connection)."""
    rows = conn.execute("SELECT key FROM tasks WHERE state IN (?, ?)", ACTIVE_STATES).fetchall()
    return [str(k) for (k,) in rows if _about(str(k), object_id)]


def _about(key: str, object_id: int) -> bool:
    marker = f"-id:{object_id}"
    return key.endswith(marker) or f"{marker}-" in key


def upload_state(sp: SPDir, object_id: int) -> str | None:
    rows = spdb_rows(sp, "SELECT state FROM upload_progress WHERE object_id = ?", (object_id,))
    return str(rows[0][0]) if rows else None


# --- an SP as an OS process -------------------------------------------------------------------


# --- a devchain that can hold seals -----------------------------------------------------------


class SealGateChain(DevChain):
    """A devchain that, for the object ids in :attr:`held`, answers a seal transaction only
    when :attr:`release` is set, and then refuses it (``UNAVAILABLE``, not applied): the
    primary SP is caught "before seal" for as long as the test likes. :attr:`seen` is set when
    such a seal arrived."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.held: set[int] = set()
        self.seen = trio.Event()
        self.release = trio.Event()

    async def _tx(self, request: Request) -> dict[str, Any]:
        body = await request.body()  # cached: the base class reads it again from the cache
        try:
            tx = unpack(body)
        except SignatureError:
            tx = None
        if (isinstance(tx, dict) and tx.get("type") == TX_SEAL_OBJECT
                and tx.get("object_id") in self.held):
            self.seen.set()
            await self.release.wait()
            self.held.discard(tx["object_id"])
            raise ChainError("UNAVAILABLE", "the test held this seal and dropped it")
        return await super()._tx(request)
