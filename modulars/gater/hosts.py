"""Which ``Host`` values name this SP: a signed request is bound to the host it was signed for.

Every signature covers the request's ``host`` header (node/auth.py). Without this check, a
request signed for one SP could be replayed, unchanged, at another (each SP keeps its own
replay cache), and that SP would act on it as if its signer had asked it. So once a
signature verifies, its ``host`` must be one of this SP's names, else 421
``MisdirectedRequest``:

- the address the gater is bound to (``http://127.0.0.1:43117`` when ``gater.listen`` has
  port 0), and ``localhost`` with its port when that address is a loopback one;
- the endpoint this SP is registered with in the SP registry (the chain): the name clients
  and other SPs use, also behind a reverse proxy;
- ``gater.hosts``: further names an operator serves the node under.

A name is compared as (host name in lower case, port); port 80 or 443 counts as no port (see
:mod:`node.hostnames`), as does a ``Host`` header without one.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Iterable

from node.errors import ServiceError
from node.hostnames import Name, endpoint_name, parse_host


class MisdirectedRequest(ServiceError):
    def __init__(self, host: str) -> None:
        super().__init__("MisdirectedRequest", f"the request was signed for host {host!r}, "
                         "which is not this SP", 421)


class HostCheck:
    """This SP's names: ``configured`` ones, the bound endpoint once :meth:`bind` is called,
    and the endpoint ``registered`` returns (asked only when the others do not match)."""

    def __init__(self, configured: Iterable[str],
                 registered: Callable[[], Awaitable[str | None]] | None = None) -> None:
        self._names: set[Name] = set()
        for value in configured:
            name = parse_host(value)
            if name is None:
                raise ValueError(f"not a host[:port]: {value!r}")
            self._names.add(name)
        self._registered = registered

    def bind(self, endpoint: str) -> None:
        """Add the bound ``endpoint``'s name; a loopback one also as ``localhost``."""
        name = endpoint_name(endpoint)
        if name is None:
            return
        self._names.add(name)
        try:
            loopback = ipaddress.ip_address(name[0]).is_loopback
        except ValueError:
            loopback = False
        if loopback:
            self._names.add(("localhost", name[1]))

    async def check(self, host: str) -> None:
        """Return when ``host`` (a request's ``Host`` header) names this SP, else raise
        :class:`MisdirectedRequest`."""
        name = parse_host(host)
        if name is not None:
            if name in self._names:
                return
            if self._registered is not None:
                endpoint = await self._registered()
                if endpoint is not None and endpoint_name(endpoint) == name:
                    return
        raise MisdirectedRequest(host)
