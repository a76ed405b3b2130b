"""The node's shared resource limiter: a libp2p-style resource manager (the seed's ``rcmgr``).

Scopes form a chain ``span -> service -> system``:

- one **system** scope for the whole node;
- one **service** scope per modular, created lazily the first time its name is used;
- one **span** scope per task, short-lived, opened with :meth:`ResourceLimiter.span`.

Every reservation made in a span is all-or-nothing over the whole chain: each scope is checked
first and only then is the amount added to all of them. If any scope would go over its
:class:`Limit`, :class:`~node.errors.ResourceLimitExceeded` is raised naming that scope
(``"system"``, ``"service:p2p"``, ``"span:service:p2p/3"``) and the resource, and nothing changes.
Releasing is the mirror image and never fails for amounts the span actually holds.

Resources are memory (bytes), tasks (in total and by priority level: high, medium, low), inbound
and outbound connections, and file descriptors. A task reserved at some priority counts toward
both ``tasks`` and its level's field.

trio runs every task on one thread and every method here is synchronous (no checkpoints), so a
check-then-add is atomic with respect to other trio tasks: no locks are needed. Typical use::

    async with limiter.span("uploader", memory=len(payload), task_priority=200) as span:
        span.add_fd()
        ...

A span releases everything it holds when its ``with`` / ``async with`` block exits, on every path
(normal exit, exception, ``trio.Cancelled``), or when :meth:`Span.done` is called.
"""

from __future__ import annotations

import dataclasses
import enum
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self

from node.errors import ResourceLimitExceeded

__all__ = [
    "RESOURCES",
    "UNLIMITED",
    "Direction",
    "Limit",
    "Priority",
    "ResourceLimiter",
    "Span",
    "Usage",
    "priority_level",
]

#: The resource names, in the order they are checked and reported.
RESOURCES: tuple[str, ...] = (
    "memory",
    "tasks",
    "tasks_high",
    "tasks_medium",
    "tasks_low",
    "conns_inbound",
    "conns_outbound",
    "fds",
)

#: The value :meth:`Limit.unlimited` uses for every field (large, but still a plain ``int``).
UNLIMITED: int = sys.maxsize

Direction = Literal["inbound", "outbound"]


class Priority(enum.IntEnum):
    """A task priority level; tasks are limited per level as well as in total."""

    LOW = 0
    MEDIUM = 1
    HIGH = 2

    @property
    def resource(self) -> str:
        """The name of the :class:`Limit` field that counts tasks of this level."""
        return f"tasks_{self.name.lower()}"


def priority_level(p: int) -> Priority:
    """Map a 0..255 task priority to its level: 0..84 LOW, 85..169 MEDIUM, 170..255 HIGH.

    Raises :class:`ValueError` for anything outside 0..255 (and :class:`TypeError` for non-ints).
    """
    if isinstance(p, bool) or not isinstance(p, int):
        raise TypeError(f"task priority must be an int, got {type(p).__name__}")
    if not 0 <= p <= 255:
        raise ValueError(f"task priority must be in 0..255, got {p}")
    if p < 85:
        return Priority.LOW
    if p < 170:
        return Priority.MEDIUM
    return Priority.HIGH


def _check_amount(name: str, value: object) -> int:
    """Return ``value`` if it is a non-negative int, else raise TypeError / ValueError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


@dataclass(frozen=True, slots=True)
class Limit:
    """Upper bounds for one scope (or, from :meth:`ResourceLimiter.remaining`, what is left).

    All fields are ints >= 0; a field left at its default is 0, i.e. nothing of that resource
    may be reserved. Use :meth:`unlimited` for "no bound".
    """

    memory: int = 0
    tasks: int = 0
    tasks_high: int = 0
    tasks_medium: int = 0
    tasks_low: int = 0
    conns_inbound: int = 0
    conns_outbound: int = 0
    fds: int = 0

    def __post_init__(self) -> None:
        for name in RESOURCES:
            _check_amount(f"Limit.{name}", getattr(self, name))

    @classmethod
    def unlimited(cls) -> Limit:
        """A limit that never refuses anything (every field is :data:`UNLIMITED`)."""
        return cls(**dict.fromkeys(RESOURCES, UNLIMITED))

    @classmethod
    def from_mapping(cls, values: Mapping[str, int]) -> Limit:
        """Build a limit from a mapping (e.g. a config table); unknown keys are a ValueError."""
        unknown = set(values) - set(RESOURCES)
        if unknown:
            raise ValueError(f"unknown resource(s) in limit: {', '.join(sorted(unknown))}")
        return cls(**dict(values))

    def as_dict(self) -> dict[str, int]:
        """The fields as a plain ``{resource: int}`` dict, in :data:`RESOURCES` order."""
        return {name: getattr(self, name) for name in RESOURCES}

    def min(self, other: Limit) -> Limit:
        """Field-wise minimum of two limits."""
        return Limit(**{n: min(getattr(self, n), getattr(other, n)) for n in RESOURCES})

    def covers(self, need: Limit | Usage) -> bool:
        """True if every field of ``need`` is <= the same field here (``need`` fits)."""
        return all(getattr(need, n) <= getattr(self, n) for n in RESOURCES)


@dataclass(slots=True)
class Usage:
    """The mutable usage record of one scope (same fields as :class:`Limit`)."""

    memory: int = 0
    tasks: int = 0
    tasks_high: int = 0
    tasks_medium: int = 0
    tasks_low: int = 0
    conns_inbound: int = 0
    conns_outbound: int = 0
    fds: int = 0

    def as_dict(self) -> dict[str, int]:
        """The fields as a plain ``{resource: int}`` dict, in :data:`RESOURCES` order."""
        return {name: getattr(self, name) for name in RESOURCES}

    def copy(self) -> Usage:
        """An independent snapshot of this record."""
        return dataclasses.replace(self)

    def is_zero(self) -> bool:
        """True if nothing at all is in use."""
        return all(getattr(self, n) == 0 for n in RESOURCES)


class _Scope:
    """One node of the scope chain: a name, a limit, a usage record and a parent."""

    __slots__ = ("limit", "name", "parent", "used")

    def __init__(self, name: str, limit: Limit, parent: _Scope | None) -> None:
        self.name = name
        self.limit = limit
        self.parent = parent
        self.used = Usage()

    def chain(self) -> Iterator[_Scope]:
        """This scope, then each ancestor up to the system scope."""
        scope: _Scope | None = self
        while scope is not None:
            yield scope
            scope = scope.parent

    def reserve(self, delta: Mapping[str, int]) -> None:
        """Add ``delta`` to this scope and every ancestor, all-or-nothing."""
        chain = list(self.chain())
        for scope in chain:
            for resource, amount in delta.items():
                used = getattr(scope.used, resource)
                limit = getattr(scope.limit, resource)
                if amount > limit - used:
                    raise ResourceLimitExceeded(scope.name, resource, amount, used, limit)
        for scope in chain:
            for resource, amount in delta.items():
                setattr(scope.used, resource, getattr(scope.used, resource) + amount)

    def release(self, delta: Mapping[str, int]) -> None:
        """Subtract ``delta`` from this scope and every ancestor, all-or-nothing.

        Raises :class:`ValueError` (changing nothing) if this scope does not hold that much.
        """
        for resource, amount in delta.items():
            held = getattr(self.used, resource)
            if amount > held:
                raise ValueError(
                    f"cannot release {amount} {resource} from scope {self.name!r}: holds {held}"
                )
        for scope in self.chain():
            for resource, amount in delta.items():
                setattr(scope.used, resource, getattr(scope.used, resource) - amount)

    def stats(self) -> dict[str, dict[str, int]]:
        return {"limit": self.limit.as_dict(), "used": self.used.as_dict()}


class Span:
    """A short-lived scope for one task; create it with :meth:`ResourceLimiter.span`.

    Usable as ``with span:`` or ``async with span:``; leaving the block calls :meth:`done`, which
    releases everything the span still holds. Every reserve method is all-or-nothing across
    span -> service -> system and raises :class:`~node.errors.ResourceLimitExceeded` on refusal.
    Calling a reserve method after :meth:`done` raises :class:`RuntimeError`.
    """

    __slots__ = ("_done", "_scope", "service")

    def __init__(self, scope: _Scope, service: str) -> None:
        self._scope = scope
        self._done = False
        self.service = service

    # -- identity / inspection -------------------------------------------------------------

    @property
    def name(self) -> str:
        """The scope name, e.g. ``"span:service:p2p/3"``."""
        return self._scope.name

    @property
    def closed(self) -> bool:
        """True once :meth:`done` has run."""
        return self._done

    def stat(self) -> Usage:
        """A snapshot of what this span currently holds."""
        return self._scope.used.copy()

    def __repr__(self) -> str:
        state = "done" if self._done else repr(self._scope.used)
        return f"<Span {self.name} {state}>"

    # -- reservations ----------------------------------------------------------------------

    def _reserve(self, delta: Mapping[str, int]) -> None:
        if self._done:
            raise RuntimeError(f"span {self.name!r} is done; it cannot reserve any more")
        delta = {r: a for r, a in delta.items() if a}
        if delta:
            self._scope.reserve(delta)

    def _release(self, delta: Mapping[str, int]) -> None:
        if self._done:
            raise RuntimeError(f"span {self.name!r} is done; it holds nothing")
        delta = {r: a for r, a in delta.items() if a}
        if delta:
            self._scope.release(delta)

    def reserve_memory(self, n: int) -> None:
        """Reserve ``n`` more bytes of memory."""
        self._reserve({"memory": _check_amount("memory", n)})

    def release_memory(self, n: int) -> None:
        """Give back ``n`` bytes (ValueError if the span holds fewer)."""
        self._release({"memory": _check_amount("memory", n)})

    def add_conn(self, direction: Direction) -> None:
        """Reserve one connection in ``direction`` ("inbound" or "outbound")."""
        self._reserve({_conn_resource(direction): 1})

    def remove_conn(self, direction: Direction) -> None:
        """Give back one connection in ``direction``."""
        self._release({_conn_resource(direction): 1})

    def add_fd(self) -> None:
        """Reserve one file descriptor."""
        self._reserve({"fds": 1})

    def remove_fd(self) -> None:
        """Give back one file descriptor."""
        self._release({"fds": 1})

    def add_task(self, priority: int) -> None:
        """Reserve one task at a 0..255 priority (counts toward ``tasks`` and its level)."""
        self._reserve({"tasks": 1, priority_level(priority).resource: 1})

    def remove_task(self, priority: int) -> None:
        """Give back one task at a 0..255 priority."""
        self._release({"tasks": 1, priority_level(priority).resource: 1})

    def done(self) -> None:
        """Release everything this span holds. Idempotent; the span is unusable afterwards."""
        if self._done:
            return
        held = {r: a for r, a in self._scope.used.as_dict().items() if a}
        if held:
            self._scope.release(held)
        self._done = True

    # -- context managers ------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.done()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.done()


def _conn_resource(direction: object) -> str:
    if direction == "inbound":
        return "conns_inbound"
    if direction == "outbound":
        return "conns_outbound"
    raise ValueError(f"connection direction must be 'inbound' or 'outbound', got {direction!r}")


class ResourceLimiter:
    """The node-wide resource manager shared by every modular.

    ``system`` bounds the whole node; each service (modular) gets its own scope bounded by
    ``services[name]`` if present, else ``service_default``. Service scopes are created lazily
    (those named in ``services`` exist from the start, so they show up in :meth:`stats`).
    """

    def __init__(
        self,
        system: Limit,
        service_default: Limit,
        services: Mapping[str, Limit] | None = None,
    ) -> None:
        self._system = _Scope("system", system, None)
        self._service_default = service_default
        self._service_limits: dict[str, Limit] = dict(services or {})
        self._services: dict[str, _Scope] = {}
        self._next_span_id = 0
        for name in self._service_limits:
            self._services[name] = self._service(name)

    def _service_limit(self, name: str) -> Limit:
        return self._service_limits.get(name, self._service_default)

    def _service(self, name: str) -> _Scope:
        """The scope of service ``name``; a new one is not registered (see :meth:`span`)."""
        scope = self._services.get(name)
        if scope is None:
            if not isinstance(name, str) or not name:
                raise ValueError(f"service name must be a non-empty str, got {name!r}")
            scope = _Scope(f"service:{name}", self._service_limit(name), self._system)
        return scope

    def span(
        self,
        service: str,
        *,
        memory: int = 0,
        task_priority: int | None = None,
        conns_inbound: int = 0,
        conns_outbound: int = 0,
        fds: int = 0,
    ) -> Span:
        """Open a span under ``service`` holding the given initial amounts.

        ``task_priority`` (0..255), if given, reserves one task at that priority. Raises
        :class:`~node.errors.ResourceLimitExceeded` (and reserves nothing) if they don't fit.
        """
        delta = {
            "memory": _check_amount("memory", memory),
            "conns_inbound": _check_amount("conns_inbound", conns_inbound),
            "conns_outbound": _check_amount("conns_outbound", conns_outbound),
            "fds": _check_amount("fds", fds),
        }
        if task_priority is not None:
            delta["tasks"] = 1
            delta[priority_level(task_priority).resource] = 1
        parent = self._service(service)
        self._next_span_id += 1
        scope = _Scope(f"span:{parent.name}/{self._next_span_id}", Limit.unlimited(), parent)
        span = Span(scope, service)
        span._reserve(delta)
        # Register a new service scope only once something fit, so a refusal changes nothing.
        self._services.setdefault(service, parent)
        return span

    def remaining(self, service: str | None = None) -> Limit:
        """What can still be reserved: for a service, the field-wise min over service and system;
        for ``None``, the system scope alone."""
        system = self._system
        left = {n: getattr(system.limit, n) - getattr(system.used, n) for n in RESOURCES}
        if service is not None:
            scope = self._services.get(service)
            limit = scope.limit if scope is not None else self._service_limit(service)
            used = scope.used if scope is not None else Usage()
            for n in RESOURCES:
                left[n] = min(left[n], getattr(limit, n) - getattr(used, n))
        return Limit(**left)

    def used(self, service: str | None = None) -> Usage:
        """A snapshot of the usage of one service scope (or of the system scope for ``None``)."""
        if service is None:
            return self._system.used.copy()
        scope = self._services.get(service)
        return scope.used.copy() if scope is not None else Usage()

    def stats(self) -> dict[str, dict[str, dict[str, int]]]:
        """``{"system": {"limit": {...}, "used": {...}}, "service:NAME": {...}, ...}``."""
        out = {"system": self._system.stats()}
        for scope in self._services.values():
            out[scope.name] = scope.stats()
        return out
