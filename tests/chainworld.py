"""A real devchain for modular tests, built once per session and copied per test.

``session_template`` runs an async builder once into a template folder; ``chain_world`` copies
that folder, serves a devchain on it (127.0.0.1, port 0) and yields a :class:`ChainWorld`: the
chain, a client, a :class:`CountingChain` wrapper over it and a NodeContext with a real SPDB
and a running signer. Used by tests/test_authorizer.py and tests/test_metadata.py.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from modulars.signer import Signer
from node.app import build_limiter
from node.chain import DevChainClient
from node.config import Config
from node.crypto import KeySet
from node.db import open_spdb
from node.modular import Modulars, NodeContext
from testnet.devchain import DevChain

T = TypeVar("T")


def session_template(factory: pytest.TempPathFactory, name: str, timeout: float,
                     build: Callable[[Path], Awaitable[T]]) -> T:
    """Run ``build(<fresh folder>/chain)`` once (for a session-scoped fixture)."""
    directory = factory.mktemp(name) / "chain"

    async def run() -> T:
        with trio.fail_after(timeout):
            return await build(directory)

    return trio.run(run)


class CountingChain:
    """A thin wrapper around a chain client that counts the calls of each method."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return await attr(*args, **kwargs)

        return counted


@dataclass
class ChainWorld:
    devchain: DevChain
    chain_stopped: trio.Event
    client: DevChainClient
    chain: CountingChain
    ctx: NodeContext

    async def stop_chain(self) -> None:
        self.devchain.shutdown()
        await self.chain_stopped.wait()


async def _run_chain(chain: DevChain, stopped: trio.Event, *,
                     task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    try:
        await chain.serve(task_status=task_status)
    finally:
        stopped.set()


@asynccontextmanager
async def chain_world(template_dir: Path, tmp_path: Path, nursery: trio.Nursery, *,
                      keys: KeySet, config: Config, block_interval: float, timeout: float
                      ) -> AsyncIterator[ChainWorld]:
    with trio.fail_after(timeout):
        directory = tmp_path / "chain"
        shutil.copytree(template_dir, directory)
        devchain = DevChain(directory, block_interval=block_interval)
        stopped = trio.Event()
        endpoint = await nursery.start(_run_chain, devchain, stopped)
    async with (open_spdb(tmp_path / "spdb.sqlite3") as db,
                DevChainClient(endpoint, request_timeout=5) as client):
        chain = CountingChain(client)
        ctx = NodeContext(config=config, limiter=build_limiter(config), db=db, keys=keys,
                          chain=chain, modulars=Modulars())
        ctx.modulars.mark_running(Signer(ctx))
        yield ChainWorld(devchain, stopped, client, chain, ctx)
