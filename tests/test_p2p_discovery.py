"""Discovery across real in-process nodes on 127.0.0.1 (signed ping/pong, peer exchange)."""

from __future__ import annotations

import trio

from tests.p2pnet import make_sps, start_nodes, wait_until

PING = 0.5


async def test_eight_nodes_converge_from_one_bootstrap_peer(tmp_path):
    sps = make_sps(tmp_path, 8, p2p={"ping_interval": PING, "ping_timeout": 0.5})
    everyone = {sp.peer_id for sp in sps}
    async with trio.open_nursery() as nursery:
        nodes = await start_nodes(nursery, sps)
        t0 = trio.current_time()
        with trio.fail_after(3 * PING + 2.0):
            await wait_until(lambda: all(n.trusted() == everyone - {n.sp.peer_id}
                                         for n in nodes))
        print(f"converged in {trio.current_time() - t0:.2f}s")
        nursery.cancel_scope.cancel()
