"""``gfsp-node``: initialise a node folder, run a node, show a running node's status.

Exit codes: 0 clean stop, 1 a modular failed (to start or while running), 2 bad usage,
config or keys (with one line naming the bad value).
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import math
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

from node.admin import STATUS_PATH, read_admin_url
from node.app import ModularFailed, Node, load_node_keys
from node.chain import DevChainClient
from node.chain_msgs import MAX_ADDRS, MAX_STR, ChainError
from node.config import (
    ChainSection,
    Config,
    GaterSection,
    NodeSection,
    P2PSection,
    dial_multiaddr_problem,
    load_config,
    parse_config,
    render_config,
)
from node.crypto import KeySet, create_keys
from node.errors import ConfigError, DBError, KeyFileError, ModularStartError
from node.lockfile import DataDirLocked
from node.log import setup_logging
from node.malloc import release_large_buffers
from node.spregistry import StaticSPRegistry, registration_tx, sp_info_of
from p2p.peers import unspecified

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
CONFIG_NAME = "config.toml"
REGISTRY_NAME = "registry.json"

log = logging.getLogger("gfsp.cli")


def cmd_init(args: argparse.Namespace) -> int:
    folder: Path = args.dir
    config_path = folder / CONFIG_NAME
    if config_path.exists():
        print(f"gfsp-node: {config_path} already exists; refusing to overwrite", file=sys.stderr)
        return EXIT_USAGE
    chain = (ChainSection(endpoint=args.chain) if args.chain
             else ChainSection(registry_file=REGISTRY_NAME))
    cfg = Config(node=NodeSection(name=args.name or folder.resolve().name),
                 p2p=dataclasses.replace(P2PSection(), listen=args.p2p_listen),
                 gater=dataclasses.replace(GaterSection(), listen=args.gater_listen),
                 chain=chain)
    try:  # what run would refuse is refused now, before anything is written
        parse_config(render_config(cfg), source=config_path)
    except ConfigError as exc:
        print(f"gfsp-node: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"gfsp-node: --dir {folder}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        keys = create_keys(folder / "keys", passphrase=args.seed)
    except KeyFileError as exc:
        print(f"gfsp-node: {exc}", file=sys.stderr)
        return EXIT_USAGE
    (folder / "data").mkdir(mode=0o700, exist_ok=True)  # user objects, SPDB
    if not args.chain:  # without a chain, the node's SP registry is a file listing itself
        StaticSPRegistry.of([sp_info_of(keys, endpoint=f"http://{cfg.gater.listen}")]
                            ).to_file(folder / REGISTRY_NAME)
    config_path.write_text(render_config(cfg))
    print(f"initialised {folder}: config {config_path}, operator {keys.operator.address}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"gfsp-node: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.log_level:
        cfg = dataclasses.replace(cfg, node=dataclasses.replace(cfg.node,
                                                                log_level=args.log_level))
    setup_logging(cfg.node.log_level, node_name=cfg.node.name)
    release_large_buffers()
    try:
        trio.run(Node(cfg).run)
    except (ConfigError, KeyFileError) as exc:
        print(f"gfsp-node: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ModularStartError, ModularFailed, DBError, DataDirLocked) as exc:
        print(f"gfsp-node: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:  # e.g. a data folder that cannot be created
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"gfsp-node: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_OK
    log.info("stopped")
    return EXIT_OK


def _wildcard_or_zero(host: str, port: str) -> bool:
    """Whether HOST:PORT is no address a peer or client can reach (0.0.0.0, ::, port 0)."""
    try:
        wildcard = ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        wildcard = False
    return wildcard or port == "0"


def registration_of(args: argparse.Namespace, cfg: Config) -> tuple[str, list[str]]:
    """(endpoint, p2p addresses) to register: the options, else the listen addresses when
    others can reach them; ConfigError naming the option otherwise."""
    endpoint = args.endpoint
    if endpoint is None:
        host, _, port = cfg.gater.listen.rpartition(":")
        if _wildcard_or_zero(host, port):
            raise ConfigError(f"gater.listen = {cfg.gater.listen!r} is no address clients can "
                              "reach: give --endpoint http(s)://HOST:PORT")
        endpoint = f"http://{cfg.gater.listen}"
    else:
        problem = _endpoint_problem(endpoint)
        if problem:
            raise ConfigError(f"--endpoint {endpoint!r}: {problem}")
        parts = urlsplit(endpoint)  # as the chain keeps them: scheme://host[:port]
        endpoint = f"{parts.scheme.lower()}://{parts.netloc}"
    addrs = list(dict.fromkeys(args.p2p_addr or []))  # in order, once each
    if not addrs:
        parts = cfg.p2p.listen.split("/")  # /ip4/HOST/tcp/PORT
        if _wildcard_or_zero(parts[2], parts[4]):
            raise ConfigError(f"p2p.listen = {cfg.p2p.listen!r} is no address peers can dial: "
                              "give --p2p-addr /ip4/HOST/tcp/PORT (or /dns4/NAME/tcp/PORT)")
        addrs = [cfg.p2p.listen]
    if len(addrs) > MAX_ADDRS:
        raise ConfigError(f"--p2p-addr: at most {MAX_ADDRS} addresses, not {len(addrs)}")
    for addr in addrs:
        parts = addr.split("/")
        if dial_multiaddr_problem(addr) or unspecified(addr) or parts[4] == "0" \
                or len(parts) > 5:  # no /p2p/<id>: the registry holds the peer id
            raise ConfigError(f"--p2p-addr {addr!r}: expected a dialable multiaddr like "
                              "/ip4/203.0.113.7/tcp/9044 (no port 0, no /p2p/ part)")
    return endpoint, addrs


def _endpoint_problem(endpoint: str) -> str | None:
    """Why clients could not use ``endpoint`` as an SP's HTTP endpoint."""
    try:
        parts = urlsplit(endpoint)
        port = parts.port
    except ValueError as exc:
        return f"not a URL ({exc})"
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return "expected http(s)://HOST[:PORT]"
    if parts.username is not None or parts.query or parts.fragment or parts.path not in ("",
                                                                                       "/"):
        return "expected http(s)://HOST[:PORT] alone (no user, path, query or fragment)"
    if _wildcard_or_zero(parts.hostname, str(port)):
        return "no address clients can reach (0.0.0.0, :: or port 0)"
    if len(endpoint) > MAX_STR:
        return f"longer than {MAX_STR} characters"
    return None


async def _register(cfg: Config, keys: KeySet, endpoint: str, addrs: list[str]
                    ) -> dict[str, Any]:
    async with DevChainClient.from_config(cfg.chain) as chain:
        seq = await chain.account_seq(keys.operator.address)
        return await chain.broadcast(registration_tx(keys, endpoint=endpoint, p2p_addrs=addrs,
                                                     seq=seq))


def cmd_register(args: argparse.Namespace) -> int:
    """Register this SP on the chain (or update its endpoint and addresses)."""
    try:
        cfg = load_config(args.config)
        if cfg.chain.registry_file:
            raise ConfigError(f"{args.config}: chain.registry_file is set: this node uses a "
                              "static SP registry, not a chain (set [chain] endpoint)")
        endpoint, addrs = registration_of(args, cfg)
        keys = load_node_keys(cfg, os.environ)
    except (ConfigError, KeyFileError) as exc:
        print(f"gfsp-node: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        trio.run(_register, cfg, keys, endpoint, addrs)
    except ChainError as exc:
        print(f"gfsp-node: register at {cfg.chain.endpoint}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"registered SP {keys.operator.address} on {cfg.chain.endpoint}: endpoint "
          f"{endpoint}, p2p {', '.join(addrs)}")
    return EXIT_OK


#: Deadline of ``gfsp-node status``'s request to the admin route.
STATUS_TIMEOUT = 5.0


def cmd_status(args: argparse.Namespace) -> int:
    """Print a running node's modulars, limiter, queues and peers (from its admin route)."""
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"gfsp-node: {exc}", file=sys.stderr)
        return EXIT_USAGE
    url = read_admin_url(cfg.data_dir)
    if url is None:
        print(f"gfsp-node: node {cfg.node.name!r} is not running (no admin address in "
              f"{cfg.data_dir})", file=sys.stderr)
        return EXIT_FAILED
    try:
        with httpx.Client(timeout=args.timeout, trust_env=False) as client:
            resp = client.get(url + STATUS_PATH)
            resp.raise_for_status()
            doc = resp.json()
    except httpx.ConnectError:
        print(f"gfsp-node: node {cfg.node.name!r} is not running (nothing listens at {url}; "
              f"the address in {cfg.data_dir} is left from a node that did not stop cleanly)",
              file=sys.stderr)
        return EXIT_FAILED
    except (httpx.HTTPError, ValueError) as exc:
        print(f"gfsp-node: node {cfg.node.name!r} is not reachable at {url}: "
              f"{str(exc) or type(exc).__name__}", file=sys.stderr)
        return EXIT_FAILED
    try:
        print(format_status(doc), flush=True)
    except BrokenPipeError:  # `| head`: the reader's choice; quiet, as one killed by SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    return EXIT_OK


def number_arg(kind: type[int] | type[float], low: float, *, above: bool = False
            ) -> Callable[[str], float]:
    """An argparse type: a finite ``kind`` at least ``low`` (more than ``low`` with ``above``);
    a bad value is a usage error (exit 2) naming it."""
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or value < low or (above and value == low):
            raise argparse.ArgumentTypeError(
                f"must be {'more than' if above else 'at least'} {low:g}, not {text}")
        return value
    return parse


def _amount(n: int | None) -> str:
    return "-" if n is None else "unlimited" if n >= sys.maxsize else str(n)


def _bytes(n: int) -> str:
    if n >= sys.maxsize:
        return "unlimited"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)  # pragma: no cover


_LIMIT_COLUMNS = (("memory", "memory"), ("tasks", "tasks"), ("tasks_high", "high"),
                  ("tasks_medium", "medium"), ("tasks_low", "low"),
                  ("conns_inbound", "conns in"), ("conns_outbound", "conns out"), ("fds", "fds"))


def _limiter_rows(stats: dict) -> list[list[str]]:  # type: ignore[type-arg]
    rows = [["scope", *(title for _, title in _LIMIT_COLUMNS)]]
    for scope, v in stats.items():
        show = [_bytes if r == "memory" else _amount for r, _ in _LIMIT_COLUMNS]
        rows.append([scope, *(f"{f(v['used'][r])}/{f(v['limit'][r])}"
                              for f, (r, _) in zip(show, _LIMIT_COLUMNS, strict=True))])
        rows.append(["  left", *(f(v["remaining"][r])
                                 for f, (r, _) in zip(show, _LIMIT_COLUMNS, strict=True))])
    return rows


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]


def format_status(doc: dict) -> str:  # type: ignore[type-arg]
    """The readable multi-section summary ``gfsp-node status`` prints."""
    lines = [f"node {doc['node']} ({doc['state']}), operator {doc['operator']}"]
    ends = doc.get("endpoints") or {}
    chain = doc.get("chain") or {}
    height = _amount(chain.get("height"))
    if chain.get("reachable") is False:
        height += " (last seen: the chain does not answer now)"
    lines.append(f"  gater {ends.get('gater') or '-'}   admin {ends.get('admin') or '-'}   "
                 f"chain height {height}   "
                 f"piece store {_amount((doc.get('piecestore') or {}).get('used_bytes'))} bytes")
    registered = chain.get("registered")
    if registered is False:
        lines.append("  NOT REGISTERED on the chain: clients and other SPs cannot find this SP "
                     "(gfsp-node register --config ...)")
    elif registered:
        lines.append(f"  registered as {registered['endpoint']}   p2p "
                     f"{', '.join(registered['p2p_addrs']) or '-'}")
    lines += ["", "modulars (start order):"]
    lines += [f"  {m['name']:<12} {'running' if m['running'] else 'STOPPED'}"
              for m in doc["modulars"]]
    lines += ["", "limiter (used/limit, and what is left):"]
    lines += _table(_limiter_rows(doc["limiter"]))
    lines += ["", "queues (pending tasks by type):"]
    lines += [f"  {t:<18} {n}" for t, n in doc["queues"].items()] or ["  (no tasks)"]
    lines += ["", "tasks by state:"]
    lines += [f"  {t:<18} " + ", ".join(f"{s} {n}" for s, n in sorted(by.items()))
              for t, by in sorted(doc["tasks"].items())] or ["  (no tasks)"]
    lines += ["", "peers:"]
    for p in doc["peers"]:
        rtt = "-" if p.get("rtt") is None else f"{p['rtt'] * 1000:.1f}ms"
        lines.append(f"  {p['peer_id']:<54} {p['state']:<10} rtt {rtt:<9} "
                     f"{p.get('operator') or ''}")
    if not doc["peers"]:
        lines.append("  (no peers)")
    approvals = doc.get("approvals") or {}
    lines += ["", "approvals:", "  " + (", ".join(f"{k} {v}" for k, v in sorted(
        approvals.items())) or "(none)")]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gfsp-node", description="A gfsp storage provider node.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("init", help="write a default config and a fresh set of keys")
    p.add_argument("--dir", type=Path, required=True, help="node folder to create")
    p.add_argument("--seed", help="derive the keys from this passphrase (testnets: stable ids)")
    p.add_argument("--name", help="node name (default: the folder's name)")
    p.add_argument("--gater-listen", default=GaterSection().listen, metavar="HOST:PORT",
                   help="HTTP listen address (default %(default)s)")
    p.add_argument("--p2p-listen", default=P2PSection().listen, metavar="MULTIADDR",
                   help="libp2p listen address (default %(default)s)")
    p.add_argument("--chain", metavar="URL",
                   help="the chain's endpoint (default: a registry file listing this SP only)")
    p.set_defaults(func=cmd_init)
    p = sub.add_parser("run", help="run the node in the foreground")
    p.add_argument("--config", type=Path, required=True, help="the node's config.toml")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("register", help="register this SP on the chain (or update its "
                       "endpoint and p2p addresses); signed by the operator key")
    p.add_argument("--config", type=Path, required=True, help="the node's config.toml")
    p.add_argument("--endpoint", metavar="URL",
                   help="the HTTP endpoint clients and SPs use (default: http://<gater.listen>)")
    p.add_argument("--p2p-addr", action="append", metavar="MULTIADDR",
                   help="a p2p address peers dial (repeatable; default: p2p.listen)")
    p.set_defaults(func=cmd_register)
    p = sub.add_parser("status", help="show a running node's modulars, limiter, queues, peers")
    p.add_argument("--config", type=Path, required=True, help="the node's config.toml")
    p.add_argument("--timeout", type=number_arg(float, 0, above=True), default=STATUS_TIMEOUT,
                   metavar="SECONDS",
                   help="deadline of the request to the node (default %(default)s)")
    p.set_defaults(func=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
