"""Signed ping/pong discovery on ``/gfsp/ping/1.0.0`` with peer exchange (ARCHITECTURE §5).

Every ``ping_interval`` each known peer is pinged and the pong read on the same stream. A
ping or pong counts only if its signer is the registry's operator for that peer id, the peer id
is the Noise-authenticated remote, its timestamp is within ``max_clock_skew`` and its nonce is
new. Peers named in a pong are candidates (checked against the registry, then pinged at once
by the side with the smaller peer id, by the other a quarter period later unless pinged first);
a peer that misses ``evict_after`` pongs in a row is evicted and re-probed every
``evict_after`` rounds, trusted again as soon as it answers (or pings us).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import trio

from node.chain_msgs import ChainError
from node.config import P2PSection
from node.errors import ResourceLimitExceeded
from node.spregistry import SPInfo, SPRegistry
from p2p.guard import ReplayGuard
from p2p.host import P2PError, P2PHost, Stream, parse_bootstrap
from p2p.messages import (
    MAX_ADDRS,
    MAX_PEERS,
    PING_PROTOCOL,
    SIG_LEN,
    InvalidMessage,
    PeerInfo,
    Ping,
    Pong,
    decode,
    encode,
    new_nonce,
    verify,
)
from p2p.peers import CANDIDATE, EVICTED, TRUSTED, PeerRecord, PeerTable

log = logging.getLogger("gfsp.p2p.discovery")


class Discovery:
    def __init__(self, *, host: P2PHost, table: PeerTable, registry: SPRegistry, signer: Any,
                 config: P2PSection, operator: str, guard: ReplayGuard,
                 reserve: Callable[[], AbstractContextManager[Any]] = nullcontext) -> None:
        self.host = host
        self.table = table
        self.registry = registry
        self.signer = signer
        self.cfg = config
        self.operator = operator
        self.guard = guard
        self.reserve = reserve
        self.rounds = 0
        # keepalives and first contacts queue apart: a node learning the network does not
        # wait behind a round of routine pings to peers it already trusts
        self._ping_slots = trio.CapacityLimiter(config.max_concurrent_pings)
        self._contact_slots = trio.CapacityLimiter(config.max_concurrent_pings)
        self._nursery: trio.Nursery | None = None
        self._pinging: set[str] = set()
        self._rng = random.Random()  # peer-exchange samples

    # --- the responder ------------------------------------------------------------------

    async def handle_ping(self, stream: Stream) -> None:
        """Answer a valid Ping with a signed Pong; anything invalid raises (stream reset)."""
        with trio.fail_after(self.cfg.ping_timeout):
            ping = decode(await stream.read_frame(self.cfg.max_ping_frame), Ping)
            if ping.peer_id != stream.remote_peer_id:
                raise InvalidMessage("ping: peer_id is not the authenticated remote")
            sp = await self._registered(ping.operator, ping.peer_id, "ping")
            verify(ping, sp.operator_key)
            self.guard.check(ping.operator, ping.nonce, ping.ts, "ping")
            known = self.table.get(ping.peer_id)
            full = known is None or known.state != TRUSTED
            await stream.write_frame(encode(self._pong(ping, full=full)), last=True)
            await stream.close()
        if known is not None and known.state != TRUSTED:  # as when our own ping finds it
            log.info("peer %s (%s) is alive (it pinged us)", ping.peer_id, ping.operator)
        await self.table.mark_alive(ping.peer_id, ping.operator, ping.addrs, pinged_us=True)

    def _pong(self, ping: Ping, *, full: bool = True) -> Pong:
        pong = Pong(operator=self.operator, peer_id=self.host.peer_id,
                    addrs=tuple(self.host.listen_addrs[:MAX_ADDRS]), ts=self.guard.now_ms(),
                    nonce=new_nonce(), ping_nonce=ping.nonce,
                    peers=self.exchange(exclude=ping.peer_id,
                                        limit=MAX_PEERS if full else self.cfg.exchange_sample))
        pong = self._fit(pong)
        return dataclasses.replace(pong, sig=self.signer.sign_p2p_pong_msg(pong))

    def _fit(self, pong: Pong) -> Pong:
        """``pong`` with peer entries dropped, largest first, until it fits the frame limit
        the asker applies: peers with long addrs (8 of up to 256 characters each are valid)
        must not make our every pong too large to be read."""
        limit = self.cfg.max_ping_frame
        peers = sorted(pong.peers, key=_entry_size)
        while peers and len(encode(dataclasses.replace(
                pong, peers=tuple(peers), sig=bytes(SIG_LEN)))) > limit:
            dropped = peers.pop()
            log.debug("pong to %s: peer %s left out (the pong would pass %d bytes)",
                      pong.peer_id, dropped.peer_id, limit)
        return pong if len(peers) == len(pong.peers) else dataclasses.replace(
            pong, peers=tuple(peers))

    def exchange(self, *, exclude: str = "", limit: int = MAX_PEERS) -> tuple[PeerInfo, ...]:
        """Trusted peers for peer exchange: up to 64 (most recently seen first), or a random
        ``limit`` of them.

        A pinger new to us (or back from eviction) gets the full list, which is how a node
        learns the network; one we already trust has met everyone we know the same way, and
        a newcomer announces itself by pinging, so it only gets a small sample that keeps
        gossip going (the list is ~60% of the cost of a pong of 31 peers).
        """
        peers = [p for p in self.table.trusted() if p.peer_id != exclude and p.operator]
        if limit >= min(len(peers), MAX_PEERS):
            peers.sort(key=lambda p: -p.last_seen)
        else:
            peers = self._rng.sample(peers, limit)
        return tuple(PeerInfo(p.peer_id, p.operator, p.addrs[:MAX_ADDRS])
                     for p in peers[:MAX_PEERS])

    async def _registered(self, operator: str, peer_id: str, what: str) -> SPInfo:
        sp = await self.registry.sp_by_operator(operator)
        if sp is None or not sp.in_service:
            raise InvalidMessage(f"{what}: {operator} is not a registered SP in service")
        if sp.peer_id != peer_id:
            raise InvalidMessage(f"{what}: peer id {peer_id} is not {operator}'s registered one")
        return sp

    # --- the asker ----------------------------------------------------------------------

    async def ping_peer(self, peer_id: str) -> bool:
        """Ping one peer; True when a valid pong came back. Updates the table either way."""
        rec = self.table.get(peer_id)
        if rec is None or peer_id in self._pinging:
            return False
        self._pinging.add(peer_id)
        slots = self._contact_slots if rec.state == CANDIDATE else self._ping_slots
        try:
            async with slots:
                try:
                    reservation = self.reserve()
                except ResourceLimitExceeded as exc:
                    # the node is busy (uploads, approvals): skip this peer this round, not
                    # counted as a missed pong; discovery itself goes on
                    log.debug("ping %s skipped: %s", peer_id, exc)
                    return False
                with reservation:
                    return await self._ping(rec)
        finally:
            self._pinging.discard(peer_id)

    async def _ping(self, rec: PeerRecord) -> bool:
        ping = Ping(operator=self.operator, peer_id=self.host.peer_id,
                    addrs=tuple(self.host.listen_addrs[:MAX_ADDRS]), ts=self.guard.now_ms(),
                    nonce=new_nonce())
        ping = dataclasses.replace(ping, sig=self.signer.sign_p2p_ping_msg(ping))
        started = trio.current_time()
        try:
            addrs = rec.addrs or await self._registry_addrs(rec.peer_id)
            data = await self.host.request(rec.peer_id, addrs, PING_PROTOCOL, encode(ping),
                                           max_response=self.cfg.max_ping_frame,
                                           timeout=self.cfg.ping_timeout)
            pong = decode(data, Pong)
            if pong.peer_id != rec.peer_id or pong.ping_nonce != ping.nonce:
                raise InvalidMessage("pong: answers another peer or another ping")
            sp = await self._registered(pong.operator, rec.peer_id, "pong")
            verify(pong, sp.operator_key)
            self.guard.check(pong.operator, pong.nonce, pong.ts, "pong")
        except (P2PError, InvalidMessage, ChainError) as exc:
            # ChainError: the registry (the chain) could not answer; a missed round, not a
            # reason to stop discovering
            after = await self.table.mark_missed(rec.peer_id, self.cfg.evict_after)
            log.debug("ping %s failed (%s): %s", rec.peer_id, type(exc).__name__, exc)
            if after is not None and after.state == EVICTED and rec.state != EVICTED:
                log.info("evicted peer %s after %d missed pongs", rec.peer_id, after.missed)
            return False
        if rec.state != TRUSTED:
            log.info("peer %s (%s) is alive", rec.peer_id, pong.operator)
        await self.table.mark_alive(rec.peer_id, pong.operator, pong.addrs,
                                    rtt=trio.current_time() - started)
        for peer in pong.peers:
            await self._learn(peer)
        return True

    async def _registry_addrs(self, peer_id: str) -> tuple[str, ...]:
        sp = await self.registry.sp_by_peer_id(peer_id)
        return sp.p2p_addrs if sp else ()

    async def _learn(self, peer: PeerInfo) -> None:
        """A peer named in a pong: a candidate if the registry agrees; pinged right away."""
        if peer.peer_id == self.host.peer_id or self.table.get(peer.peer_id) is not None:
            return
        try:
            sp = await self.registry.sp_by_operator(peer.operator)
        except ChainError as exc:
            log.debug("cannot check candidate %s now: %s", peer.peer_id, exc)
            return
        if sp is None or sp.peer_id != peer.peer_id or not sp.in_service:
            return
        # the registry's addrs first: a third party's pong could name junk ones
        if await self.table.put(PeerRecord(peer.peer_id, peer.operator,
                                           sp.p2p_addrs or peer.addrs, CANDIDATE)):
            # First contact from one side (the smaller peer id) at once, from the other a
            # quarter period later unless it was pinged meanwhile: two nodes learning each
            # other together do not both dial, and a link never waits for a whole round.
            if self._nursery is not None:
                delay = 0.0 if self.host.peer_id < peer.peer_id else self.cfg.ping_interval / 4
                self._nursery.start_soon(self._first_contact, peer.peer_id, delay)

    async def _first_contact(self, peer_id: str, delay: float) -> None:
        if delay > 0:
            await trio.sleep(delay)
            rec = self.table.get(peer_id)
            if rec is None or rec.state != CANDIDATE:
                return  # it pinged us meanwhile (trusted now), or it was dropped
        await self.ping_peer(peer_id)

    # --- the loop -----------------------------------------------------------------------

    async def add_bootstrap(self) -> None:
        for entry in self.cfg.bootstrap:
            peer_id, addrs = parse_bootstrap(entry)
            old = self.table.get(peer_id)
            rec = (dataclasses.replace(old, bootstrap=True, addrs=old.addrs or tuple(addrs))
                   if old else PeerRecord(peer_id, addrs=tuple(addrs), bootstrap=True))
            await self.table.put(rec)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        await self.table.load()
        await self.add_bootstrap()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._flush_state_changes)
                task_status.started()
                while True:
                    started = trio.current_time()
                    await self.ping_round()
                    await self.table.flush()
                    await trio.sleep_until(started + self.cfg.ping_interval)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await self.table.flush()

    async def _flush_state_changes(self) -> None:
        """Write new peers and state changes to SPDB a tenth of a period after they happen
        (grouped; ``last_seen`` updates alone wait for the round's flush)."""
        while True:
            await self.table.wait_state_change()
            await trio.sleep(self.cfg.ping_interval / 10)
            await self.table.flush()

    async def ping_round(self) -> None:
        """Ping every known peer once, together (at most ``max_concurrent_pings`` at a time).

        A trusted peer whose valid ping reached us less than 0.9 periods ago is skipped: that
        exchange already proved both sides alive (it halves the pings of a full mesh), unless
        we last measured its RTT ``rtt_every`` periods ago or more (only a ping of ours
        measures it). Evicted peers are re-probed every ``evict_after`` rounds.
        """
        reprobe = self.rounds % self.cfg.evict_after == 0
        now = time.time()
        fresh_after = now - 0.9 * self.cfg.ping_interval
        rtt_after = now - self.cfg.rtt_every * self.cfg.ping_interval
        async with trio.open_nursery() as nursery:
            for rec in self.table.all():
                if rec.state == EVICTED and not reprobe:
                    continue
                if (rec.state == TRUSTED and rec.pinged_us_at > fresh_after
                        and self.table.rtt_at.get(rec.peer_id, 0.0) > rtt_after):
                    continue
                nursery.start_soon(self.ping_peer, rec.peer_id)
        self.rounds += 1

    def handle_query_bootstrap(self) -> list[str]:
        """The seed's HandleQueryBootstrap: known peers as ``<peer id>@<multiaddr>``."""
        return [f"{p.peer_id}@{p.addrs[0]}" for p in self.table.trusted() if p.addrs]


def _entry_size(peer: PeerInfo) -> int:
    return len(peer.peer_id) + len(peer.operator) + sum(len(a) + 1 for a in peer.addrs)
