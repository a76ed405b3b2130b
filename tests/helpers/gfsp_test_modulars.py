"""Modular implementations for tests (tests/test_node.py), loaded by config dotted path.

A subprocess node imports these too, so this module must not import pytest or test files:
the test puts ``tests/helpers`` on ``PYTHONPATH`` and names ``gfsp_test_modulars:Class``.
In-process tests read and reset the class-level records.
"""

from __future__ import annotations

import math
from typing import ClassVar

import trio
import trio.testing

from node.modular import ModularBase, NodeContext


class FailsBeforeStart(ModularBase):
    """serve() raises before calling task_status.started()."""

    name = "metadata"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        raise RuntimeError("metadata store unreachable")


class FailsAfterStart(ModularBase):
    """serve() starts, then raises once the test sets ``trigger``."""

    name = "metadata"
    trigger: ClassVar[trio.Event | None] = None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        task_status.started()
        if FailsAfterStart.trigger is not None:
            await FailsAfterStart.trigger.wait()
        raise RuntimeError("lost the metadata index")


class ReturnsAfterStart(ModularBase):
    """serve() starts and then returns while the node is running."""

    name = "metadata"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        task_status.started()
        await trio.lowlevel.checkpoint()


class Draining(ModularBase):
    """A modular with drain(): drain takes ``drain_seconds`` (inf: never finishes)."""

    name = "uploader"
    requires = ("signer",)
    drain_seconds: ClassVar[float] = 1.0
    events: ClassVar[list[tuple[str, float]]] = []

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            Draining.events.append(("cancelled", trio.current_time()))

    async def drain(self) -> None:
        Draining.events.append(("drain-start", trio.current_time()))
        if math.isinf(Draining.drain_seconds):
            await trio.sleep_forever()
        await trio.sleep(Draining.drain_seconds)
        Draining.events.append(("drain-done", trio.current_time()))


class CustomApprover(ModularBase):
    """A replacement approver that records what it saw at start."""

    name = "approver"
    requires = ("signer",)
    seen: ClassVar[list[str]] = []

    def __init__(self, ctx: NodeContext) -> None:
        super().__init__(ctx)
        CustomApprover.seen.append("constructed")

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        # Started after its requirement: the signer is already callable.
        CustomApprover.seen.append(self.ctx.modulars.signer.operator_address)
        task_status.started()
        await trio.sleep_forever()

    def approve(self) -> str:
        return "custom"


class WrongName(ModularBase):
    """Registered under one name, calls itself another."""

    name = "not-approver"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        task_status.started()
        await trio.sleep_forever()


class SizeCapApprover(ModularBase):
    """An approver whose replicate-piece policy refuses objects over 1 MiB (p2p tests)."""

    name = "approver"
    requires = ("signer",)
    CAP = 1 << 20

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        task_status.started()
        await trio.sleep_forever()

    async def pre_replicate_piece_approval(self, task) -> None:
        return None

    async def handle_replicate_piece_approval(self, task) -> bool:
        if task.object.size > self.CAP:
            task.set_error(f"object of {task.object.size} bytes is over the 1 MiB cap")
            return False
        return True

    def post_replicate_piece_approval(self, task) -> None:
        return None


class UsesSignerWhileStopping(ModularBase):
    """Finishes a step after the node's stop began (a shielded section), then uses the
    signer: the node's stop must not have unregistered it yet. Records what it found."""

    name = "metadata"
    requires = ("signer",)
    found: ClassVar[list[str]] = []

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.testing.wait_all_tasks_blocked()  # the others have stopped
                UsesSignerWhileStopping.found.append(
                    self.ctx.modulars.signer.operator_address)
