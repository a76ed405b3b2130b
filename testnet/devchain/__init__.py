"""devchain: the local stand-in for the blockchain (ARCHITECTURE §3).

A trio HTTP service on loopback with its own SQLite file (``<dir>/devchain.sqlite3``): block
heights (one block every ``block_interval`` seconds), an SP registry, accounts with sequence
numbers, storage params, buckets and objects (CREATED -> SEALED, or deleted) and an event log.
Every transaction is a canonical msgpack map built by :mod:`node.chain_msgs` and checked here;
every refusal is a typed :class:`~node.chain_msgs.ChainError` (code + reason).

* :mod:`testnet.devchain.state`: schema and state transitions (pure functions on sqlite3).
* :mod:`testnet.devchain.server`: :class:`DevChain`, the block producer and the HTTP API.
* ``python -m testnet.devchain --dir D``: run one (see README.md).

Nodes reach it only through :mod:`node.chain` (``DevChainClient``).
"""

from testnet.devchain.server import DB_NAME, INFO_NAME, MAX_TX_BYTES, DevChain

__all__ = ["DB_NAME", "INFO_NAME", "MAX_TX_BYTES", "DevChain"]
