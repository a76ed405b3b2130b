"""Tests for the node frame: node.app.Node in-process, and `gfsp-node` as a real subprocess.

In-process tests run a Node over a folder made by `gfsp-node init` (through node.cli.main) with
fake modulars from tests/helpers/gfsp_test_modulars.py named in the config. Timing tests (drain,
grace period) use the autojump clock. Subprocess tests run the console script with
NOTIFY_SOCKET pointing at a datagram socket the test binds, and check exit codes and stderr.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import trio

from node import cli
from node.app import ModularFailed, Node
from node.config import Config, LimitValues, ModularsSection, Seconds, load_config
from node.crypto import PrivateKey, load_keys
from node.errors import ConfigError, ModularStartError, NilModularError
from node.lockfile import LOCK_NAME, DataDirLocked
from node.registry import (
    CANONICAL_ORDER,
    DEFAULT_MODULARS,
    build_modulars,
    resolve_factories,
    start_order,
)

HELPERS = Path(__file__).parent / "helpers"
HELPER_MODULE = "gfsp_test_modulars"
# In-process tests run the signer alone (plus the test's own modulars): no libp2p host.
OTHER_DEFAULTS = [name for name in DEFAULT_MODULARS if name != "signer"]


def _gfsp_node() -> str:
    beside = Path(sys.executable).parent / "gfsp-node"
    found = str(beside) if beside.exists() else shutil.which("gfsp-node")
    assert found, "the gfsp-node console script is not installed"
    return found


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def helpers(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The helper module, importable by dotted path, with its records reset."""
    monkeypatch.syspath_prepend(str(HELPERS))
    import gfsp_test_modulars as mod

    monkeypatch.setattr(mod.Draining, "events", [])
    monkeypatch.setattr(mod.Draining, "drain_seconds", 1.0)
    monkeypatch.setattr(mod.CustomApprover, "seen", [])
    monkeypatch.setattr(mod.FailsAfterStart, "trigger", None)
    yield mod


@pytest.fixture
def node_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "sp"
    assert cli.main(["init", "--dir", str(folder), "--seed", "t",
                     "--gater-listen", "127.0.0.1:0"]) == 0
    return folder


def _config(node_dir: Path, *, implementations: Mapping[str, str] | None = None,
            disabled: list[str] | None = None, grace_period: float | None = None) -> Config:
    cfg = load_config(node_dir / "config.toml")
    replaced = set(implementations or ())
    modulars = ModularsSection(disabled=[*(n for n in OTHER_DEFAULTS if n not in replaced),
                                         *(disabled or [])],
                               implementations=dict(implementations or {}))
    node = cfg.node
    if grace_period is not None:
        node = dataclasses.replace(node, grace_period=Seconds(grace_period))
    return dataclasses.replace(cfg, modulars=modulars, node=node)


def _impl(cls_name: str) -> str:
    return f"{HELPER_MODULE}:{cls_name}"


# --- in-process: start, container, stop -----------------------------------------------------


async def test_node_starts_signer_and_stops_cleanly(node_dir: Path) -> None:
    cfg = _config(node_dir)
    node = Node(cfg, env={}, handle_signals=False)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            ctx = node.ctx
            assert ctx is not None
            assert node.order == ["signer"]
            signer = ctx.modulars.signer
            assert signer.operator_address == PrivateKey.from_passphrase("t", "operator").address
            assert ctx.modulars.running() == ["signer"]
            with pytest.raises(NilModularError, match="p2p"):
                _ = ctx.modulars.p2p
            with pytest.raises(NilModularError):
                _ = ctx.modulars.gater
            node.request_stop()
    # run() returned on its own: the nursery closed without cancelling it.
    assert not nursery.cancel_scope.cancelled_caught
    assert ctx.modulars.running() == []
    with pytest.raises(NilModularError, match="signer"):
        _ = ctx.modulars.signer
    assert cfg.db_path.exists()


def test_init_folder_layout(node_dir: Path) -> None:
    cfg = load_config(node_dir / "config.toml")
    assert cfg.node.name == "sp"
    assert cfg.keys_dir == node_dir / "keys"
    assert cfg.data_dir.is_dir()
    assert cfg.data_dir.stat().st_mode & 0o777 == 0o700  # user objects: whatever the umask
    keys = load_keys(cfg.keys_dir)
    assert keys.operator.address == PrivateKey.from_passphrase("t", "operator").address


def test_init_twice_in_process_refuses(node_dir: Path, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    before = (node_dir / "keys" / "operator.key").read_text()
    capsys.readouterr()
    assert cli.main(["init", "--dir", str(node_dir), "--seed", "other"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (node_dir / "keys" / "operator.key").read_text() == before


# --- start order (registry.start_order over fake modular objects) ----------------------------


@dataclasses.dataclass
class FakeModular:
    name: str
    requires: tuple[str, ...] = ()
    description: str = "fake"

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()


def _fakes(**requires: tuple[str, ...]) -> dict[str, FakeModular]:
    return {name: FakeModular(name, reqs) for name, reqs in requires.items()}


def test_start_order_canonical_without_requirements() -> None:
    names = list(reversed(CANONICAL_ORDER))
    assert start_order({n: FakeModular(n) for n in names}) == list(CANONICAL_ORDER)


def test_start_order_follows_requires() -> None:
    mods = _fakes(signer=(), gater=(), approver=("gater", "p2p"), p2p=("signer",), zeta=(),
                  alpha=("zeta",))
    order = start_order(mods)
    assert sorted(order) == sorted(mods)
    for name, mod in mods.items():
        for req in mod.requires:
            assert order.index(req) < order.index(name), order
    # Canonical names first in canonical order where allowed; unknown names after, by name.
    assert order == ["signer", "p2p", "gater", "approver", "zeta", "alpha"]


def test_start_order_missing_requirement() -> None:
    with pytest.raises(ConfigError, match="'uploader' requires 'manager'"):
        start_order(_fakes(signer=(), uploader=("manager",)))


def test_start_order_cycle() -> None:
    with pytest.raises(ConfigError, match="cycle") as info:
        start_order(_fakes(signer=(), a=("b",), b=("c",), c=("a",)))
    msg = str(info.value)
    assert "a" in msg and "b" in msg and "c" in msg and "signer" not in msg
    with pytest.raises(ConfigError, match="cycle"):
        start_order(_fakes(selfish=("selfish",)))


# --- in-process: failures --------------------------------------------------------------------


async def test_modular_failing_before_start(node_dir: Path, helpers: ModuleType) -> None:
    cfg = _config(node_dir, implementations={"metadata": _impl("FailsBeforeStart")})
    node = Node(cfg, env={}, handle_signals=False)
    with trio.fail_after(30), pytest.raises(ModularStartError) as info:
        await node.run()
    err = info.value
    assert err.name == "metadata"
    assert "'metadata' failed to start" in str(err)
    assert "metadata store unreachable" in str(err)
    assert isinstance(err.cause, RuntimeError)
    assert node.order == ["signer", "metadata"]
    assert node.ctx is not None and node.ctx.modulars.running() == []


async def test_modular_failing_after_start(node_dir: Path, helpers: ModuleType) -> None:
    helpers.FailsAfterStart.trigger = trio.Event()
    cfg = _config(node_dir, implementations={"metadata": _impl("FailsAfterStart")})
    node = Node(cfg, env={}, handle_signals=False)
    failures: list[ModularFailed] = []

    async def run_node(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await node.run(task_status=task_status)
        except ModularFailed as exc:
            failures.append(exc)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_node)
            assert node.ctx is not None
            assert node.ctx.modulars.running() == ["signer", "metadata"]
            helpers.FailsAfterStart.trigger.set()
    assert len(failures) == 1
    assert failures[0].name == "metadata"
    assert "lost the metadata index" in str(failures[0])
    assert node.ctx.modulars.running() == []


async def test_a_modular_finishing_a_step_during_the_stop_still_finds_its_peers(
        node_dir: Path, helpers: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stop cancels every modular at once; one still finishing a step must not find a
    peer already unregistered (found in CI: the executor asked a manager that had just
    stopped, NilModularError, and a clean stop raised)."""
    monkeypatch.setattr(helpers.UsesSignerWhileStopping, "found", [])
    cfg = _config(node_dir, implementations={"metadata": _impl("UsesSignerWhileStopping")})
    node = Node(cfg, env={}, handle_signals=False)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            node.request_stop()
    assert node.ctx is not None
    assert helpers.UsesSignerWhileStopping.found == [node.ctx.keys.operator.address]
    assert node.ctx.modulars.running() == []


async def test_modular_returning_while_running_is_a_failure(node_dir: Path,
                                                            helpers: ModuleType) -> None:
    cfg = _config(node_dir, implementations={"metadata": _impl("ReturnsAfterStart")})
    node = Node(cfg, env={}, handle_signals=False)
    with trio.fail_after(30), pytest.raises(ModularFailed, match="returned while running"):
        await node.run()


# --- in-process: drain and grace period (autojump clock) -------------------------------------


async def _run_and_stop(node: Node, *, stops: int = 1) -> tuple[float, float]:
    """Start ``node``, request a stop ``stops`` times; (time of the stop, time run() ended)."""
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        stopped_at = trio.current_time()
        for _ in range(stops):
            node.request_stop()
    return stopped_at, trio.current_time()


async def test_stop_waits_for_drain(node_dir: Path, helpers: ModuleType,
                                    autojump_clock: trio.testing.MockClock) -> None:
    helpers.Draining.drain_seconds = 2.0
    cfg = _config(node_dir, implementations={"uploader": _impl("Draining")}, grace_period=5)
    node = Node(cfg, env={}, handle_signals=False)
    stopped_at, ended_at = await _run_and_stop(node)
    events = dict(helpers.Draining.events)
    assert list(events) == ["drain-start", "drain-done", "cancelled"]
    assert events["drain-start"] == pytest.approx(stopped_at)
    assert events["drain-done"] == pytest.approx(stopped_at + 2.0)
    assert events["cancelled"] == pytest.approx(stopped_at + 2.0)
    assert ended_at - stopped_at == pytest.approx(2.0, abs=0.01)


async def test_drain_that_never_finishes_is_cut_at_grace_period(
        node_dir: Path, helpers: ModuleType, autojump_clock: trio.testing.MockClock) -> None:
    helpers.Draining.drain_seconds = float("inf")
    cfg = _config(node_dir, implementations={"uploader": _impl("Draining")}, grace_period=3)
    node = Node(cfg, env={}, handle_signals=False)
    stopped_at, ended_at = await _run_and_stop(node)
    events = dict(helpers.Draining.events)
    assert "drain-done" not in events
    assert events["cancelled"] == pytest.approx(stopped_at + 3.0)
    assert ended_at - stopped_at == pytest.approx(3.0, abs=0.01)


async def test_second_stop_skips_grace_period(
        node_dir: Path, helpers: ModuleType, autojump_clock: trio.testing.MockClock) -> None:
    helpers.Draining.drain_seconds = float("inf")
    cfg = _config(node_dir, implementations={"uploader": _impl("Draining")}, grace_period=100)
    node = Node(cfg, env={}, handle_signals=False)
    stopped_at, ended_at = await _run_and_stop(node, stops=2)
    events = dict(helpers.Draining.events)
    assert "drain-start" in events and "drain-done" not in events
    assert ended_at - stopped_at < 1.0


async def test_zero_grace_period_cancels_at_once(
        node_dir: Path, helpers: ModuleType, autojump_clock: trio.testing.MockClock) -> None:
    helpers.Draining.drain_seconds = 5.0
    cfg = _config(node_dir, implementations={"uploader": _impl("Draining")}, grace_period=0)
    node = Node(cfg, env={}, handle_signals=False)
    stopped_at, ended_at = await _run_and_stop(node)
    assert "drain-done" not in dict(helpers.Draining.events)
    assert ended_at - stopped_at < 0.01


async def test_unreachable_notify_socket_is_not_fatal(
        node_dir: Path, tmp_path: Path, autojump_clock: trio.testing.MockClock,
        caplog: pytest.LogCaptureFixture) -> None:
    env = {"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock"), "WATCHDOG_USEC": "200000"}
    node = Node(_config(node_dir), env=env, handle_signals=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        await trio.sleep(1.0)  # virtual time: the watchdog fires every 0.1 s meanwhile
        assert node.ctx is not None and node.ctx.modulars.is_running("signer")
        node.request_stop()
    sent = [r.getMessage() for r in caplog.records if "NOTIFY_SOCKET" in r.getMessage()]
    assert any("READY=1" in m for m in sent)
    assert sum("WATCHDOG=1" in m for m in sent) >= 5
    assert any("STOPPING=1" in m for m in sent)


# --- in-process: custom implementations and registry errors ----------------------------------


async def test_custom_implementation_from_config(node_dir: Path, helpers: ModuleType) -> None:
    # Through the config file, as an operator would write it.
    config = node_dir / "config.toml"
    text = config.read_text()
    assert "\ndisabled = []\n" in text
    disabled = ", ".join(f'"{name}"' for name in OTHER_DEFAULTS if name != "approver")
    text = text.replace("\ndisabled = []\n", f"\ndisabled = [{disabled}]\n")
    text += f'\n[modulars.implementations]\napprover = "{_impl("CustomApprover")}"\n'
    config.write_text(text)
    cfg = load_config(config)
    assert cfg.modulars.implementations == {"approver": _impl("CustomApprover")}
    node = Node(cfg, env={}, handle_signals=False)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            assert node.ctx is not None
            assert node.order == ["signer", "approver"]
            approver = node.ctx.modulars.approver
            assert isinstance(approver, helpers.CustomApprover)
            assert approver.approve() == "custom"
            node.request_stop()
    operator = PrivateKey.from_passphrase("t", "operator").address
    assert helpers.CustomApprover.seen == ["constructed", operator]


async def test_unknown_modular_name_is_config_error(node_dir: Path, helpers: ModuleType) -> None:
    cfg = _config(node_dir, implementations={"frobnicator": _impl("CustomApprover")})
    node = Node(cfg, env={}, handle_signals=False)
    with trio.fail_after(30), pytest.raises(ConfigError, match="unknown modular 'frobnicator'"):
        await node.run()
    cfg = _config(node_dir, disabled=["nonesuch"])
    with pytest.raises(ConfigError, match="unknown modular 'nonesuch'") as info:
        resolve_factories(cfg)
    assert str(node_dir / "config.toml") in str(info.value)
    # found by an operator review: a misspelt [limits.services.uploder] was taken silently
    cfg = dataclasses.replace(cfg, modulars=ModularsSection(), limits=dataclasses.replace(
        cfg.limits, services={"uploder": LimitValues()}))
    with pytest.raises(ConfigError, match=r"limits\.services: unknown modular 'uploder'"):
        resolve_factories(cfg)


@pytest.mark.parametrize("path", [f"{HELPER_MODULE}:NoSuchClass", "no_such_pkg.mod:Thing"])
def test_unloadable_implementation_is_config_error(node_dir: Path, helpers: ModuleType,
                                                   path: str) -> None:
    cfg = _config(node_dir, implementations={"approver": path})
    with pytest.raises(ConfigError, match="cannot load") as info:
        resolve_factories(cfg)
    assert path in str(info.value)


async def test_misnamed_implementation_is_config_error(node_dir: Path,
                                                       helpers: ModuleType) -> None:
    cfg = _config(node_dir, implementations={"approver": _impl("WrongName")})
    node = Node(cfg, env={}, handle_signals=False)
    with trio.fail_after(30), pytest.raises(ConfigError, match="calls itself 'not-approver'"):
        await node.run()


async def test_disabled_requirement_is_config_error(node_dir: Path, helpers: ModuleType) -> None:
    cfg = _config(node_dir, implementations={"approver": _impl("CustomApprover")},
                  disabled=["signer"])
    factories = resolve_factories(cfg)
    assert set(factories) == {"approver"}
    node = Node(cfg, env={}, handle_signals=False)
    with trio.fail_after(30), pytest.raises(ConfigError, match="requires 'signer'"):
        await node.run()


def test_build_modulars_checks_protocol(node_dir: Path) -> None:
    class NotAModular:
        def __init__(self, ctx: Any) -> None:
            self.ctx = ctx

    with pytest.raises(ConfigError, match="lacks name/description/serve"):
        build_modulars(object(), {"approver": NotAModular})  # type: ignore[arg-type]


# --- subprocess: `gfsp-node` as an operator (and systemd) runs it -----------------------------


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
                        "CREDENTIALS_DIRECTORY")}
    path = os.pathsep.join(p for p in (str(HELPERS), env.get("PYTHONPATH", "")) if p)
    env["PYTHONPATH"] = path
    env.update(extra)
    return env


def _socket_path(tmp_path: Path) -> str:
    path = str(tmp_path / "notify.sock")
    assert len(path.encode()) < 108, "tmp_path too long for an AF_UNIX address"
    return path


async def _gfsp(*args: str, cwd: Path, env: dict[str, str] | None = None
                ) -> trio.CompletedProcess[bytes]:
    return await trio.run_process([_gfsp_node(), *args], cwd=str(cwd), env=env or _child_env(),
                                  capture_stdout=True, capture_stderr=True, check=False)


async def _await_state(sock: trio.socket.SocketType, state: str, seen: list[str]) -> None:
    """Receive datagrams until one carries ``state``; every line received goes to ``seen``."""
    while True:
        data = await sock.recv(4096)
        lines = data.decode().splitlines()
        seen.extend(lines)
        if state in lines:
            return


def _gfsp_lines(stderr: bytes) -> list[str]:
    """The lines the CLI itself printed (not the JSON log lines)."""
    return [line for line in stderr.decode().splitlines() if line.startswith("gfsp-node:")]


class RunningNode:
    """A `gfsp-node run` subprocess with stderr in a file; killed if the test leaves early."""

    def __init__(self, tmp_path: Path, config: Path, env: dict[str, str]) -> None:
        self.tmp_path, self.config, self.env = tmp_path, config, env
        self.stderr_path = tmp_path / "node.stderr"
        self.proc: trio.Process | None = None

    async def __aenter__(self) -> RunningNode:
        with self.stderr_path.open("wb") as err:
            self.proc = await trio.lowlevel.open_process(
                [_gfsp_node(), "run", "--config", str(self.config)], cwd=str(self.tmp_path),
                env=self.env, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.kill()
            with trio.CancelScope(shield=True):
                await self.proc.wait()

    def stderr(self) -> str:
        return self.stderr_path.read_text()


async def test_acceptance_ready_sigterm_stopping_exit_0(tmp_path: Path) -> None:
    folder = tmp_path / "D"
    with trio.fail_after(60):
        init = await _gfsp("init", "--dir", str(folder), "--seed", "s",
                           "--gater-listen", "127.0.0.1:0", cwd=tmp_path)
        assert init.returncode == 0, init.stderr
        operator = PrivateKey.from_passphrase("s", "operator").address
        assert operator in init.stdout.decode()
        config = folder / "config.toml"
        grace = load_config(config).node.grace_period
        path = _socket_path(tmp_path)
        seen: list[str] = []
        with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            await sock.bind(path)
            async with RunningNode(tmp_path, config, _child_env(NOTIFY_SOCKET=path)) as node:
                assert node.proc is not None
                await _await_state(sock, "READY=1", seen)
                assert seen == ["READY=1"]
                node.proc.send_signal(signal.SIGTERM)
                with trio.fail_after(grace):
                    await _await_state(sock, "STOPPING=1", seen)
                    returncode = await node.proc.wait()
        assert returncode == 0, node.stderr()
        assert seen == ["READY=1", "STOPPING=1"]
        stderr = node.stderr()
        assert "Traceback" not in stderr
        assert "received SIGTERM" in stderr
        assert (folder / "data" / "spdb.sqlite3").exists()


async def test_sigint_also_stops_cleanly(node_dir: Path, tmp_path: Path) -> None:
    path = _socket_path(tmp_path)
    seen: list[str] = []
    with trio.fail_after(60), trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        await sock.bind(path)
        async with RunningNode(tmp_path, node_dir / "config.toml",
                               _child_env(NOTIFY_SOCKET=path)) as node:
            assert node.proc is not None
            await _await_state(sock, "READY=1", seen)
            node.proc.send_signal(signal.SIGINT)
            await _await_state(sock, "STOPPING=1", seen)
            assert await node.proc.wait() == 0, node.stderr()
    assert "Traceback" not in node.stderr()


async def test_watchdog_pings_repeatedly(node_dir: Path, tmp_path: Path) -> None:
    path = _socket_path(tmp_path)
    seen: list[str] = []
    with trio.fail_after(60), trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        await sock.bind(path)
        env = _child_env(NOTIFY_SOCKET=path, WATCHDOG_USEC="200000")
        async with RunningNode(tmp_path, node_dir / "config.toml", env) as node:
            assert node.proc is not None
            await _await_state(sock, "READY=1", seen)
            for _ in range(4):
                await _await_state(sock, "WATCHDOG=1", seen)
            node.proc.send_signal(signal.SIGTERM)
            await _await_state(sock, "STOPPING=1", seen)
            assert await node.proc.wait() == 0, node.stderr()
    assert seen[0] == "READY=1"
    assert seen.count("WATCHDOG=1") >= 4
    assert seen[-1] == "STOPPING=1"


async def test_broken_config_exits_2_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "broken.toml"
    config.write_text('[p2p]\nping_interval = "x"\n')
    with trio.fail_after(30):
        result = await _gfsp("run", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    stderr = result.stderr.decode()
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert "p2p.ping_interval" in lines[0] and "'x'" in lines[0]
    assert str(config) in lines[0]


async def test_missing_config_exits_2(tmp_path: Path) -> None:
    with trio.fail_after(30):
        result = await _gfsp("run", "--config", str(tmp_path / "nope.toml"), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and "nope.toml" in lines[0] and "not found" in lines[0]


async def test_readable_key_file_exits_2_naming_it(node_dir: Path, tmp_path: Path) -> None:
    key = node_dir / "keys" / "operator.key"
    key.chmod(0o644)
    with trio.fail_after(30):
        result = await _gfsp("run", "--config", str(node_dir / "config.toml"), cwd=tmp_path)
    assert result.returncode == 2
    stderr = result.stderr.decode()
    assert "Traceback" not in stderr
    (line,) = _gfsp_lines(result.stderr)
    assert str(key) in line and "0644" in line


async def test_modular_failing_to_start_exits_non_zero(node_dir: Path, tmp_path: Path) -> None:
    with (node_dir / "config.toml").open("a") as f:
        f.write(f'\n[modulars.implementations]\nmetadata = "{_impl("FailsBeforeStart")}"\n')
    path = _socket_path(tmp_path)
    with trio.fail_after(30), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.bind(path)
        result = await _gfsp("run", "--config", str(node_dir / "config.toml"), cwd=tmp_path,
                             env=_child_env(NOTIFY_SOCKET=path))
        # Never READY: nothing was sent to the notify socket (the child has exited).
        with pytest.raises(BlockingIOError):
            sock.recv(4096)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr.decode()
    (line,) = _gfsp_lines(result.stderr)
    assert "'metadata' failed to start" in line and "metadata store unreachable" in line


@pytest.mark.parametrize("key", ["gater", "admin"])
async def test_a_port_in_use_is_named_in_one_line(node_dir: Path, tmp_path: Path,
                                                  key: str) -> None:
    """Found in review: the message was "ExceptionGroup: Exceptions from Trio nursery (1
    sub-exception)" (gater) or ": Address already in use" (admin)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        text = (node_dir / "config.toml").read_text()
        if key == "gater":
            text = text.replace('listen = "127.0.0.1:0"', f'listen = "{address}"')
            want = f"gater.listen = '{address}'"
        else:
            text = text.replace('admin_listen = "127.0.0.1:0"', f'admin_listen = "{address}"')
            want = f"node.admin_listen = '{address}'"
        assert address in text
        (node_dir / "config.toml").write_text(text)
        with trio.fail_after(30):
            result = await _gfsp("run", "--config", str(node_dir / "config.toml"),
                                 cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr.decode()
    (line,) = _gfsp_lines(result.stderr)
    assert want in line and "EADDRINUSE" in line and "ExceptionGroup" not in line, line


async def test_a_second_node_on_one_data_folder_stops_at_once(node_dir: Path,
                                                             tmp_path: Path) -> None:
    """Found in review: a second ``run`` of one config started every modular on the same SPDB
    and piece store, and failed only at the gater's port."""
    cfg = _config(node_dir)
    first = Node(cfg, env={}, handle_signals=False)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(first.run)
            second = Node(cfg, env={}, handle_signals=False)
            with pytest.raises(DataDirLocked, match=f"pid {os.getpid()}"):
                await second.run()
            assert second.ctx is None  # nothing was opened
            result = await _gfsp("run", "--config", str(node_dir / "config.toml"),
                                 cwd=tmp_path)
            assert result.returncode == 1
            (line,) = _gfsp_lines(result.stderr)
            assert "another node runs on" in line and str(os.getpid()) in line, line
            first.request_stop()
    # the lock goes with its holder: the folder serves a new node at once
    again = Node(cfg, env={}, handle_signals=False)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(again.run)
            again.request_stop()
    assert (cfg.data_dir / LOCK_NAME).stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(("argv", "named"), [
    (["--gater-listen", "notahostport"], "gater.listen = 'notahostport'"),
    (["--gater-listen", "127.0.0.1:99999"], "gater.listen = '127.0.0.1:99999'"),
    (["--p2p-listen", "garbage"], "p2p.listen = 'garbage'"),
    (["--chain", "notaurl"], "chain.endpoint = 'notaurl'"),
])
def test_init_refuses_what_run_would(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     argv: list[str], named: str) -> None:
    """Found by a UX review: init wrote these, and run refused them (or failed on the
    chain without naming chain.endpoint)."""
    folder = tmp_path / "D"
    assert cli.main(["init", "--dir", str(folder), *argv]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert named in line, line
    assert not folder.exists()


def test_init_into_a_file_is_a_usage_error(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "f").write_text("")
    assert cli.main(["init", "--dir", str(tmp_path / "f")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"--dir {tmp_path / 'f'}" in line, line


async def test_init_twice_exits_2(tmp_path: Path) -> None:
    folder = tmp_path / "D"
    with trio.fail_after(30):
        first = await _gfsp("init", "--dir", str(folder), "--seed", "s",
                           "--gater-listen", "127.0.0.1:0", cwd=tmp_path)
        assert first.returncode == 0, first.stderr
        key_before = (folder / "keys" / "operator.key").read_text()
        second = await _gfsp("init", "--dir", str(folder), "--seed", "other", cwd=tmp_path)
    assert second.returncode == 2
    (line,) = _gfsp_lines(second.stderr)
    assert "already exists" in line
    assert (folder / "keys" / "operator.key").read_text() == key_before


async def test_register_puts_the_sp_on_the_chain(tmp_path: Path, nursery: trio.Nursery) -> None:
    """Found by an operator review: nothing but gfsp-testnet could register an SP, so a node
    set up by the README's steps was invisible to clients and other SPs."""
    from node.chain import DevChainClient
    from testnet.devchain import DevChain
    from tests.p2pnet import free_port

    with trio.fail_after(60):
        endpoint = await nursery.start(DevChain(tmp_path / "chain", block_interval=0.2).serve)
        folder = tmp_path / "solo"
        gater, p2p = f"127.0.0.1:{free_port()}", f"/ip4/127.0.0.1/tcp/{free_port()}"
        made = await _gfsp("init", "--dir", str(folder), "--chain", endpoint, "--gater-listen",
                           gater, "--p2p-listen", p2p, cwd=tmp_path)
        assert made.returncode == 0, made.stderr
        config = str(folder / "config.toml")
        operator = load_keys(folder / "keys").operator.address
        done = await _gfsp("register", "--config", config, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert operator in done.stdout.decode()
        async with DevChainClient(endpoint) as chain:
            sp = await chain.get_sp(operator)
            assert sp is not None and (sp.endpoint, sp.p2p_addrs) == (f"http://{gater}", (p2p,))
            # again with other names: the entry is updated
            moved = await _gfsp("register", "--config", config, "--endpoint",
                                "HTTPS://sp.example/", "--p2p-addr", "/dns4/sp.example/tcp/9044",
                                "--p2p-addr", "/dns4/sp.example/tcp/9044", cwd=tmp_path)
            assert moved.returncode == 0, moved.stderr
            sp = await chain.get_sp(operator)
            assert sp is not None and sp.endpoint == "https://sp.example"
            assert sp.p2p_addrs == ("/dns4/sp.example/tcp/9044",)  # once
        bad_args = [(["--endpoint", bad], "--endpoint") for bad in (
            # found in review: all but the first were registered
            "sp.example", "http://0.0.0.0:1", "http://[::]:9033", "http://h:0",
            "http://h:1/path?q", "http://user:pw@h:1", "http://" + "h" * 300)]
        bad_args += [(["--p2p-addr", bad], "--p2p-addr") for bad in (
            "/ip4/0.0.0.0/tcp/1", "junk", "/ip4/1.2.3.4/tcp/0", "/ip4/1.2.3.4/tcp/1/p2p/QmFoo")]
        bad_args.append(([a for i in range(9) for a in ("--p2p-addr", f"/ip4/1.2.3.{i}/tcp/1")],
                         "at most 8"))
        for argv, named in bad_args:
            bad = await _gfsp("register", "--config", config, *argv, cwd=tmp_path)
            assert bad.returncode == 2
            (line,) = _gfsp_lines(bad.stderr)
            assert named in line, line
        text = (folder / "config.toml").read_text().replace(f'"{gater}"', '"0.0.0.0:9033"')
        (folder / "config.toml").write_text(text)
        bad = await _gfsp("register", "--config", config, cwd=tmp_path)
        assert bad.returncode == 2
        (line,) = _gfsp_lines(bad.stderr)
        assert "gater.listen" in line and "--endpoint" in line, line


def test_a_data_dir_that_cannot_be_made_is_a_config_error(
        node_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 2 naming the key, which systemd does not restart (found by an operator review:
    exit 1 without the key's name, restarted every 5 s for ever)."""
    (tmp_path / "file").write_text("")
    config = node_dir / "config.toml"
    text = config.read_text().replace('data_dir = "data"', f'data_dir = "{tmp_path}/file/data"')
    assert "/file/data" in text
    config.write_text(text)
    assert cli.main(["run", "--config", str(config)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("gfsp-node:") and "node.data_dir" in line, line


def test_a_full_disk_at_start_names_the_file(
        node_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Found in a fault review: a node started on a full disk said only
    "gfsp-node: : No space left on device" (a write error names no file). The admin address
    file's temp file is made a link to /dev/full, where every write is ENOSPC."""
    data = node_dir / "data"
    data.mkdir(exist_ok=True)
    tmp = data / f".admin.addr.{os.getpid()}.tmp"
    tmp.symlink_to("/dev/full")
    assert cli.main(["run", "--config", str(node_dir / "config.toml")]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == f"gfsp-node: {data / 'admin.addr'}: No space left on device", line
    assert not tmp.is_symlink()  # the temp file is gone
    assert not (data / "admin.addr").exists()
