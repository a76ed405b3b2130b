"""``gfsp-node``: initialise a node folder, run a node.

Exit codes: 0 clean stop, 1 a modular failed (to start or while running), 2 bad usage,
config or keys (with one line naming the bad value).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import trio

from node.app import ModularFailed, Node
from node.config import (
    ChainSection,
    Config,
    GaterSection,
    NodeSection,
    P2PSection,
    load_config,
    render_config,
)
from node.crypto import create_keys
from node.errors import ConfigError, DBError, KeyFileError, ModularStartError
from node.log import setup_logging
from node.spregistry import StaticSPRegistry, sp_info_of

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
    folder.mkdir(parents=True, exist_ok=True)
    chain = (ChainSection(endpoint=args.chain) if args.chain
             else ChainSection(registry_file=REGISTRY_NAME))
    cfg = Config(node=NodeSection(name=args.name or folder.resolve().name),
                 p2p=dataclasses.replace(P2PSection(), listen=args.p2p_listen),
                 gater=dataclasses.replace(GaterSection(), listen=args.gater_listen),
                 chain=chain)
    try:
        keys = create_keys(folder / "keys", passphrase=args.seed)
    except KeyFileError as exc:
        print(f"gfsp-node: {exc}", file=sys.stderr)
        return EXIT_USAGE
    (folder / "data").mkdir(exist_ok=True)
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
    try:
        trio.run(Node(cfg).run)
    except (ConfigError, KeyFileError) as exc:
        print(f"gfsp-node: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ModularStartError, ModularFailed, DBError) as exc:
        print(f"gfsp-node: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:  # e.g. a data folder that cannot be created
        print(f"gfsp-node: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_OK
    log.info("stopped")
    return EXIT_OK


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
