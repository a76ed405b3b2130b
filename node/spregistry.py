"""The SP registry: who owns which peer id and which keys (the chain's view of SPs).

Signatures between SPs are checked only against public keys taken from here, never from the
message. :class:`SPRegistry` is the interface; the chain client implements it against the
chain. :class:`StaticSPRegistry` holds the SPs in memory (tests, and nodes run before a chain
exists, which may load it from a JSON file); its height is read from a callable (by default
wall-clock seconds divided by the block interval, the same in every process).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from node.crypto import KeySet
from node.errors import ConfigError

IN_SERVICE = "IN_SERVICE"


@dataclass(frozen=True)
class SPInfo:
    operator: str
    endpoint: str
    peer_id: str
    p2p_addrs: tuple[str, ...]
    operator_key: bytes
    approval_key: bytes
    seal_key: bytes
    gc_key: bytes
    status: str = IN_SERVICE

    @property
    def in_service(self) -> bool:
        return self.status == IN_SERVICE

    def to_json(self) -> dict[str, Any]:
        return {"operator": self.operator, "endpoint": self.endpoint, "peer_id": self.peer_id,
                "p2p_addrs": list(self.p2p_addrs), "operator_key": self.operator_key.hex(),
                "approval_key": self.approval_key.hex(), "seal_key": self.seal_key.hex(),
                "gc_key": self.gc_key.hex(), "status": self.status}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SPInfo:
        return cls(operator=d["operator"], endpoint=d["endpoint"], peer_id=d["peer_id"],
                   p2p_addrs=tuple(d.get("p2p_addrs", ())),
                   operator_key=bytes.fromhex(d["operator_key"]),
                   approval_key=bytes.fromhex(d["approval_key"]),
                   seal_key=bytes.fromhex(d["seal_key"]), gc_key=bytes.fromhex(d["gc_key"]),
                   status=d.get("status", IN_SERVICE))


def sp_info_of(keys: KeySet, *, endpoint: str, p2p_addrs: tuple[str, ...] = (),
               peer_id: str | None = None) -> SPInfo:
    """The registry entry of an SP holding ``keys`` (peer id derived from its p2p key)."""
    if peer_id is None:
        from p2p.host import peer_id_from_public_key  # the one module that knows libp2p ids
        peer_id = peer_id_from_public_key(keys.p2p.public_key)
    return SPInfo(operator=keys.operator.address, endpoint=endpoint, peer_id=peer_id,
                  p2p_addrs=p2p_addrs, operator_key=keys.operator.public_key,
                  approval_key=keys.approval.public_key, seal_key=keys.seal.public_key,
                  gc_key=keys.gc.public_key)


def registration_tx(keys: KeySet, *, endpoint: str, p2p_addrs: Sequence[str], seq: int
                    ) -> dict[str, Any]:
    """The register_sp transaction (register or update) of the SP holding ``keys``, signed by
    its operator key: what ``gfsp-node register`` and ``gfsp-testnet up`` send."""
    from node import chain_msgs

    info = sp_info_of(keys, endpoint=endpoint, p2p_addrs=tuple(p2p_addrs))
    return chain_msgs.sign(keys.operator, chain_msgs.register_sp_tx(
        pubkey=keys.operator.public_key, seq=seq, endpoint=endpoint, peer_id=info.peer_id,
        p2p_addrs=list(p2p_addrs), approval_key=info.approval_key, seal_key=info.seal_key,
        gc_key=info.gc_key))


class SPRegistry(Protocol):
    async def sp_by_operator(self, operator: str) -> SPInfo | None: ...

    async def sp_by_peer_id(self, peer_id: str) -> SPInfo | None: ...

    async def list_sps(self) -> list[SPInfo]: ...

    async def current_height(self) -> int: ...


def wall_clock_height(block_interval: float = 1.0) -> Callable[[], int]:
    return lambda: int(time.time() // block_interval)


@dataclass
class StaticSPRegistry:
    """An in-memory registry (not a chain): SPs given up front or added by tests."""

    sps: dict[str, SPInfo] = field(default_factory=dict)
    height: Callable[[], int] = field(default_factory=wall_clock_height)

    @classmethod
    def of(cls, sps: Iterable[SPInfo], height: Callable[[], int] | None = None
           ) -> StaticSPRegistry:
        reg = cls({sp.operator: sp for sp in sps})
        if height is not None:
            reg.height = height
        return reg

    @classmethod
    def from_file(cls, path: Path, height: Callable[[], int] | None = None
                  ) -> StaticSPRegistry:
        try:
            data = json.loads(path.read_text())
            return cls.of((SPInfo.from_json(d) for d in data["sps"]), height)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: not a valid SP registry file: {exc}") from None

    def to_file(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"sps": [sp.to_json() for sp in self.sps.values()]}, indent=1))
        tmp.replace(path)

    def add(self, sp: SPInfo) -> None:
        self.sps[sp.operator] = sp

    async def sp_by_operator(self, operator: str) -> SPInfo | None:
        return self.sps.get(operator)

    async def sp_by_peer_id(self, peer_id: str) -> SPInfo | None:
        return next((sp for sp in self.sps.values() if sp.peer_id == peer_id), None)

    async def list_sps(self) -> list[SPInfo]:
        return list(self.sps.values())

    async def current_height(self) -> int:
        return self.height()
