"""Signer: the only holder of the SP's private keys (the seed's Signer), one per SP.

Ping/pong, approval requests and SP registration are signed with the operator key;
replicate-piece, bucket and object approvals and integrity hashes with the approval key; seal
transactions with the seal key. Other modulars never see a private key: they hand the signer a
message and get a signature back.

Chain transactions carry the account's sequence number. The signer tracks it locally per key
and sends one transaction per key at a time (a lock), so concurrent seals never race; on a
BAD_SEQUENCE refusal or a lost answer it asks the chain for the number again and retries (up
to ``signer.seal_retries``), and a seal whose object is already sealed counts as done.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import trio

from node import chain_msgs
from node.auth import new_nonce, sign_request
from node.chain import ChainClient, ChainUnavailable
from node.chain_msgs import ChainError
from node.crypto import KeySet, PrivateKey, pack, signing_bytes
from node.ec import integrity_hash
from node.errors import ConfigError
from node.modular import ModularBase, NodeContext
from p2p.messages import ApprovalRequest, ApprovalResponse, Ping, Pong, signing_payload

INTEGRITY_TYPE = "gfsp.integrity.v1"

log = logging.getLogger("gfsp.signer")


def integrity_payload(object_id: int, integrity: bytes) -> bytes:
    return pack([INTEGRITY_TYPE, object_id, integrity])


class Signer(ModularBase):
    name = "signer"

    def __init__(self, ctx: NodeContext) -> None:
        super().__init__(ctx)
        self._keys: KeySet = ctx.keys
        self._seq: dict[str, int] = {}
        self._locks: dict[str, trio.Lock] = {}

    def __repr__(self) -> str:
        return f"Signer(operator={self._keys.operator.address})"

    @property
    def operator_address(self) -> str:
        return self._keys.operator.address

    @property
    def approval_address(self) -> str:
        return self._keys.approval.address

    @property
    def approval_public_key(self) -> bytes:
        return self._keys.approval.public_key

    def sign_http_request(self, method: str, url: str, *,
                          query: Sequence[tuple[str, str]] = (), body_sha256: str | None,
                          headers: Mapping[str, str] | None = None,
                          expiry_seconds: int = 300) -> dict[str, str]:
        """Headers authenticating an SP-to-SP HTTP request as this SP's operator."""
        parts = urlsplit(url)
        hdrs = {"host": parts.netloc, **(headers or {})}
        hdrs.update(sign_request(self._keys.operator, method, parts.path, query, hdrs,
                                 body_sha256, int(time.time()) + expiry_seconds, new_nonce()))
        return hdrs

    def sign_p2p_ping_msg(self, ping: Ping) -> bytes:
        return self._keys.operator.sign(signing_payload(ping))

    def sign_p2p_pong_msg(self, pong: Pong) -> bytes:
        return self._keys.operator.sign(signing_payload(pong))

    def sign_p2p_approval_request(self, request: ApprovalRequest) -> bytes:
        return self._keys.operator.sign(signing_payload(request))

    def sign_replicate_piece_approval(self, response: ApprovalResponse) -> bytes:
        return self._keys.approval.sign(signing_payload(response))

    def sign_integrity_hash(self, object_id: int, checksums: Sequence[bytes]
                            ) -> tuple[bytes, bytes]:
        """(signature, integrity hash) over the checksums of what this SP holds."""
        integrity = integrity_hash(checksums)
        return self._keys.approval.sign(integrity_payload(object_id, integrity)), integrity

    # --- bucket/object approvals (the seed's SignCreateBucketApproval / ...ObjectApproval) --

    def sign_create_bucket_approval(self, approval: Mapping[str, Any]) -> bytes:
        if approval.get("type") != chain_msgs.APPROVAL_CREATE_BUCKET:
            raise ValueError("not a create-bucket approval")
        return self._keys.approval.sign(signing_bytes(approval))

    def sign_create_object_approval(self, approval: Mapping[str, Any]) -> bytes:
        if approval.get("type") != chain_msgs.APPROVAL_CREATE_OBJECT:
            raise ValueError("not a create-object approval")
        return self._keys.approval.sign(signing_bytes(approval))

    # --- chain transactions ---------------------------------------------------------------

    @property
    def chain(self) -> ChainClient:
        if self.ctx.chain is None:
            raise ConfigError("the signer needs a chain: set chain.endpoint "
                              "(not chain.registry_file)")
        return self.ctx.chain

    async def seal_object(self, *, object_id: int, secondaries: Sequence[str],
                          secondary_sigs: Sequence[bytes]) -> dict[str, Any]:
        """The seed's SealObject: sign MsgSealObject with the seal key and broadcast it."""
        def build(seq: int) -> dict[str, Any]:
            return chain_msgs.seal_object_tx(
                pubkey=self._keys.seal.public_key, seq=seq, object_id=object_id,
                primary_sp=self.operator_address, secondaries=secondaries,
                secondary_sigs=secondary_sigs)

        async def already_done() -> dict[str, Any] | None:
            obj = await self.chain.get_object_by_id(object_id)
            return {"object_id": object_id, "already": True} if obj and obj.sealed else None

        return await self._broadcast(self._keys.seal, build, already_done)

    async def register_sp(self, *, endpoint: str, p2p_addrs: Sequence[str]) -> dict[str, Any]:
        """Register (or update) this SP on the chain, signed by the operator key."""
        from p2p.host import peer_id_from_public_key  # the one module that knows libp2p ids

        peer_id = peer_id_from_public_key(self._keys.p2p.public_key)

        def build(seq: int) -> dict[str, Any]:
            return chain_msgs.register_sp_tx(
                pubkey=self._keys.operator.public_key, seq=seq, endpoint=endpoint,
                peer_id=peer_id, p2p_addrs=list(p2p_addrs)[:8],
                approval_key=self._keys.approval.public_key,
                seal_key=self._keys.seal.public_key, gc_key=self._keys.gc.public_key)

        return await self._broadcast(self._keys.operator, build, None)

    async def _broadcast(self, key: PrivateKey, build: Any, already_done: Any
                         ) -> dict[str, Any]:
        address = key.address
        lock = self._locks.setdefault(address, trio.Lock())
        retries = self.ctx.config.signer.seal_retries
        async with lock:
            for attempt in range(retries + 1):
                if address not in self._seq:
                    self._seq[address] = await self.chain.account_seq(address)
                tx = chain_msgs.sign(key, build(self._seq[address]))
                try:
                    result = await self.chain.broadcast(tx)
                except ChainError as exc:
                    retryable = isinstance(exc, ChainUnavailable) or exc.code == "BAD_SEQUENCE"
                    self._seq.pop(address, None)  # ask the chain again next time
                    if already_done is not None and (done := await _quiet(already_done)):
                        return done
                    if not retryable or attempt == retries:
                        raise
                    log.warning("tx from %s failed (%s), retry %d/%d", address, exc.code,
                                attempt + 1, retries)
                    await trio.sleep(min(0.05 * 2**attempt, 2.0))
                    continue
                self._seq[address] += 1
                return result
        raise AssertionError("unreachable")


async def _quiet(check: Any) -> Any:
    """Run an idempotency check; a chain that cannot answer it means "not known to be done"."""
    try:
        return await check()
    except ChainError:
        return None
