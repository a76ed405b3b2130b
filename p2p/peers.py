"""The peer table: who we know, how they did, persisted in SPDB (survives restarts).

States: ``candidate`` (heard of through a pong or the bootstrap list, not yet proven),
``trusted`` (answered or sent a valid signed ping/pong), ``evicted`` (missed ``evict_after``
pongs in a row; re-probed now and then, trusted again when it answers).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import sqlite3
import time
from dataclasses import dataclass, field, replace

import trio

from node.db import SPDB
from node.errors import DBError

log = logging.getLogger("gfsp.p2p.peers")


def unspecified(addr: str) -> bool:
    """Whether a multiaddr's IP is 0.0.0.0 or :: (a listen address: no peer can dial it;
    on one machine it happens to reach the dialer itself)."""
    parts = addr.split("/", 3)
    if len(parts) < 3 or parts[1] not in ("ip4", "ip6"):
        return False
    try:
        return ipaddress.ip_address(parts[2]).is_unspecified
    except ValueError:
        return False


def dialable(addrs: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``addrs`` without the :func:`unspecified` ones."""
    return tuple(a for a in addrs if not unspecified(a))

CANDIDATE, TRUSTED, EVICTED = "candidate", "trusted", "evicted"


@dataclass(frozen=True)
class PeerRecord:
    peer_id: str
    operator: str = ""
    addrs: tuple[str, ...] = ()
    state: str = CANDIDATE
    missed: int = 0
    first_seen: float = field(default_factory=time.time)
    last_seen: float = 0.0
    bootstrap: bool = False
    pinged_us_at: float = 0.0  # when its last valid ping reached us (memory only)


class PeerTable:
    """In-memory view of the ``peers`` table; changes are written in batches (:meth:`flush`)."""

    def __init__(self, db: SPDB, *, self_peer_id: str, max_peers: int) -> None:
        self._db = db
        self._self = self_peer_id
        self._max = max_peers
        self._peers: dict[str, PeerRecord] = {}
        self._dirty: set[str] = set()
        self._gone: set[str] = set()  # removed, still to be deleted from SPDB
        self._refused = False  # the last flush was refused (logged once until one succeeds)
        self._state_changed = trio.Event()
        self.rtts: dict[str, float] = {}
        self.rtt_at: dict[str, float] = {}  # peer id -> when (unix s) its RTT was measured

    async def load(self) -> None:
        def read(conn: sqlite3.Connection) -> list[PeerRecord]:
            rows = conn.execute("SELECT peer_id, operator, addrs, state, missed, first_seen, "
                                "last_seen FROM peers").fetchall()
            return [PeerRecord(r[0], r[1] or "", tuple(json.loads(r[2] or "[]")), r[3], r[4],
                               r[5] or 0.0, r[6] or 0.0) for r in rows]

        for rec in await self._db.run(read):
            if rec.peer_id != self._self:
                self._peers[rec.peer_id] = rec

    def get(self, peer_id: str) -> PeerRecord | None:
        return self._peers.get(peer_id)

    def all(self) -> list[PeerRecord]:
        return list(self._peers.values())

    def in_state(self, *states: str) -> list[PeerRecord]:
        return [p for p in self._peers.values() if p.state in states]

    def trusted(self) -> list[PeerRecord]:
        return self.in_state(TRUSTED)

    def __len__(self) -> int:
        return len(self._peers)

    async def put(self, rec: PeerRecord) -> bool:
        """Insert or replace; False (nothing stored) for ourselves or when the table is full.

        The change reaches SPDB at the next :meth:`flush`. Discovery flushes once per ping
        round (and on the way out), and soon after a peer is added or changes state (see
        :meth:`wait_state_change`), one transaction for all changes so far. Writing each
        change at once cost a transaction per new peer, ~10% of a node's time while 32
        nodes converged; a crash loses at most one round of ``last_seen`` updates.
        """
        if rec.peer_id == self._self:
            return False
        old = self._peers.get(rec.peer_id)
        if old is None and len(self._peers) >= self._max:
            return False
        self._peers[rec.peer_id] = rec
        self._dirty.add(rec.peer_id)
        self._gone.discard(rec.peer_id)
        if old is None or old.state != rec.state:
            self._state_changed.set()
        return True

    async def wait_state_change(self) -> None:
        """Return once a peer was added or changed state since the last call."""
        await self._state_changed.wait()
        self._state_changed = trio.Event()

    async def flush(self) -> None:
        """Write every changed and removed record in one transaction. A write SPDB refuses
        (e.g. its disk is full) is logged and kept for the next flush: the table in memory
        is what discovery uses, and a failed write must not stop it (and the node)."""
        dirty, gone = self._dirty, self._gone
        self._dirty, self._gone = set(), set()
        rows = [(r.peer_id, r.operator, json.dumps(list(r.addrs)), r.first_seen, r.last_seen,
                 r.missed, r.state)
                for pid in dirty if (r := self._peers.get(pid)) is not None]
        if not rows and not gone:
            return

        def write(conn: sqlite3.Connection) -> None:
            conn.executemany("DELETE FROM peers WHERE peer_id = ?", [(p,) for p in gone])
            conn.executemany(
                "INSERT OR REPLACE INTO peers (peer_id, operator, addrs, first_seen, last_seen,"
                " missed, state) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

        try:
            await self._db.run(write)
        except DBError as exc:
            self._dirty |= {pid for pid in dirty if pid in self._peers}
            self._gone |= {pid for pid in gone if pid not in self._peers}
            # a warning for the first refusal only: flushes come every ping period
            log.log(logging.DEBUG if self._refused else logging.WARNING,
                    "peer table: %d change(s) not written, kept for the next try: %s",
                    len(dirty) + len(gone), exc)
            self._refused = True
            return
        if self._refused:
            log.info("peer table: written again")
            self._refused = False

    async def remove(self, peer_id: str) -> None:
        self._peers.pop(peer_id, None)
        self._dirty.discard(peer_id)
        self._gone.add(peer_id)
        self._forget_rtt(peer_id)
        await self.flush()

    def _forget_rtt(self, peer_id: str) -> None:
        self.rtts.pop(peer_id, None)
        self.rtt_at.pop(peer_id, None)

    async def mark_alive(self, peer_id: str, operator: str, addrs: tuple[str, ...],
                         rtt: float | None = None, *, pinged_us: bool = False) -> PeerRecord:
        old = self._peers.get(peer_id) or PeerRecord(peer_id)
        now = time.time()
        rec = replace(old, operator=operator, addrs=dialable(addrs) or old.addrs,
                      state=TRUSTED, missed=0,
                      last_seen=now, pinged_us_at=now if pinged_us else old.pinged_us_at)
        if rtt is not None:
            self.rtts[peer_id] = rtt
            self.rtt_at[peer_id] = now
        await self.put(rec)
        return rec

    async def mark_missed(self, peer_id: str, evict_after: int) -> PeerRecord | None:
        """Count a missed pong. Returns the new record, or None when the peer was dropped.

        A candidate that never answered is dropped after ``evict_after`` misses (unless it is a
        bootstrap peer); a trusted peer becomes ``evicted``.
        """
        old = self._peers.get(peer_id)
        if old is None:
            return None
        missed = old.missed + 1
        if missed >= evict_after and old.state == CANDIDATE and not old.bootstrap:
            await self.remove(peer_id)
            return None
        state = EVICTED if missed >= evict_after and old.state != CANDIDATE else old.state
        rec = replace(old, missed=missed, state=state)
        if state == EVICTED:
            self._forget_rtt(peer_id)
        await self.put(rec)
        return rec
