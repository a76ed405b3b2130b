"""The peer table (p2p/peers.py) on a real SPDB file: batched writes, and the signal that
lets discovery write new peers and state changes soon instead of at the end of a round."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest
import trio

from node.db import open_spdb
from p2p.peers import CANDIDATE, TRUSTED, PeerRecord, PeerTable, unspecified


def _rows(path) -> dict[str, str]:
    with sqlite3.connect(path) as conn:
        return dict(conn.execute("SELECT peer_id, state FROM peers"))


async def _state_change_seen(table: PeerTable) -> bool:
    with trio.move_on_after(1.0):
        await table.wait_state_change()
        return True
    return False


async def test_writes_wait_for_flush_and_reload(tmp_path, autojump_clock):
    path = tmp_path / "spdb.sqlite"
    async with open_spdb(path) as db:
        table = PeerTable(db, self_peer_id="me", max_peers=8)
        assert await table.put(PeerRecord("a", "0xa", ("/ip4/127.0.0.1/tcp/1",)))
        assert not await table.put(PeerRecord("me"))  # never ourselves
        assert _rows(path) == {}
        await table.flush()
        assert _rows(path) == {"a": CANDIDATE}
        await table.mark_alive("a", "0xa", ())
        await table.flush()
        assert _rows(path) == {"a": TRUSTED}
        again = PeerTable(db, self_peer_id="me", max_peers=8)
        await again.load()
        rec = again.get("a")
        assert rec is not None and rec.state == TRUSTED
        assert rec.addrs == ("/ip4/127.0.0.1/tcp/1",)  # kept: mark_alive had none


async def test_new_peer_and_state_change_signal_but_last_seen_does_not(tmp_path,
                                                                       autojump_clock):
    async with open_spdb(tmp_path / "spdb.sqlite") as db:
        table = PeerTable(db, self_peer_id="me", max_peers=8)
        assert not await _state_change_seen(table)
        await table.put(PeerRecord("a", "0xa"))
        assert await _state_change_seen(table)
        assert not await _state_change_seen(table)  # consumed
        await table.mark_alive("a", "0xa", ())  # candidate -> trusted
        assert await _state_change_seen(table)
        await table.mark_alive("a", "0xa", ())  # trusted again: last_seen only
        assert not await _state_change_seen(table)
        await table.mark_missed("a", evict_after=3)  # missed 1, still trusted
        assert not await _state_change_seen(table)


async def test_full_table_refuses_new_peers_but_updates_known_ones(tmp_path, autojump_clock):
    async with open_spdb(tmp_path / "spdb.sqlite") as db:
        table = PeerTable(db, self_peer_id="me", max_peers=2)
        assert await table.put(PeerRecord("a"))
        assert await table.put(PeerRecord("b"))
        assert not await table.put(PeerRecord("c"))
        assert await table.put(PeerRecord("a", state=TRUSTED))
        assert {p.peer_id for p in table.all()} == {"a", "b"}


async def test_unspecified_addrs_are_never_stored(tmp_path, autojump_clock):
    """Found in review: a node listening on 0.0.0.0 announced /ip4/0.0.0.0/... and its peers
    stored that over the registry's address (on one machine it dials the dialer itself)."""
    assert unspecified("/ip4/0.0.0.0/tcp/9044/p2p/x") and unspecified("/ip6/::/tcp/1")
    assert not unspecified("/ip4/10.0.0.5/tcp/9044") and not unspecified("/dns4/sp/tcp/1")
    async with open_spdb(tmp_path / "spdb.sqlite") as db:
        table = PeerTable(db, self_peer_id="me", max_peers=8)
        await table.put(PeerRecord("a", "0xa", ("/ip4/10.0.0.5/tcp/9044",)))
        rec = await table.mark_alive("a", "0xa", ("/ip4/0.0.0.0/tcp/9044/p2p/a",))
        assert rec.addrs == ("/ip4/10.0.0.5/tcp/9044",)
        rec = await table.mark_alive("a", "0xa", ("/ip6/::/tcp/1", "/ip4/10.0.0.6/tcp/1"))
        assert rec.addrs == ("/ip4/10.0.0.6/tcp/1",)


async def test_a_full_spdb_keeps_changes_for_later_instead_of_failing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A peer-table write that SPDB refuses (its disk is full) is logged and kept for the next
    flush; it used to raise out of discovery and stop the node (found by filling a testnet
    node's data disk: 'modular p2p failed: DBError: database or disk is full', exit 1)."""
    path = tmp_path / "spdb.sqlite"
    with trio.fail_after(10):
        async with open_spdb(path) as db:
            table = PeerTable(db, self_peer_id="me", max_peers=1000)
            await table.put(PeerRecord("gone", "0xg"))
            await table.flush()
            pages = await db.run(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
            await db.run(lambda c: c.execute(f"PRAGMA max_page_count = {pages}").fetchone())
            for i in range(200):  # more than the pages left hold
                await table.put(PeerRecord(f"p{i}", "0x" + "a" * 40,
                                           ("/ip4/10.0.0.1/tcp/1",) * 4))
            with caplog.at_level(logging.DEBUG, logger="gfsp.p2p.peers"):
                await table.flush()  # refused: kept
                await table.remove("gone")
                assert _rows(path) == {"gone": CANDIDATE}
                # one warning while refusals last (flushes come every ping period)
                assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.DEBUG]
                await db.run(lambda c: c.execute("PRAGMA max_page_count = 1000000").fetchone())
                await table.flush()
                assert caplog.records[-1].getMessage() == "peer table: written again"
            rows = _rows(path)
            assert len(rows) == 200 and "gone" not in rows
