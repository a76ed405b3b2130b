"""Signer: the only holder of the SP's private keys (the seed's Signer), one per SP.

Ping/pong and approval requests are signed with the operator key, replicate-piece approvals
and integrity hashes with the approval key. Other modulars never see a private key: they hand
the signer a message and get a signature back. (``seal_object`` and the bucket/object approval
signatures arrive with the chain client.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import trio

from node.crypto import KeySet, pack
from node.modular import ModularBase, NodeContext
from p2p.messages import ApprovalRequest, ApprovalResponse, Ping, Pong, signing_payload

INTEGRITY_TYPE = "gfsp.integrity.v1"


def integrity_hash(checksums: Sequence[bytes]) -> bytes:
    """SHA-256 over the concatenated piece/segment checksums (ARCHITECTURE §4)."""
    h = hashlib.sha256()
    for c in checksums:
        h.update(c)
    return h.digest()


def integrity_payload(object_id: int, integrity: bytes) -> bytes:
    return pack([INTEGRITY_TYPE, object_id, integrity])


class Signer(ModularBase):
    name = "signer"

    def __init__(self, ctx: NodeContext) -> None:
        super().__init__(ctx)
        self._keys: KeySet = ctx.keys

    def __repr__(self) -> str:
        return f"Signer(operator={self._keys.operator.address})"

    @property
    def operator_address(self) -> str:
        return self._keys.operator.address

    @property
    def approval_address(self) -> str:
        return self._keys.approval.address

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        task_status.started()
        await trio.sleep_forever()

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
