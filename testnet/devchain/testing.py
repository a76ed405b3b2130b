"""Helpers to drive a devchain from tests and tools: SP key sets, accounts, signed approvals.

Not used by the devchain itself. Everything here goes through :mod:`node.chain_msgs`, the same
builders the node uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from modulars.signer import integrity_payload
from node import chain_msgs as msgs
from node.crypto import KeySet, PrivateKey
from node.spregistry import SPInfo


def new_keyset() -> KeySet:
    """A fresh random key per role."""
    return KeySet(operator=PrivateKey.generate(), approval=PrivateKey.generate(),
                  seal=PrivateKey.generate(), gc=PrivateKey.generate(),
                  p2p=PrivateKey.generate())


@dataclass
class Account:
    """A signing key and its next sequence number (as the chain expects it)."""

    key: PrivateKey
    seq: int = 0

    @property
    def address(self) -> str:
        return self.key.address

    @property
    def pubkey(self) -> bytes:
        return self.key.public_key

    def take_seq(self) -> int:
        """The sequence number for the next transaction (then count it as used)."""
        seq = self.seq
        self.seq += 1
        return seq


@dataclass
class TestSP:
    """An SP's keys, its operator and seal accounts, and its registry entry."""

    __test__ = False  # not a pytest test class

    keys: KeySet
    endpoint: str
    peer_id: str
    operator: Account = field(init=False)
    sealer: Account = field(init=False)

    def __post_init__(self) -> None:
        self.operator = Account(self.keys.operator)
        self.sealer = Account(self.keys.seal)

    @classmethod
    def create(cls, index: int) -> TestSP:
        """SP number ``index`` with random keys and a made-up endpoint and peer id."""
        return cls(new_keyset(), f"http://127.0.0.1:{20000 + index}", f"12D3KooWtest{index}")

    @property
    def address(self) -> str:
        return self.keys.operator.address

    @property
    def info(self) -> SPInfo:
        return SPInfo(operator=self.address, endpoint=self.endpoint, peer_id=self.peer_id,
                      p2p_addrs=(f"/ip4/127.0.0.1/tcp/{30000}",),
                      operator_key=self.keys.operator.public_key,
                      approval_key=self.keys.approval.public_key,
                      seal_key=self.keys.seal.public_key, gc_key=self.keys.gc.public_key)

    def register_tx(self) -> dict[str, Any]:
        """A signed register_sp transaction for this SP."""
        info = self.info
        return msgs.sign(self.keys.operator, msgs.register_sp_tx(
            pubkey=self.operator.pubkey, seq=self.operator.take_seq(), endpoint=info.endpoint,
            peer_id=info.peer_id, p2p_addrs=info.p2p_addrs, approval_key=info.approval_key,
            seal_key=info.seal_key, gc_key=info.gc_key))

    def bucket_approval(self, creator: str, bucket: str, expiry_height: int
                        ) -> dict[str, Any]:
        return msgs.sign(self.keys.approval, msgs.create_bucket_approval(
            creator=creator, bucket=bucket, primary_sp=self.address,
            expiry_height=expiry_height))

    def object_approval(self, creator: str, bucket: str, name: str, size: int,
                        checksums: Sequence[bytes], expiry_height: int,
                        content_type: str = "application/octet-stream") -> dict[str, Any]:
        return msgs.sign(self.keys.approval, msgs.create_object_approval(
            creator=creator, bucket=bucket, object=name, size=size, content_type=content_type,
            checksums=checksums, expiry_height=expiry_height))

    def integrity_sig(self, object_id: int, checksum: bytes) -> bytes:
        """This SP's signature (as a secondary) over one piece index's checksum."""
        return self.keys.approval.sign(integrity_payload(object_id, checksum))


def seal_tx(primary: TestSP, object_id: int, secondaries: Sequence[TestSP],
            checksums: Sequence[bytes], *, sigs: Sequence[bytes] | None = None,
            key: PrivateKey | None = None, seq: int | None = None) -> dict[str, Any]:
    """A seal transaction of ``primary`` (signed by its seal key unless ``key`` is given)."""
    if sigs is None:
        sigs = [sp.integrity_sig(object_id, checksums[i + 1])
                for i, sp in enumerate(secondaries)]
    signer = key if key is not None else primary.keys.seal
    if seq is None:
        seq = primary.sealer.take_seq() if key is None else 0
    return msgs.sign(signer, msgs.seal_object_tx(
        pubkey=signer.public_key, seq=seq, object_id=object_id, primary_sp=primary.address,
        secondaries=[sp.address for sp in secondaries], secondary_sigs=list(sigs)))
