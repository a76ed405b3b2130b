"""The libp2p host of a gfsp node: the ONLY module of the project that imports libp2p.

It wraps py-libp2p 0.8.1 (see /work/shared/P2P-NOTES.md) behind a small trio API:

* :func:`open_host` is an async context manager yielding a :class:`P2PHost` once it listens:
  Noise only, Yamux only, one connection per peer, the node's ed25519 p2p key as host key.
* :class:`Stream` reads and writes length-prefixed frames (PROTOCOL.md "Framing": a 4-byte
  big-endian length, then the body), with a maximum size checked before the body is read.
* :meth:`P2PHost.request` is one request frame and one response frame on a new stream, the
  whole exchange under one deadline.

Every libp2p / multiaddr exception is mapped at this boundary to a :class:`P2PError` subclass;
no libp2p type escapes. Handlers are wrapped: whatever they raise is logged and only their
stream is reset; the host keeps serving.

Pitfalls of py-libp2p 0.8.1 applied here (numbers from P2P-NOTES.md):
1 ``max_connections_per_peer=1``; 2 handlers wrapped; 3 ``host.close()`` inside ``run()``;
4 Noise + Yamux only; 5 our own deadlines everywhere; 6 our own read loop; 8 exception groups
unwrapped at the boundary; 9 one write per frame; 10 libp2p loggers at WARNING.

Two more, found by counting frames (a one-request stream cost 22 encrypted frames, 4.1 ms of
CPU for both ends in one process): py-libp2p's yamux credits the window after every read and
doubles it each time (12 frames), and its multistream-select costs two round trips and four
frames. Our yamux streams credit at half-window as go-yamux does, and we negotiate ourselves
(p2p/multistream.py: a lazy dialer, a listener that answers in one write and sends the echo
with the response); a new stream's SYN rides on its first frame and a last write carries
FIN (``write_frame(..., last=True)``): 3 frames (SYN+data+FIN, ACK, data+FIN), 1.1 ms, and
the same protocols on the wire for any libp2p peer.

And one found by counting ``recv`` calls: every read of a connection (a 2-byte Noise length,
then its frame) was its own ``recv``, 6.1 per request for both ends. Connections now read
ahead (:class:`_BufferedTCPStream`, installed like the yamux class): 3.1 per request, and
~7% less CPU per request.
"""

from __future__ import annotations

import logging
import math
import struct
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, NoReturn

import multiaddr
import multiaddr.exceptions
import nacl.signing
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.identity.identify.identify import ID as IDENTIFY_PROTOCOL
from libp2p.io.trio import TrioTCPStream
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer import muxer_multistream
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux, YamuxStream
from libp2p.transport.tcp import tcp as libp2p_tcp

from node.crypto import PrivateKey
from node.errors import GfspError
from p2p import multistream
from p2p.peers import unspecified

__all__ = [
    "FrameTooLarge",
    "Handler",
    "P2PError",
    "P2PHost",
    "P2PTimeout",
    "PeerUnreachable",
    "ProtocolError",
    "Stream",
    "StreamClosed",
    "open_host",
    "parse_bootstrap",
    "peer_id_from_public_key",
]

log = logging.getLogger(__name__)

FRAME_HEADER = struct.Struct(">I")
#: Hard ceiling for one frame whatever the caller asks (the prefix is a uint32).
MAX_FRAME_LEN = 0xFFFFFFFF
#: How long cleanup (reset, close of a stream) may take once we are giving up on it.
_CLEANUP_TIMEOUT = 1.0
#: How long closing the whole host may take on the way out (it measured ~200 ms).
_HOST_CLOSE_TIMEOUT = 5.0
#: How many protocols a dialer may propose on one inbound stream before we reset it.
_MAX_PROPOSALS = 8
#: yamux frame header (version, type, flags, stream id, length) and the values we use
_YAMUX_HEADER = struct.Struct("!BBHII")
_YAMUX_WINDOW_UPDATE = 0x1
_YAMUX_SYN = 0x1
_YAMUX_FIN = 0x4
_YAMUX_MAX_PAYLOAD = 64 * 1024 - 12  # py-libp2p's MAX_MESSAGE_SIZE minus the header
#: Most bytes one read of a connection's socket takes in (the rest serves the next reads).
READ_AHEAD = 64 * 1024
#: Swarm notifications not sent (see _skip_stream_notifications)
_STREAM_EVENTS = frozenset({"opened_stream", "closed_stream"})
#: Inbound streams a host negotiates or serves at once before it resets new ones
DEFAULT_MAX_INBOUND_STREAMS = 1024
DEFAULT_MAX_INBOUND_PER_PEER = 128
#: Decides whether a remote peer id may open streams to us (e.g. "is it a registered SP")
Admit = Callable[[str], Awaitable[bool]]
#: Parsed peer ids a host remembers (more than any network of SPs we serve).
_MAX_IDS = 4096
#: Stream I/O errors other than libp2p's own that a dead connection can surface.
_IO_ERRORS: tuple[type[BaseException], ...] = (
    BaseLibp2pError,
    OSError,
    EOFError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
)


# --- errors ------------------------------------------------------------------------------------


class P2PError(GfspError):
    """Base of every p2p failure (libp2p exceptions are mapped to a subclass of this)."""


class PeerUnreachable(P2PError):
    """Dialing the peer failed (nothing listening, handshake failed, wrong peer id, ...)."""


class P2PTimeout(P2PError):
    """A deadline passed (connect, open, or a whole request)."""


class StreamClosed(P2PError):
    """The remote closed or reset the stream, or our read hit EOF in the middle of a frame."""


class FrameTooLarge(P2PError):
    """A frame's declared length is above the maximum; refused before reading the body."""

    def __init__(self, length: int, max_len: int) -> None:
        super().__init__(f"frame of {length} bytes exceeds the maximum of {max_len}")
        self.length = length
        self.max_len = max_len


class ProtocolError(P2PError):
    """Malformed input at the p2p layer: a bad multiaddr, peer id, bootstrap entry, protocol."""


class ListenError(P2PError):
    """The host could not bind its listen address (in use, or not yet released)."""


Handler = Callable[["Stream"], Awaitable[None]]


# --- identities and addresses -----------------------------------------------------------------


def _libp2p_public_key(pk: bytes) -> Ed25519PublicKey:
    if len(pk) != 32:
        raise ProtocolError(f"an ed25519 public key has 32 bytes, not {len(pk)}")
    try:
        return Ed25519PublicKey.from_bytes(pk)
    except (ValueError, TypeError, BaseLibp2pError) as exc:
        raise ProtocolError(f"invalid ed25519 public key: {exc}") from exc


def peer_id_from_public_key(pk: bytes) -> str:
    """The base58 libp2p peer id of a 32-byte ed25519 public key."""
    return ID.from_pubkey(_libp2p_public_key(pk)).to_base58()


def _parse_peer_id(peer_id: str) -> ID:
    """A libp2p ID from its base58 form; ProtocolError unless it is a canonical peer id."""
    if not isinstance(peer_id, str) or not peer_id:
        raise ProtocolError(f"invalid peer id {peer_id!r}")
    try:
        pid = ID.from_base58(peer_id)
    except (ValueError, TypeError, BaseLibp2pError) as exc:
        raise ProtocolError(f"invalid peer id {peer_id!r}: {exc}") from exc
    raw = pid.to_bytes()
    # a multihash: identity (0x00) of an inlined key, or sha2-256 (0x12) of 32 bytes
    valid_multihash = len(raw) >= 3 and (
        (raw[0] == 0x00 and raw[1] == len(raw) - 2)
        or (raw[0] == 0x12 and raw[1] == 32 and len(raw) == 34)
    )
    if pid.to_base58() != peer_id or not valid_multihash:
        raise ProtocolError(f"invalid peer id {peer_id!r}: not a multihash")
    return pid


def _parse_multiaddr(addr: str) -> tuple[multiaddr.Multiaddr, list[str]]:
    """A multiaddr and the names of its protocols, or ProtocolError.

    The whole address is decoded here: py-multiaddr accepts some strings (``/ip6zone/1``)
    that only fail when their protocols are listed, and an address can come from a peer."""
    if not isinstance(addr, str) or not addr.startswith("/"):
        raise ProtocolError(f"invalid multiaddr {addr!r}")
    try:
        maddr = multiaddr.Multiaddr(addr)
        return maddr, [p.name for p in maddr.protocols()]
    except (multiaddr.exceptions.Error, ValueError, TypeError, KeyError) as exc:
        raise ProtocolError(f"invalid multiaddr {addr!r}: {exc}") from exc


def _split_p2p(parsed: tuple[multiaddr.Multiaddr, list[str]], what: str
               ) -> tuple[str | None, multiaddr.Multiaddr]:
    """(peer id of a trailing ``/p2p/<id>`` or None, the address without it)."""
    maddr, protos = parsed
    if "p2p" not in protos:
        return None, maddr
    if protos.count("p2p") != 1 or protos[-1] != "p2p":
        raise ProtocolError(f"{what}: /p2p/<peer id> must come once, at the end")
    try:
        peer = maddr.value_for_protocol("p2p")
        rest = maddr.decapsulate(multiaddr.Multiaddr(f"/p2p/{peer}"))
    except (multiaddr.exceptions.Error, ValueError, TypeError, KeyError) as exc:
        raise ProtocolError(f"{what}: {exc}") from exc
    return str(peer), rest


def _transport_addr(addr: str, peer_id: str | None = None) -> multiaddr.Multiaddr:
    """Parse a dialable address, dropping a ``/p2p/<id>`` suffix (which must match peer_id)."""
    suffix, rest = _split_p2p(_parse_multiaddr(addr), f"multiaddr {addr!r}")
    if suffix is not None and peer_id is not None and suffix != peer_id:
        raise ProtocolError(f"multiaddr {addr!r} names peer {suffix}, expected {peer_id}")
    if not str(rest) or str(rest) == "/":
        raise ProtocolError(f"multiaddr {addr!r} has no transport part")
    return rest


def parse_bootstrap(entry: str) -> tuple[str, list[str]]:
    """Parse a bootstrap entry into ``(peer id, [transport multiaddr])``.

    Accepts ``"<peer id>@<multiaddr>"`` or a full multiaddr ending in ``/p2p/<peer id>``.
    The returned address has no ``/p2p`` suffix. Raises :class:`ProtocolError` naming the
    entry when it is malformed.
    """
    if not isinstance(entry, str) or not entry.strip():
        raise ProtocolError(f"bad bootstrap entry {entry!r}: empty")
    text = entry.strip()
    try:
        if "@" in text:
            peer, _, addr = text.partition("@")
            _parse_peer_id(peer)
            rest = _transport_addr(addr, peer)
        else:
            suffix, rest = _split_p2p(_parse_multiaddr(text), "multiaddr")
            if suffix is None:
                raise ProtocolError("no /p2p/<peer id> and no '<peer id>@' prefix")
            peer = suffix
            _parse_peer_id(peer)
            if not str(rest) or str(rest) == "/":
                raise ProtocolError("no transport part")
    except ProtocolError as exc:
        raise ProtocolError(f"bad bootstrap entry {entry!r}: {exc}") from exc
    return peer, [str(rest)]


# --- exception plumbing -----------------------------------------------------------------------


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        out: list[BaseException] = []
        for sub in exc.exceptions:
            out.extend(_leaves(sub))
        return out
    return [exc]


def _unwrap_group(group: BaseExceptionGroup[Any]) -> NoReturn:
    """Re-raise the meaningful exception inside (nested) exception groups (pitfall 8).

    One non-Cancelled leaf: raised as is. Only Cancelled leaves: the first Cancelled (trio's
    cancel scopes accept it bare). Several real errors: our own error wins, else a P2PError.
    """
    leaves = _leaves(group)
    real = [e for e in leaves if not isinstance(e, trio.Cancelled)]
    if not real:
        raise leaves[0]
    if len(real) == 1:
        if isinstance(real[0], BaseLibp2pError):
            raise P2PError(f"libp2p failure: {real[0]!r}") from real[0]
        raise real[0]
    for exc in real:
        if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit, ...
            raise exc
    for exc in real:
        if isinstance(exc, GfspError):
            raise exc
    raise P2PError(f"several p2p failures: {real!r}") from group


async def _quietly(what: str, fn: Callable[[], Awaitable[None]]) -> None:
    """Run a cleanup call shielded and bounded; its I/O failure is logged, not raised."""
    with trio.move_on_after(_CLEANUP_TIMEOUT) as scope:
        scope.shield = True
        try:
            await fn()
        except (*_IO_ERRORS, P2PError) as exc:
            log.debug("p2p: %s failed: %r", what, exc)
    if scope.cancelled_caught:
        log.debug("p2p: %s timed out", what)


# --- yamux flow control -----------------------------------------------------------------------


class _GfspYamuxStream(YamuxStream):
    """A yamux stream that credits its window as go-yamux does: once half of it is consumed.

    py-libp2p 0.8.1 sends a WINDOW_UPDATE after every read and doubles the window each time
    ("auto-tuning"): 12 of the 22 frames of a one-request stream, each one encrypted, sent and
    woken up for. Our messages fit in the initial 256 KiB window, so a fixed window credited
    at half-consumption is the same flow control at a fraction of the cost (same wire format).
    """

    async def _auto_tune_and_send_window_update(self, *, bytes_read: int = 0) -> None:
        async with self.window_lock:
            buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
            delta = self.target_recv_window - (self.recv_window + buffered)
            if delta < self.target_recv_window // 2:
                return
            self.recv_window += delta
        await self.send_window_update(delta)

    def _log_perf_yamux_summary(self) -> None:
        """Nothing: py-libp2p reads ``PY_YAMUX_DEBUG`` from the environment on every close."""

    def fits_one_frame(self, n: int) -> bool:
        """True when n bytes (n > 0) go out as one data frame right now."""
        return 0 < n <= min(self.send_window, _YAMUX_MAX_PAYLOAD)

    async def write_last(self, data: bytes) -> None:
        """Write data (one frame: check :meth:`fits_one_frame`) with FIN on it: our side is
        closed after it (the later ``close()`` sends nothing more)."""
        owed: dict[int, int] = self.conn._owed_flags  # type: ignore[attr-defined]
        before = owed.get(self.stream_id, 0)
        owed[self.stream_id] = before | _YAMUX_FIN
        try:
            await self.write(data)
        except BaseException:
            if self.stream_id in owed:  # not written: owe what we owed before
                owed[self.stream_id] = before
                if not before:
                    del owed[self.stream_id]
            raise
        self.send_closed = True


class _BufferedTCPStream(TrioTCPStream):
    """py-libp2p's TCP stream with a read buffer.

    Every reader above asks for exactly what it needs next: multistream-select a varint one
    byte at a time, Noise a 2-byte length and then the frame. 0.8.1 turned each into its own
    ``recv`` (a syscall, a lock and a trio checkpoint). Here one ``recv`` of up to
    :data:`READ_AHEAD` bytes serves the reads that follow from memory. One task reads a
    connection at a time (the upgrade, then yamux's loop); a second reader entering while the
    first waits on the socket gets ``trio.BusyResourceError`` rather than bytes out of order.
    A read served from the buffer returns without a checkpoint (that is the saving); at most
    :data:`READ_AHEAD` bytes are served so before the next socket read checkpoints.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        super().__init__(stream)
        self._buf = b""
        self._pos = 0
        self._receiving = False

    async def read(self, n: int | None = None) -> bytes:
        if n is not None and n <= 0:
            return b""
        left = len(self._buf) - self._pos
        if not left:
            if self._receiving:
                raise trio.BusyResourceError("another task is reading this connection")
            self._receiving = True
            try:
                data = await super().read(max(n or 0, READ_AHEAD))
            finally:
                self._receiving = False
            if n is None or len(data) <= n:
                return data
            self._buf, self._pos = data, n
            return data[:n]
        take = left if n is None else min(n, left)
        start = self._pos
        self._pos += take
        if self._pos == len(self._buf):
            buf, self._buf, self._pos = self._buf, b"", 0
            return buf[start:] if start else buf
        return self._buf[start:start + take]

    @staticmethod
    def install() -> None:
        """Make py-libp2p's TCP transport build this class for each connection (idempotent;
        ``tcp.py`` 0.8.1 constructs ``TrioTCPStream`` by its module-level name)."""
        libp2p_tcp.TrioTCPStream = _BufferedTCPStream  # type: ignore[misc]


class _GfspYamux(Yamux):
    """Yamux whose streams are :class:`_GfspYamuxStream`, and whose frames carry flags along.

    A new outbound stream's SYN is not sent alone: it rides on the stream's first frame (go-
    yamux style; py-libp2p accepts data with SYN). :meth:`_GfspYamuxStream.write_last` puts
    FIN on the data frame itself. Flags owed to a stream wait in ``_owed_flags`` for its next
    frame.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._owed_flags: dict[int, int] = {}

    @staticmethod
    def install() -> None:
        """Make py-libp2p build this class for every yamux connection (idempotent).

        ``MuxerMultistream.new_conn`` 0.8.1 constructs ``Yamux`` by its module-level name
        whatever class ``muxer_opt`` gives, so that name is what we rebind: a process-wide
        change, confined to this module like every other use of libp2p.
        """
        muxer_multistream.Yamux = _GfspYamux  # type: ignore[misc]

    async def open_stream(self) -> YamuxStream:
        stream = await super().open_stream()
        stream.__class__ = _GfspYamuxStream
        return stream

    async def accept_stream(self) -> Any:
        stream = await super().accept_stream()
        stream.__class__ = _GfspYamuxStream
        return stream

    async def _write_frame(self, data: bytes) -> None:
        if len(data) >= _YAMUX_HEADER.size:
            _, typ, flags, sid, length = _YAMUX_HEADER.unpack_from(data)
            if typ == _YAMUX_WINDOW_UPDATE and flags == _YAMUX_SYN and length == 0:
                self._owed_flags[sid] = self._owed_flags.get(sid, 0) | _YAMUX_SYN
                return  # open_stream's bare SYN: it goes with the stream's first frame
            owed = self._owed_flags.pop(sid, 0) if self._owed_flags else 0
            if owed:
                data = _YAMUX_HEADER.pack(0, typ, flags | owed, sid, length) + data[
                    _YAMUX_HEADER.size:]
        await super()._write_frame(data)

# --- streams ----------------------------------------------------------------------------------


class Stream:
    """One libp2p stream with length-prefixed framing (PROTOCOL.md "Framing").

    ``remote_peer_id`` and ``remote_public_key`` are those of the Noise-authenticated remote.
    Every method maps libp2p failures to :class:`P2PError` subclasses. Deadlines are the
    caller's (``trio.fail_after`` around the calls); reads never give up on their own.
    """

    def __init__(self, raw: Any, remote_peer_id: str, remote_public_key: bytes,
                 protocol: str) -> None:
        self._raw = raw
        self.remote_peer_id = remote_peer_id
        self.remote_public_key = remote_public_key
        self.protocol = protocol
        self._buf = bytearray()
        #: bytes owed to the remote, sent in front of our next write (or before our FIN): a
        #: lazy dialer's multistream proposal, or a listener's echo held back (multistream.py)
        self._owed = b""
        #: a lazy dialer has not yet checked the remote's multistream answer
        self._unconfirmed = False
        #: a listener answered "na" to a proposal of this stream's dialer
        self.refused = False

    @classmethod
    def _from_raw(cls, raw: Any, protocol: str,
                  remotes: dict[Any, tuple[str, bytes]] | None = None) -> Stream:
        """Wrap a libp2p net stream, extracting the authenticated remote's identity.

        ``remotes`` remembers identities already extracted (py-libp2p re-parses the base58
        id to get at the key: ~50 us a stream).
        """
        try:
            pid: ID = raw.muxed_conn.peer_id
            known = remotes.get(pid) if remotes is not None else None
            if known is not None:
                return cls(raw, known[0], known[1], protocol)
            key = pid.extract_public_key()
        except (AttributeError, ValueError, TypeError, BaseLibp2pError) as exc:
            raise ProtocolError(f"cannot identify the remote of a stream: {exc}") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise ProtocolError(f"remote peer {pid} does not use an ed25519 key")
        identity = (pid.to_base58(), key.to_bytes())
        if remotes is not None:
            if len(remotes) >= _MAX_IDS:
                remotes.clear()
            remotes[pid] = identity
        return cls(raw, *identity, protocol)

    def __repr__(self) -> str:
        return f"Stream(remote={self.remote_peer_id}, protocol={self.protocol!r})"

    async def _read_some(self, n: int) -> bytes:
        try:
            chunk = await self._raw.read(n)
        except _IO_ERRORS as exc:
            raise StreamClosed(
                f"stream from {self.remote_peer_id} closed while reading: {exc!r}") from exc
        if not chunk:
            raise StreamClosed(f"stream from {self.remote_peer_id} hit EOF")
        return bytes(chunk)

    async def _read_exact(self, n: int) -> bytes:
        """Exactly n bytes (our own loop: libp2p's read_exactly gives up, pitfall 6)."""
        while len(self._buf) < n:
            self._buf += await self._read_some(min(n - len(self._buf), 1 << 20))
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def read_frame(self, max_len: int) -> bytes:
        """Read one frame; FrameTooLarge if its declared length exceeds max_len."""
        if max_len < 0:
            raise ValueError("max_len must be >= 0")
        if self._unconfirmed:
            await self._confirm_protocol()
        (length,) = FRAME_HEADER.unpack(await self._read_exact(FRAME_HEADER.size))
        if length > max_len:
            raise FrameTooLarge(length, max_len)
        return await self._read_exact(length) if length else b""

    # multistream-select (the bytes: p2p/multistream.py)

    async def _read_line(self) -> str:
        while True:
            try:
                line = multistream.take_line(self._buf)
            except multistream.NegotiationError as exc:
                raise ProtocolError(f"{self.remote_peer_id}: {exc}") from None
            if line is not None:
                return line
            self._buf += await self._read_some(4096)

    def _has_line(self) -> bool:
        try:
            return multistream.has_line(self._buf)
        except multistream.NegotiationError as exc:
            raise ProtocolError(f"{self.remote_peer_id}: {exc}") from None

    def _propose_lazily(self) -> None:
        """Dialer: owe the header and our proposal; check the answer on the first read."""
        self._owed = multistream.dialer_prefix(self.protocol)
        self._unconfirmed = True

    async def _confirm_protocol(self) -> None:
        """Dialer: send what we owe if not yet sent, then read the header and the echo."""
        if self._owed:
            await self.write_raw(b"")
        header = await self._read_line()
        if header != multistream.HEADER:
            raise ProtocolError(
                f"{self.remote_peer_id} does not speak multistream-select: {header!r}")
        answer = await self._read_line()
        if answer != self.protocol:
            raise ProtocolError(
                f"peer {self.remote_peer_id} refused protocol {self.protocol} ({answer!r})")
        self._unconfirmed = False

    async def _select_inbound(self, protocols: set[str] | frozenset[str]) -> str:
        """Listener: read the dialer's header and proposals, answer; return the protocol.

        The answer to a proposal already in hand goes out with the header (one write); the
        echo of the chosen protocol is held back until our first write when the request is
        already in hand (a lazy dialer), so the whole exchange is one frame each way.
        """
        header = await self._read_line()
        if header != multistream.HEADER:
            raise ProtocolError(f"not multistream-select: {header!r}")
        out = multistream.encode_line(multistream.HEADER)
        for _ in range(_MAX_PROPOSALS):
            if out and not self._has_line():
                await self.write_raw(out)  # a non-lazy dialer waits for it before proposing
                out = b""
            proposal = await self._read_line()
            if proposal in protocols:
                self.protocol = proposal
                out += multistream.encode_line(proposal)
                if self._buf:
                    self._owed = out
                else:
                    await self.write_raw(out)
                return proposal
            # answered at once: a lazy dialer's request follows its proposal, and is no
            # proposal; it reads "na", and we close (no reset that could overtake the "na")
            await self.write_raw(out + multistream.encode_line(multistream.NA))
            out = b""
            self.refused = True
        raise ProtocolError(f"{self.remote_peer_id} proposed {_MAX_PROPOSALS} unknown protocols")

    async def write_frame(self, data: bytes, *, last: bool = False) -> None:
        """Write one frame: the prefix and the body in ONE write call (pitfall 9).

        ``last``: nothing more will be written; our side is closed with this very frame when
        it fits in one yamux frame (else right after it).
        """
        if len(data) > MAX_FRAME_LEN:
            raise FrameTooLarge(len(data), MAX_FRAME_LEN)
        await self.write_raw(FRAME_HEADER.pack(len(data)) + bytes(data), last=last)

    async def write_raw(self, data: bytes, *, last: bool = False) -> None:
        """Write bytes as they are (no framing), after what we owe the remote (if anything);
        ``last`` as for :meth:`write_frame`."""
        if self._owed:
            data, self._owed = self._owed + data, b""
        muxed = getattr(self._raw, "muxed_stream", None)
        try:
            if last and isinstance(muxed, _GfspYamuxStream) and muxed.fits_one_frame(len(data)):
                await muxed.write_last(data)
                return
            await self._raw.write(data)
            if last:
                await self._raw.close_write()
        except _IO_ERRORS as exc:
            raise StreamClosed(
                f"stream to {self.remote_peer_id} closed while writing: {exc!r}") from exc

    async def close(self) -> None:
        """Close our side gracefully (the remote reads EOF after what we wrote)."""
        try:
            if self._owed:
                await self.write_raw(b"")
            await self._raw.close()
        except _IO_ERRORS as exc:
            raise StreamClosed(f"closing stream to {self.remote_peer_id}: {exc!r}") from exc

    async def reset(self) -> None:
        """Abort the stream in both directions; never raises for an already dead stream."""
        await _quietly("stream reset", self._raw.reset)


# --- the host ---------------------------------------------------------------------------------


class P2PHost:
    """A running libp2p host (use :func:`open_host`)."""

    def __init__(self, host: Any, *, connect_timeout: float,
                 handlers: Mapping[str, Handler],
                 max_inbound_streams: int = DEFAULT_MAX_INBOUND_STREAMS,
                 max_inbound_per_peer: int = DEFAULT_MAX_INBOUND_PER_PEER,
                 admit: Admit | None = None) -> None:
        self._host = host
        self._connect_timeout = connect_timeout
        self._handlers: dict[str, Handler] = dict(handlers)
        self._max_inbound = max_inbound_streams
        self._max_per_peer = max_inbound_per_peer
        self._admit = admit
        self.inbound_streams = 0  # being negotiated or served now
        self._inbound_by_peer: Counter[str] = Counter()  # the same, by remote peer id
        self.inbound_refused: Counter[str] = Counter()  # streams reset before negotiating, why
        self.inbound_protocols: Counter[str] = Counter()  # streams served, by protocol
        self._remotes: dict[Any, tuple[str, bytes]] = {}  # libp2p ID -> (base58, public key)
        self._ids: dict[str, ID] = {}  # parsed peer ids (base58 decoding costs ~50 us)
        self._listen_addrs: list[str] = []
        self.peer_id: str = host.get_id().to_base58()
        self._handler_scopes: set[trio.CancelScope] = set()
        self._closing = False

    def __repr__(self) -> str:
        return f"P2PHost(peer_id={self.peer_id})"

    @property
    def listen_addrs(self) -> list[str]:
        """Full multiaddrs we listen on (real bound ports), each ending in ``/p2p/<id>``, but
        for those on 0.0.0.0 or :: (no peer can dial them: with only those, peers use this
        SP's addresses in the SP registry).

        Fixed once listening (every ping and pong carries them; rebuilding them cost ~0.1 ms).
        """
        if not self._listen_addrs:
            self._listen_addrs = [f"{addr}/p2p/{self.peer_id}"
                                  for addr in self._host.get_transport_addrs()
                                  if not unspecified(str(addr))]
        return list(self._listen_addrs)

    # connections

    def _pid(self, peer_id: str) -> ID:
        """:func:`_parse_peer_id`, remembered (at most _MAX_IDS entries)."""
        pid = self._ids.get(peer_id)
        if pid is None:
            pid = _parse_peer_id(peer_id)
            if len(self._ids) >= _MAX_IDS:
                self._ids.clear()
            self._ids[peer_id] = pid
        return pid

    def is_connected(self, peer_id: str) -> bool:
        """True if a connection to peer_id is open."""
        try:
            pid = self._pid(peer_id)
        except ProtocolError:
            return False
        return len(self._host.get_network().get_connections(pid)) > 0

    def connected_peers(self) -> list[str]:
        """Peer ids of every peer with an open connection."""
        return [pid.to_base58() for pid in self._host.get_connected_peers()]

    async def connect(self, peer_id: str, addrs: Sequence[str]) -> None:
        """Connect to peer_id at addrs unless already connected (deadline connect_timeout).

        Raises P2PTimeout when the deadline passes, PeerUnreachable when the dial fails,
        ProtocolError for a bad peer id or address.
        """
        pid = self._pid(peer_id)
        if peer_id == self.peer_id:
            raise ProtocolError("cannot connect to ourselves")
        if self.is_connected(peer_id):
            return
        if not addrs:
            raise PeerUnreachable(f"not connected to {peer_id} and no address to dial")
        maddrs = []
        for a in addrs:  # one bad address (a peer's record can hold any) spoils no other
            try:
                maddrs.append(_transport_addr(a, peer_id))
            except ProtocolError as exc:
                if len(addrs) == 1:
                    raise
                log.debug("connect %s: skipping %s", peer_id, exc)
        if not maddrs:
            raise ProtocolError(f"no address of {peer_id} is a dialable multiaddr: "
                                f"{list(addrs)[:3]}")
        try:
            with trio.fail_after(self._connect_timeout):
                try:
                    await self._host.connect(PeerInfo(pid, maddrs))
                except BaseExceptionGroup as group:
                    _unwrap_group(group)
        except trio.TooSlowError:
            raise P2PTimeout(
                f"connect to {peer_id} timed out after {self._connect_timeout}s") from None
        except (PeerUnreachable, P2PTimeout, ProtocolError):
            raise
        except Exception as exc:  # the boundary: any libp2p/transport failure means this
            raise PeerUnreachable(f"cannot reach {peer_id} at {list(addrs)}: {exc!r}") from exc
        if not self.is_connected(peer_id):
            raise PeerUnreachable(f"cannot reach {peer_id} at {list(addrs)}")

    async def disconnect(self, peer_id: str) -> None:
        """Close every connection to peer_id (no-op if none)."""
        pid = self._pid(peer_id)
        try:
            with trio.move_on_after(self._connect_timeout):
                await self._host.disconnect(pid)
        except BaseExceptionGroup as group:
            log.debug("p2p: disconnect from %s: %r", peer_id, group)
        except _IO_ERRORS as exc:
            log.debug("p2p: disconnect from %s: %r", peer_id, exc)

    # streams

    async def _open_lazy(self, peer_id: str, protocol: str) -> Stream:
        """A new stream to a connected peer whose proposal goes out with the first write.

        No round trip here: the peer's answer is checked on our first read (ProtocolError
        then if it refused). PeerUnreachable if not connected; no deadline of its own.
        """
        pid = self._pid(peer_id)
        if not self.is_connected(peer_id):
            raise PeerUnreachable(f"not connected to {peer_id}")
        try:
            try:
                raw = await self._host.get_network().new_stream(pid)
            except BaseExceptionGroup as group:
                _unwrap_group(group)
        except (PeerUnreachable, P2PTimeout, ProtocolError):
            raise
        except Exception as exc:  # the boundary: map whatever libp2p raised
            raise PeerUnreachable(
                f"cannot open a stream to {peer_id}: {exc!r}") from exc
        try:
            stream = Stream._from_raw(raw, protocol, self._remotes)
        except ProtocolError:
            await _quietly("stream reset", raw.reset)
            raise
        raw.set_protocol(TProtocol(protocol))
        stream._propose_lazily()
        return stream

    async def open_stream(self, peer_id: str, protocol: str) -> Stream:
        """Open a new stream for protocol to a connected peer (deadline connect_timeout).

        The protocol is agreed before it returns (one round trip). PeerUnreachable if not
        connected, ProtocolError if the peer does not speak protocol, P2PTimeout when the
        deadline passes.
        """
        stream: Stream | None = None
        try:
            with trio.fail_after(self._connect_timeout):
                stream = await self._open_lazy(peer_id, protocol)
                await stream._confirm_protocol()
                return stream
        except trio.TooSlowError:
            if stream is not None:
                await stream.reset()
            raise P2PTimeout(
                f"opening {protocol} to {peer_id} timed out "
                f"after {self._connect_timeout}s") from None
        except BaseException:
            if stream is not None:
                await stream.reset()
            raise

    async def request(self, peer_id: str, addrs: Sequence[str], protocol: str, frame: bytes,
                      *, max_response: int,
                      timeout: float) -> bytes:
        """One request frame, one response frame on a new stream; the whole under timeout.

        Connects if needed. Raises P2PTimeout (the deadline passed: a frozen peer is never
        noticed by libp2p, pitfall 5), PeerUnreachable, StreamClosed, FrameTooLarge or
        ProtocolError. The stream is reset on any failure.
        """
        stream: Stream | None = None
        deadline = trio.current_time() + timeout
        try:
            with trio.fail_after(timeout):
                await self.connect(peer_id, addrs)
                stream = await self._open_lazy(peer_id, protocol)
                await stream.write_frame(frame, last=True)
                response = await stream.read_frame(max_response)
                await stream.close()
                return response
        except trio.TooSlowError:
            if stream is not None:
                await stream.reset()
            raise P2PTimeout(
                f"{protocol} request to {peer_id} timed out after {timeout}s") from None
        except P2PError as exc:
            if stream is not None:
                await stream.reset()
            if not isinstance(exc, P2PTimeout) and trio.current_time() >= deadline:
                # libp2p turned our deadline's Cancelled into a failure of its own
                raise P2PTimeout(
                    f"{protocol} request to {peer_id} timed out after {timeout}s") from exc
            raise
        except BaseException:
            if stream is not None:
                await stream.reset()
            raise

    # handlers

    async def _inbound(self, raw: Any) -> None:
        """Every inbound stream: our own multistream-select, then its handler, guarded.

        Installed as the swarm's stream handler (in place of py-libp2p's negotiation, see
        p2p/multistream.py). Nothing raised here reaches libp2p (pitfall 2): a failure resets
        only this stream.
        """
        if self._closing or self.inbound_streams >= self._max_inbound:
            if not self._closing:
                log.debug("p2p: %d inbound streams already: one more reset",
                          self.inbound_streams)
            await _quietly("stream reset", raw.reset)
            return
        self.inbound_streams += 1
        with trio.CancelScope() as scope:
            self._handler_scopes.add(scope)
            try:
                await self._serve(raw)
            finally:
                self._handler_scopes.discard(scope)
                self.inbound_streams -= 1

    async def _serve(self, raw: Any) -> None:
        try:
            stream = Stream._from_raw(raw, "", self._remotes)
        except ProtocolError as exc:
            log.info("p2p: refused an inbound stream: %s", exc)
            await _quietly("stream reset", raw.reset)
            return
        peer = stream.remote_peer_id
        if self._inbound_by_peer[peer] >= self._max_per_peer:
            self.inbound_refused["per_peer"] += 1
            log.debug("p2p: %s has %d inbound streams already: one more reset", peer,
                      self._max_per_peer)
            await stream.reset()
            return
        self._inbound_by_peer[peer] += 1
        try:
            if self._admit is not None:
                admitted = False
                with trio.move_on_after(self._connect_timeout):
                    try:
                        admitted = await self._admit(peer)
                    except GfspError as exc:  # e.g. the registry cannot be asked now
                        log.debug("p2p: cannot admit %s now: %s", peer, exc)
                    except Exception:  # a bug in the hook: this stream only
                        log.info("p2p: admitting %s failed", peer, exc_info=True)
                if not admitted:
                    self.inbound_refused["not_admitted"] += 1
                    log.debug("p2p: a stream from %s, which is not admitted: reset", peer)
                    await stream.reset()
                    return
            await self._negotiate_and_handle(stream)
        finally:
            self._inbound_by_peer[peer] -= 1
            if not self._inbound_by_peer[peer]:
                del self._inbound_by_peer[peer]

    async def _negotiate_and_handle(self, stream: Stream) -> None:
        raw = stream._raw
        # of py-libp2p's own protocols only identify is answered (a stock peer runs it on
        # connect); identify-push would let a peer write addresses into the peerstore that a
        # dial uses, and its ping keeps a stream open for as long as the peer likes
        libp2p_handlers = {p: h for p, h in self._host.get_mux().handlers.items()
                           if p == IDENTIFY_PROTOCOL}
        try:
            with trio.fail_after(self._connect_timeout):
                protocol = await stream._select_inbound(
                    set(self._handlers) | {p for p in libp2p_handlers if p is not None})
        except trio.TooSlowError:
            log.debug("p2p: %s did not choose a protocol in %ss", stream.remote_peer_id,
                      self._connect_timeout)
            await stream.reset()
            return
        except P2PError as exc:
            log.debug("p2p: inbound stream from %s: %s", stream.remote_peer_id, exc)
            if stream.refused:
                await _quietly("stream close", stream.close)
            else:
                await stream.reset()
            return
        raw.set_protocol(TProtocol(protocol))
        self.inbound_protocols[protocol] += 1
        handler = self._handlers.get(protocol)
        if handler is None:
            await self._serve_libp2p(stream, libp2p_handlers[TProtocol(protocol)])
            return
        try:
            await handler(stream)
        except (GfspError, trio.TooSlowError) as exc:
            # ours and the peer's doing (a bad frame or signature, a deadline, no room in
            # the limiter): one line at debug, which any peer can cause at will
            log.debug("p2p: %s handler for %s: %s: %s", protocol, stream.remote_peer_id,
                      type(exc).__name__, exc)
            await stream.reset()
            return
        except Exception:  # a guard for handler bugs: logged with traceback, stream reset
            log.info("p2p: %s handler for %s failed", protocol, stream.remote_peer_id,
                     exc_info=True)
            await stream.reset()
            return
        except BaseException:
            await stream.reset()
            raise
        await _quietly("stream close", stream.close)

    async def _serve_libp2p(self, stream: Stream, handler: Any) -> None:
        """py-libp2p's own identify on its raw stream, within ``connect_timeout``."""
        if stream._buf:  # bytes read ahead that its handler would never see
            await stream.reset()
            return
        try:
            with trio.fail_after(self._connect_timeout):  # its own timeouts are not ours
                await stream.write_raw(b"")  # the echo, if held back
                await handler(stream._raw)
        except trio.TooSlowError:
            log.debug("p2p: %s for %s: no end within %ss", stream.protocol,
                      stream.remote_peer_id, self._connect_timeout)
            await stream.reset()
        except P2PError as exc:
            log.debug("p2p: %s for %s: %s", stream.protocol, stream.remote_peer_id, exc)
            await stream.reset()
        except Exception:  # libp2p's handler failed: its stream only
            log.debug("p2p: %s handler for %s failed", stream.protocol,
                      stream.remote_peer_id, exc_info=True)
            await stream.reset()

    def _cancel_handlers(self) -> None:
        self._closing = True
        for scope in list(self._handler_scopes):
            scope.cancel()


def _quiet_libp2p_logs() -> None:
    """libp2p loggers at WARNING (pitfall 10); its root-logger chatter below ERROR dropped.

    Idempotent; these are process-wide logging settings, not state of ours.
    """
    logging.getLogger("libp2p").setLevel(logging.WARNING)
    # libp2p's own setup_logging() leaves "libp2p" with no handler and propagate=False: its
    # records would bypass our formatter as bare lines on stderr.
    logging.getLogger("libp2p").propagate = True
    # dial and multiselect failures are mapped to P2PError and logged by us (else: once per
    # ping round for every dead peer)
    for name in ("libp2p.transport.tcp.tcp", "libp2p.protocol_muxer.multiselect_client"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    # some modules pin their own logger below WARNING (auto_connector: INFO every 10 s)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("libp2p."):
            logger = logging.getLogger(name)
            if logging.NOTSET < logger.level < logging.WARNING:
                logger.setLevel(logging.WARNING)
    # basic_host logs a 7-line ERROR for a refused protocol, which we map and log ourselves.
    logging.getLogger("libp2p.host.basic_host").setLevel(logging.CRITICAL)
    root = logging.getLogger()
    if not any(isinstance(f, _Libp2pRootFilter) for f in root.filters):
        root.addFilter(_Libp2pRootFilter())


class _Libp2pRootFilter(logging.Filter):
    """Drops records libp2p logs directly on the root logger (``logging.warning(...)``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        path = record.pathname.replace("\\", "/")
        return record.levelno >= logging.ERROR or "/libp2p/" not in path


def _skip_stream_notifications(network: Any) -> None:
    """Stop the swarm announcing every stream opened and closed to its notifees.

    Each announcement is a nursery and a task per notifee (4 per request, 2 notifees); py-
    libp2p's notifees (the tag store, identify) do nothing with stream events and we register
    none. Connection events still go out.
    """
    notify = network._notify

    async def _notify(method: str, *args: Any) -> None:
        if method not in _STREAM_EVENTS:
            await notify(method, *args)

    network._notify = _notify


def _no_identify(peer_id: Any, *, reason: str) -> None:
    """Stands in for ``BasicHost._schedule_identify`` on our hosts: identify is not run."""


def _key_pair(key: PrivateKey) -> KeyPair:
    sk = nacl.signing.SigningKey(key.seed_bytes())
    return KeyPair(Ed25519PrivateKey(sk), Ed25519PublicKey(sk.verify_key))


@asynccontextmanager
async def open_host(key: PrivateKey, listen: str, *, connect_timeout: float,
                    handlers: Mapping[str, Handler],
                    max_inbound_streams: int = DEFAULT_MAX_INBOUND_STREAMS,
                    max_inbound_per_peer: int = DEFAULT_MAX_INBOUND_PER_PEER,
                    admit: Admit | None = None) -> AsyncIterator[P2PHost]:
    """Run a libp2p host with ``key`` as identity, listening on ``listen``; yield it.

    Noise only, Yamux only, one connection per peer. Each ``handlers`` entry maps a protocol
    id to an async function taking a :class:`Stream`; it runs guarded (an exception resets
    only its stream; after it returns the stream is closed). A remote peer opens at most
    ``max_inbound_per_peer`` streams at once, and, given ``admit``, only once it admits the
    peer id (asked before the protocol is negotiated, within ``connect_timeout``). On the way
    out every handler is cancelled and the host (listener included) is closed. Errors raised
    by the body come out unwrapped from libp2p's exception groups.
    """
    if not (connect_timeout > 0 and math.isfinite(connect_timeout)):
        raise ValueError("connect_timeout must be a positive number of seconds")
    if max_inbound_streams < 1 or max_inbound_per_peer < 1:
        raise ValueError("max_inbound_streams and max_inbound_per_peer must be >= 1")
    _quiet_libp2p_logs()
    _GfspYamux.install()
    _BufferedTCPStream.install()
    listen_maddr, _ = _parse_multiaddr(listen)
    key_pair = _key_pair(key)
    noise = NoiseTransport(key_pair, noise_privkey=create_new_x25519_key_pair().private_key)
    try:
        host = new_host(
            key_pair=key_pair,
            sec_opt={TProtocol(NOISE_PROTOCOL_ID): noise},
            muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): _GfspYamux},
            listen_addrs=[listen_maddr],
            connection_config=ConnectionConfig(max_connections_per_peer=1),
        )
    except (BaseLibp2pError, ValueError, TypeError) as exc:
        raise ProtocolError(f"cannot create a host for {listen!r}: {exc}") from exc
    # py-libp2p runs identify on every new connection, both ends (in system tasks outside any
    # nursery; a signed peer record each way): ~10 ms of CPU per connection, of no use to us
    # (the SP registry is our source of addresses and keys). We still answer a peer's identify.
    host._schedule_identify = _no_identify
    _skip_stream_notifications(host.get_network())
    # py-libp2p's own resource manager (made by default: a lock, a base58 parse and metrics
    # per stream) is replaced by the node's limiter in the handlers and max_inbound_streams
    host.get_network().set_resource_manager(None)
    p2p = P2PHost(host, connect_timeout=connect_timeout, handlers=handlers,
                  max_inbound_streams=max_inbound_streams,
                  max_inbound_per_peer=max_inbound_per_peer, admit=admit)
    host.get_network().set_stream_handler(p2p._inbound)

    started = False
    try:
        async with host.run(listen_addrs=[listen_maddr]):
            try:
                if not host.get_transport_addrs():
                    raise ListenError(f"host is not listening on {listen}")
                started = True
                yield p2p
            finally:
                p2p._cancel_handlers()
                with trio.move_on_after(_HOST_CLOSE_TIMEOUT) as scope:
                    scope.shield = True
                    try:
                        await host.close()
                    except BaseExceptionGroup as group:
                        log.debug("p2p: closing the host: %r", group)
                    except _IO_ERRORS as exc:
                        log.debug("p2p: closing the host: %r", exc)
                if scope.cancelled_caught:
                    log.warning("p2p: closing the host took more than %ss", _HOST_CLOSE_TIMEOUT)
    except BaseExceptionGroup as group:
        _unwrap_group(group)
    except GfspError:
        raise
    except Exception as exc:
        if started and not isinstance(exc, BaseLibp2pError):
            raise  # the body's own exception
        raise P2PError(f"cannot listen on {listen}: {exc!r}") from exc
