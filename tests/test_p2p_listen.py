"""A node whose p2p port is still taken at start retries the bind and starts once it is free
(a restarted SP whose old process has not yet released the port)."""

from __future__ import annotations

import logging
import socket

import trio

from tests.p2pnet import make_sps, start_nodes, wait_until


async def test_p2p_start_retries_a_busy_port(tmp_path, nursery, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="gfsp.p2p")
    sps = make_sps(tmp_path, 1, p2p={"listen_retries": 100, "listen_retry_interval": 0.05})
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", sps[0].port))
    blocker.listen()
    started = trio.Event()

    async def start() -> None:
        await start_nodes(nursery, sps)
        started.set()

    with trio.fail_after(30):
        nursery.start_soon(start)
        await wait_until(lambda: any("retrying" in r.getMessage() for r in caplog.records))
        assert not started.is_set()
        blocker.close()
        await started.wait()
