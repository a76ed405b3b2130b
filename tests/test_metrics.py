"""Observability: /metrics and /admin/status on the admin port, and `gfsp-node status`.

Two in-process nodes on 127.0.0.1 (static SP registry, so the chain height is the wall-clock
height): sp0 runs without an executor (tasks added to its manager stay pending) and with a
limit of its own for the gater service. Metrics are scraped over real sockets and parsed with
prometheus_client's parser; `gfsp-node status` runs as a subprocess against the running node.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.routing import Route

from modulars.gater.errors import _route_template
from node import cli
from node.admin import ADDR_FILE, METRICS_PATH, STATUS_PATH, check_loopback
from node.app import Node, limit_of
from node.config import (
    ByteSize,
    Config,
    LimitsSection,
    LimitValues,
    ModularsSection,
    load_config,
    render_config,
)
from node.errors import ConfigError, ModularStartError
from node.piecestore import piece_key
from node.rcmgr import RESOURCES, UNLIMITED
from node.tasks import GCMetaTask, ObjectInfo, ReplicatePieceApprovalTask, StorageParams
from tests.p2pnet import RunningNode, SPDir, make_sps, start_nodes, wait_until

DEADLINE = 30.0
GATER_LIMIT = LimitValues(memory=ByteSize(64 << 20), tasks=10, tasks_high=5, tasks_medium=4,
                          tasks_low=3, conns_inbound=7, conns_outbound=6, fds=20)
STATUS_ROUTE = "/gfsp/v1/status"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# --- helpers ----------------------------------------------------------------------------------


def _configure(sp: SPDir, p2p: dict[str, object] | None = None, **node: object) -> Config:
    """sp's config without the executor, with GATER_LIMIT for the gater (and changes)."""
    cfg = sp.config()
    cfg = dataclasses.replace(
        cfg, modulars=ModularsSection(disabled=["executor"]),
        limits=dataclasses.replace(LimitsSection(), services={"gater": GATER_LIMIT}),
        node=dataclasses.replace(cfg.node, **node),
        p2p=dataclasses.replace(cfg.p2p, **(p2p or {})))
    sp.config_path.write_text(render_config(cfg))
    return load_config(sp.config_path)


def make_cluster(root: Path) -> list[SPDir]:
    """sp0 and sp1 (bootstrapping from sp0). A peer that pinged us within the interval is not
    pinged back, so sp1 pings seldom and sp0 often: sp0 sees sp1's RTT soon."""
    sps = make_sps(root, 2, p2p={"ping_interval": 5.0, "ping_timeout": 2.0})
    _configure(sps[0], p2p={"ping_interval": 0.2})
    return sps


async def wait_for_peers(nodes: list[RunningNode]) -> None:
    a, b = nodes
    await wait_until(lambda: a.trusted() == {b.sp.peer_id} and b.trusted() == {a.sp.peer_id}
                     and b.sp.peer_id in a.p2p.table.rtts)


def admin_url(node: RunningNode) -> str:
    assert node.node.admin_endpoint
    return node.node.admin_endpoint


async def scrape(client: httpx.AsyncClient, node: RunningNode) -> Samples:
    resp = await client.get(admin_url(node) + METRICS_PATH)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def val(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def approval_task() -> ReplicatePieceApprovalTask:
    obj = ObjectInfo(id=7, bucket="bkt", name="obj7", owner="0x" + "ab" * 20, size=1 << 20,
                     checksums=tuple(bytes([i]) * 32 for i in range(7)))
    return ReplicatePieceApprovalTask(object=obj, params=StorageParams(
        segment_size=16 << 20, data_shards=4, parity_shards=2, max_payload=1 << 40))


def expected(n: int) -> float:
    return math.inf if n >= UNLIMITED else float(n)


# --- the metrics ------------------------------------------------------------------------------


async def test_metrics_of_a_running_node(tmp_path, nursery):
    sps = make_cluster(tmp_path)
    with trio.fail_after(DEADLINE):
        nodes = await start_nodes(nursery, sps)
        await wait_for_peers(nodes)
        sp0, sp1 = nodes
        ctx = sp0.node.ctx
        assert ctx is not None and ctx.piecestore is not None
        # manager tasks, a stored piece, one approval quorum
        manager = ctx.modulars.manager
        await manager.add_task(GCMetaTask(create_time=1000.0))
        await manager.add_task(GCMetaTask(create_time=2000.0))
        await ctx.piecestore.put(piece_key(1, 0, 0), b"x" * 1234)
        got = await sp0.p2p.handle_replicate_piece_approval(approval_task(), 1, 1, 5.0)
        assert len(got) == 1
        # gater requests: three statuses, one unknown path, one wrong method
        async with httpx.AsyncClient(trust_env=False) as client:
            gater = ctx.modulars.gater.endpoint
            for _ in range(3):
                assert (await client.get(gater + STATUS_ROUTE)).status_code == 200
            assert (await client.get(gater + "/")).status_code == 404  # no route matches
            assert (await client.post(gater + STATUS_ROUTE)).status_code == 405
            assert (await client.request("BREW", gater + STATUS_ROUTE)).status_code == 405
            before = int(time.time())
            m = await scrape(client, sp0)
            after = int(time.time())
            m1 = await scrape(client, sp1)

    assert {"gfsp_http_requests_total", "gfsp_http_request_duration_seconds_count",
            "gfsp_limiter_limit", "gfsp_limiter_used", "gfsp_limiter_remaining", "gfsp_tasks",
            "gfsp_task_queue_size", "gfsp_p2p_peers", "gfsp_p2p_ping_rtt_seconds",
            "gfsp_p2p_approval_outcomes_total", "gfsp_piecestore_used_bytes",
            "gfsp_chain_height", "gfsp_modular_running", "gfsp_node_info"} <= names(m)
    assert all(name.startswith("gfsp_") for name in names(m))

    assert val(m, "gfsp_node_info", node="sp0", operator=sps[0].keys.operator.address) == 1
    assert val(m, "gfsp_modular_running", modular="p2p") == 1
    assert val(m, "gfsp_modular_running", modular="gater") == 1
    assert ("gfsp_modular_running", frozenset({("modular", "executor")})) not in m

    # p2p: one trusted peer with a ping RTT
    assert val(m, "gfsp_p2p_peers", state="trusted") == 1
    assert val(m, "gfsp_p2p_peers", state="candidate") == 0
    assert val(m, "gfsp_p2p_peers", state="evicted") == 0
    assert 0 < val(m, "gfsp_p2p_ping_rtt_seconds", peer=sps[1].peer_id) < DEADLINE

    # the limiter: limits as configured, remaining = limit - used on the system scope
    system = limit_of(ctx.config.limits.system)
    for r in RESOURCES:
        limit = val(m, "gfsp_limiter_limit", scope="system", resource=r)
        assert limit == expected(getattr(system, r))
        used = val(m, "gfsp_limiter_used", scope="system", resource=r)
        assert val(m, "gfsp_limiter_remaining", scope="system", resource=r) == limit - used
        assert val(m, "gfsp_limiter_limit", scope="service:gater", resource=r) == getattr(
            GATER_LIMIT, r)
    assert val(m, "gfsp_limiter_used", scope="service:gater", resource="conns_inbound") == 0
    assert val(m, "gfsp_limiter_remaining", scope="service:gater",
               resource="conns_inbound") == GATER_LIMIT.conns_inbound
    # p2p's service scope exists once it pinged: the service default limits
    service = limit_of(ctx.config.limits.service)
    assert val(m, "gfsp_limiter_limit", scope="service:p2p", resource="conns_outbound") == (
        service.conns_outbound)

    # the manager's tasks (no executor: both stay pending)
    assert val(m, "gfsp_tasks", type="GCMeta", state="pending") == 2
    assert val(m, "gfsp_tasks", type="GCMeta", state="running") == 0
    assert val(m, "gfsp_task_queue_size", type="GCMeta") == 2

    # piece store and chain height (static registry: wall-clock height, block_interval 1 s)
    assert val(m, "gfsp_piecestore_used_bytes") == 1234
    assert before <= val(m, "gfsp_chain_height") <= after
    assert val(m, "gfsp_chain_reachable") == 1

    # approval outcomes: sp0 asked and sp1 approved
    assert val(m, "gfsp_p2p_approval_outcomes_total", role="asker", outcome="approved") == 1
    assert val(m, "gfsp_p2p_approval_outcomes_total", role="asker", outcome="quorum_met") == 1
    assert val(m1, "gfsp_p2p_approval_outcomes_total", role="responder",
               outcome="approved") == 1

    # HTTP requests by route template, method and status; latency per route
    assert val(m, "gfsp_http_requests_total", route=STATUS_ROUTE, method="GET",
               status="200") == 3
    assert val(m, "gfsp_http_requests_total", route="unmatched", method="GET",
               status="404") == 1
    assert val(m, "gfsp_http_requests_total", route=STATUS_ROUTE, method="POST",
               status="405") == 1
    assert val(m, "gfsp_http_requests_total", route=STATUS_ROUTE, method="other",
               status="405") == 1  # an unknown method never becomes a label value
    assert val(m, "gfsp_http_request_duration_seconds_count", route=STATUS_ROUTE,
               method="GET") == 3
    assert val(m, "gfsp_http_request_duration_seconds_sum", route=STATUS_ROUTE,
               method="GET") > 0
    # sp1's gater saw nothing; its registry is its own
    assert not any(name == "gfsp_http_requests_total" for name, _ in m1)


async def test_object_routes_are_counted_by_template(tmp_path, nursery):
    sps = make_sps(tmp_path, 1)
    with trio.fail_after(DEADLINE):
        (node,) = await start_nodes(nursery, sps)
        gater = node.node.ctx.modulars.gater.endpoint
        async with httpx.AsyncClient(trust_env=False) as client:
            for name in ("a/b", "c"):  # unsigned: refused, still counted under the template
                resp = await client.get(f"{gater}/gfsp/v1/objects/bucket1/{name}")
                assert resp.status_code >= 400
            m = await scrape(client, node)
    routes = {dict(labels)["route"] for name, labels in m if name == "gfsp_http_requests_total"}
    assert routes == {"/gfsp/v1/objects/{bucket}/{object:path}"}


def test_route_template_without_starlettes_route_in_the_scope():
    """Older starlette versions do not set scope["route"]: the routes are matched again."""
    async def endpoint(request: object) -> None: ...

    app = Starlette(routes=[Route("/a/{x}", endpoint, methods=["GET"]),
                            Route("/b/{y:path}", endpoint, methods=["PUT"])])

    def template(path: str, method: str) -> str:
        return _route_template({"type": "http", "path": path, "method": method,
                                "root_path": ""}, app)

    assert template("/a/1", "GET") == "/a/{x}"
    assert template("/a/1", "POST") == "/a/{x}"  # a 405 keeps its route
    assert template("/b/q/r", "PUT") == "/b/{y:path}"
    assert template("/zz", "GET") == "unmatched"


# --- the admin server -------------------------------------------------------------------------


async def test_admin_status_document(tmp_path, nursery):
    sps = make_cluster(tmp_path)
    with trio.fail_after(DEADLINE):
        nodes = await start_nodes(nursery, sps)
        await wait_for_peers(nodes)
        sp0 = nodes[0]
        ctx = sp0.node.ctx
        await ctx.modulars.manager.add_task(GCMetaTask(create_time=1000.0))
        async with httpx.AsyncClient(trust_env=False) as client:
            resp = await client.get(admin_url(sp0) + STATUS_PATH)
            head = await client.head(admin_url(sp0) + STATUS_PATH)
            missing = await client.get(admin_url(sp0) + "/admin/nope")
            wrong = await client.post(admin_url(sp0) + METRICS_PATH)
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    assert head.status_code == 200 and head.content == b""
    assert missing.status_code == 404 and wrong.status_code == 405
    doc = resp.json()
    assert doc["node"] == "sp0" and doc["operator"] == sps[0].keys.operator.address
    assert doc["state"] == "running"
    assert [m["name"] for m in doc["modulars"]] == sp0.node.order
    assert all(m["running"] for m in doc["modulars"])
    assert doc["limiter"]["system"]["limit"] == limit_of(ctx.config.limits.system).as_dict()
    assert doc["limiter"]["service:gater"]["limit"] == limit_of(GATER_LIMIT).as_dict()
    assert set(doc["limiter"]["system"]) == {"limit", "used", "remaining"}
    assert doc["tasks"] == {"GCMeta": {"pending": 1}}
    assert doc["queues"] == {"GCMeta": 1}
    (peer,) = doc["peers"]
    assert peer["peer_id"] == sps[1].peer_id and peer["state"] == "trusted"
    assert peer["operator"] == sps[1].keys.operator.address and peer["rtt"] > 0
    assert doc["piecestore"] == {"used_bytes": 0}
    assert isinstance(doc["chain"]["height"], int)
    assert doc["endpoints"] == {"gater": ctx.modulars.gater.endpoint,
                                "admin": admin_url(sp0)}
    # the bound address is where `gfsp-node status` finds it
    assert (ctx.config.data_dir / ADDR_FILE).read_text().strip() == admin_url(sp0)


async def test_admin_addr_file_is_removed_on_stop(tmp_path, nursery):
    sps = make_sps(tmp_path, 1)
    with trio.fail_after(DEADLINE):
        (node,) = await start_nodes(nursery, sps)
        path = node.node.config.data_dir / ADDR_FILE
        assert path.exists()
        url = admin_url(node)
        await node.stop()
    assert not path.exists()
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient(trust_env=False) as client:
            await client.get(url + STATUS_PATH)


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "10.1.2.3:9100", "[::]:0", "example.com:0",
                                    "127.0.0.1", "127.0.0.1:99999"])
async def test_a_non_loopback_admin_listen_is_refused(tmp_path, listen):
    (sp,) = make_sps(tmp_path, 1)
    cfg = sp.config()
    with pytest.raises(ConfigError, match=r"node\.admin_listen"):  # in a file: exit 2
        _configure(sp, admin_listen=listen)
    # built in code: the admin server refuses it all the same
    cfg = dataclasses.replace(cfg, modulars=ModularsSection(disabled=["executor"]),
                              node=dataclasses.replace(cfg.node, admin_listen=listen))
    with pytest.raises(ModularStartError, match="admin") as info:
        await Node(cfg, env={}, handle_signals=False).run()
    assert "admin_listen" in str(info.value)
    assert not (cfg.data_dir / ADDR_FILE).exists()


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "127.0.0.2:9100", "[::1]:0", "localhost:0"])
def test_loopback_addresses_are_accepted(listen):
    assert check_loopback(listen) == listen


# --- gfsp-node status -------------------------------------------------------------------------


async def test_status_command_against_a_running_node(tmp_path, nursery):
    sps = make_cluster(tmp_path)
    with trio.fail_after(DEADLINE):
        nodes = await start_nodes(nursery, sps)
        await wait_for_peers(nodes)
        await nodes[0].node.ctx.modulars.manager.add_task(GCMetaTask(create_time=1000.0))
        proc = await trio.run_process(
            [sys.executable, "-m", "node.cli", "status", "--config", str(sps[0].config_path)],
            capture_stdout=True, capture_stderr=True, check=False)
        # a reader gone before the output (`| head`): quiet, as one killed by SIGPIPE (found
        # by an operator review: a BrokenPipeError traceback, exit 1)
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            gone = await trio.run_process(
                [sys.executable, "-m", "node.cli", "status", "--config",
                 str(sps[0].config_path)], stdout=write_end, capture_stderr=True, check=False)
        finally:
            os.close(write_end)
        assert gone.returncode == 128 + signal.SIGPIPE and gone.stderr == b"", gone.stderr
    out = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr.decode()
    for section in ("modulars (start order):", "limiter (used/limit, and what is left):",
                    "queues (pending tasks by type):", "tasks by state:", "peers:",
                    "approvals:"):
        assert section in out
    assert out.startswith(f"node sp0 (running), operator {sps[0].keys.operator.address}")
    assert f"registered as {sps[0].info().endpoint}" in out  # what the SP registry lists
    assert "GCMeta" in out and sps[1].peer_id in out and "trusted" in out
    (gater_row,) = [line.split() for line in out.splitlines()
                    if line.startswith("  service:gater ")]
    assert gater_row == ["service:gater", "0B/64.0MiB", "0/10", "0/5", "0/4", "0/3", "0/7",
                         "0/6", "0/20"]
    for name in nodes[0].node.order:
        assert f"  {name} " in out


async def test_status_command_against_a_stopped_node(tmp_path, nursery, capsys):
    sps = make_sps(tmp_path, 1)
    with trio.fail_after(DEADLINE):
        (node,) = await start_nodes(nursery, sps)
        await node.stop()
    config = str(sps[0].config_path)
    assert cli.main(["status", "--config", config]) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not running" in err

    # a stale address (a node killed with SIGKILL leaves it): nothing listens there, so the
    # node is not running (found in review: it said "not reachable"); one line, exit 1
    data_dir = node.node.config.data_dir
    with trio.socket.socket() as s:
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (data_dir / ADDR_FILE).write_text(f"http://127.0.0.1:{port}\n")
    code = await trio.to_thread.run_sync(cli.main, ["status", "--config", config,
                                                    "--timeout", "2"])
    assert code == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not running" in err and "did not stop" in err


def test_status_says_when_the_sp_is_not_registered() -> None:
    """Found by an operator review: nothing told an unregistered node apart."""
    doc = {"node": "solo", "state": "running", "operator": "0xabc", "modulars": [],
           "limiter": {}, "queues": {}, "tasks": {}, "peers": [], "approvals": {},
           "chain": {"height": 7, "registered": False}}
    assert "NOT REGISTERED on the chain" in cli.format_status(doc)
    doc["chain"]["registered"] = None  # the registry could not be asked: nothing said
    assert "REGISTERED" not in cli.format_status(doc) and "registered" not in \
        cli.format_status(doc)
    # found in review: with the chain down, old values were shown as current
    doc["chain"]["reachable"] = False
    assert "chain height 7 (last seen: the chain does not answer now)" in \
        cli.format_status(doc)
