"""Test helpers: a set of SP folders sharing one static SP registry, run in-process or as
processes, plus :class:`FakeSP`, a real libp2p host speaking our protocols with chosen faults."""

from __future__ import annotations

import dataclasses
import os
import random
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from node import chain_msgs
from node.app import Node
from node.chain import DevChainClient
from node.config import (
    ChainSection,
    Config,
    GaterSection,
    ModularsSection,
    NodeSection,
    P2PSection,
    load_config,
    render_config,
)
from node.crypto import KeySet, PrivateKey, create_keys
from node.spregistry import SPInfo, StaticSPRegistry, sp_info_of
from p2p.host import P2PHost, Stream, open_host, peer_id_from_public_key

REGISTRY = "registry.json"


def free_port() -> int:
    """A port that is free now, below Linux's ephemeral range (32768+), so that outgoing
    connections made before the node binds it cannot take it meanwhile."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found in 20000-32000")


def keyset(passphrase: str) -> KeySet:
    return KeySet(**{r: PrivateKey.from_passphrase(passphrase, r)
                     for r in ("operator", "approval", "seal", "gc", "p2p")})


@dataclass
class SPDir:
    index: int
    dir: Path
    keys: KeySet
    port: int
    gater_port: int = 0

    @property
    def config_path(self) -> Path:
        return self.dir / "config.toml"

    @property
    def peer_id(self) -> str:
        return peer_id_from_public_key(self.keys.p2p.public_key)

    @property
    def addr(self) -> str:
        return f"/ip4/127.0.0.1/tcp/{self.port}"

    @property
    def bootstrap_entry(self) -> str:
        return f"{self.peer_id}@{self.addr}"

    def info(self) -> SPInfo:
        port = self.gater_port or 9000 + self.index
        return sp_info_of(self.keys, endpoint=f"http://127.0.0.1:{port}",
                          p2p_addrs=(self.addr,), peer_id=self.peer_id)

    def config(self) -> Config:
        return load_config(self.config_path)


def make_sps(root: Path, n: int, *, p2p: dict[str, object] | None = None,
             bootstrap: Callable[[int, list[SPDir]], list[str]] | None = None,
             extra: list[SPInfo] = (), tag: str = "sp",
             implementations: Callable[[int], dict[str, str]] | None = None) -> list[SPDir]:
    """``n`` SP folders with keys, configs and one shared registry file (plus ``extra`` SPs).

    By default every SP but sp0 bootstraps from sp0 only.
    """
    root.mkdir(parents=True, exist_ok=True)
    sps = []
    for i in range(n):
        d = root / f"{tag}{i}"
        keys = create_keys(d / "keys", passphrase=f"{tag}{i}-{root.name}")
        sps.append(SPDir(i, d, keys, free_port()))
    registry = StaticSPRegistry.of([sp.info() for sp in sps] + list(extra))
    registry.to_file(root / REGISTRY)
    for sp in sps:
        boot = bootstrap(sp.index, sps) if bootstrap else (
            [] if sp.index == 0 else [sps[0].bootstrap_entry])
        p2p_cfg = dataclasses.replace(P2PSection(), listen=sp.addr, bootstrap=boot,
                                      **(p2p or {}))
        impls = implementations(sp.index) if implementations else {}
        cfg = Config(node=NodeSection(name=sp.dir.name, grace_period=1.0),
                     modulars=ModularsSection(implementations=impls),
                     gater=dataclasses.replace(GaterSection(), listen="127.0.0.1:0"),
                     p2p=p2p_cfg, chain=ChainSection(registry_file=str(root / REGISTRY)))
        sp.config_path.write_text(render_config(cfg))
    return sps


def make_chain_sps(root: Path, n: int, chain_endpoint: str, *,
                   p2p: dict[str, object] | None = None, tag: str = "sp") -> list[SPDir]:
    """``n`` SP folders whose nodes use the chain at ``chain_endpoint`` (no registry file),
    each with its own gater port; sp1.. bootstrap from sp0. Register them with
    :func:`register_on_chain` before starting them."""
    root.mkdir(parents=True, exist_ok=True)
    sps = []
    for i in range(n):
        d = root / f"{tag}{i}"
        keys = create_keys(d / "keys", passphrase=f"{tag}{i}-{root.name}")
        sps.append(SPDir(i, d, keys, free_port(), gater_port=free_port()))
    for sp in sps:
        boot = [] if sp.index == 0 else [sps[0].bootstrap_entry]
        cfg = Config(node=NodeSection(name=sp.dir.name, grace_period=1.0),
                     p2p=dataclasses.replace(P2PSection(), listen=sp.addr, bootstrap=boot,
                                             **(p2p or {})),
                     gater=dataclasses.replace(GaterSection(),
                                               listen=f"127.0.0.1:{sp.gater_port}"),
                     chain=ChainSection(endpoint=chain_endpoint, height_refresh_interval=0.2))
        sp.config_path.write_text(render_config(cfg))
    return sps


async def register_on_chain(chain_endpoint: str, sps: list[SPDir]) -> None:
    """Register every SP (operator-key signed register_sp transactions)."""
    async with DevChainClient(chain_endpoint) as client:
        for sp in sps:
            info = sp.info()
            seq = await client.account_seq(sp.keys.operator.address)
            await client.broadcast(chain_msgs.sign(sp.keys.operator, chain_msgs.register_sp_tx(
                pubkey=sp.keys.operator.public_key, seq=seq, endpoint=info.endpoint,
                peer_id=info.peer_id, p2p_addrs=info.p2p_addrs,
                approval_key=info.approval_key, seal_key=info.seal_key,
                gc_key=info.gc_key)))


class RunningNode:
    """A Node run in-process in its own cancel scope (stop() is a graceful stop)."""

    def __init__(self, sp: SPDir) -> None:
        self.sp = sp
        self.node = Node(sp.config(), env={}, handle_signals=False)
        self.done = trio.Event()

    @property
    def p2p(self):
        assert self.node.ctx is not None
        return self.node.ctx.modulars.p2p

    async def _run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                   ) -> None:
        try:
            await self.node.run(task_status=task_status)
        finally:
            self.done.set()

    async def stop(self) -> None:
        self.node.request_stop()
        await self.done.wait()

    def trusted(self) -> set[str]:
        return {p.peer_id for p in self.p2p.table.trusted()}


async def start_nodes(nursery: trio.Nursery, sps: list[SPDir]) -> list[RunningNode]:
    nodes = [RunningNode(sp) for sp in sps]
    for n in nodes:
        await nursery.start(n._run)
    return nodes


async def wait_until(cond: Callable[[], bool], *, poll: float = 0.02) -> None:
    """Poll a condition on the event loop (bounded by the caller's fail_after).

    Polling, not an event: the state watched spans several nodes (or processes' SPDB files).
    """
    while not cond():  # noqa: ASYNC110
        await trio.sleep(poll)


def node_process_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    return env


def node_command(sp: SPDir) -> list[str]:
    return [sys.executable, "-m", "node.cli", "run", "--config", str(sp.config_path)]


Handler = Callable[[Stream], Awaitable[None]]


async def open_fake_sp(sp: SPDir, handlers: dict[str, Handler]):
    """A real libp2p host with ``sp``'s p2p key and the given protocol handlers."""
    return open_host(sp.keys.p2p, sp.addr, connect_timeout=2.0, handlers=handlers)


__all__ = ["P2PHost", "RunningNode", "SPDir", "free_port", "keyset", "make_sps",
           "node_command", "node_process_env", "open_fake_sp", "start_nodes", "wait_until"]
