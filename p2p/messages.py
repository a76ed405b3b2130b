"""The p2p messages of PROTOCOL.md, to the byte.

Each message is a frozen dataclass whose fields are the wire map's keys in wire order
(``type`` is implied by the class and goes first; ``sig`` last). :func:`encode` gives the
msgpack bytes of a signed message, :func:`signing_payload` the bytes its signature covers, and
:func:`decode` checks that a frame has exactly the listed keys, in order, of the listed types,
before building the dataclass. Signatures are checked by :func:`verify` against a public key
the caller took from the SP registry (never from the message).
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from node.crypto import SIG_LEN, check_shape, is_address, pack, signing_bytes, unpack
from node.crypto import verify as verify_sig
from node.errors import SignatureError

NONCE_LEN = 16
CHECKSUM_LEN = 32
MAX_ADDRS = 8
#: Longest multiaddr accepted in a message (a real one is well under 100 characters)
MAX_ADDR_LEN = 256
MAX_PEERS = 64
MAX_CHECKSUMS = 1 + 64

PING_PROTOCOL = "/gfsp/ping/1.0.0"
APPROVAL_PROTOCOL = "/gfsp/approval/1.0.0"


class InvalidMessage(SignatureError):
    """A frame that is not a valid message of the expected type (shape, values or signature)."""


def now_ms() -> int:
    return int(time.time() * 1000)


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_LEN)


@dataclass(frozen=True)
class PeerInfo:
    peer_id: str
    operator: str
    addrs: tuple[str, ...]

    SCHEMA: ClassVar = (("peer_id", str), ("operator", str), ("addrs", list))

    def to_wire(self) -> dict[str, Any]:
        return {"peer_id": self.peer_id, "operator": self.operator, "addrs": list(self.addrs)}


@dataclass(frozen=True)
class ObjectRef:
    id: int
    bucket: str
    name: str
    size: int
    checksums: tuple[bytes, ...]

    SCHEMA: ClassVar = (("id", int), ("bucket", str), ("name", str), ("size", int),
                        ("checksums", list))

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "bucket": self.bucket, "name": self.name, "size": self.size,
                "checksums": list(self.checksums)}


@dataclass(frozen=True)
class Params:
    segment_size: int
    data_shards: int
    parity_shards: int

    SCHEMA: ClassVar = (("segment_size", int), ("data_shards", int), ("parity_shards", int))

    def to_wire(self) -> dict[str, Any]:
        return {"segment_size": self.segment_size, "data_shards": self.data_shards,
                "parity_shards": self.parity_shards}


@dataclass(frozen=True)
class Message:
    TYPE: ClassVar[str] = ""
    SCHEMA: ClassVar[tuple[tuple[str, Any], ...]] = ()

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, PeerInfo | ObjectRef | Params):
                value = value.to_wire()
            elif isinstance(value, tuple):
                value = [v.to_wire() if isinstance(v, PeerInfo) else v for v in value]
            out[f.name] = value
        return out


@dataclass(frozen=True)
class Ping(Message):
    TYPE: ClassVar[str] = "gfsp.ping.v1"
    SCHEMA: ClassVar = (("type", str), ("operator", str), ("peer_id", str), ("addrs", list),
                        ("ts", int), ("nonce", bytes), ("sig", bytes))
    operator: str
    peer_id: str
    addrs: tuple[str, ...]
    ts: int
    nonce: bytes
    sig: bytes = b""


@dataclass(frozen=True)
class Pong(Message):
    TYPE: ClassVar[str] = "gfsp.pong.v1"
    SCHEMA: ClassVar = (("type", str), ("operator", str), ("peer_id", str), ("addrs", list),
                        ("ts", int), ("nonce", bytes), ("ping_nonce", bytes), ("peers", list),
                        ("sig", bytes))
    operator: str
    peer_id: str
    addrs: tuple[str, ...]
    ts: int
    nonce: bytes
    ping_nonce: bytes
    peers: tuple[PeerInfo, ...]
    sig: bytes = b""


@dataclass(frozen=True)
class ApprovalRequest(Message):
    TYPE: ClassVar[str] = "gfsp.approval.request.v1"
    SCHEMA: ClassVar = (("type", str), ("object", dict), ("params", dict), ("asker", str),
                        ("ts", int), ("nonce", bytes), ("sig", bytes))
    object: ObjectRef
    params: Params
    asker: str
    ts: int
    nonce: bytes
    sig: bytes = b""


@dataclass(frozen=True)
class ApprovalResponse(Message):
    TYPE: ClassVar[str] = "gfsp.approval.response.v1"
    SCHEMA: ClassVar = (("type", str), ("request_nonce", bytes), ("object_id", int),
                        ("asker", str), ("approver", str), ("approved", bool), ("reason", str),
                        ("endpoint", str), ("expiry_height", int), ("ts", int), ("sig", bytes))
    request_nonce: bytes
    object_id: int
    asker: str
    approver: str
    approved: bool
    reason: str
    endpoint: str
    expiry_height: int
    ts: int
    sig: bytes = b""


M = TypeVar("M", bound=Message)


def signing_payload(msg: Message) -> bytes:
    """The bytes a message's signature covers (its wire map with ``sig`` = b"")."""
    return signing_bytes(msg.to_wire())


def encode(msg: Message) -> bytes:
    """The frame body of a signed message."""
    if len(msg.sig) != SIG_LEN:
        raise ValueError(f"{type(msg).__name__} is not signed")
    return pack(msg.to_wire())


def verify(msg: Message, public_key: bytes) -> None:
    """Raise :class:`InvalidMessage` unless ``msg.sig`` is ``public_key``'s over the payload."""
    try:
        verify_sig(public_key, signing_payload(msg), msg.sig)
    except SignatureError as exc:
        raise InvalidMessage(f"{msg.TYPE}: {exc}") from None


def _bad(what: str, why: str) -> InvalidMessage:
    return InvalidMessage(f"{what}: {why}")


def _check_common(wire: dict[str, Any], what: str) -> None:
    if len(wire["sig"]) != SIG_LEN:
        raise _bad(what, "signature must be 64 bytes")
    if "nonce" in wire and len(wire["nonce"]) != NONCE_LEN:
        raise _bad(what, "nonce must be 16 bytes")
    if "ts" in wire and wire["ts"] < 0:
        raise _bad(what, "negative timestamp")
    for key in ("operator", "asker", "approver"):
        if key in wire and not is_address(wire[key]):
            raise _bad(what, f"{key} is not an address")


def _addrs(value: list[Any], what: str) -> tuple[str, ...]:
    if len(value) > MAX_ADDRS or not all(isinstance(a, str) for a in value):
        raise _bad(what, f"addrs must be at most {MAX_ADDRS} strings")
    for a in value:
        if not (0 < len(a) <= MAX_ADDR_LEN and a.startswith("/") and a.isascii()
                and a.isprintable() and " " not in a):
            raise _bad(what, f"an addr is not a multiaddr of at most {MAX_ADDR_LEN} "
                       f"characters: {a[:80]!r}")
    return tuple(value)


def _nested(value: dict[str, Any], schema: Any, what: str) -> None:
    try:
        check_shape(value, schema, what=what)
    except SignatureError as exc:
        raise InvalidMessage(str(exc)) from None


def decode(data: bytes, cls: type[M]) -> M:
    """Decode and shape-check a frame as ``cls``; raise :class:`InvalidMessage` otherwise."""
    what = cls.TYPE
    try:
        wire = unpack(data)
    except SignatureError as exc:
        raise InvalidMessage(f"{what}: {exc}") from None
    if not isinstance(wire, dict):
        raise _bad(what, "not a map")
    _nested(wire, cls.SCHEMA, what)
    if wire["type"] != cls.TYPE:
        raise _bad(what, f"type is {wire['type']!r}")
    _check_common(wire, what)
    fields: dict[str, Any] = {k: v for k, v in wire.items() if k != "type"}
    if "addrs" in fields:
        fields["addrs"] = _addrs(fields["addrs"], what)
    if cls is Pong:
        peers = fields["peers"]
        if len(peers) > MAX_PEERS:
            raise _bad(what, f"more than {MAX_PEERS} peers")
        out = []
        for p in peers:
            if not isinstance(p, dict):
                raise _bad(what, "peer entry is not a map")
            _nested(p, PeerInfo.SCHEMA, f"{what}.peers")
            if not is_address(p["operator"]):
                raise _bad(what, "peer operator is not an address")
            out.append(PeerInfo(p["peer_id"], p["operator"], _addrs(p["addrs"], what)))
        fields["peers"] = tuple(out)
        if len(fields["ping_nonce"]) != NONCE_LEN:
            raise _bad(what, "ping_nonce must be 16 bytes")
    if cls is ApprovalRequest:
        obj, params = fields["object"], fields["params"]
        _nested(obj, ObjectRef.SCHEMA, f"{what}.object")
        _nested(params, Params.SCHEMA, f"{what}.params")
        sums = obj["checksums"]
        if len(sums) > MAX_CHECKSUMS or not all(
                isinstance(c, bytes) and len(c) == CHECKSUM_LEN for c in sums):
            raise _bad(what, "checksums must be 32-byte hashes")
        if obj["id"] < 0 or obj["size"] < 0:
            raise _bad(what, "negative object id or size")
        if min(params.values()) < 0 or params["data_shards"] < 1 or params["segment_size"] < 1:
            raise _bad(what, "bad storage params")
        fields["object"] = ObjectRef(obj["id"], obj["bucket"], obj["name"], obj["size"],
                                     tuple(sums))
        fields["params"] = Params(**params)
    if cls is ApprovalResponse:
        if len(fields["request_nonce"]) != NONCE_LEN:
            raise _bad(what, "request_nonce must be 16 bytes")
        if fields["object_id"] < 0 or fields["expiry_height"] < 0:
            raise _bad(what, "negative object id or height")
    return cls(**fields)
