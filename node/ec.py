"""Erasure coding of segments (Reed-Solomon, systematic) and the object checksums built on it.

Behind this one module: zfec (C core). A segment of ``n`` bytes is cut into ``k`` data pieces of
``piece_size(n) = ceil(n / k)`` bytes (the last one zero-padded), and ``m`` parity pieces of the
same size are computed; piece ``i`` of every segment goes to secondary ``i``. zfec is
systematic: the data pieces are the segment's own bytes, so a reader holding pieces
``0..k-1`` needs no decoding. (pyeclib's fragments carry an 80-byte header and measured no
faster here; bench/data.py compares both.)

Checksums, as the chain stores them for an object (ARCHITECTURE §4, devchain README):
``checksums[0]`` is the primary's integrity hash, SHA-256 over the SHA-256 of every segment;
``checksums[1 + i]`` is secondary ``i``'s, SHA-256 over the SHA-256 of its piece of every
segment. A 0-byte object has no segments: every checksum is SHA-256 of nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence

import zfec


def piece_size(segment_len: int, data_shards: int) -> int:
    return -(-segment_len // data_shards)


class Codec:
    """A ``k`` data + ``m`` parity Reed-Solomon code (thread-safe: zfec releases the GIL)."""

    def __init__(self, data_shards: int, parity_shards: int) -> None:
        if data_shards < 1 or parity_shards < 0 or data_shards + parity_shards > 256:
            raise ValueError(f"bad shard counts {data_shards}+{parity_shards}")
        self.k = data_shards
        self.m = parity_shards
        self._encoder = zfec.Encoder(self.k, self.k + self.m)

    def encode_blocks(self, blocks: Sequence[bytes | memoryview]
                      ) -> list[bytes | memoryview]:
        """The ``k + m`` pieces of a segment given as its ``k`` data pieces (each
        ``piece_size`` bytes, the last zero-padded; any buffers): the data pieces themselves,
        the same objects (the code is systematic), then the ``m`` parity pieces (bytes)."""
        if len(blocks) != self.k:
            raise ValueError(f"need {self.k} data pieces, have {len(blocks)}")
        if len({len(b) for b in blocks}) > 1:
            raise ValueError("the data pieces differ in size")
        return list(self._encoder.encode(list(blocks)))

    def encode(self, segment: bytes | memoryview) -> list[bytes]:
        """The ``k + m`` pieces of one segment."""
        size = piece_size(len(segment), self.k)
        view = memoryview(segment)
        blocks = [bytes(view[i * size:(i + 1) * size]).ljust(size, b"\0")
                  for i in range(self.k)]
        return list(self._encoder.encode(blocks))

    def data_pieces(self, pieces: Mapping[int, bytes | memoryview]
                    ) -> Sequence[bytes | memoryview]:
        """The ``k`` data pieces, from any ``k`` pieces (index -> any buffer): given ones as
        they are, missing ones computed."""
        if len(pieces) < self.k:
            raise ValueError(f"need {self.k} pieces, have {len(pieces)}")
        chosen = sorted(pieces)[: self.k]
        if chosen == list(range(self.k)):
            return [pieces[i] for i in chosen]
        return list(zfec.Decoder(self.k, self.k + self.m).decode(
            [pieces[i] for i in chosen], chosen))

    def decode(self, pieces: Mapping[int, bytes | memoryview], segment_len: int) -> bytes:
        """The segment from any ``k`` pieces (index -> any buffer)."""
        return b"".join(self.data_pieces(pieces))[:segment_len]

    def decode_into(self, pieces: Mapping[int, bytes | memoryview], out: memoryview) -> None:
        """Write the segment of ``len(out)`` bytes rebuilt from any ``k`` pieces into
        ``out`` (no segment-sized allocation: only missing data pieces are computed)."""
        data = self.data_pieces(pieces)
        at = 0
        for block in data:
            n = min(len(block), len(out) - at)
            with memoryview(block) as view:
                out[at:at + n] = view[:n]
            at += n
        if at != len(out):
            raise ValueError(f"{self.k} pieces of {len(data[0])} bytes make no segment of "
                             f"{len(out)} bytes")


def sha256(data: bytes | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


def integrity_hash(checksums: Iterable[bytes]) -> bytes:
    """SHA-256 over concatenated checksums (of segments, or of one index's pieces)."""
    h = hashlib.sha256()
    for c in checksums:
        h.update(c)
    return h.digest()


class ChecksumBuilder:
    """Feed segments in order; :meth:`result` gives the object's 1 + k + m checksums."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.segment_hashes: list[bytes] = []
        self.piece_hashes: list[list[bytes]] = [[] for _ in range(codec.k + codec.m)]

    def add_segment(self, segment: bytes) -> list[bytes]:
        """Hash one segment and its pieces; returns the pieces (for the caller to send)."""
        self.segment_hashes.append(sha256(segment))
        pieces = self.codec.encode(segment)
        for i, piece in enumerate(pieces):
            self.piece_hashes[i].append(sha256(piece))
        return pieces

    def result(self) -> list[bytes]:
        return [integrity_hash(self.segment_hashes),
                *(integrity_hash(h) for h in self.piece_hashes)]


def object_checksums(segments: Iterable[bytes], data_shards: int, parity_shards: int
                     ) -> list[bytes]:
    """The chain checksums of an object given as its segments in order."""
    builder = ChecksumBuilder(Codec(data_shards, parity_shards))
    for segment in segments:
        builder.add_segment(segment)
    return builder.result()


def split(data: bytes, segment_size: int) -> Sequence[bytes]:
    """An in-memory object cut into segments (tests and small objects)."""
    return [data[i:i + segment_size] for i in range(0, len(data), segment_size)]
