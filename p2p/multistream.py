"""multistream-select 1.0.0, the protocol negotiation that opens every libp2p stream: pure logic.

No I/O here (the trio/libp2p side is :mod:`p2p.host`). A message is an unsigned-varint length,
then that many bytes: the UTF-8 text and a final ``"\\n"``. Both sides first send the header
``/multistream/1.0.0``; the dialer then proposes a protocol id, which the listener echoes when it
speaks it and answers ``na`` otherwise.

What we do differently from py-libp2p (same bytes on the wire, fewer frames and round trips):

* our dialer is *lazy* (as go-libp2p's): it sends the header, the protocol id and its request
  frame in one write, and checks both echoes when it reads the answer;
* our listener reads before it writes: when the dialer's proposal is already in hand it answers
  the header and the echo in one write, and when the request came along too it holds the
  echo back to send it with the response. A non-lazy dialer (py-libp2p's) waits for our header
  before proposing, so a proposal not yet in hand gets the header at once: never a deadlock.
"""

from __future__ import annotations

__all__ = [
    "HEADER",
    "MAX_LINE",
    "NA",
    "NegotiationError",
    "dialer_prefix",
    "encode_line",
    "has_line",
    "take_line",
]

HEADER = "/multistream/1.0.0"
NA = "na"
#: Longest message we accept (a protocol id is a short path; py-libp2p allows 64 KiB).
MAX_LINE = 1024
_MAX_VARINT_BYTES = 2  # enough for MAX_LINE + 1 < 2**14


class NegotiationError(ValueError):
    """The peer broke multistream-select (bad header, bad framing, too long a message)."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_line(text: str) -> bytes:
    """One multistream message: varint length, the text, ``\\n``."""
    body = text.encode() + b"\n"
    if len(body) > MAX_LINE:
        raise NegotiationError(f"multistream message longer than {MAX_LINE} bytes")
    return _varint(len(body)) + body


def dialer_prefix(protocol: str) -> bytes:
    """What a lazy dialer sends before its first frame: the header and its proposal."""
    return encode_line(HEADER) + encode_line(protocol)


def _parse(buf: bytearray) -> tuple[str, int] | None:
    """The first whole message of ``buf`` and the bytes it takes, or None if incomplete."""
    length = 0
    for i in range(min(len(buf), _MAX_VARINT_BYTES + 1)):
        byte = buf[i]
        length |= (byte & 0x7F) << (7 * i)
        if byte & 0x80:
            if i >= _MAX_VARINT_BYTES:
                raise NegotiationError("multistream length prefix too long")
            continue
        if length > MAX_LINE:
            raise NegotiationError(f"multistream message of {length} bytes (max {MAX_LINE})")
        start = i + 1
        if len(buf) < start + length:
            return None
        body = bytes(buf[start:start + length])
        if not body.endswith(b"\n"):
            raise NegotiationError("multistream message without its final newline")
        try:
            return body[:-1].decode(), start + length
        except UnicodeDecodeError as exc:
            raise NegotiationError(f"multistream message is not UTF-8: {exc}") from None
    return None


def has_line(buf: bytearray) -> bool:
    """True when ``buf`` starts with a whole message (NegotiationError if it is malformed)."""
    return _parse(buf) is not None


def take_line(buf: bytearray) -> str | None:
    """Remove one whole message from the front of ``buf`` and return its text.

    None when ``buf`` does not hold a whole message yet (``buf`` untouched). Raises
    NegotiationError for a message over :data:`MAX_LINE`, one without the final newline, or
    text that is not UTF-8.
    """
    parsed = _parse(buf)
    if parsed is None:
        return None
    text, used = parsed
    del buf[:used]
    return text
