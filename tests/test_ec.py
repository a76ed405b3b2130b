"""Erasure coding and object checksums (node/ec.py)."""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.ec import Codec, integrity_hash, object_checksums, piece_size, sha256, split


@settings(max_examples=40, deadline=None)
@given(data=st.binary(min_size=1, max_size=5000), k=st.integers(1, 6), m=st.integers(0, 3))
def test_any_k_pieces_give_the_segment_back(data: bytes, k: int, m: int) -> None:
    codec = Codec(k, m)
    pieces = codec.encode(data)
    assert len(pieces) == k + m
    assert all(len(p) == piece_size(len(data), k) for p in pieces)
    for chosen in itertools.islice(itertools.combinations(range(k + m), k), 10):
        assert codec.decode({i: pieces[i] for i in chosen}, len(data)) == data


def test_the_code_is_systematic() -> None:
    data = os.urandom(4096 + 3)
    pieces = Codec(4, 2).encode(data)
    assert b"".join(pieces[:4])[: len(data)] == data


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=1, max_size=3000), st.integers(1, 5), st.integers(0, 3))
def test_decode_into_writes_the_segment_from_any_k_pieces(data: bytes, k: int, m: int) -> None:
    codec = Codec(k, m)
    pieces = codec.encode(data)
    for chosen in itertools.islice(itertools.combinations(range(k + m), k), 6):
        out = bytearray(b"\xee" * len(data))  # old bytes never show through
        with memoryview(out) as view:  # pieces given as views, as the downloader has them
            codec.decode_into({i: memoryview(pieces[i]) for i in chosen}, view)
        assert bytes(out) == data


def test_decode_into_refuses_a_segment_the_pieces_cannot_fill() -> None:
    codec = Codec(4, 2)
    pieces = codec.encode(b"x" * 100)  # 4 pieces of 25 bytes
    with pytest.raises(ValueError, match="make no segment of 101 bytes"):
        codec.decode_into(dict(enumerate(pieces[:4])), memoryview(bytearray(101)))
    with pytest.raises(ValueError, match="need 4 pieces"):
        codec.decode_into({0: pieces[0]}, memoryview(bytearray(100)))


def test_too_few_pieces_is_an_error() -> None:
    codec = Codec(4, 2)
    pieces = codec.encode(b"x" * 100)
    with pytest.raises(ValueError):
        codec.decode({0: pieces[0], 5: pieces[5]}, 100)


def test_checksums_follow_the_documented_layout() -> None:
    data = os.urandom(2500)
    segments = split(data, 1000)
    assert [len(s) for s in segments] == [1000, 1000, 500]
    sums = object_checksums(segments, 2, 1)
    assert len(sums) == 4
    assert sums[0] == integrity_hash(sha256(s) for s in segments)
    codec = Codec(2, 1)
    for i in range(3):
        assert sums[1 + i] == integrity_hash(sha256(codec.encode(s)[i]) for s in segments)


def test_empty_object_checksums() -> None:
    assert object_checksums([], 4, 2) == [sha256(b"")] * 7


def test_bad_shard_counts() -> None:
    with pytest.raises(ValueError):
        Codec(0, 1)


@pytest.mark.parametrize("size", [1, 4096, 4 * 1024 + 3, 65536])
def test_encode_blocks_is_encode_of_the_segment(size: int) -> None:
    codec = Codec(4, 2)
    segment = os.urandom(size)
    n = piece_size(size, 4)
    blocks = [segment[i * n:(i + 1) * n].ljust(n, b"\0") for i in range(4)]
    pieces = codec.encode_blocks(blocks)
    assert pieces == codec.encode(segment)
    assert pieces[:4] == blocks  # systematic: the data pieces come back as given
    with pytest.raises(ValueError):
        codec.encode_blocks(blocks[:3])
    with pytest.raises(ValueError):
        codec.encode_blocks([*blocks[:3], blocks[3] + b"x"])
