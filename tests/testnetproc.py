"""The ``gfsp-testnet`` command as a subprocess, and the last-resort cleanup of its processes.

Shared by tests/test_testnet.py and tests/test_client_cli.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import trio

from testnet.cli import alive, read_pid

GFSP_TESTNET = Path(sys.executable).parent / "gfsp-testnet"


async def run_testnet(*args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    result = await trio.run_process([str(GFSP_TESTNET), *args], capture_stdout=True,
                                    capture_stderr=True, check=False,
                                    stdin=subprocess.DEVNULL)
    if check:
        assert result.returncode == 0, (args, result.stdout.decode(), result.stderr.decode())
    return result


def recorded_pids(root: Path) -> list[int]:
    run = root / "run"
    return [pid for f in sorted(run.glob("*.pid")) if (pid := read_pid(f))] if run.exists() \
        else []


async def last_resort(root: Path, pids: set[int]) -> None:
    """``down``, then SIGKILL every pid the testnet ever recorded that is still alive."""
    with trio.move_on_after(30) as scope:
        scope.shield = True
        if (root / "testnet.toml").exists():
            await run_testnet("down", "--dir", str(root), "--grace", "3", check=False)
    for pid in pids | set(recorded_pids(root)):
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
