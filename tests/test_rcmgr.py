"""Tests for node.rcmgr: the scope chain, all-or-nothing reservations, release on every path."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import trio
import trio.lowlevel
import trio.testing
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from node.errors import ResourceLimitExceeded
from node.rcmgr import (
    RESOURCES,
    Limit,
    Priority,
    ResourceLimiter,
    Span,
    Usage,
    priority_level,
)

SYSTEM = Limit(
    memory=1000,
    tasks=6,
    tasks_high=2,
    tasks_medium=3,
    tasks_low=4,
    conns_inbound=5,
    conns_outbound=5,
    fds=6,
)
SERVICE_DEFAULT = Limit(
    memory=500,
    tasks=3,
    tasks_high=1,
    tasks_medium=2,
    tasks_low=2,
    conns_inbound=3,
    conns_outbound=2,
    fds=3,
)
SERVICE_A = Limit(
    memory=700,
    tasks=4,
    tasks_high=2,
    tasks_medium=2,
    tasks_low=3,
    conns_inbound=4,
    conns_outbound=4,
    fds=4,
)
SERVICES = ("a", "b", "c")


def make_limiter() -> ResourceLimiter:
    return ResourceLimiter(SYSTEM, SERVICE_DEFAULT, {"a": SERVICE_A})


def snapshot(limiter: ResourceLimiter, spans: list[Span]) -> tuple[object, ...]:
    return (limiter.stats(), [s.stat() for s in spans])


def add(total: dict[str, int], usage: dict[str, int]) -> None:
    for k, v in usage.items():
        total[k] += v


# ----------------------------------------------------------------------------------------------
# Stateful property test
# ----------------------------------------------------------------------------------------------


class LimiterMachine(RuleBasedStateMachine):
    """Random opens/closes/reservations over three services against small limits."""

    def __init__(self) -> None:
        super().__init__()
        self.limiter = make_limiter()
        self.spans: list[Span] = []
        self.tasks: dict[int, list[int]] = {}  # id(span) -> priorities held
        self.refusals = 0

    # -- helpers ---------------------------------------------------------------------------

    def attempt(self, action: Callable[[], object]) -> bool:
        """Run ``action``; on ResourceLimitExceeded assert nothing changed and return False."""
        before = snapshot(self.limiter, self.spans)
        try:
            action()
        except ResourceLimitExceeded as err:
            self.refusals += 1
            event(f"refused {err.scope.split(':')[0]} {err.resource}")
            assert snapshot(self.limiter, self.spans) == before
            assert err.resource in RESOURCES
            assert err.scope == "system" or err.scope.startswith("service:")
            assert err.requested > err.limit - err.used
            return False
        return True

    # -- rules -----------------------------------------------------------------------------

    @rule(
        service=st.sampled_from(SERVICES),
        memory=st.integers(0, 400),
        prio=st.none() | st.integers(0, 255),
        cin=st.integers(0, 2),
        cout=st.integers(0, 2),
        fds=st.integers(0, 2),
    )
    def open_span(
        self, service: str, memory: int, prio: int | None, cin: int, cout: int, fds: int
    ) -> None:
        result: list[Span] = []

        def go() -> None:
            result.append(
                self.limiter.span(
                    service,
                    memory=memory,
                    task_priority=prio,
                    conns_inbound=cin,
                    conns_outbound=cout,
                    fds=fds,
                )
            )

        if self.attempt(go):
            span = result[0]
            self.spans.append(span)
            self.tasks[id(span)] = [] if prio is None else [prio]
            stat = span.stat()
            assert (stat.memory, stat.conns_inbound, stat.conns_outbound, stat.fds) == (
                memory,
                cin,
                cout,
                fds,
            )
            assert stat.tasks == (prio is not None)

    @precondition(lambda self: self.spans)
    @rule(data=st.data(), how=st.sampled_from(["done", "exit", "twice"]))
    def close_span(self, data: st.DataObject, how: str) -> None:
        span = self.spans.pop(data.draw(st.integers(0, len(self.spans) - 1)))
        del self.tasks[id(span)]
        if how == "exit":
            with span:
                pass
        else:
            span.done()
            if how == "twice":
                span.done()
        assert span.closed
        assert span.stat().is_zero()
        with pytest.raises(RuntimeError):
            span.reserve_memory(1)

    @precondition(lambda self: self.spans)
    @rule(data=st.data(), n=st.integers(0, 400))
    def reserve_memory(self, data: st.DataObject, n: int) -> None:
        span = data.draw(st.sampled_from(self.spans))
        before = span.stat().memory
        if self.attempt(lambda: span.reserve_memory(n)):
            assert span.stat().memory == before + n

    @precondition(lambda self: self.spans)
    @rule(data=st.data())
    def release_memory(self, data: st.DataObject) -> None:
        span = data.draw(st.sampled_from(self.spans))
        held = span.stat().memory
        n = data.draw(st.integers(0, held + 5))
        before = snapshot(self.limiter, self.spans)
        if n > held:
            with pytest.raises(ValueError):
                span.release_memory(n)
            assert snapshot(self.limiter, self.spans) == before
        else:
            span.release_memory(n)
            assert span.stat().memory == held - n

    @precondition(lambda self: self.spans)
    @rule(data=st.data(), direction=st.sampled_from(["inbound", "outbound"]), add=st.booleans())
    def conn(self, data: st.DataObject, direction: str, add: bool) -> None:
        span = data.draw(st.sampled_from(self.spans))
        field = f"conns_{direction}"
        held = getattr(span.stat(), field)
        if add:
            if self.attempt(lambda: span.add_conn(direction)):
                assert getattr(span.stat(), field) == held + 1
        elif held:
            span.remove_conn(direction)
            assert getattr(span.stat(), field) == held - 1
        else:
            before = snapshot(self.limiter, self.spans)
            with pytest.raises(ValueError):
                span.remove_conn(direction)
            assert snapshot(self.limiter, self.spans) == before

    @precondition(lambda self: self.spans)
    @rule(data=st.data(), add=st.booleans())
    def fd(self, data: st.DataObject, add: bool) -> None:
        span = data.draw(st.sampled_from(self.spans))
        held = span.stat().fds
        if add:
            if self.attempt(span.add_fd):
                assert span.stat().fds == held + 1
        elif held:
            span.remove_fd()
            assert span.stat().fds == held - 1
        else:
            with pytest.raises(ValueError):
                span.remove_fd()

    @precondition(lambda self: self.spans)
    @rule(data=st.data(), prio=st.integers(0, 255))
    def add_task(self, data: st.DataObject, prio: int) -> None:
        span = data.draw(st.sampled_from(self.spans))
        if self.attempt(lambda: span.add_task(prio)):
            self.tasks[id(span)].append(prio)

    @precondition(lambda self: any(self.tasks.values()))
    @rule(data=st.data())
    def remove_task(self, data: st.DataObject) -> None:
        span = data.draw(st.sampled_from([s for s in self.spans if self.tasks[id(s)]]))
        held = self.tasks[id(span)]
        prio = held.pop(data.draw(st.integers(0, len(held) - 1)))
        span.remove_task(prio)

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def within_limits(self) -> None:
        for scope in self.limiter.stats().values():
            for r in RESOURCES:
                assert 0 <= scope["used"][r] <= scope["limit"][r]

    @invariant()
    def sums_match(self) -> None:
        stats = self.limiter.stats()
        services_total = dict.fromkeys(RESOURCES, 0)
        for name in SERVICES:
            key = f"service:{name}"
            spans_total = dict.fromkeys(RESOURCES, 0)
            for span in self.spans:
                if span.service == name:
                    add(spans_total, span.stat().as_dict())
            used = stats[key]["used"] if key in stats else dict.fromkeys(RESOURCES, 0)
            assert used == spans_total
            add(services_total, used)
        assert stats["system"]["used"] == services_total

    @invariant()
    def tasks_by_level(self) -> None:
        for span in self.spans:
            stat = span.stat()
            prios = self.tasks[id(span)]
            assert stat.tasks == len(prios) == stat.tasks_low + stat.tasks_medium + stat.tasks_high
            for level in Priority:
                n = sum(1 for p in prios if priority_level(p) is level)
                assert getattr(stat, level.resource) == n

    @invariant()
    def remaining_is_min_over_chain(self) -> None:
        stats = self.limiter.stats()
        sys_left = {r: stats["system"]["limit"][r] - stats["system"]["used"][r] for r in RESOURCES}
        assert self.limiter.remaining().as_dict() == sys_left
        for name in SERVICES:
            key = f"service:{name}"
            limit = SERVICE_A if name == "a" else SERVICE_DEFAULT
            used = stats[key]["used"] if key in stats else dict.fromkeys(RESOURCES, 0)
            expect = {r: min(sys_left[r], getattr(limit, r) - used[r]) for r in RESOURCES}
            assert self.limiter.remaining(name).as_dict() == expect

    def teardown(self) -> None:
        for span in self.spans:
            span.done()
        for scope in self.limiter.stats().values():
            assert all(v == 0 for v in scope["used"].values())


LimiterMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)
TestLimiterMachine = LimiterMachine.TestCase


# ----------------------------------------------------------------------------------------------
# Release on every path
# ----------------------------------------------------------------------------------------------


def all_zero(limiter: ResourceLimiter) -> bool:
    return all(all(v == 0 for v in s["used"].values()) for s in limiter.stats().values())


async def test_cancel_inside_span_releases() -> None:
    limiter = make_limiter()
    entered = trio.Event()

    async def worker() -> None:
        async with limiter.span("a", memory=300, task_priority=200, fds=1) as span:
            span.add_conn("outbound")
            entered.set()
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker)
        await entered.wait()
        assert limiter.used("a").memory == 300
        assert limiter.used().tasks_high == 1
        assert limiter.used().conns_outbound == 1
        nursery.cancel_scope.cancel()
    assert all_zero(limiter)


async def test_timeout_inside_span_releases(autojump_clock: trio.testing.MockClock) -> None:
    limiter = make_limiter()
    with trio.move_on_after(5) as cs:
        async with limiter.span("b", memory=100) as span:
            span.reserve_memory(50)
            await trio.sleep_forever()
    assert cs.cancelled_caught
    assert all_zero(limiter)


def test_exception_inside_span_releases() -> None:
    limiter = make_limiter()
    with pytest.raises(KeyError), limiter.span("c", memory=10, conns_inbound=1) as span:
        span.add_fd()
        raise KeyError("boom")
    assert span.closed
    assert all_zero(limiter)


def test_refused_span_creation_reserves_nothing() -> None:
    limiter = make_limiter()
    with pytest.raises(ResourceLimitExceeded) as info:
        # memory fits, fds don't: the memory must not stay reserved.
        limiter.span("b", memory=100, fds=SERVICE_DEFAULT.fds + 1)
    assert (info.value.scope, info.value.resource) == ("service:b", "fds")
    assert all_zero(limiter)


# ----------------------------------------------------------------------------------------------
# Concurrency
# ----------------------------------------------------------------------------------------------

N = 7
EACH = 100


async def test_many_tasks_never_over_reserve(autojump_clock: trio.testing.MockClock) -> None:
    limiter = ResourceLimiter(Limit.unlimited(), Limit(memory=N * EACH), {})
    holders = 0
    max_holders = 0
    granted = 0
    refused: list[ResourceLimitExceeded] = []
    rng = random.Random(1234)

    async def worker(delay: float, hold: float) -> None:
        nonlocal holders, max_holders, granted
        await trio.sleep(delay)
        try:
            async with limiter.span("svc", memory=EACH):
                holders += 1
                granted += 1
                max_holders = max(max_holders, holders)
                assert limiter.used("svc").memory <= N * EACH
                await trio.lowlevel.checkpoint()
                await trio.sleep(hold)
                holders -= 1
        except ResourceLimitExceeded as err:
            refused.append(err)

    async with trio.open_nursery() as nursery:
        for _ in range(200):
            nursery.start_soon(worker, rng.choice([0, 0, 0.5, 1.0]), rng.choice([0, 0.7, 2.0]))

    assert max_holders == N
    assert granted + len(refused) == 200
    assert refused
    for err in refused:
        assert (err.scope, err.resource) == ("service:svc", "memory")
        assert (err.requested, err.limit) == (EACH, N * EACH)
        assert err.used == N * EACH
    assert all_zero(limiter)


async def test_retrying_tasks_all_finish(autojump_clock: trio.testing.MockClock) -> None:
    """Refused tasks back off and retry (what a 503 + Retry-After asks of a client)."""
    limiter = ResourceLimiter(Limit(memory=N * EACH), Limit.unlimited(), {})
    holders = 0
    max_holders = 0
    finished = 0
    scopes: set[tuple[str, str]] = set()

    async def worker() -> None:
        nonlocal holders, max_holders, finished
        while True:
            try:
                span = limiter.span("svc", memory=EACH)
            except ResourceLimitExceeded as err:
                scopes.add((err.scope, err.resource))
                await trio.sleep(0.1)
                continue
            async with span:
                holders += 1
                max_holders = max(max_holders, holders)
                await trio.sleep(0.25)
                holders -= 1
            finished += 1
            return

    async with trio.open_nursery() as nursery:
        for _ in range(200):
            nursery.start_soon(worker)

    assert finished == 200
    assert max_holders == N
    assert scopes == {("system", "memory")}
    assert all_zero(limiter)


# ----------------------------------------------------------------------------------------------
# Plain unit tests
# ----------------------------------------------------------------------------------------------


def test_error_names_scope_and_resource() -> None:
    limiter = make_limiter()
    with limiter.span("b", memory=400) as span:
        with pytest.raises(ResourceLimitExceeded) as info:
            span.reserve_memory(200)
        err = info.value
        assert (err.scope, err.resource, err.requested, err.used, err.limit) == (
            "service:b",
            "memory",
            200,
            400,
            500,
        )
        assert "service:b" in str(err)
        assert "memory" in str(err)
        assert span.name.startswith("span:service:b/")


def test_system_scope_refuses_when_services_fit() -> None:
    limiter = make_limiter()
    with limiter.span("a", memory=600), limiter.span("b", memory=300):
        with pytest.raises(ResourceLimitExceeded) as info:
            limiter.span("c", memory=200)
        assert (info.value.scope, info.value.resource) == ("system", "memory")
        assert "'system'" in str(info.value)


def test_task_priority_levels_limited() -> None:
    limiter = make_limiter()
    with limiter.span("b", task_priority=255):
        with pytest.raises(ResourceLimitExceeded) as info:
            limiter.span("b", task_priority=170)
        assert (info.value.scope, info.value.resource) == ("service:b", "tasks_high")
        with limiter.span("b", task_priority=0), limiter.span("b", task_priority=100):
            assert limiter.used("b").tasks == 3
            with pytest.raises(ResourceLimitExceeded) as info:
                limiter.span("b", task_priority=0)
            assert info.value.resource == "tasks"


def test_remaining_after_reservations() -> None:
    limiter = make_limiter()
    assert limiter.remaining() == SYSTEM
    assert limiter.remaining("b") == SERVICE_DEFAULT
    assert limiter.remaining("a") == SERVICE_A
    with limiter.span("a", memory=600, task_priority=90, conns_outbound=1) as span_a:
        span_a.add_fd()
        left = limiter.remaining("a")
        assert left.memory == 100
        assert left.tasks == 3
        assert left.tasks_medium == 1
        assert left.conns_outbound == 3
        assert left.fds == 3
        # service b is bounded by what the system has left (400 < 500).
        assert limiter.remaining("b").memory == 400
        assert limiter.remaining().memory == 400
        assert limiter.remaining().tasks == 5
        assert limiter.remaining("b").covers(Limit(memory=400, tasks=1, tasks_low=1))
        assert not limiter.remaining("b").covers(Limit(memory=401))
    assert limiter.remaining("a") == SERVICE_A


def test_stats_shape() -> None:
    limiter = make_limiter()
    stats = limiter.stats()
    assert set(stats) == {"system", "service:a"}  # configured services exist from the start
    with limiter.span("p2p", memory=5):
        stats = limiter.stats()
        assert set(stats) == {"system", "service:a", "service:p2p"}
        assert stats["service:p2p"]["limit"] == SERVICE_DEFAULT.as_dict()
        assert stats["service:p2p"]["used"]["memory"] == 5
        assert stats["system"]["used"]["memory"] == 5
        assert list(stats["system"]["limit"]) == list(RESOURCES)


def test_span_names_are_unique_per_limiter() -> None:
    limiter = make_limiter()
    names = set()
    for _ in range(3):
        with limiter.span("p2p") as span:
            names.add(span.name)
    assert len(names) == 3
    assert all(n.startswith("span:service:p2p/") for n in names)


def test_release_more_than_held_is_value_error() -> None:
    limiter = make_limiter()
    with limiter.span("a", memory=10) as span:
        with pytest.raises(ValueError):
            span.release_memory(11)
        with pytest.raises(ValueError):
            span.remove_conn("inbound")
        with pytest.raises(ValueError):
            span.remove_task(0)
        with pytest.raises(ValueError):
            span.add_conn("sideways")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            span.reserve_memory(-1)
        assert span.stat() == Usage(memory=10)


def test_limit_validation() -> None:
    with pytest.raises(ValueError):
        Limit(memory=-1)
    with pytest.raises(TypeError):
        Limit(memory=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Limit.from_mapping({"memroy": 1})
    assert Limit.from_mapping({"memory": 3}) == Limit(memory=3)
    assert Limit(memory=3, fds=9).min(Limit(memory=5, fds=1)) == Limit(memory=3, fds=1)
    assert all(v > 10**15 for v in Limit.unlimited().as_dict().values())


@pytest.mark.parametrize(
    ("p", "level"),
    [
        (0, Priority.LOW),
        (84, Priority.LOW),
        (85, Priority.MEDIUM),
        (169, Priority.MEDIUM),
        (170, Priority.HIGH),
        (255, Priority.HIGH),
    ],
)
def test_priority_level_edges(p: int, level: Priority) -> None:
    assert priority_level(p) is level


@pytest.mark.parametrize("p", [-1, 256])
def test_priority_level_out_of_range(p: int) -> None:
    with pytest.raises(ValueError):
        priority_level(p)
    with pytest.raises(ValueError):
        make_limiter().span("a", task_priority=p)
    assert Priority.LOW < Priority.MEDIUM < Priority.HIGH
