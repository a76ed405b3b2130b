"""multistream-select: the pure codec (p2p/multistream.py) and our host's negotiation on the wire.

The wire tests put a *stock* py-libp2p host (its own multistream-select: a dialer that waits
for each answer, a listener that writes its header first) against ours, both ways, and speak
hostile negotiation to our listener from a raw libp2p stream. The stock host runs in this
process, so it shares our yamux window policy (wire-compatible either way); its multistream
code is libp2p's own. Real sockets on 127.0.0.1, each test under a deadline.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import multiaddr
import pytest
import trio
import trio.testing
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.host.exceptions import StreamFailure
from libp2p.network.config import ConnectionConfig
from libp2p.network.stream.exceptions import StreamError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from node.crypto import PrivateKey
from p2p import multistream
from p2p.host import P2PHost, ProtocolError, Stream, open_host

LISTEN = "/ip4/127.0.0.1/tcp/0"
ECHO = "/test/echo/1.0.0"
MAX = 64 * 1024
DEADLINE = 30


# --- the codec ----------------------------------------------------------------------------------


def test_encode_and_take_round_trip() -> None:
    long_id = "/p/" + "x" * 200  # a two-byte varint length
    buf = bytearray(multistream.encode_line(multistream.HEADER)
                    + multistream.encode_line(long_id) + b"\x00\x00")
    assert buf[0] == len(multistream.HEADER) + 1
    assert multistream.has_line(buf)
    assert multistream.take_line(buf) == multistream.HEADER
    assert multistream.take_line(buf) == long_id
    assert buf == bytearray(b"\x00\x00")  # what follows is left for the frame reader


def test_dialer_prefix_is_header_then_proposal() -> None:
    buf = bytearray(multistream.dialer_prefix(ECHO))
    assert [multistream.take_line(buf), multistream.take_line(buf)] == [multistream.HEADER, ECHO]
    assert not buf


@pytest.mark.parametrize("cut", [0, 1, 5, len(multistream.HEADER)])
def test_incomplete_message_is_none_and_untouched(cut: int) -> None:
    whole = multistream.encode_line(multistream.HEADER)
    buf = bytearray(whole[:cut])
    assert not multistream.has_line(buf)
    assert multistream.take_line(buf) is None
    assert bytes(buf) == whole[:cut]


@pytest.mark.parametrize("raw, why", [
    (b"\x05abcde", "newline"),  # no final newline
    (b"\x03\xff\xfe\n", "UTF-8"),
    (b"\x88\x27" + b"a" * 10, "bytes"),  # 5000 > MAX_LINE, refused before it arrives
    (b"\x80\x80\x80\x01", "prefix"),  # a varint longer than any allowed length
])
def test_malformed_messages_refused(raw: bytes, why: str) -> None:
    with pytest.raises(multistream.NegotiationError, match=why):
        multistream.take_line(bytearray(raw))


def test_encode_refuses_overlong_protocol() -> None:
    with pytest.raises(multistream.NegotiationError):
        multistream.encode_line("/" + "x" * multistream.MAX_LINE)


# --- a stock py-libp2p host ----------------------------------------------------------------------


async def echo(stream: Stream) -> None:
    await stream.write_frame(b"echo:" + await stream.read_frame(MAX))


@asynccontextmanager
async def stock_host(handlers: dict[str, Callable[[Any], Awaitable[None]]] | None = None
                     ) -> AsyncIterator[Any]:
    """A BasicHost as py-libp2p builds it (Noise, Yamux), with raw stream handlers."""
    key_pair = create_new_key_pair()
    noise = NoiseTransport(key_pair, noise_privkey=create_new_x25519_key_pair().private_key)
    listen = multiaddr.Multiaddr(LISTEN)
    host = new_host(key_pair=key_pair, sec_opt={TProtocol(NOISE_PROTOCOL_ID): noise},
                    muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux}, listen_addrs=[listen],
                    connection_config=ConnectionConfig(max_connections_per_peer=1))
    for protocol, handler in (handlers or {}).items():
        host.set_stream_handler(TProtocol(protocol), handler)
    async with host.run(listen_addrs=[listen]):
        try:
            yield host
        finally:
            await host.close()


async def connect_stock(stock: Any, ours: P2PHost) -> ID:
    pid = ID.from_base58(ours.peer_id)
    addr = ours.listen_addrs[0].rsplit("/p2p/", 1)[0]
    await stock.connect(PeerInfo(pid, [multiaddr.Multiaddr(addr)]))
    return pid


async def read_exactly(raw: Any, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = await raw.read(n - len(out))
        if not chunk:
            raise EOFError(f"EOF after {len(out)} of {n} bytes")
        out += chunk
    return out


async def read_until_gone(raw: Any) -> bytes:
    """Everything the remote sends until it closes or resets the stream."""
    out = b""
    try:
        while chunk := await raw.read(4096):
            out += chunk
    except StreamError:  # StreamEOF or StreamReset: gone either way
        return out
    return out


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


async def our_host(handlers: dict[str, Any], *, connect_timeout: float = 5.0) -> Any:
    return open_host(PrivateKey(b"\x07" * 32), LISTEN, connect_timeout=connect_timeout,
                     handlers=handlers)


async def test_stock_dialer_to_our_listener() -> None:
    with trio.fail_after(DEADLINE):
        async with await our_host({ECHO: echo}) as ours, stock_host() as stock:
            pid = await connect_stock(stock, ours)
            for i in range(3):
                raw = await stock.new_stream(pid, [TProtocol(ECHO)])
                await raw.write(frame(b"hi%d" % i))
                (n,) = struct.unpack(">I", await read_exactly(raw, 4))
                assert await read_exactly(raw, n) == b"echo:hi%d" % i
                await raw.close()
            with pytest.raises(StreamFailure):  # we answered "na"
                await stock.new_stream(pid, [TProtocol("/test/nope/1.0.0")])
            raw = await stock.new_stream(pid, [TProtocol(ECHO)])  # still serving
            await raw.write(frame(b"again"))
            (n,) = struct.unpack(">I", await read_exactly(raw, 4))
            assert await read_exactly(raw, n) == b"echo:again"


async def test_our_lazy_dialer_to_stock_listener() -> None:
    async def stock_echo(raw: Any) -> None:
        (n,) = struct.unpack(">I", await read_exactly(raw, 4))
        await raw.write(frame(b"stock:" + await read_exactly(raw, n)))
        await raw.close()

    with trio.fail_after(DEADLINE):
        async with stock_host({ECHO: stock_echo}) as stock, await our_host({}) as ours:
            peer = stock.get_id().to_base58()
            addrs = [str(a) for a in stock.get_transport_addrs()]
            for i in range(3):
                got = await ours.request(peer, addrs, ECHO, b"x%d" % i, max_response=MAX,
                                         timeout=5.0)
                assert got == b"stock:x%d" % i
            with pytest.raises(ProtocolError, match="refused protocol"):
                await ours.request(peer, addrs, "/test/nope/1.0.0", b"x", max_response=MAX,
                                   timeout=5.0)
            stream = await ours.open_stream(peer, ECHO)  # the eager form: agreed on return
            await stream.write_frame(b"eager")
            assert await stream.read_frame(MAX) == b"stock:eager"
            await stream.close()


async def test_lazy_exchange_answers_in_order() -> None:
    """A lazy dialer's header + proposal + request, sent in one write, get header + echo +
    response back in order (our listener holds the echo back to send it with the response)."""
    with trio.fail_after(DEADLINE):
        async with await our_host({ECHO: echo}) as ours, stock_host() as stock:
            pid = await connect_stock(stock, ours)
            raw = await stock.get_network().new_stream(pid)
            await raw.write(multistream.dialer_prefix(ECHO) + frame(b"lazy"))
            buf = bytearray(await read_until_gone(raw))
            assert multistream.take_line(buf) == multistream.HEADER
            assert multistream.take_line(buf) == ECHO
            assert bytes(buf) == frame(b"echo:lazy")


@pytest.mark.parametrize("name, send", [
    ("garbage header", b"\x05hello"),
    ("not multistream", multistream.encode_line("/other/1.0.0")),
    ("overlong proposal", multistream.encode_line(multistream.HEADER) + b"\x88\x27"),
    ("too many proposals", multistream.encode_line(multistream.HEADER) + b"".join(
        multistream.encode_line(f"/nope/{i}") for i in range(12))),
])
async def test_hostile_negotiation_resets_only_that_stream(name: str, send: bytes) -> None:
    with trio.fail_after(DEADLINE):
        async with await our_host({ECHO: echo}) as ours, stock_host() as stock:
            pid = await connect_stock(stock, ours)
            raw = await stock.get_network().new_stream(pid)
            await raw.write(send)
            answered = bytearray(await read_until_gone(raw))
            lines = []
            while (line := multistream.take_line(answered)) is not None:
                lines.append(line)
            assert ECHO not in lines, name
            assert lines.count(multistream.NA) <= 8  # at most _MAX_PROPOSALS answered
            raw = await stock.new_stream(pid, [TProtocol(ECHO)])  # the host still serves
            await raw.write(frame(b"ok"))
            (n,) = struct.unpack(">I", await read_exactly(raw, 4))
            assert await read_exactly(raw, n) == b"echo:ok"


async def test_silent_dialer_is_dropped_at_the_negotiation_deadline() -> None:
    with trio.fail_after(DEADLINE):
        async with await our_host({ECHO: echo}, connect_timeout=0.5) as ours, \
                stock_host() as stock:
            pid = await connect_stock(stock, ours)
            raw = await stock.get_network().new_stream(pid)
            await raw.write(multistream.encode_line(multistream.HEADER))  # then nothing
            answered = bytearray(await read_until_gone(raw))
            assert multistream.take_line(answered) == multistream.HEADER
            assert multistream.take_line(answered) is None


async def test_identify_is_answered_but_never_run_between_our_hosts() -> None:
    with trio.fail_after(DEADLINE):
        async with (await our_host({ECHO: echo}) as ours,
                    open_host(PrivateKey(b"\x08" * 32), LISTEN, connect_timeout=5.0,
                              handlers={ECHO: echo}) as other):
            for _ in range(3):
                assert await other.request(ours.peer_id, ours.listen_addrs, ECHO, b"x",
                                           max_response=MAX, timeout=5.0) == b"echo:x"
            assert await ours.request(other.peer_id, other.listen_addrs, ECHO, b"y",
                                      max_response=MAX, timeout=5.0) == b"echo:y"
            await trio.testing.wait_all_tasks_blocked(0.05)  # any identify would be done
            assert dict(ours.inbound_protocols) == {ECHO: 3}
            assert dict(other.inbound_protocols) == {ECHO: 1}
            async with stock_host() as stock:  # py-libp2p runs identify on connect
                await connect_stock(stock, ours)
                await trio.testing.wait_all_tasks_blocked(0.1)  # its identify has run
                assert ours.inbound_protocols["/ipfs/id/1.0.0"] == 1


@pytest.mark.parametrize("protocol", ["/ipfs/ping/1.0.0", "/ipfs/id/push/1.0.0"])
async def test_libp2p_ping_and_identify_push_are_refused(protocol: str) -> None:
    """Of py-libp2p's own protocols only identify is answered: its ping holds a stream for
    as long as the peer likes, and identify-push writes the peer's addresses into the
    peerstore that dials use (found in review)."""
    with trio.fail_after(DEADLINE):
        async with await our_host({ECHO: echo}) as ours, stock_host() as stock:
            pid = await connect_stock(stock, ours)
            with pytest.raises(StreamFailure):
                await stock.new_stream(pid, [TProtocol(protocol)])
            raw = await stock.new_stream(pid, [TProtocol(ECHO)])  # the host still serves
            await raw.write(frame(b"ok"))
            (n,) = struct.unpack(">I", await read_exactly(raw, 4))
            assert await read_exactly(raw, n) == b"echo:ok"
            assert protocol not in ours.inbound_protocols
