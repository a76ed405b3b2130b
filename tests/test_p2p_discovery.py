"""Discovery across real in-process nodes on 127.0.0.1 (signed ping/pong, peer exchange)."""

from __future__ import annotations

import contextlib
import sqlite3

import pytest
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


async def _pong_from(asker, target_id: str):
    """A signed Ping from ``asker`` to ``target_id`` on the wire; the decoded Pong."""
    import dataclasses

    from p2p.messages import PING_PROTOCOL, Ping, Pong, decode, encode, new_nonce

    disc, host = asker.p2p.discovery, asker.p2p.host
    ping = Ping(operator=disc.operator, peer_id=host.peer_id, addrs=tuple(host.listen_addrs),
                ts=disc.guard.now_ms(), nonce=new_nonce())
    ping = dataclasses.replace(ping, sig=disc.signer.sign_p2p_ping_msg(ping))
    rec = disc.table.get(target_id)
    data = await host.request(target_id, rec.addrs, PING_PROTOCOL, encode(ping),
                              max_response=disc.cfg.max_ping_frame, timeout=5.0)
    return decode(data, Pong)


async def test_full_peer_list_only_for_a_pinger_new_to_the_answerer(tmp_path):
    slow = 2.0  # background pings seldom race the table edit below (and it is retried)
    sps = make_sps(tmp_path, 6, p2p={"ping_interval": slow, "exchange_sample": 2})
    everyone = {sp.peer_id for sp in sps}
    async with trio.open_nursery() as nursery:
        nodes = await start_nodes(nursery, sps)
        with trio.fail_after(3 * slow + 5.0):
            await wait_until(lambda: all(n.trusted() == everyone - {n.sp.peer_id}
                                         for n in nodes))
            asker, answerer = nodes[0], nodes[1]
            pong = await _pong_from(asker, answerer.sp.peer_id)  # trusted: a sample
            assert len(pong.peers) == 2
            assert {p.peer_id for p in pong.peers} <= everyone - {asker.sp.peer_id}
            others = everyone - {asker.sp.peer_id, answerer.sp.peer_id}
            for _ in range(3):  # unless a background ping re-trusted it in between
                await answerer.p2p.table.remove(asker.sp.peer_id)  # a stranger to it now
                pong = await _pong_from(asker, answerer.sp.peer_id)
                if len(pong.peers) == len(others):
                    break
            assert {p.peer_id for p in pong.peers} == others
            assert answerer.p2p.table.get(asker.sp.peer_id).state == "trusted"  # and learned
        nursery.cancel_scope.cancel()


async def test_a_new_peer_reaches_spdb_soon_not_at_the_next_round(tmp_path):
    period = 20.0  # the next round (and its flush) is far off: only the prompt write can pass
    sps = make_sps(tmp_path, 2, p2p={"ping_interval": period})
    db_path = sps[0].config().db_path

    def stored() -> dict[str, str]:
        with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as c:
            return dict(c.execute("SELECT peer_id, state FROM peers"))

    async with trio.open_nursery() as nursery:
        await start_nodes(nursery, sps)  # sp1 bootstraps from sp0 and pings it at once
        with trio.fail_after(period / 10 + 5.0):
            await wait_until(lambda: stored().get(sps[1].peer_id) == "trusted", poll=0.05)
        nursery.cancel_scope.cancel()


async def test_a_full_limiter_skips_pings_and_discovery_goes_on(tmp_path):
    """With no memory left for p2p in the shared limiter (approval asks hold it), a ping round skips
    its peers (no missed pong counted) instead of failing the p2p modular, and discovery
    resumes once memory is free again."""
    sps = make_sps(tmp_path, 2, p2p={"ping_interval": PING, "ping_timeout": 0.5})
    async with trio.open_nursery() as nursery:
        nodes = await start_nodes(nursery, sps)
        a, b = nodes
        with trio.fail_after(3 * PING + 5.0):
            await wait_until(lambda: a.trusted() == {b.sp.peer_id})
            limiter = a.node.ctx.limiter
            hog = limiter.span("p2p", memory=limiter.remaining("p2p").memory)
            with hog:
                b_rec = a.p2p.table.get(b.sp.peer_id)
                rounds = a.p2p.discovery.rounds
                await wait_until(lambda: a.p2p.discovery.rounds >= rounds + 3)
                assert a.node.ctx.modulars.is_running("p2p")
                assert await a.p2p.discovery.ping_peer(b.sp.peer_id) is False
                after = a.p2p.table.get(b.sp.peer_id)
                assert after.state == "trusted" and after.missed == b_rec.missed == 0
            assert await a.p2p.discovery.ping_peer(b.sp.peer_id) is True
        nursery.cancel_scope.cancel()


async def test_peers_with_long_addrs_never_make_a_pong_too_large(tmp_path):
    """Each of 64 trusted peers may validly carry 8 addrs of 256 characters: a pong listing
    them all would pass the 64 KiB ping frame limit and every asker would refuse it. The
    answerer leaves out the largest entries until the pong fits (found in review)."""
    from p2p.messages import MAX_ADDR_LEN, MAX_ADDRS, MAX_PEERS, PeerInfo
    from p2p.peers import TRUSTED, PeerRecord

    sps = make_sps(tmp_path, 2, p2p={"ping_interval": 30.0})
    async with trio.open_nursery() as nursery:
        asker, answerer = await start_nodes(nursery, sps)
        with trio.fail_after(20):
            await wait_until(lambda: answerer.trusted() == {asker.sp.peer_id})
            table = answerer.p2p.table
            honest = PeerRecord("12D3KooWHonest", "0x" + "ab" * 20, ("/ip4/10.0.0.1/tcp/1",),
                                TRUSTED)
            await table.put(honest)
            for i in range(MAX_PEERS):
                addr = f"/dns4/h{i}.example/tcp/1/"
                await table.put(PeerRecord(
                    f"12D3KooWLong{i:03d}", "0x" + f"{i:02x}" * 20,
                    tuple(addr + "x" * (MAX_ADDR_LEN - len(addr)) for _ in range(MAX_ADDRS)),
                    TRUSTED))
            await table.remove(asker.sp.peer_id)  # a stranger: it gets the full list
            pong = await _pong_from(asker, answerer.sp.peer_id)  # decoded within 64 KiB
            assert PeerInfo(honest.peer_id, honest.operator, honest.addrs) in pong.peers
            assert 0 < len(pong.peers) < MAX_PEERS
        nursery.cancel_scope.cancel()


async def test_a_candidate_is_dialed_at_its_registered_addrs(tmp_path):
    """A peer named in a pong is recorded with the addrs the registry lists for it, not
    the ones the pong claims (a third party could plant junk there)."""
    from p2p.messages import PeerInfo

    sps = make_sps(tmp_path, 3, p2p={"ping_interval": 30.0})
    async with trio.open_nursery() as nursery:
        node, _ = await start_nodes(nursery, sps[:2])
        third = sps[2]  # registered, not running
        with trio.fail_after(10):
            await node.p2p.discovery._learn(PeerInfo(
                third.peer_id, third.keys.operator.address, ("/ip4/10.6.6.6/tcp/6",)))
            rec = node.p2p.table.get(third.peer_id)
            assert rec is not None and rec.addrs == (third.addr,)
        nursery.cancel_scope.cancel()


async def test_a_peer_id_the_registry_does_not_list_gets_no_stream(tmp_path):
    """A throwaway libp2p identity can connect (Noise) but every stream it opens is reset
    before negotiation: it holds no stream slot and reaches no handler (found in review)."""
    from node.crypto import PrivateKey
    from p2p.host import P2PError, open_host
    from p2p.messages import PING_PROTOCOL

    sps = make_sps(tmp_path, 2, p2p={"ping_interval": 30.0})
    async with trio.open_nursery() as nursery:
        node, other = await start_nodes(nursery, sps)
        host = node.p2p.host
        with trio.fail_after(20):
            await wait_until(lambda: node.trusted() == {other.sp.peer_id}
                             and other.trusted() == {node.sp.peer_id})
            served = host.inbound_protocols[PING_PROTOCOL]  # quiet now: 30 s period
            async with open_host(PrivateKey.generate(), "/ip4/127.0.0.1/tcp/0",
                                 connect_timeout=5.0, handlers={}) as stranger:
                for _ in range(3):
                    with pytest.raises(P2PError):
                        await stranger.request(host.peer_id, host.listen_addrs, PING_PROTOCOL,
                                               b"\x00" * 10, max_response=1024, timeout=5.0)
                assert host.inbound_refused["not_admitted"] == 3
                assert host.inbound_protocols[PING_PROTOCOL] == served
            assert await other.p2p.discovery.ping_peer(node.sp.peer_id) is True
            assert host.inbound_protocols[PING_PROTOCOL] == served + 1
        nursery.cancel_scope.cancel()


async def test_a_peer_address_that_fails_to_decode_never_stops_the_node(tmp_path):
    """py-multiaddr parses ``/ip6zone/1`` but fails with BinaryParseError once its protocols
    are listed: a registered peer that announced such an addr (and then disconnected) made
    the next ping round raise out of discovery and stop the node, again after every restart
    (found in review). Now the address is refused as a ProtocolError: that ping fails and
    discovery goes on."""
    from p2p.peers import TRUSTED, PeerRecord

    sps = make_sps(tmp_path, 3, p2p={"ping_interval": PING, "ping_timeout": 0.5})
    async with trio.open_nursery() as nursery:
        node, other = await start_nodes(nursery, sps[:2])
        third = sps[2]  # registered, not running: never connected, so its addr is dialed
        with trio.fail_after(3 * PING + 10.0):
            await wait_until(lambda: node.trusted() == {other.sp.peer_id})
            await node.p2p.table.put(PeerRecord(third.peer_id, third.keys.operator.address,
                                                ("/ip6zone/1",), TRUSTED))
            assert await node.p2p.discovery.ping_peer(third.peer_id) is False
            rounds = node.p2p.discovery.rounds
            await wait_until(lambda: node.p2p.discovery.rounds >= rounds + 2)
            assert node.node.ctx.modulars.is_running("p2p")
            assert node.p2p.table.get(third.peer_id).missed >= 1
            assert await node.p2p.discovery.ping_peer(other.sp.peer_id) is True
        nursery.cancel_scope.cancel()


async def test_every_node_measures_every_peers_rtt_again(tmp_path):
    """Found by an operator review: a peer that pinged us first was never pinged by us (the
    halving of a full mesh's pings), so half the gfsp_p2p_ping_rtt_seconds series were
    missing and the others frozen at their first value."""
    sps = make_sps(tmp_path, 3, p2p={"ping_interval": 0.3, "rtt_every": 2})
    everyone = {sp.peer_id for sp in sps}
    async with trio.open_nursery() as nursery:
        nodes = await start_nodes(nursery, sps)
        with trio.fail_after(20):
            def measured() -> bool:
                return all(set(n.p2p.table.rtt_at) == everyone - {n.sp.peer_id} for n in nodes)

            await wait_until(measured)
            first = [dict(n.p2p.table.rtt_at) for n in nodes]
            await wait_until(lambda: all(
                all(n.p2p.table.rtt_at[p] > seen[p] for p in seen)
                for n, seen in zip(nodes, first, strict=True)))
        nursery.cancel_scope.cancel()
