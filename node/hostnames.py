"""Host names as requests and endpoints give them, compared as (host name, port).

``parse_host("Example.com:9033")`` is ``("example.com", 9033)``; a port that is its scheme's
default (80 for http, 443 for https) counts as no port, so ``"sp.example"`` and
``"https://sp.example"`` (from a TLS-terminating proxy's point of view) are one name.
"""

from __future__ import annotations

from urllib.parse import urlsplit

Name = tuple[str, int | None]

_DEFAULT_PORTS = {"http": 80, "https": 443}


def parse_host(value: str, scheme: str = "http") -> Name | None:
    """``"Example.com:9033"`` -> ``("example.com", 9033)``; ``"[::1]"`` -> ``("::1", None)``;
    None when it is not a host[:port]."""
    value = value.strip().lower()
    if not value or any(c in value for c in "/?#@ \t"):
        return None
    try:
        parts = urlsplit(f"//{value}")
        port = parts.port
    except ValueError:  # a port out of range or not a number, an unclosed [
        return None
    if not parts.hostname:
        return None
    if port == _DEFAULT_PORTS.get(scheme):
        port = None
    return parts.hostname, port


def endpoint_name(endpoint: str) -> Name | None:
    """The name of an endpoint URL (``"http://127.0.0.1:9033"``), None when it has none."""
    try:
        parts = urlsplit(endpoint.strip())
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    if port == _DEFAULT_PORTS.get(parts.scheme.lower()):
        port = None
    return parts.hostname.lower(), port
