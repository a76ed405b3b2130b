"""Host names as requests and endpoints give them (node/hostnames.py)."""

from __future__ import annotations

import pytest

from node.hostnames import endpoint_name, parse_host


@pytest.mark.parametrize(("value", "name"), [
    ("127.0.0.1:9033", ("127.0.0.1", 9033)),
    ("SP.Example", ("sp.example", None)),
    ("sp.example:80", ("sp.example", None)),
    ("sp.example:443", ("sp.example", None)),  # found in review: behind a TLS proxy, 443
    ("[::1]:9033", ("::1", 9033)),             # came as an http Host and matched nothing
    ("[::1]", ("::1", None)),
])
def test_parse_host(value: str, name: tuple[str, int | None]) -> None:
    assert parse_host(value) == name


@pytest.mark.parametrize("value", ["", "sp.example:99999", "sp.example:x", "[::1",
                                   "http://sp.example", "sp.example/x", "user@sp.example",
                                   "a b", ":9033"])
def test_parse_host_refuses(value: str) -> None:
    assert parse_host(value) is None


@pytest.mark.parametrize(("endpoint", "name"), [
    ("http://127.0.0.1:9033", ("127.0.0.1", 9033)),
    ("https://SP.example:443/", ("sp.example", None)),
    ("http://sp.example:80", ("sp.example", None)),
    ("https://sp.example:80", ("sp.example", None)),
    ("http://[::1]:1", ("::1", 1)),
    ("sp.example", None),
    ("http://sp.example:99999", None),
])
def test_endpoint_name(endpoint: str, name: tuple[str, int | None] | None) -> None:
    assert endpoint_name(endpoint) == name
