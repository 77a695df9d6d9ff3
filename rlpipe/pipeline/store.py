"""The experience buffer's store: one SQLite database in WAL mode, `<buffer_dir>/buffer.db`.

Chosen over the previous hand-written CRC log by measurement (benchmarks/bench_buffer_store.py,
4k-token groups on the 2-core dev machine, decode + validation included): about 2.7k groups/s
accepted with every commit fsynced, as fast as the CRC log extended with an id set (2.8-3.0k/s,
fsync per round too), and SQLite brings what the log lacked: deduplication that survives
restarts and compaction (a primary key on the group id), compaction by DELETE, and counters
that change in the same transaction as the data.

    decisions(group_id PRIMARY KEY, outcome, explorer, n)
                                               the groups received and what was decided
                                               ("accepted" or the drop reason), kept after
                                               compaction: the newest DEDUP_PER_EXPLORER of
                                               each explorer (see there)
    payloads(seq PRIMARY KEY, version, incarnation, body, newest)
                                               accepted groups not yet compacted or dropped at
                                               serve time; body is the msgpack TrajectoryGroup,
                                               version the floor of its action tokens' mean
                                               version, newest their newest (validation.Versions;
                                               NULL in a store written before per-token
                                               staleness, where version was the oldest)
    counters(name PRIMARY KEY, n)              received, accepted, duplicates, dropped:<r>,
                                               stale:<r>, rejected:<r>, last_seq, durable_seq,
                                               learner_incarnation
    meta(key PRIMARY KEY, value)               run_id, schema

Durability: synchronous=FULL, so a COMMIT has reached the disk (the WAL is fsynced) before it
returns; the buffer acknowledges a group only after the transaction holding its decision has
committed, and batches one transaction per intake round so the fsync is shared. One process
writes (an flock on `<buffer_dir>/buffer.lock`); readers (`read_stats`, `rlpipe stats`) open
the database read-only at any time, and WAL mode never makes them wait for the writer.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path

DB_NAME = "buffer.db"
LOCK_NAME = "buffer.lock"
SCHEMA = "1"
PAGE_SIZE = 65536  # a 4k-token group (~60 KB) fits one page: 2.6k groups/s against 2.0-2.3k with 4 KiB pages
WAL_PAGES = 64  # checkpoint the WAL into the database every 64 pages (4 MiB)...
WAL_LIMIT_BYTES = 8 << 20  # ...and truncate a WAL file that grew past this after a checkpoint
VACUUM_MIN_FREE_PAGES = 64  # give freed pages back to the file system once this many (4 MiB) are free
DEDUP_PER_EXPLORER = 4096
"""Decisions remembered per explorer id, for deduplication. An explorer re-sends only groups
still in its outbox, which holds at most explorer.max_unacked (256 by default; checked against
this when a config is read), sent oldest first, one at a time: an older decision can never be
asked about again. So the table stays bounded (about 60 bytes a decision) however long the
run, and an explorer that is away for days keeps its own window: others cannot push it out."""
STALE_REASONS = ("too_old", "future_version", "other_incarnation")
"""Why an accepted group was never served: all counted as dropped["stale"]."""

_SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS decisions (group_id TEXT PRIMARY KEY, outcome TEXT NOT NULL, explorer TEXT NOT NULL,
                                      n INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS decisions_by_explorer ON decisions (explorer, n);
CREATE TABLE IF NOT EXISTS payloads (seq INTEGER PRIMARY KEY, version INTEGER NOT NULL,
                                     incarnation INTEGER NOT NULL, body BLOB NOT NULL, newest INTEGER);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
"""


class StoreInUse(RuntimeError):
    """Another process has this buffer directory open for writing."""


class Store:
    """The buffer's database, for its one writer. Counters are kept in memory too (`values`)
    and written in the transaction that changes them, so memory and disk never disagree
    after a commit; a rolled-back transaction reloads them from disk."""

    def __init__(self, buffer_dir: str | os.PathLike, *, run_id: str = "", synchronous: str = "FULL"):
        self.dir = Path(buffer_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / DB_NAME
        self._lock = _lock(self.dir / LOCK_NAME)
        self.values: dict[str, int] = {}
        self._dirty: set[str] = set()
        self._in_transaction = False
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
            _configure(self.db, synchronous)
            self.run_id = self._claim(run_id)
        except BaseException:
            self._lock.close()
            raise
        self.values = dict(self.db.execute("SELECT name, n FROM counters"))

    # ------------------------------------------------------------------ counters

    def get(self, name: str) -> int:
        return self.values.get(name, 0)

    def bump(self, name: str, n: int = 1) -> None:
        """Add n to a counter; written by the current transaction, or by the next one."""
        self.set(name, self.get(name) + n)

    def set(self, name: str, value: int) -> None:
        self.values[name] = value
        self._dirty.add(name)

    # ------------------------------------------------------------------ transactions

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT with the changed counters; on any error (a signal
        included) ROLLBACK and reload the counters, so nothing half-done is ever counted."""
        if self._in_transaction:
            raise RuntimeError("transactions do not nest")
        self.db.execute("BEGIN IMMEDIATE")
        self._in_transaction = True
        try:
            yield self.db
            self._write_counters()
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:  # a failed COMMIT may have rolled back already
                self.db.execute("ROLLBACK")
            self.values = dict(self.db.execute("SELECT name, n FROM counters"))
            self._dirty.clear()
            raise
        finally:
            self._in_transaction = False

    def flush(self) -> None:
        """Commit counters changed outside a transaction (rejected frames)."""
        if self._dirty:
            with self.transaction():
                pass

    def _write_counters(self) -> None:
        self.db.executemany("INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET n = excluded.n",
                            [(name, self.values[name]) for name in self._dirty])
        self._dirty.clear()

    # ------------------------------------------------------------------ groups

    def decide(self, group_id: str, outcome: str, explorer: str = "") -> bool:
        """Record the first decision about a group id; False if it was decided before."""
        n = self.get("decisions") + 1
        if self.db.execute("INSERT INTO decisions VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                           (group_id, outcome, explorer, n)).rowcount != 1:
            return False
        self.set("decisions", n)
        return True

    def forget_decisions(self, explorer: str, keep: int = DEDUP_PER_EXPLORER) -> int:
        """Forget all but the newest `keep` decisions about this explorer's groups."""
        return self.db.execute(
            "DELETE FROM decisions WHERE explorer = ? AND n < (SELECT MIN(n) FROM "
            "(SELECT n FROM decisions WHERE explorer = ? ORDER BY n DESC LIMIT ?))",
            (explorer, explorer, keep)).rowcount

    def put(self, seq: int, version: int, incarnation: int, body: bytes | memoryview, newest: int | None = None) -> None:
        self.db.execute("INSERT INTO payloads (seq, version, incarnation, body, newest) VALUES (?, ?, ?, ?, ?)",
                        (seq, version, incarnation, body, version if newest is None else newest))

    def candidates(self, after_seq: int, limit: int) -> list[tuple[int, int, int, int]]:
        """(seq, version, incarnation, newest) of the next stored groups after after_seq."""
        return self.db.execute("SELECT seq, version, incarnation, COALESCE(newest, version) FROM payloads "
                               "WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)).fetchall()

    def body(self, seq: int) -> bytes:
        return self.db.execute("SELECT body FROM payloads WHERE seq = ?", (seq,)).fetchone()[0]

    def forget(self, seq: int) -> None:
        self.db.execute("DELETE FROM payloads WHERE seq = ?", (seq,))

    def compact(self, up_to_seq: int) -> int:
        """Delete the payloads of groups at or below up_to_seq; returns how many went."""
        return self.db.execute("DELETE FROM payloads WHERE seq <= ?", (up_to_seq,)).rowcount

    def vacuum(self) -> None:
        """Return free pages to the file system once there are enough to bother (outside a
        transaction: incremental_vacuum runs its own). The WAL is checkpointed and truncated
        by SQLite itself (wal_autocheckpoint, journal_size_limit)."""
        free = self.db.execute("PRAGMA freelist_count").fetchone()[0]
        if free >= VACUUM_MIN_FREE_PAGES:
            self.db.execute("PRAGMA incremental_vacuum").fetchall()

    def count_after(self, seq: int) -> int:
        """How many accepted groups after seq are still in the store (not served stale, not compacted)."""
        return self.db.execute("SELECT COUNT(*) FROM payloads WHERE seq > ?", (seq,)).fetchone()[0]

    def in_store(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM payloads").fetchone()[0]

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.db.close()
            self._lock.close()

    def _claim(self, run_id: str) -> str:
        """The store belongs to one run: the first run id given is kept; another is refused."""
        with self.transaction() as db:
            meta = dict(db.execute("SELECT key, value FROM meta"))
            if meta.get("schema", SCHEMA) != SCHEMA:
                raise RuntimeError(f"{self.path} has schema {meta['schema']}, this rlpipe reads {SCHEMA}")
            stored = meta.get("run_id", "")
            if stored and run_id and stored != run_id:
                raise ValueError(f"{self.dir} holds the buffer of run {stored}, not of run {run_id}; "
                                 f"use another run directory")
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                           [("schema", SCHEMA), ("run_id", stored or run_id)])
        return stored or run_id


def _configure(db: sqlite3.Connection, synchronous: str) -> None:
    # page_size and auto_vacuum only take effect on a new, empty database: set them first.
    db.execute(f"PRAGMA page_size = {PAGE_SIZE}")
    db.execute("PRAGMA auto_vacuum = INCREMENTAL")
    if db.execute("PRAGMA journal_mode = WAL").fetchone()[0] != "wal":
        raise RuntimeError("SQLite could not switch the buffer store to WAL mode")
    db.execute(f"PRAGMA synchronous = {synchronous}")
    db.execute(f"PRAGMA wal_autocheckpoint = {WAL_PAGES}")
    db.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT_BYTES}")
    db.executescript(_SCHEMA_SQL)
    if "newest" not in {row[1] for row in db.execute("PRAGMA table_info(payloads)")}:
        db.execute("ALTER TABLE payloads ADD COLUMN newest INTEGER")  # a store from before per-token staleness


def _lock(path: Path):
    f = open(path, "a+")  # noqa: SIM115  (held open: the lock lives as long as the file)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise StoreInUse(f"{path.parent} is in use by another buffer process") from None
    return f


# --------------------------------------------------------------------------- readers


@contextlib.contextmanager
def read_only(buffer_dir: str | os.PathLike) -> Iterator[sqlite3.Connection | None]:
    """A read-only connection to the store (None if there is none yet). It never blocks the
    writer or takes its lock; each query sees one committed state."""
    path = Path(buffer_dir) / DB_NAME
    if not path.exists():
        yield None
        return
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0, isolation_level=None)
    try:
        # A buffer that is creating its store right now has not made the tables yet: no store.
        made = db.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'meta'").fetchone()[0]
        yield db if made else None
    finally:
        db.close()


def figures(counters: dict[str, int], in_store: int, run_id: str) -> dict:
    """The buffer's stats() from its counters: one shape for the running buffer and readers."""
    def by_prefix(prefix: str) -> dict[str, int]:
        return {k.removeprefix(prefix): n for k, n in sorted(counters.items()) if k.startswith(prefix) and n}

    stale = {r: counters.get(f"stale:{r}", 0) for r in STALE_REASONS}
    dropped = by_prefix("dropped:")
    if sum(stale.values()):
        dropped["stale"] = sum(stale.values())
    return {"received": counters.get("received", 0), "accepted": counters.get("accepted", 0),
            "duplicates": counters.get("duplicates", 0), "dropped": dropped, "stale_reasons": stale,
            "rejected": by_prefix("rejected:"), "last_seq": counters.get("last_seq", 0),
            "durable_seq": counters.get("durable_seq", 0), "in_store": in_store,
            "learner_incarnation": counters.get("learner_incarnation", 0), "run_id": run_id}


def read_stats(buffer_dir: str | os.PathLike) -> dict:
    """The buffer's stats(), read from its store without disturbing a running buffer
    (read-only, one consistent snapshot). Zeros if it never started."""
    counters, in_store, run_id = {}, 0, ""
    with read_only(buffer_dir) as db:
        if db is not None:
            db.execute("BEGIN")  # one snapshot for all three reads
            counters = dict(db.execute("SELECT name, n FROM counters"))
            in_store = db.execute("SELECT COUNT(*) FROM payloads").fetchone()[0]
            run = db.execute("SELECT value FROM meta WHERE key = 'run_id'").fetchone()
            run_id = run[0] if run else ""
            db.execute("COMMIT")
    return {**figures(counters, in_store, run_id), "store_bytes": store_bytes(buffer_dir)}


def seen_group_ids(buffer_dir: str | os.PathLike, group_ids: Iterable[str]) -> set[str]:
    """Which of these group ids the buffer has decided (accepted or dropped), read-only."""
    ids, found = list(group_ids), set()
    with read_only(buffer_dir) as db:
        for i in range(0, len(ids) if db is not None else 0, 500):  # SQLite limits bound parameters
            chunk = ids[i:i + 500]
            found.update(r[0] for r in db.execute(
                f"SELECT group_id FROM decisions WHERE group_id IN ({','.join('?' * len(chunk))})", chunk))
    return found


def read_bodies(buffer_dir: str | os.PathLike) -> list[bytes]:
    """The msgpack TrajectoryGroups still stored (not compacted, not dropped stale), in seq order."""
    with read_only(buffer_dir) as db:
        return [body for (body,) in db.execute("SELECT body FROM payloads ORDER BY seq")] if db is not None else []


def store_bytes(buffer_dir: str | os.PathLike) -> int:
    """The store's size on disk: the database and its WAL."""
    total = 0
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            total += (Path(buffer_dir) / f"{DB_NAME}{suffix}").stat().st_size
    return total
