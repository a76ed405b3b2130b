"""Tests of node/db.py (SPDB) against real SQLite files."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trio.testing

from node import db as dbmod
from node.db import MIGRATIONS, open_spdb
from node.errors import DBError

REPO_ROOT = Path(__file__).resolve().parents[1]
TABLES = {
    "tasks",
    "upload_progress",
    "integrity_meta",
    "piece_hashes",
    "peers",
    "gc_progress",
    "read_records",
}


def _tables(conn: sqlite3.Connection) -> set[str]:
    rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {name for (name,) in rows}


def _create_kv(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE kv (k INTEGER PRIMARY KEY, v TEXT)")


def _count_kv(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT count(*) FROM kv").fetchone()[0]


# ---------------------------------------------------------------------- migrations


async def test_migrations_applied_on_fresh_file(tmp_path: Path) -> None:
    path = tmp_path / "sp.db"
    async with open_spdb(path) as db:
        assert db.path == path
        assert await db.user_version() == len(MIGRATIONS) >= 1
        assert TABLES <= await db.run(_tables)
        assert await db.run(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0]) == "wal"
        assert await db.run(lambda c: c.execute("PRAGMA foreign_keys").fetchone()[0]) == 1
        indexes = await db.run(
            lambda c: {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        )
        assert {"tasks_type_state_priority", "read_records_bucket_ts"} <= indexes
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


async def test_reopen_does_not_reapply(tmp_path: Path) -> None:
    path = tmp_path / "sp.db"
    async with open_spdb(path) as db:
        await db.run(
            lambda c: c.execute(
                "INSERT INTO gc_progress (kind, last_height, update_time) VALUES ('obj', 7, 1.0)"
            )
        )
    # Migration 1 uses plain CREATE TABLE: re-applying it would fail, and data would be lost.
    async with open_spdb(path) as db:
        assert await db.user_version() == len(MIGRATIONS)
        row = await db.run(lambda c: c.execute("SELECT last_height FROM gc_progress").fetchone())
        assert row == (7,)


async def test_only_missing_migrations_are_applied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "sp.db"
    async with open_spdb(path):
        pass
    extra = "CREATE TABLE extra (a INTEGER); INSERT INTO extra VALUES (1); -- done;"
    monkeypatch.setattr(dbmod, "MIGRATIONS", (*MIGRATIONS, extra))
    async with open_spdb(path) as db:
        assert await db.user_version() == len(MIGRATIONS) + 1
        assert await db.run(lambda c: c.execute("SELECT count(*) FROM extra").fetchone()) == (1,)
    async with open_spdb(path) as db:  # not applied twice
        assert await db.run(lambda c: c.execute("SELECT count(*) FROM extra").fetchone()) == (1,)


async def test_failing_migration_is_rolled_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "sp.db"
    bad = "CREATE TABLE half (a INTEGER); INSERT INTO no_such_table VALUES (1);"
    monkeypatch.setattr(dbmod, "MIGRATIONS", (*MIGRATIONS, bad))
    with pytest.raises(DBError, match="migration 2"):
        async with open_spdb(path):
            pytest.fail("must not open")
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        assert "half" not in _tables(conn)
        assert TABLES <= _tables(conn)


async def test_database_newer_than_code(tmp_path: Path) -> None:
    path = tmp_path / "sp.db"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 5}")
    with pytest.raises(DBError, match="newer"):
        async with open_spdb(path):
            pytest.fail("must not open")


async def test_open_failure_is_dberror(tmp_path: Path) -> None:
    with pytest.raises(DBError):
        async with open_spdb(tmp_path / "missing-dir" / "sp.db"):
            pytest.fail("must not open")
    with pytest.raises(ValueError):
        async with open_spdb(tmp_path / "sp.db", synchronous="SOMETIMES"):
            pytest.fail("must not open")


# ---------------------------------------------------------------------- transactions


async def test_raising_transaction_leaves_nothing(tmp_path: Path) -> None:
    class Boom(Exception):
        pass

    boom = Boom("boom")

    def write_then_fail(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO kv VALUES (1, 'a')")
        conn.execute("INSERT INTO kv VALUES (2, 'b')")
        raise boom

    async with open_spdb(tmp_path / "sp.db") as db:
        await db.run(_create_kv)
        with pytest.raises(Boom) as info:
            await db.run(write_then_fail)
        assert info.value is boom  # propagated unchanged
        assert await db.run(_count_kv) == 0


async def test_sqlite_errors_become_dberror(tmp_path: Path) -> None:
    def duplicate(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO kv VALUES (1, 'a')")
        conn.execute("INSERT INTO kv VALUES (1, 'again')")

    async with open_spdb(tmp_path / "sp.db") as db:
        await db.run(_create_kv)
        with pytest.raises(DBError) as info:
            await db.run(duplicate)
        assert isinstance(info.value.__cause__, sqlite3.IntegrityError)
        assert await db.run(_count_kv) == 0  # the first insert was rolled back
        with pytest.raises(DBError) as info:
            await db.run(lambda c: c.execute("SELECT * FROM no_such_table"))
        assert isinstance(info.value.__cause__, sqlite3.OperationalError)
        # the connection is still fine
        await db.run(lambda c: c.execute("INSERT INTO kv VALUES (1, 'ok')"))
        assert await db.run(_count_kv) == 1


async def test_commit_is_durable_and_result_returned(tmp_path: Path) -> None:
    path = tmp_path / "sp.db"
    async with open_spdb(path) as db:
        await db.run(_create_kv)
        rowid = await db.run(lambda c: c.execute("INSERT INTO kv (v) VALUES ('x')").lastrowid)
        assert rowid == 1
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT k, v FROM kv").fetchall() == [(1, "x")]


async def test_order_preserved_under_concurrency(tmp_path: Path) -> None:
    submitted: list[int] = []
    executed: list[int] = []

    async with open_spdb(tmp_path / "sp.db") as db:
        await db.run(lambda c: c.execute("CREATE TABLE log (seq INTEGER PRIMARY KEY, i INTEGER)"))

        def job(i: int):
            def fn(conn: sqlite3.Connection) -> int:
                executed.append(i)
                conn.execute("INSERT INTO log (i) VALUES (?)", (i,))
                return i

            return fn

        async def worker(i: int) -> None:
            await trio.lowlevel.checkpoint()  # scramble start order a little
            submitted.append(i)  # no checkpoint between this and the queue.put in run()
            assert await db.run(job(i)) == i

        async with trio.open_nursery() as nursery:
            for i in range(300):
                nursery.start_soon(worker, i)

        assert sorted(executed) == list(range(300))
        assert executed == submitted
        logged = await db.run(lambda c: [r[0] for r in c.execute("SELECT i FROM log ORDER BY seq")])
        assert logged == submitted


async def test_run_after_close_raises(tmp_path: Path) -> None:
    async with open_spdb(tmp_path / "sp.db") as db:
        thread = db._thread
        assert thread is not None and thread.is_alive()
    assert db.closed
    assert not thread.is_alive()
    with pytest.raises(DBError, match="closed"):
        await db.run(_count_kv)
    await db.aclose()  # idempotent


async def test_close_on_cancellation_and_exception(tmp_path: Path) -> None:
    with trio.move_on_after(0.05):
        async with open_spdb(tmp_path / "a.db") as db_a:
            await trio.sleep_forever()
    assert db_a.closed and db_a._thread is not None and not db_a._thread.is_alive()

    with pytest.raises(RuntimeError):
        async with open_spdb(tmp_path / "b.db") as db_b:
            raise RuntimeError("body failed")
    assert db_b.closed and db_b._thread is not None and not db_b._thread.is_alive()
    with pytest.raises(DBError):
        await db_b.run(_count_kv)


# ---------------------------------------------------------------------- cancellation

LONG_QUERY = """
WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000000000)
SELECT count(*) FROM c
"""


async def test_cancel_interrupts_running_query_and_rolls_back(tmp_path: Path) -> None:
    started = threading.Event()

    def write_then_long(conn: sqlite3.Connection) -> int:
        conn.execute("INSERT INTO kv VALUES (1, 'cancelled')")
        started.set()
        return conn.execute(LONG_QUERY).fetchone()[0]

    async with open_spdb(tmp_path / "sp.db") as db:
        await db.run(_create_kv)
        t0 = time.monotonic()
        with trio.move_on_after(0.2) as scope:
            await db.run(write_then_long)
            pytest.fail("the long query must not finish")
        elapsed = time.monotonic() - t0
        assert scope.cancelled_caught
        assert started.is_set()
        assert elapsed < 2.0
        # The next job works, and the write made before the long query was rolled back.
        t1 = time.monotonic()
        assert await db.run(_count_kv) == 0
        assert time.monotonic() - t1 < 2.0
        await db.run(lambda c: c.execute("INSERT INTO kv VALUES (2, 'after')"))
        assert await db.run(lambda c: c.execute("SELECT k, v FROM kv").fetchall()) == [(2, "after")]


async def test_cancel_between_statements_rolls_back(tmp_path: Path) -> None:
    """A job cancelled while it runs Python code between statements must not commit."""
    started = threading.Event()
    release = threading.Event()

    def slow(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO kv VALUES (1, 'a')")
        started.set()
        assert release.wait(10)
        conn.execute("INSERT INTO kv VALUES (2, 'b')")  # short: may run under the progress check

    async with open_spdb(tmp_path / "sp.db") as db:
        await db.run(_create_kv)
        async with trio.open_nursery() as nursery:
            cancel_scope = trio.CancelScope()

            async def caller() -> None:
                with cancel_scope:
                    await db.run(slow)

            nursery.start_soon(caller)
            await trio.to_thread.run_sync(started.wait, 10)
            cancel_scope.cancel()
        release.set()
        assert await db.run(_count_kv) == 0


async def test_cancelled_queued_job_never_runs(tmp_path: Path) -> None:
    started = threading.Event()
    release = threading.Event()
    ran: list[str] = []

    def blocker(conn: sqlite3.Connection) -> str:
        started.set()
        assert release.wait(10)
        ran.append("blocker")
        return "blocker"

    def queued(conn: sqlite3.Connection) -> None:
        ran.append("queued")
        conn.execute("INSERT INTO kv VALUES (1, 'should not exist')")

    async with open_spdb(tmp_path / "sp.db") as db:
        await db.run(_create_kv)
        results: list[str] = []
        async with trio.open_nursery() as nursery:

            async def run_blocker() -> None:
                results.append(await db.run(blocker))

            nursery.start_soon(run_blocker)
            await trio.to_thread.run_sync(started.wait, 10)

            queued_scope = trio.CancelScope()

            async def run_queued() -> None:
                with queued_scope:
                    await db.run(queued)
                results.append("queued-cancelled" if queued_scope.cancelled_caught else "?")

            nursery.start_soon(run_queued)
            await trio.testing.wait_all_tasks_blocked()
            queued_scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert results == ["queued-cancelled"]  # returned without waiting for the blocker
            release.set()
        assert results == ["queued-cancelled", "blocker"]
        assert await db.run(_count_kv) == 0
        assert ran == ["blocker"]


# ---------------------------------------------------------------------- crash safety

CHILD = """
import sys
from pathlib import Path

import trio

from node.db import open_spdb


def txn(i):
    def fn(conn):
        conn.executemany(
            "INSERT INTO crash (txn, n) VALUES (?, ?)", [(i, n) for n in range(10)]
        )
    return fn


async def main(path):
    async with open_spdb(path) as db:
        await db.run(lambda c: c.execute(
            "CREATE TABLE IF NOT EXISTS crash (txn INTEGER, n INTEGER, PRIMARY KEY (txn, n))"
        ))
        i = 0
        while True:
            await db.run(txn(i))
            print(i, flush=True)
            i += 1


trio.run(main, Path(sys.argv[1]))
"""


@pytest.mark.slow
async def test_crash_safety_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "crash.db"
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    last_printed = -1
    with trio.fail_after(30):
        proc = await trio.lowlevel.open_process(
            [sys.executable, str(script), str(path)],
            stdout=subprocess.PIPE,
            cwd=REPO_ROOT,
            env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
        )
        try:
            assert proc.stdout is not None
            buffer = b""
            while last_printed < 200:
                chunk = await proc.stdout.receive_some(4096)
                assert chunk, "child exited early"
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    value = int(line)
                    assert value == last_printed + 1
                    last_printed = value
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            if proc.stdout is not None:
                await proc.stdout.aclose()
        assert proc.returncode == -signal.SIGKILL

        async with open_spdb(path) as db:
            assert await db.run(lambda c: c.execute("PRAGMA integrity_check").fetchone()) == ("ok",)
            counts = await db.run(
                lambda c: c.execute(
                    "SELECT txn, count(*) FROM crash GROUP BY txn ORDER BY txn"
                ).fetchall()
            )
    assert all(count == 10 for _, count in counts), counts
    txns = [txn for txn, _ in counts]
    k = txns[-1]
    assert txns == list(range(k + 1))
    assert k >= last_printed
