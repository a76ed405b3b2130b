"""``python -m testnet.devchain --dir D``: run a devchain in the foreground.

Prints one line ``devchain listening on <endpoint>`` (and writes ``D/devchain.json``) once it
listens; SIGINT/SIGTERM stop it gracefully. Storage params are fixed when the chain is first
created: the flags may be repeated on later starts but not changed.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import trio

from node.chain_msgs import ChainError
from node.errors import DBError, TaskError
from node.tasks import StorageParams
from testnet.devchain.server import DevChain
from testnet.devchain.state import DEFAULT_PARAMS

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m testnet.devchain``."""
    p = argparse.ArgumentParser(prog="python -m testnet.devchain",
                                description="Run a gfsp devchain (the local chain stand-in).")
    p.add_argument("--dir", required=True, type=Path, help="state directory")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="listen port (default 0: any free port)")
    p.add_argument("--block-interval", type=float, default=1.0, help="seconds per block")
    p.add_argument("--segment-size", type=int, help=f"default {DEFAULT_PARAMS.segment_size}")
    p.add_argument("--data-shards", type=int, help=f"default {DEFAULT_PARAMS.data_shards}")
    p.add_argument("--parity-shards", type=int, help=f"default {DEFAULT_PARAMS.parity_shards}")
    p.add_argument("--max-payload", type=int, help=f"default {DEFAULT_PARAMS.max_payload}")
    p.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    return p


def _params(args: argparse.Namespace) -> StorageParams | None:
    given = {name: getattr(args, name) for name in
             ("segment_size", "data_shards", "parity_shards", "max_payload")}
    if all(v is None for v in given.values()):
        return None
    merged = {k: (v if v is not None else getattr(DEFAULT_PARAMS, k)) for k, v in given.items()}
    return StorageParams(**merged)


async def _run(chain: DevChain) -> None:
    async with trio.open_nursery() as nursery:
        endpoint = await nursery.start(chain.serve)
        print(f"devchain listening on {endpoint}", flush=True)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                chain.shutdown()
                break


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        chain = DevChain(args.dir, host=args.host, port=args.port,
                         block_interval=args.block_interval, params=_params(args))
        trio.run(_run, chain)
    except (TaskError, ValueError) as exc:
        print(f"devchain: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ChainError as exc:
        print(f"devchain: {exc.reason}", file=sys.stderr)
        return EXIT_USAGE
    except (DBError, OSError) as exc:
        print(f"devchain: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
