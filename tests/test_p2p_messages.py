"""Every p2p message: round trip, exact wire shape, tamper and shape checks (PROTOCOL.md)."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from node.crypto import PrivateKey, pack
from p2p.messages import (
    ApprovalRequest,
    ApprovalResponse,
    InvalidMessage,
    ObjectRef,
    Params,
    PeerInfo,
    Ping,
    Pong,
    decode,
    encode,
    new_nonce,
    now_ms,
    signing_payload,
    verify,
)

KEY = PrivateKey.from_passphrase("messages", "operator")
OTHER = PrivateKey.from_passphrase("messages", "approval")
ADDR = KEY.address
PEER = "12D3KooWA7XP1oEEBhPsVAUre3wUAw16VvPx7ENjDkZwD46EDgXq"


def signed(msg):
    return dataclasses.replace(msg, sig=KEY.sign(signing_payload(msg)))


def samples():
    ping = Ping(ADDR, PEER, ("/ip4/127.0.0.1/tcp/1",), now_ms(), new_nonce())
    pong = Pong(ADDR, PEER, (), now_ms(), new_nonce(), new_nonce(),
                (PeerInfo(PEER, OTHER.address, ("/ip4/127.0.0.1/tcp/2",)),))
    req = ApprovalRequest(ObjectRef(7, "b", "o", 100, (b"\1" * 32, b"\2" * 32)),
                          Params(16 << 20, 4, 2), ADDR, now_ms(), new_nonce())
    resp = ApprovalResponse(new_nonce(), 7, OTHER.address, ADDR, True, "", "http://x", 10,
                            now_ms())
    return [signed(m) for m in (ping, pong, req, resp)]


@pytest.mark.parametrize("msg", samples(), ids=lambda m: type(m).__name__)
def test_round_trip_and_wire_order(msg):
    data = encode(msg)
    back = decode(data, type(msg))
    assert back == msg
    verify(back, KEY.public_key)
    wire = msgpack.unpackb(data)
    keys = list(wire)
    assert keys[0] == "type" and keys[-1] == "sig"
    assert wire["type"] == msg.TYPE
    # the signed bytes are the same map with sig = b""
    assert signing_payload(msg) == pack({**wire, "sig": b""})


@pytest.mark.parametrize("msg", samples(), ids=lambda m: type(m).__name__)
def test_tampering_any_field_breaks_the_signature(msg):
    for f in dataclasses.fields(msg):
        if f.name == "sig":
            continue
        value = getattr(msg, f.name)
        if isinstance(value, bool):
            changed = not value
        elif isinstance(value, int):
            changed = value + 1
        elif isinstance(value, str):
            changed = value + "x"
        elif isinstance(value, bytes):
            changed = bytes([value[0] ^ 1]) + value[1:]
        elif isinstance(value, tuple):
            changed = ()
        elif isinstance(value, ObjectRef):
            changed = dataclasses.replace(value, size=value.size + 1)
        else:
            changed = dataclasses.replace(value, data_shards=value.data_shards + 1)
        if changed == value:
            continue
        tampered = dataclasses.replace(msg, **{f.name: changed})
        with pytest.raises(InvalidMessage):
            verify(tampered, KEY.public_key)
    with pytest.raises(InvalidMessage):
        verify(msg, OTHER.public_key)


def test_a_signature_for_one_type_is_not_valid_for_another():
    ping = samples()[0]
    wire = msgpack.unpackb(encode(ping))
    wire["type"] = Pong.TYPE
    with pytest.raises(InvalidMessage):
        decode(pack(wire), Pong)


@pytest.mark.parametrize("mutate", [
    lambda w: w.pop("nonce"),
    lambda w: w.update(extra=1),
    lambda w: w.update(ts="now"),
    lambda w: w.update(ts=True),
    lambda w: w.update(ts=1.5),
    lambda w: w.update(nonce=b"short"),
    lambda w: w.update(sig=b"x" * 10),
    lambda w: w.update(operator="not-an-address"),
    lambda w: w.update(addrs=["/ip4/1.2.3.4/tcp/1"] * 9),
    lambda w: w.update(addrs=[1]),
    lambda w: w.update(addrs=["/ip4/1.2.3.4/tcp/1/" + "x" * 300]),
    lambda w: w.update(addrs=["ip4/1.2.3.4/tcp/1"]),
    lambda w: w.update(addrs=["/ip4/1.2.3.4/tcp/1 /x"]),
    lambda w: w.update(addrs=["/ip4/1.2.3.4/tcp/1\n"]),
    lambda w: w.update(addrs=[""]),
], ids=["missing", "extra", "str-ts", "bool-ts", "float-ts", "short-nonce", "short-sig",
        "bad-operator", "too-many-addrs", "non-str-addr", "long-addr", "relative-addr",
        "space-in-addr", "newline-in-addr", "empty-addr"])
def test_shape_violations_are_invalid(mutate):
    wire = msgpack.unpackb(encode(samples()[0]))
    mutate(wire)
    with pytest.raises(InvalidMessage):
        decode(pack(wire), Ping)


def test_key_order_is_checked():
    wire = msgpack.unpackb(encode(samples()[0]))
    reordered = {"type": wire.pop("type"), "peer_id": wire.pop("peer_id"), **wire}
    with pytest.raises(InvalidMessage):
        decode(pack(reordered), Ping)


@pytest.mark.parametrize("repeat", ["type_after_sig", "same_operator"])
def test_a_key_twice_is_invalid(repeat):
    """msgpack maps may repeat a key and a dict keeps the last: the same signed Ping then
    had other encodings, one not ending in ``sig`` (found in review)."""
    wire = msgpack.unpackb(encode(samples()[0]))
    pairs = list(wire.items())
    if repeat == "type_after_sig":
        pairs.append(("type", wire["type"]))
    else:
        pairs.insert(2, ("operator", wire["operator"]))
    packer = msgpack.Packer(use_bin_type=True)
    data = packer.pack_map_header(len(pairs)) + b"".join(
        packer.pack(k) + packer.pack(v) for k, v in pairs)
    assert msgpack.unpackb(data) == wire  # what a plain decoder sees: the valid Ping
    with pytest.raises(InvalidMessage, match="more than once"):
        decode(data, Ping)


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x92\x01\x02", pack([1, 2]), b"\xff" * 50,
                                  pack({"type": "gfsp.ping.v1"})])
def test_garbage_is_invalid(data):
    with pytest.raises(InvalidMessage):
        decode(data, Ping)


def test_request_checksums_must_be_hashes():
    req = samples()[2]
    wire = msgpack.unpackb(encode(req))
    wire["object"]["checksums"] = [b"short"]
    with pytest.raises(InvalidMessage):
        decode(pack(wire), ApprovalRequest)
    wire["object"]["checksums"] = [b"\0" * 32]
    wire["params"]["data_shards"] = 0
    with pytest.raises(InvalidMessage):
        decode(pack(wire), ApprovalRequest)


def test_unsigned_message_cannot_be_encoded():
    with pytest.raises(ValueError):
        encode(Ping(ADDR, PEER, (), now_ms(), new_nonce()))
