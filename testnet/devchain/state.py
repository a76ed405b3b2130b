"""The devchain's state and its state transitions, as plain functions on a sqlite3 connection.

Each function here runs inside one SPDB transaction (``await db.run(fn)``), so a transaction is
applied entirely or not at all: a refused transaction raises :class:`ChainError`, the SPDB rolls
back, and nothing changes (not even the sender's sequence number).

Rules (ARCHITECTURE §3):

* Accounts are created implicitly by their first accepted transaction, with sequence 0; a
  transaction's ``seq`` must equal the account's next sequence number, which then increments.
  Checked in order: shape (``MALFORMED``), ``from == address_of(pubkey)`` and the signature
  (``BAD_SIGNATURE``), the sequence (``BAD_SEQUENCE``), then the transaction's own rules.
* Transactions apply at once and are recorded at the current height.
* An approval is valid while ``height <= expiry_height``.
* There is no governance: anyone may register an SP (``register_sp`` by its operator key; the
  same operator re-registering updates its entry and keeps its status), and each SP sets its own
  status with ``set_sp_status``.
* Deleting removes the row; ids are never reused (AUTOINCREMENT) and the event log keeps what
  was deleted, for GC.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Mapping
from typing import Any

from modulars.signer import integrity_payload
from node.chain_msgs import (
    APPROVAL_CREATE_BUCKET,
    APPROVAL_CREATE_OBJECT,
    BUCKET_PATTERN,
    SP_STATUSES,
    TX_CREATE_BUCKET,
    TX_CREATE_OBJECT,
    TX_DELETE_BUCKET,
    TX_DELETE_OBJECT,
    TX_REGISTER_SP,
    TX_SEAL_OBJECT,
    TX_SET_SP_STATUS,
    ChainError,
    check_approval,
    check_tx,
)
from node.crypto import address_of, is_address, verify, verify_message
from node.errors import SignatureError
from node.tasks import StorageParams

__all__ = ["MIGRATIONS", "apply_tx", "init_chain"]

MIGRATIONS: tuple[str, ...] = (
    # 1: initial schema.
    """
    CREATE TABLE meta (
        key   TEXT NOT NULL PRIMARY KEY,
        value INTEGER NOT NULL
    );
    CREATE TABLE accounts (
        address TEXT    NOT NULL PRIMARY KEY,
        seq     INTEGER NOT NULL
    );
    CREATE TABLE sps (
        operator        TEXT    NOT NULL PRIMARY KEY,
        endpoint        TEXT    NOT NULL,
        peer_id         TEXT    NOT NULL UNIQUE,
        p2p_addrs       TEXT    NOT NULL,      -- JSON list
        operator_key    BLOB    NOT NULL,
        approval_key    BLOB    NOT NULL,
        seal_key        BLOB    NOT NULL,
        gc_key          BLOB    NOT NULL,
        status          TEXT    NOT NULL,
        register_height INTEGER NOT NULL
    );
    CREATE TABLE buckets (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        name          TEXT    NOT NULL UNIQUE,
        owner         TEXT    NOT NULL,
        primary_sp    TEXT    NOT NULL,
        create_height INTEGER NOT NULL
    );
    CREATE INDEX buckets_owner ON buckets (owner, name);
    CREATE TABLE objects (
        id             INTEGER PRIMARY KEY AUTOINCREMENT,
        bucket         TEXT    NOT NULL,
        name           TEXT    NOT NULL,
        owner          TEXT    NOT NULL,
        size           INTEGER NOT NULL,
        content_type   TEXT    NOT NULL,
        checksums      TEXT    NOT NULL,       -- JSON list of hex
        status         TEXT    NOT NULL,
        create_height  INTEGER NOT NULL,
        seal_height    INTEGER,
        secondaries    TEXT    NOT NULL DEFAULT '[]',  -- JSON list of operator addresses
        secondary_sigs TEXT    NOT NULL DEFAULT '[]',  -- JSON list of hex
        UNIQUE (bucket, name)
    );
    CREATE TABLE events (
        idx       INTEGER PRIMARY KEY AUTOINCREMENT,
        height    INTEGER NOT NULL,
        kind      TEXT    NOT NULL,
        bucket    TEXT    NOT NULL,
        bucket_id INTEGER NOT NULL,
        object    TEXT    NOT NULL DEFAULT '',
        object_id INTEGER
    );
    CREATE INDEX events_height ON events (height, idx);
    """,
)

PARAM_KEYS = ("segment_size", "data_shards", "parity_shards", "max_payload")
DEFAULT_PARAMS = StorageParams(segment_size=16 * 1024 * 1024, data_shards=4, parity_shards=2,
                               max_payload=64 * 1024**3)
#: Bucket names: :data:`node.chain_msgs.BUCKET_PATTERN` ("by-id" is reserved: it would shadow
#: the ``/objects/by-id/{id}`` route).
_BUCKET_RE = re.compile(BUCKET_PATTERN)
RESERVED_BUCKETS = frozenset({"by-id"})
MAX_LIST = 1000

CREATED = "CREATED"
SEALED = "SEALED"


# --- setup and reads ------------------------------------------------------------------------


def init_chain(conn: sqlite3.Connection, params: StorageParams | None) -> StorageParams:
    """Store the height (0) and ``params`` on first start; return the stored params.

    ``params`` None means "what is stored, else the defaults". Params given that differ from
    the stored ones are refused: a chain's parameters do not change under its objects.
    """
    conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('height', 0)")
    stored = dict(conn.execute(
        f"SELECT key, value FROM meta WHERE key IN ({','.join('?' * len(PARAM_KEYS))})",
        PARAM_KEYS).fetchall())
    if stored:
        current = StorageParams(**{k: int(stored[k]) for k in PARAM_KEYS})
        if params is not None and params != current:
            raise ChainError("MALFORMED", f"this chain was created with {current}; "
                             f"it cannot change to {params}")
        return current
    chosen = params if params is not None else DEFAULT_PARAMS
    conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                     [(k, getattr(chosen, k)) for k in PARAM_KEYS])
    return chosen


def height(conn: sqlite3.Connection) -> int:
    """The current block height."""
    return int(conn.execute("SELECT value FROM meta WHERE key = 'height'").fetchone()[0])


def next_block(conn: sqlite3.Connection) -> int:
    """Produce one block: increment the height and return it."""
    conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'height'")
    return height(conn)


def account_seq(conn: sqlite3.Connection, address: str) -> int | None:
    """The next sequence number of ``address``, None if it never sent a transaction."""
    row = conn.execute("SELECT seq FROM accounts WHERE address = ?", (address,)).fetchone()
    return None if row is None else int(row[0])


_SP_COLS = ("operator, endpoint, peer_id, p2p_addrs, operator_key, approval_key, seal_key, "
            "gc_key, status, register_height")


def _sp_row(row: tuple[Any, ...] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    (operator, endpoint, peer_id, addrs, op_key, ap_key, seal_key, gc_key, status,
     reg_height) = row
    return {"operator": operator, "endpoint": endpoint, "peer_id": peer_id,
            "p2p_addrs": json.loads(addrs), "operator_key": bytes(op_key).hex(),
            "approval_key": bytes(ap_key).hex(), "seal_key": bytes(seal_key).hex(),
            "gc_key": bytes(gc_key).hex(), "status": status, "register_height": reg_height}


def get_sp(conn: sqlite3.Connection, operator: str) -> dict[str, Any] | None:
    """One SP as JSON, by operator address."""
    return _sp_row(conn.execute(f"SELECT {_SP_COLS} FROM sps WHERE operator = ?",
                                (operator,)).fetchone())


def get_sp_by_peer(conn: sqlite3.Connection, peer_id: str) -> dict[str, Any] | None:
    """One SP as JSON, by p2p peer id."""
    return _sp_row(conn.execute(f"SELECT {_SP_COLS} FROM sps WHERE peer_id = ?",
                                (peer_id,)).fetchone())


def list_sps(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every registered SP as JSON, by operator address."""
    rows = conn.execute(f"SELECT {_SP_COLS} FROM sps ORDER BY operator").fetchall()
    return [sp for sp in map(_sp_row, rows) if sp is not None]


_BUCKET_COLS = "id, name, owner, primary_sp, create_height"


def _bucket_row(row: tuple[Any, ...] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return dict(zip(("id", "name", "owner", "primary_sp", "create_height"), row, strict=True))


def get_bucket(conn: sqlite3.Connection, name: str) -> dict[str, Any] | None:
    """One bucket as JSON."""
    return _bucket_row(conn.execute(f"SELECT {_BUCKET_COLS} FROM buckets WHERE name = ?",
                                    (name,)).fetchone())


def list_buckets(conn: sqlite3.Connection, owner: str) -> list[dict[str, Any]]:
    """The buckets of ``owner``, by name."""
    rows = conn.execute(f"SELECT {_BUCKET_COLS} FROM buckets WHERE owner = ? ORDER BY name",
                        (owner,)).fetchall()
    return [b for b in map(_bucket_row, rows) if b is not None]


_OBJECT_COLS = ("id, bucket, name, owner, size, content_type, checksums, status, "
                "create_height, seal_height, secondaries, secondary_sigs")


def _object_row(row: tuple[Any, ...] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    obj = dict(zip(("id", "bucket", "name", "owner", "size", "content_type", "checksums",
                    "status", "create_height", "seal_height", "secondaries",
                    "secondary_sigs"), row, strict=True))
    for name in ("checksums", "secondaries", "secondary_sigs"):
        obj[name] = json.loads(obj[name])
    return obj


def get_object(conn: sqlite3.Connection, bucket: str, name: str) -> dict[str, Any] | None:
    """One object as JSON, by bucket and name."""
    return _object_row(conn.execute(
        f"SELECT {_OBJECT_COLS} FROM objects WHERE bucket = ? AND name = ?",
        (bucket, name)).fetchone())


def get_object_by_id(conn: sqlite3.Connection, object_id: int) -> dict[str, Any] | None:
    """One object as JSON, by id."""
    return _object_row(conn.execute(f"SELECT {_OBJECT_COLS} FROM objects WHERE id = ?",
                                    (object_id,)).fetchone())


def list_objects(conn: sqlite3.Connection, bucket: str, prefix: str, start_after: str,
                 limit: int) -> list[dict[str, Any]]:
    """Objects of ``bucket`` whose name starts with ``prefix``, after ``start_after``, by name."""
    rows = conn.execute(
        f"SELECT {_OBJECT_COLS} FROM objects WHERE bucket = ? AND name > ? "
        "AND substr(name, 1, ?) = ? ORDER BY name LIMIT ?",
        (bucket, start_after, len(prefix), prefix, limit)).fetchall()
    return [o for o in map(_object_row, rows) if o is not None]


def events_since(conn: sqlite3.Connection, since: int, after: int, limit: int
                 ) -> list[dict[str, Any]]:
    """Events at height >= ``since`` with index > ``after``, oldest first."""
    rows = conn.execute(
        "SELECT idx, height, kind, bucket, bucket_id, object, object_id FROM events "
        "WHERE height >= ? AND idx > ? ORDER BY idx LIMIT ?", (since, after, limit)).fetchall()
    return [dict(zip(("index", "height", "kind", "bucket", "bucket_id", "object", "object_id"),
                     row, strict=True)) for row in rows]


# --- transactions ---------------------------------------------------------------------------


def apply_tx(conn: sqlite3.Connection, raw: object, params: StorageParams) -> dict[str, Any]:
    """Check and apply one decoded transaction; return its result (JSON).

    Raises :class:`ChainError` on any refusal (the caller's transaction then rolls back).
    """
    tx = check_tx(raw)
    if address_of(tx["pubkey"]) != tx["from"]:
        raise ChainError("BAD_SIGNATURE", "from is not the address of pubkey")
    try:
        verify_message(tx["pubkey"], tx)
    except SignatureError:
        raise ChainError("BAD_SIGNATURE", f"{tx['type']}: signature does not verify") from None
    sender = tx["from"]
    expected = account_seq(conn, sender) or 0
    if tx["seq"] != expected:
        raise ChainError("BAD_SEQUENCE", f"{sender}: seq {tx['seq']}, expected {expected}")
    now = height(conn)
    result = _HANDLERS[tx["type"]](conn, tx, now, params)
    conn.execute("INSERT INTO accounts (address, seq) VALUES (?, 1) "
                 "ON CONFLICT (address) DO UPDATE SET seq = seq + 1", (sender,))
    return {"type": tx["type"], "from": sender, "seq": tx["seq"], "height": now, **result}


def _event(conn: sqlite3.Connection, now: int, kind: str, bucket: str, bucket_id: int,
           obj: str = "", object_id: int | None = None) -> None:
    conn.execute("INSERT INTO events (height, kind, bucket, bucket_id, object, object_id) "
                 "VALUES (?, ?, ?, ?, ?, ?)", (now, kind, bucket, bucket_id, obj, object_id))


def _sp_keys(conn: sqlite3.Connection, operator: str) -> tuple[bytes, bytes, str]:
    """(approval key, seal key, status) of a registered SP, else ``SP_NOT_FOUND``."""
    row = conn.execute("SELECT approval_key, seal_key, status FROM sps WHERE operator = ?",
                       (operator,)).fetchone()
    if row is None:
        raise ChainError("SP_NOT_FOUND", f"no SP with operator {operator}")
    return bytes(row[0]), bytes(row[1]), str(row[2])


def _check_approval(conn: sqlite3.Connection, approval: Mapping[str, Any], primary_sp: str,
                    now: int, expected: Mapping[str, Any]) -> None:
    """The primary's approval: fields as expected, SP in service, signature, expiry."""
    for name, value in expected.items():
        if approval[name] != value:
            raise ChainError("APPROVAL_INVALID", f"approval {name} differs from the transaction")
    approval_key, _, status = _sp_keys(conn, primary_sp)
    if status != "IN_SERVICE":
        raise ChainError("SP_NOT_IN_SERVICE", f"SP {primary_sp} is {status}")
    try:
        verify_message(approval_key, approval)
    except SignatureError:
        raise ChainError("APPROVAL_INVALID",
                         f"approval is not signed by {primary_sp}'s approval key") from None
    if approval["expiry_height"] < now:
        raise ChainError("APPROVAL_EXPIRED",
                         f"approval expired at height {approval['expiry_height']}, now {now}")


def _register_sp(conn: sqlite3.Connection, tx: dict[str, Any], now: int,
                 params: StorageParams) -> dict[str, Any]:
    if not tx["endpoint"].startswith(("http://", "https://")) or not tx["peer_id"]:
        raise ChainError("MALFORMED", "endpoint must be an http(s) URL and peer_id non-empty")
    other = conn.execute("SELECT operator FROM sps WHERE peer_id = ? AND operator != ?",
                         (tx["peer_id"], tx["from"])).fetchone()
    if other is not None:
        raise ChainError("PEER_ID_IN_USE", f"peer id {tx['peer_id']} belongs to {other[0]}")
    conn.execute(
        "INSERT INTO sps (operator, endpoint, peer_id, p2p_addrs, operator_key, approval_key, "
        "seal_key, gc_key, status, register_height) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (operator) DO UPDATE SET endpoint = excluded.endpoint, "
        "peer_id = excluded.peer_id, p2p_addrs = excluded.p2p_addrs, "
        "approval_key = excluded.approval_key, seal_key = excluded.seal_key, "
        "gc_key = excluded.gc_key",
        (tx["from"], tx["endpoint"], tx["peer_id"], json.dumps(tx["p2p_addrs"]), tx["pubkey"],
         tx["approval_key"], tx["seal_key"], tx["gc_key"], "IN_SERVICE", now))
    return {"operator": tx["from"]}


def _set_sp_status(conn: sqlite3.Connection, tx: dict[str, Any], now: int,
                   params: StorageParams) -> dict[str, Any]:
    if tx["status"] not in SP_STATUSES:
        raise ChainError("MALFORMED", f"status must be one of {list(SP_STATUSES)}")
    cur = conn.execute("UPDATE sps SET status = ? WHERE operator = ?", (tx["status"], tx["from"]))
    if cur.rowcount == 0:
        raise ChainError("SP_NOT_FOUND", f"no SP with operator {tx['from']}")
    return {"operator": tx["from"], "status": tx["status"]}


def _create_bucket(conn: sqlite3.Connection, tx: dict[str, Any], now: int,
                   params: StorageParams) -> dict[str, Any]:
    name = tx["bucket"]
    if not _BUCKET_RE.fullmatch(name) or name in RESERVED_BUCKETS:
        raise ChainError("MALFORMED", f"invalid bucket name {name!r}")
    if not is_address(tx["primary_sp"]):
        raise ChainError("MALFORMED", "primary_sp is not an address")
    approval = check_approval(tx["approval"], APPROVAL_CREATE_BUCKET)
    _check_approval(conn, approval, tx["primary_sp"], now,
                    {"creator": tx["from"], "bucket": name, "primary_sp": tx["primary_sp"]})
    if get_bucket(conn, name) is not None:
        raise ChainError("BUCKET_EXISTS", f"bucket {name} exists")
    cur = conn.execute("INSERT INTO buckets (name, owner, primary_sp, create_height) "
                       "VALUES (?, ?, ?, ?)", (name, tx["from"], tx["primary_sp"], now))
    bucket_id = int(cur.lastrowid or 0)
    _event(conn, now, "bucket_created", name, bucket_id)
    return {"bucket": name, "bucket_id": bucket_id}


def _owned_bucket(conn: sqlite3.Connection, name: str, sender: str) -> dict[str, Any]:
    bucket = get_bucket(conn, name)
    if bucket is None:
        raise ChainError("BUCKET_NOT_FOUND", f"no bucket {name}")
    if bucket["owner"] != sender:
        raise ChainError("PERMISSION_DENIED", f"{sender} does not own bucket {name}")
    return bucket


def _delete_bucket(conn: sqlite3.Connection, tx: dict[str, Any], now: int,
                   params: StorageParams) -> dict[str, Any]:
    bucket = _owned_bucket(conn, tx["bucket"], tx["from"])
    if conn.execute("SELECT 1 FROM objects WHERE bucket = ? LIMIT 1",
                    (bucket["name"],)).fetchone() is not None:
        raise ChainError("BUCKET_NOT_EMPTY", f"bucket {bucket['name']} still has objects")
    conn.execute("DELETE FROM buckets WHERE id = ?", (bucket["id"],))
    _event(conn, now, "bucket_deleted", bucket["name"], bucket["id"])
    return {"bucket": bucket["name"], "bucket_id": bucket["id"]}


def _create_object(conn: sqlite3.Connection, tx: dict[str, Any], now: int,
                   params: StorageParams) -> dict[str, Any]:
    name = tx["object"]
    if not name or "\x00" in name:
        raise ChainError("MALFORMED", "object name must be non-empty, without NUL")
    if len(tx["checksums"]) != 1 + params.total_shards:
        raise ChainError("MALFORMED", f"checksums must hold 1 + {params.total_shards} hashes")
    if tx["size"] > params.max_payload:
        raise ChainError("TOO_LARGE", f"size {tx['size']} exceeds max payload "
                         f"{params.max_payload}")
    bucket = _owned_bucket(conn, tx["bucket"], tx["from"])
    approval = check_approval(tx["approval"], APPROVAL_CREATE_OBJECT)
    _check_approval(conn, approval, bucket["primary_sp"], now,
                    {"creator": tx["from"], "bucket": tx["bucket"], "object": name,
                     "size": tx["size"], "content_type": tx["content_type"],
                     "checksums": tx["checksums"]})
    if get_object(conn, tx["bucket"], name) is not None:
        raise ChainError("OBJECT_EXISTS", f"object {tx['bucket']}/{name} exists")
    cur = conn.execute(
        "INSERT INTO objects (bucket, name, owner, size, content_type, checksums, status, "
        "create_height) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (tx["bucket"], name, tx["from"], tx["size"], tx["content_type"],
         json.dumps([c.hex() for c in tx["checksums"]]), CREATED, now))
    object_id = int(cur.lastrowid or 0)
    _event(conn, now, "object_created", tx["bucket"], bucket["id"], name, object_id)
    return {"bucket": tx["bucket"], "object": name, "object_id": object_id}


def _seal_object(conn: sqlite3.Connection, tx: dict[str, Any], now: int,
                 params: StorageParams) -> dict[str, Any]:
    obj = get_object_by_id(conn, tx["object_id"])
    if obj is None:
        raise ChainError("OBJECT_NOT_FOUND", f"no object with id {tx['object_id']}")
    if obj["status"] != CREATED:
        raise ChainError("BAD_STATUS", f"object {obj['id']} is {obj['status']}, not CREATED")
    bucket = get_bucket(conn, obj["bucket"])
    assert bucket is not None  # a bucket with objects cannot be deleted
    primary = tx["primary_sp"]
    if primary != bucket["primary_sp"]:
        raise ChainError("BAD_SEAL", f"{primary} is not the primary SP of bucket "
                         f"{bucket['name']}")
    _, seal_key, _ = _sp_keys(conn, primary)
    if tx["pubkey"] != seal_key:
        raise ChainError("BAD_SEAL", f"not signed by the seal key of {primary}")
    secondaries, sigs = tx["secondaries"], tx["secondary_sigs"]
    total = params.total_shards
    if len(secondaries) != total or len(sigs) != total:
        raise ChainError("BAD_SEAL", f"a seal needs {total} secondaries and {total} signatures, "
                         f"got {len(secondaries)} and {len(sigs)}")
    if len(set(secondaries)) != total or primary in secondaries:
        raise ChainError("BAD_SEAL", "secondaries must be distinct and not the primary")
    checksums = [bytes.fromhex(c) for c in obj["checksums"]]
    for i, (operator, sig) in enumerate(zip(secondaries, sigs, strict=True)):
        approval_key, _, status = _sp_keys(conn, operator)
        if status != "IN_SERVICE":
            raise ChainError("SP_NOT_IN_SERVICE", f"secondary {operator} is {status}")
        try:
            verify(approval_key, integrity_payload(obj["id"], checksums[i + 1]), sig)
        except SignatureError:
            raise ChainError("BAD_SEAL", f"secondary {i} ({operator}): integrity signature "
                             f"does not verify") from None
    conn.execute("UPDATE objects SET status = ?, seal_height = ?, secondaries = ?, "
                 "secondary_sigs = ? WHERE id = ?",
                 (SEALED, now, json.dumps(secondaries), json.dumps([s.hex() for s in sigs]),
                  obj["id"]))
    _event(conn, now, "object_sealed", obj["bucket"], bucket["id"], obj["name"], obj["id"])
    return {"bucket": obj["bucket"], "object": obj["name"], "object_id": obj["id"]}


def _delete_object(conn: sqlite3.Connection, tx: dict[str, Any], now: int,
                   params: StorageParams) -> dict[str, Any]:
    bucket = _owned_bucket(conn, tx["bucket"], tx["from"])
    obj = get_object(conn, tx["bucket"], tx["object"])
    if obj is None:
        raise ChainError("OBJECT_NOT_FOUND", f"no object {tx['bucket']}/{tx['object']}")
    conn.execute("DELETE FROM objects WHERE id = ?", (obj["id"],))
    _event(conn, now, "object_deleted", obj["bucket"], bucket["id"], obj["name"], obj["id"])
    return {"bucket": obj["bucket"], "object": obj["name"], "object_id": obj["id"]}


_HANDLERS = {
    TX_REGISTER_SP: _register_sp,
    TX_SET_SP_STATUS: _set_sp_status,
    TX_CREATE_BUCKET: _create_bucket,
    TX_DELETE_BUCKET: _delete_bucket,
    TX_CREATE_OBJECT: _create_object,
    TX_SEAL_OBJECT: _seal_object,
    TX_DELETE_OBJECT: _delete_object,
}
