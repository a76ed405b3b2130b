"""Host names as requests and endpoints give them, compared as (host name, port).

``parse_host("Example.com:9033")`` is ``("example.com", 9033)``; the web's default ports (80,
443) count as no port, whatever the scheme: behind a TLS-terminating proxy the node sees http
while the name is https's, so ``"sp.example"``, ``"sp.example:443"`` and
``"https://sp.example"`` are one name.
"""

from __future__ import annotations

from urllib.parse import urlsplit

Name = tuple[str, int | None]

_DEFAULT_PORTS = (80, 443)


def parse_host(value: str) -> Name | None:
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
    if port in _DEFAULT_PORTS:
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
    if port in _DEFAULT_PORTS:
        port = None
    return parts.hostname.lower(), port
