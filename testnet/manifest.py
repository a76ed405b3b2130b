"""The testnet manifest ``D/testnet.toml``: what ``gfsp-testnet init`` laid out, for tools to read.

One file says where everything is: the devchain (endpoint, folder, pid file, log), the storage
parameters it was created with, and per SP node its HTTP endpoint, p2p address, peer id,
operator address, config, pid file and log file. Tests and the ``gfsp`` client read it with
:func:`load_manifest`. Paths in the file are relative to the manifest's folder (so the folder
can be moved); :class:`Manifest` resolves them to absolute paths.

Format (version 1)::

    version = 1
    nodes = 4
    random_keys = false

    [chain]
    endpoint = "http://127.0.0.1:40001"
    dir = "devchain"
    pid_file = "run/devchain.pid"
    log_file = "devchain/devchain.log"
    block_interval = 1.0

    [params]
    segment_size = 16777216
    data_shards = 2
    parity_shards = 1

    [[sp]]
    index = 0
    name = "sp0"
    dir = "sp0"
    config = "sp0/config.toml"
    endpoint = "http://127.0.0.1:40002"
    p2p_addr = "/ip4/127.0.0.1/tcp/40003"
    peer_id = "12D3KooW..."
    operator = "0x..."
    pid_file = "run/sp0.pid"
    log_file = "sp0/node.log"
    ready_file = "run/sp0.ready"
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

MANIFEST_NAME = "testnet.toml"
MANIFEST_VERSION = 1
RUN_DIR = "run"
CHAIN_DIR = "devchain"
DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024


class ManifestError(Exception):
    """A missing or malformed manifest (one line naming the file and the problem)."""


def default_storage_params(nodes: int) -> tuple[int, int]:
    """(data shards, parity shards) for a testnet of ``nodes`` SPs.

    4 + 2 from 7 nodes on (a primary and six secondaries). Below that, data + parity fills
    the other ``nodes - 1`` SPs with at least one parity shard, about a third of them parity
    (3 -> 1+1, 4 -> 2+1, 5 -> 3+1, 6 -> 3+2). With fewer than 3 nodes no parity fits: 1 + 0
    (a copy on the one other SP, or none with a single node).
    """
    if nodes >= 7:
        return 4, 2
    total = nodes - 1
    if total < 2:
        return 1, 0
    parity = max(1, round(total / 3))
    return total - parity, parity


@dataclass(frozen=True)
class ChainEntry:
    endpoint: str
    dir: Path
    pid_file: Path
    log_file: Path
    block_interval: float = 1.0

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1].split("/", 1)[0])


@dataclass(frozen=True)
class NodeEntry:
    index: int
    name: str
    dir: Path
    config: Path
    endpoint: str
    p2p_addr: str
    peer_id: str
    operator: str
    pid_file: Path
    log_file: Path
    ready_file: Path

    @property
    def bootstrap_entry(self) -> str:
        """``<peer id>@<multiaddr>``: how other nodes' configs name this one."""
        return f"{self.peer_id}@{self.p2p_addr}"

    @property
    def gater_listen(self) -> str:
        return self.endpoint.removeprefix("http://")


@dataclass(frozen=True)
class Manifest:
    root: Path
    chain: ChainEntry
    nodes: list[NodeEntry]
    segment_size: int = DEFAULT_SEGMENT_SIZE
    data_shards: int = 4
    parity_shards: int = 2
    random_keys: bool = False
    version: int = MANIFEST_VERSION

    @property
    def path(self) -> Path:
        return self.root / MANIFEST_NAME

    @property
    def run_dir(self) -> Path:
        return self.root / RUN_DIR

    def node(self, index: int) -> NodeEntry:
        for n in self.nodes:
            if n.index == index:
                return n
        raise ManifestError(f"{self.path}: no node sp{index} (nodes: 0..{len(self.nodes) - 1})")

    def render(self) -> str:
        rel = self._rel
        out = ["# gfsp testnet manifest, written by 'gfsp-testnet init'. Paths are relative to",
               "# this file's folder. Read it with testnet.manifest.load_manifest().",
               f"version = {self.version}", f"nodes = {len(self.nodes)}",
               f"random_keys = {'true' if self.random_keys else 'false'}", "",
               "[chain]", f"endpoint = {_s(self.chain.endpoint)}",
               f"dir = {_s(rel(self.chain.dir))}", f"pid_file = {_s(rel(self.chain.pid_file))}",
               f"log_file = {_s(rel(self.chain.log_file))}",
               f"block_interval = {float(self.chain.block_interval)!r}", "",
               "[params]", f"segment_size = {self.segment_size}",
               f"data_shards = {self.data_shards}", f"parity_shards = {self.parity_shards}"]
        for n in self.nodes:
            out += ["", "[[sp]]", f"index = {n.index}", f"name = {_s(n.name)}",
                    f"dir = {_s(rel(n.dir))}", f"config = {_s(rel(n.config))}",
                    f"endpoint = {_s(n.endpoint)}", f"p2p_addr = {_s(n.p2p_addr)}",
                    f"peer_id = {_s(n.peer_id)}", f"operator = {_s(n.operator)}",
                    f"pid_file = {_s(rel(n.pid_file))}", f"log_file = {_s(rel(n.log_file))}",
                    f"ready_file = {_s(rel(n.ready_file))}"]
        return "\n".join(out) + "\n"

    def write(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{MANIFEST_NAME}.tmp")
        tmp.write_text(self.render())
        tmp.replace(self.path)

    def _rel(self, p: Path) -> str:
        try:
            return str(p.relative_to(self.root))
        except ValueError:
            return str(p)


def _s(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def manifest_path(root: Path) -> Path:
    return Path(root) / MANIFEST_NAME


def load_manifest(root_or_file: Path) -> Manifest:
    """Read ``D/testnet.toml`` (give D or the file); paths come back absolute."""
    p = Path(root_or_file)
    path = p if p.suffix == ".toml" else p / MANIFEST_NAME
    path = path.absolute()
    root = path.parent
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path}: no testnet here (run 'gfsp-testnet init' first)") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read the manifest: {exc}") from None

    def at(value: str) -> Path:
        q = Path(value)
        return q if q.is_absolute() else root / q

    try:
        if raw.get("version") != MANIFEST_VERSION:
            raise ManifestError(f"{path}: unsupported manifest version {raw.get('version')!r}")
        c = raw["chain"]
        chain = ChainEntry(endpoint=c["endpoint"], dir=at(c["dir"]), pid_file=at(c["pid_file"]),
                           log_file=at(c["log_file"]),
                           block_interval=float(c.get("block_interval", 1.0)))
        nodes = [NodeEntry(index=int(s["index"]), name=s["name"], dir=at(s["dir"]),
                           config=at(s["config"]), endpoint=s["endpoint"],
                           p2p_addr=s["p2p_addr"], peer_id=s["peer_id"], operator=s["operator"],
                           pid_file=at(s["pid_file"]), log_file=at(s["log_file"]),
                           ready_file=at(s["ready_file"]))
                 for s in raw.get("sp", [])]
        params = raw.get("params", {})
        return Manifest(root=root, chain=chain, nodes=sorted(nodes, key=lambda n: n.index),
                        segment_size=int(params.get("segment_size", DEFAULT_SEGMENT_SIZE)),
                        data_shards=int(params.get("data_shards", 4)),
                        parity_shards=int(params.get("parity_shards", 2)),
                        random_keys=bool(raw.get("random_keys", False)))
    except (KeyError, TypeError, ValueError) as exc:
        raise ManifestError(f"{path}: malformed manifest: {exc!r}") from None
