"""The chain's signed messages: SP approvals and transactions, built by one shared module.

The signer modular, the client library and the devchain all build and check these maps here, so
there is one definition of each. Every message is a canonical msgpack map (node.crypto rules:
keys in the order listed below, ``type`` first, ``sig`` last, signed over the encoding with
``sig = b""``).

Approvals are signed by the primary SP's **approval** key and embedded, signed, in the client's
create transaction::

    gfsp.approval.create_bucket.v1: type, creator, bucket, primary_sp, expiry_height, sig
    gfsp.approval.create_object.v1: type, creator, bucket, object, size, content_type,
                                    checksums, expiry_height, sig

An approval is valid up to and including block ``expiry_height`` and void after it.

Transactions all start with ``type, from, pubkey, seq`` and end with ``sig``: ``pubkey`` is the
32-byte ed25519 key that signed, ``from`` must be ``address_of(pubkey)``, ``seq`` must equal the
account's next sequence number (see :data:`TX_SCHEMAS` and testnet/devchain/README.md for each
type's fields).

Builders return the *unsigned* map (``sig = b""``); :func:`sign` fills in the signature with a
:class:`~node.crypto.PrivateKey`. :func:`check_tx` / :func:`check_approval` check a decoded map's
shape (keys, order, types, value ranges) and raise :class:`ChainError` with code ``MALFORMED``.

:class:`ChainError` (``code``, ``reason``) is the typed refusal of the chain; the devchain raises
it and returns it as ``{"code", "reason"}``, the chain client raises it again on its side.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from node.crypto import PrivateKey, address_of, check_shape, sign_message
from node.errors import GfspError, SignatureError

__all__ = [
    "APPROVAL_CREATE_BUCKET",
    "APPROVAL_CREATE_OBJECT",
    "APPROVAL_SCHEMAS",
    "CHECKSUM_LEN",
    "CODES",
    "MAX_INT",
    "SP_STATUSES",
    "TX_CREATE_BUCKET",
    "TX_CREATE_OBJECT",
    "TX_DELETE_BUCKET",
    "TX_DELETE_OBJECT",
    "TX_REGISTER_SP",
    "TX_SCHEMAS",
    "TX_SEAL_OBJECT",
    "TX_SET_SP_STATUS",
    "ChainError",
    "check_approval",
    "check_tx",
    "create_bucket_approval",
    "create_bucket_tx",
    "create_object_approval",
    "create_object_tx",
    "delete_bucket_tx",
    "delete_object_tx",
    "register_sp_tx",
    "seal_object_tx",
    "set_sp_status_tx",
    "sign",
]

APPROVAL_CREATE_BUCKET = "gfsp.approval.create_bucket.v1"
APPROVAL_CREATE_OBJECT = "gfsp.approval.create_object.v1"

TX_REGISTER_SP = "gfsp.tx.register_sp.v1"
TX_SET_SP_STATUS = "gfsp.tx.set_sp_status.v1"
TX_CREATE_BUCKET = "gfsp.tx.create_bucket.v1"
TX_DELETE_BUCKET = "gfsp.tx.delete_bucket.v1"
TX_CREATE_OBJECT = "gfsp.tx.create_object.v1"
TX_SEAL_OBJECT = "gfsp.tx.seal_object.v1"
TX_DELETE_OBJECT = "gfsp.tx.delete_object.v1"

#: Status values an SP may set for itself (only IN_SERVICE SPs may approve or be secondaries).
SP_STATUSES: tuple[str, ...] = ("IN_SERVICE", "IN_MAINTENANCE", "GRACEFUL_EXITING", "JAILED")

CHECKSUM_LEN = 32
PUBKEY_LEN = 32
#: Integers on the chain are stored as SQLite INTEGER: 0 .. 2**63 - 1.
MAX_INT = 2**63 - 1
MAX_ADDRS = 8
MAX_STR = 256
MAX_OBJECT_NAME = 1024
#: Bucket names, the S3 rules Greenfield keeps: 3-63 of a-z 0-9 . -, starting and ending
#: with a letter or digit, no ".." ".-" "-.", not an IPv4 address (a regular expression that
#: the chain, the gater's schema and the client share).
BUCKET_PATTERN = (r"^(?!\d{1,3}(\.\d{1,3}){3}$)(?!.*(\.\.|\.-|-\.))"
                  r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
MAX_SHARDS = 64

#: Every refusal code, with its HTTP status on the devchain.
CODES: dict[str, int] = {
    "MALFORMED": 400,
    "TOO_LARGE": 413,
    "BAD_SIGNATURE": 400,
    "BAD_SEQUENCE": 400,
    "APPROVAL_EXPIRED": 400,
    "APPROVAL_INVALID": 400,
    "PERMISSION_DENIED": 403,
    "SP_NOT_FOUND": 404,
    "SP_NOT_IN_SERVICE": 400,
    "PEER_ID_IN_USE": 409,
    "BUCKET_EXISTS": 409,
    "BUCKET_NOT_FOUND": 404,
    "BUCKET_NOT_EMPTY": 409,
    "OBJECT_EXISTS": 409,
    "OBJECT_NOT_FOUND": 404,
    "ACCOUNT_NOT_FOUND": 404,
    "BAD_STATUS": 409,
    "BAD_SEAL": 400,
    "NOT_FOUND": 404,
    "UNAVAILABLE": 503,
}


class ChainError(GfspError):
    """A typed refusal of the chain: ``code`` (one of :data:`CODES`, or a client-side code such
    as ``UNAVAILABLE``) and a human ``reason``."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason

    def to_json(self) -> dict[str, str]:
        """The error body the devchain returns."""
        return {"code": self.code, "reason": self.reason}


# --- schemas --------------------------------------------------------------------------------

_HEAD: tuple[tuple[str, type | tuple[type, ...]], ...] = (
    ("type", str), ("from", str), ("pubkey", bytes), ("seq", int))
_SIG = (("sig", bytes),)

APPROVAL_SCHEMAS: dict[str, tuple[tuple[str, type | tuple[type, ...]], ...]] = {
    APPROVAL_CREATE_BUCKET: (
        ("type", str), ("creator", str), ("bucket", str), ("primary_sp", str),
        ("expiry_height", int), *_SIG),
    APPROVAL_CREATE_OBJECT: (
        ("type", str), ("creator", str), ("bucket", str), ("object", str), ("size", int),
        ("content_type", str), ("checksums", list), ("expiry_height", int), *_SIG),
}

TX_SCHEMAS: dict[str, tuple[tuple[str, type | tuple[type, ...]], ...]] = {
    TX_REGISTER_SP: (*_HEAD, ("endpoint", str), ("peer_id", str), ("p2p_addrs", list),
                     ("approval_key", bytes), ("seal_key", bytes), ("gc_key", bytes), *_SIG),
    TX_SET_SP_STATUS: (*_HEAD, ("status", str), *_SIG),
    TX_CREATE_BUCKET: (*_HEAD, ("bucket", str), ("primary_sp", str), ("approval", dict), *_SIG),
    TX_DELETE_BUCKET: (*_HEAD, ("bucket", str), *_SIG),
    TX_CREATE_OBJECT: (*_HEAD, ("bucket", str), ("object", str), ("size", int),
                       ("content_type", str), ("checksums", list), ("approval", dict), *_SIG),
    TX_SEAL_OBJECT: (*_HEAD, ("object_id", int), ("primary_sp", str), ("secondaries", list),
                     ("secondary_sigs", list), *_SIG),
    TX_DELETE_OBJECT: (*_HEAD, ("bucket", str), ("object", str), *_SIG),
}

_INT_FIELDS = ("seq", "size", "expiry_height", "object_id")
_STR_LIMITS = {"bucket": 63, "object": MAX_OBJECT_NAME, "content_type": 128,
               "endpoint": MAX_STR, "peer_id": 128, "status": 32}


def _malformed(reason: str) -> ChainError:
    return ChainError("MALFORMED", reason)


def _check_values(msg: Mapping[str, Any], what: str) -> None:
    """Range checks shared by approvals and transactions (after :func:`check_shape`)."""
    for name in _INT_FIELDS:
        if name in msg and not 0 <= msg[name] <= MAX_INT:
            raise _malformed(f"{what}: {name} out of range")
    for name, limit in _STR_LIMITS.items():
        if name in msg and len(msg[name]) > limit:
            raise _malformed(f"{what}: {name} longer than {limit}")
    for name in ("checksums", "secondary_sigs"):
        if name in msg:
            items = msg[name]
            if len(items) > 1 + MAX_SHARDS or not all(isinstance(c, bytes) for c in items):
                raise _malformed(f"{what}: {name} must be a list of at most "
                                 f"{1 + MAX_SHARDS} byte strings")
    if "checksums" in msg and not all(len(c) == CHECKSUM_LEN for c in msg["checksums"]):
        raise _malformed(f"{what}: every checksum has {CHECKSUM_LEN} bytes")
    for name in ("secondaries", "p2p_addrs"):
        if name in msg:
            items = msg[name]
            if (len(items) > MAX_SHARDS or not all(isinstance(a, str) and len(a) <= MAX_STR
                                                   for a in items)):
                raise _malformed(f"{what}: {name} must be a short list of strings")
    if "p2p_addrs" in msg and len(msg["p2p_addrs"]) > MAX_ADDRS:
        raise _malformed(f"{what}: at most {MAX_ADDRS} p2p_addrs")
    for name in ("pubkey", "approval_key", "seal_key", "gc_key"):
        if name in msg and len(msg[name]) != PUBKEY_LEN:
            raise _malformed(f"{what}: {name} must have {PUBKEY_LEN} bytes")


def check_approval(approval: object, expected_type: str) -> dict[str, Any]:
    """Check an embedded approval's shape; raise ``APPROVAL_INVALID`` if it is not one."""
    if not isinstance(approval, dict) or approval.get("type") != expected_type:
        raise ChainError("APPROVAL_INVALID", f"not a {expected_type} approval")
    try:
        check_shape(approval, APPROVAL_SCHEMAS[expected_type], what=expected_type)
        _check_values(approval, expected_type)
    except SignatureError as exc:
        raise ChainError("APPROVAL_INVALID", str(exc)) from None
    except ChainError as exc:
        raise ChainError("APPROVAL_INVALID", exc.reason) from None
    return approval


def check_tx(tx: object) -> dict[str, Any]:
    """Check a decoded transaction's shape and value ranges; raise ``MALFORMED`` otherwise.

    Signatures, sequence numbers and state are the chain's business, not checked here.
    """
    if not isinstance(tx, dict):
        raise _malformed("a transaction is a msgpack map")
    tx_type = tx.get("type")
    schema = TX_SCHEMAS.get(tx_type) if isinstance(tx_type, str) else None
    if schema is None:
        raise _malformed(f"unknown transaction type {tx_type!r}")
    try:
        check_shape(tx, schema, what=tx_type)
    except SignatureError as exc:
        raise _malformed(str(exc)) from None
    _check_values(tx, tx_type)
    return tx


# --- builders -------------------------------------------------------------------------------


def sign(key: PrivateKey, message: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``message`` signed by ``key`` (``sig`` filled in)."""
    return sign_message(key, message)


def create_bucket_approval(*, creator: str, bucket: str, primary_sp: str,
                           expiry_height: int) -> dict[str, Any]:
    """The unsigned approval of the primary SP for ``creator`` creating ``bucket``."""
    return {"type": APPROVAL_CREATE_BUCKET, "creator": creator, "bucket": bucket,
            "primary_sp": primary_sp, "expiry_height": expiry_height, "sig": b""}


def create_object_approval(*, creator: str, bucket: str, object: str, size: int,
                           content_type: str, checksums: Sequence[bytes],
                           expiry_height: int) -> dict[str, Any]:
    """The unsigned approval of the bucket's primary SP for ``creator`` creating ``object``.

    ``checksums``: the primary integrity hash, then one per EC piece index.
    """
    return {"type": APPROVAL_CREATE_OBJECT, "creator": creator, "bucket": bucket,
            "object": object, "size": size, "content_type": content_type,
            "checksums": list(checksums), "expiry_height": expiry_height, "sig": b""}


def _head(tx_type: str, pubkey: bytes, seq: int) -> dict[str, Any]:
    return {"type": tx_type, "from": address_of(pubkey), "pubkey": pubkey, "seq": seq}


def register_sp_tx(*, pubkey: bytes, seq: int, endpoint: str, peer_id: str,
                   p2p_addrs: Sequence[str], approval_key: bytes, seal_key: bytes,
                   gc_key: bytes) -> dict[str, Any]:
    """Register (or update) the SP whose operator key is ``pubkey``."""
    return {**_head(TX_REGISTER_SP, pubkey, seq), "endpoint": endpoint, "peer_id": peer_id,
            "p2p_addrs": list(p2p_addrs), "approval_key": approval_key, "seal_key": seal_key,
            "gc_key": gc_key, "sig": b""}


def set_sp_status_tx(*, pubkey: bytes, seq: int, status: str) -> dict[str, Any]:
    """Set the status of the SP whose operator key is ``pubkey`` (one of :data:`SP_STATUSES`)."""
    return {**_head(TX_SET_SP_STATUS, pubkey, seq), "status": status, "sig": b""}


def create_bucket_tx(*, pubkey: bytes, seq: int, bucket: str, primary_sp: str,
                     approval: Mapping[str, Any]) -> dict[str, Any]:
    """Create ``bucket`` owned by ``address_of(pubkey)`` with the primary's signed approval."""
    return {**_head(TX_CREATE_BUCKET, pubkey, seq), "bucket": bucket, "primary_sp": primary_sp,
            "approval": dict(approval), "sig": b""}


def delete_bucket_tx(*, pubkey: bytes, seq: int, bucket: str) -> dict[str, Any]:
    """Delete an (empty) bucket; only its owner may."""
    return {**_head(TX_DELETE_BUCKET, pubkey, seq), "bucket": bucket, "sig": b""}


def create_object_tx(*, pubkey: bytes, seq: int, bucket: str, object: str, size: int,
                     content_type: str, checksums: Sequence[bytes],
                     approval: Mapping[str, Any]) -> dict[str, Any]:
    """Create ``object`` in ``bucket`` (owner only) with the primary's signed approval."""
    return {**_head(TX_CREATE_OBJECT, pubkey, seq), "bucket": bucket, "object": object,
            "size": size, "content_type": content_type, "checksums": list(checksums),
            "approval": dict(approval), "sig": b""}


def seal_object_tx(*, pubkey: bytes, seq: int, object_id: int, primary_sp: str,
                   secondaries: Sequence[str], secondary_sigs: Sequence[bytes]
                   ) -> dict[str, Any]:
    """Seal an object: ``pubkey`` is the primary's SEAL key; ``secondary_sigs[i]`` is secondary
    ``i``'s approval-key signature over ``integrity_payload(object_id, checksums[i + 1])``."""
    return {**_head(TX_SEAL_OBJECT, pubkey, seq), "object_id": object_id,
            "primary_sp": primary_sp, "secondaries": list(secondaries),
            "secondary_sigs": list(secondary_sigs), "sig": b""}


def delete_object_tx(*, pubkey: bytes, seq: int, bucket: str, object: str) -> dict[str, Any]:
    """Delete an object (created or sealed); only the bucket owner may."""
    return {**_head(TX_DELETE_OBJECT, pubkey, seq), "bucket": bucket, "object": object,
            "sig": b""}
