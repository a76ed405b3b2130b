"""What a modular is, and the container through which modulars reach each other.

A modular (the seed's ``Modular``) is an object with ``name``, ``description`` and
``async def serve(self, *, task_status)``: it calls ``task_status.started()`` once it is ready to
take calls and runs until cancelled. A modular with work in flight may also define
``async def drain(self)``: on SIGTERM the node calls it (within the grace period) before
cancelling. ``requires`` names the modulars that must be running before this one starts.

Modulars are constructed with one :class:`NodeContext` and call each other in-process through
``ctx.modulars`` (a :class:`Modulars`), whose accessors raise :class:`~node.errors.NilModularError`
(the seed's ``ErrNilModular``) for a modular that is absent or not running.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import trio

from node.errors import NilModularError

if TYPE_CHECKING:
    from node.chain import ChainClient
    from node.config import Config
    from node.crypto import KeySet
    from node.db import SPDB
    from node.piecestore import PieceStore
    from node.rcmgr import ResourceLimiter
    from node.spregistry import SPRegistry

# The seed's modular names (snake_case, as the config uses them) and descriptions.
DESCRIPTIONS: dict[str, str] = {
    "gater": "Receives the user request and route to the responding service.",
    "approver": "Handles the ask create bucket/object and replicate piece approval request.",
    "authorizer": "Authorization authentication.",
    "uploader": "Uploads object payload to primary SP.",
    "downloader": "Downloads object and get challenge info from the backend and statistical "
                  "read traffic.",
    "manager": "SP management and task scheduling.",
    "executor": "Executes background task.",
    "p2p": "Communicates between SPs on p2p protocol.",
    "receiver": "Receives data pieces of an object from other storage provider and store.",
    "signer": "Sign the transaction and broadcast to chain.",
    "metadata": "Serves bucket, object and upload-progress metadata.",
}


@runtime_checkable
class Modular(Protocol):
    """The seed's Modular: a named service the node starts in its nursery."""

    name: str
    description: str

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None: ...


class Drainable(Protocol):
    async def drain(self) -> None: ...


class Modulars:
    """The running modulars by name. Accessing one that is absent or stopped raises NilModular."""

    def __init__(self) -> None:
        self._running: dict[str, Modular] = {}

    def get(self, name: str) -> Any:
        try:
            return self._running[name]
        except KeyError:
            raise NilModularError(name) from None

    def is_running(self, name: str) -> bool:
        return name in self._running

    def running(self) -> list[str]:
        return list(self._running)

    def mark_running(self, modular: Modular) -> None:
        self._running[modular.name] = modular

    def mark_stopped(self, name: str) -> None:
        self._running.pop(name, None)

    # Typed accessors, one per seed modular (each raises NilModularError when not running).
    @property
    def signer(self) -> Any:
        return self.get("signer")

    @property
    def p2p(self) -> Any:
        return self.get("p2p")

    @property
    def approver(self) -> Any:
        return self.get("approver")

    @property
    def authorizer(self) -> Any:
        return self.get("authorizer")

    @property
    def uploader(self) -> Any:
        return self.get("uploader")

    @property
    def downloader(self) -> Any:
        return self.get("downloader")

    @property
    def manager(self) -> Any:
        return self.get("manager")

    @property
    def executor(self) -> Any:
        return self.get("executor")

    @property
    def receiver(self) -> Any:
        return self.get("receiver")

    @property
    def metadata(self) -> Any:
        return self.get("metadata")

    @property
    def gater(self) -> Any:
        return self.get("gater")


@dataclass
class NodeContext:
    """What every modular is constructed with: shared services, no global state.

    ``keys`` is handed over for the signer (and the libp2p host key); other modulars sign
    through ``modulars.signer``.
    """

    config: Config
    limiter: ResourceLimiter
    db: SPDB
    keys: KeySet
    sp_registry: SPRegistry | None = None
    chain: ChainClient | None = None
    piecestore: PieceStore | None = None
    modulars: Modulars = field(default_factory=Modulars)
    clock: Callable[[], float] = field(default=trio.current_time)


ModularFactory = Callable[[NodeContext], Modular]


class ModularBase:
    """Convenience base: name/description from the seed table, ``requires`` empty, and a
    ``serve`` for modulars with no background work of their own (ready at once, then running
    until cancelled). ``needs_piecestore`` makes ``serve`` refuse to start without one."""

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    needs_piecestore: ClassVar[bool] = False

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx

    @property
    def description(self) -> str:
        return DESCRIPTIONS.get(self.name, self.name)

    @property
    def store(self) -> PieceStore:
        """The node's piece store (RuntimeError when the node has none)."""
        if self.ctx.piecestore is None:
            raise RuntimeError(f"the {self.name} needs a piece store")
        return self.ctx.piecestore

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        if self.needs_piecestore:
            self.store  # noqa: B018 - raises when the node has no piece store
        task_status.started()
        await trio.sleep_forever()
