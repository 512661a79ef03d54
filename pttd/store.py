"""The embedded store: one SQLite database per data directory, in WAL mode.

Blocks live in one table shared by every repository (an ordinary rowid table with a
UNIQUE index on the address: far faster to write than a table keyed by the address);
each repository's signed commits in another. Every block read back is checked against
its address. A write transaction is durable when it returns (synchronous=FULL by
default: it survives kill -9 and power loss).

The store is synchronous; the daemon calls it through ``trio.to_thread``. One Store
object may be used from several threads: calls are serialized by a lock.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from blake3 import blake3

from protocol.chunks import ChunkNode, decode_chunk_node
from protocol.commit import SignedCommit, verify_commit
from protocol.errors import FormatError, SignatureError
from protocol.hashing import KIND_CHUNK, KIND_CHUNK_NODE, KIND_NODE, KIND_VALUE
from protocol.tree import Node, decode_node

from .errors import CorruptBlock, DataDirError, ForkDetected, MissingBlock, NotFound, RollbackRefused, StoreBusy

log = logging.getLogger("pttd.store")

# 2: follows, partial (issue 3); 3: gateway tables (issue 4); 4: hub joins; 5: pins;
# 6: login sessions; 7: exported users; 8: users' hub joins; 9: gw_dms.members
SCHEMA_VERSION = 9
# 64 KiB: chunks of 4-32 KiB left 16 KiB pages about 64% full (104 MB of pages for a
# 64 MiB value); 64 KiB pages fill about 90%, which took storing a large value from
# ~110-170 to ~210-260 MB/s here, with small writes no slower.
PAGE_SIZE = 65536
SYNC_MODES = ("FULL", "NORMAL", "EXTRA")
FLUSH_BLOCKS = 16_000
FLUSH_BYTES = 16 << 20
NODE_CACHE = 8192
# The caches hold at most so many bytes of blocks too: a repository's owner may make
# nodes of megabytes (a modified client), and a hub syncs whoever joins.
NODE_CACHE_BYTES = 32 << 20  # decoded nodes, by their blocks' size (honest ones: ~0.5 KB each)
COMMIT_CACHE = 16384  # checked commits (~0.4 KB each)
SERVED_CACHE = 2048  # node blocks kept as bytes, for answering peers (~1 MB)
SERVED_CACHE_BYTES = 8 << 20
GET_PART = 900  # addresses of a want looked up at once
GET_SMALL = 64 << 10  # bytes: a block this small is read with its size; a larger one only if it fits
COMPLETE_CACHE = 200_000
WAL_CHECKPOINT_BYTES = 256 << 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS blocks(
    id INTEGER PRIMARY KEY,
    hash BLOB NOT NULL UNIQUE,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS repos(
    id INTEGER PRIMARY KEY,
    key BLOB NOT NULL UNIQUE,
    owned INTEGER NOT NULL,
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS commits(
    repo INTEGER NOT NULL REFERENCES repos(id),
    seq INTEGER NOT NULL,
    hash BLOB NOT NULL,
    block BLOB NOT NULL,
    sig BLOB NOT NULL,
    PRIMARY KEY(repo, seq)
);
CREATE TABLE IF NOT EXISTS forks(
    repo INTEGER NOT NULL REFERENCES repos(id),
    seq INTEGER NOT NULL,
    hash BLOB NOT NULL,
    block BLOB NOT NULL,
    sig BLOB NOT NULL,
    seen INTEGER NOT NULL,
    PRIMARY KEY(repo, seq, hash)
);
-- Interior blocks (tree nodes, chunk-tree nodes) stored by a sync or an on-demand read
-- before everything under them is: a stored block not listed here has its whole
-- subtree stored, so a sync skips it; a listed one is walked again (resume, sparse).
CREATE TABLE IF NOT EXISTS partial(hash BLOB PRIMARY KEY) WITHOUT ROWID;
-- Repositories this daemon follows: from which peers, under which path prefixes.
CREATE TABLE IF NOT EXISTS follows(
    repo BLOB PRIMARY KEY,
    prefixes TEXT NOT NULL,
    peers TEXT NOT NULL,
    added INTEGER NOT NULL
);
-- Gateway mode. Hosted users: a login name, the repository, its secret key sealed with
-- the gateway key (never in the clear), an Argon2id password hash or NULL.
CREATE TABLE IF NOT EXISTS gw_users(
    name TEXT PRIMARY KEY,
    repo BLOB NOT NULL UNIQUE,
    sealed_key BLOB NOT NULL,
    password TEXT,
    created INTEGER NOT NULL
);
-- Events for the live streams, written in the transaction of the commit they tell of,
-- so that a stream resumed with Last-Event-ID misses nothing. A post event is for the
-- users in its topic; a dm event for its recipient (body: where the envelope is).
CREATE TABLE IF NOT EXISTS gw_events(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    topic TEXT,
    user BLOB,
    body TEXT NOT NULL,
    time INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS gw_events_user ON gw_events(user, id) WHERE user IS NOT NULL;
CREATE INDEX IF NOT EXISTS gw_events_topic ON gw_events(topic, id) WHERE topic IS NOT NULL;
-- Indexes kept by the gateway beside the repositories, written in the transaction of the
-- commit they describe: which hosted users are in which topic; which direct-message
-- envelopes each hosted user can open (sent or received); whose envelopes a hosted user
-- could receive (their friends). Everything in them can be derived from the
-- repositories and the users' keys, but nothing rebuilds them yet.
CREATE TABLE IF NOT EXISTS gw_topics(topic TEXT NOT NULL, repo BLOB NOT NULL, PRIMARY KEY(topic, repo)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS gw_dms(
    user BLOB NOT NULL,
    sender BLOB NOT NULL,
    path TEXT NOT NULL,
    peer BLOB NOT NULL,
    date INTEGER NOT NULL,
    members BLOB,
    PRIMARY KEY(user, sender, path)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS gw_friends(friend BLOB NOT NULL, user BLOB NOT NULL, PRIMARY KEY(friend, user)) WITHOUT ROWID;
-- Gateway login sessions: a refresh token (its hash) per login; logout revokes one.
CREATE TABLE IF NOT EXISTS gw_sessions(
    id TEXT PRIMARY KEY,
    user BLOB NOT NULL,
    refresh_hash BLOB NOT NULL,
    expires INTEGER NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);
-- Gateway users exported to another home (pttctl user export): their writes here are
-- refused, so that two gateways never both sign versions of one repository (a fork).
CREATE TABLE IF NOT EXISTS gw_moved(repo BLOB PRIMARY KEY, moved INTEGER NOT NULL);
-- The hubs (wire addresses) each hosted user was joined to, once: a user who then leaves
-- a hub is not joined to it again.
CREATE TABLE IF NOT EXISTS gw_hub_joins(
    user BLOB NOT NULL,
    hub TEXT NOT NULL,
    joined INTEGER NOT NULL,
    PRIMARY KEY(user, hub)
) WITHOUT ROWID;
-- Hub mode: the repositories that joined, and where they said they are served.
CREATE TABLE IF NOT EXISTS hub_joins(repo BLOB PRIMARY KEY, addresses TEXT NOT NULL, joined INTEGER NOT NULL);
-- Replicator mode: the repositories pinned (kept whole and live, served to anyone).
CREATE TABLE IF NOT EXISTS pins(repo BLOB PRIMARY KEY, added INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class RepoRow:
    id: int
    key: bytes
    owned: bool


# Rows per INSERT statement. One multi-row INSERT is one sqlite3_step, during which the
# sqlite3 module releases the GIL; executemany re-takes it after every row, which starves
# a background insert while the caller's thread runs Python (measured: 35 s vs 1.7 s for
# 100,000 rows beside a busy thread).
ROWS_PER_INSERT = 4000 if sqlite3.sqlite_version_info >= (3, 32, 0) else 499


@functools.lru_cache(maxsize=8)
def _insert_sql(rows: int) -> str:
    # A block stored already is left as it is, unless its stored bytes differ (damaged on
    # the disk): the new ones match the address, so a write of the same content repairs it.
    return (
        "INSERT INTO blocks(hash, data) VALUES "
        + ",".join(["(?,?)"] * rows)
        + " ON CONFLICT(hash) DO UPDATE SET data=excluded.data WHERE blocks.data IS NOT excluded.data"
    )


def _insert_blocks(db: sqlite3.Connection, rows: list[tuple[bytes, bytes]]) -> None:
    for i in range(0, len(rows), ROWS_PER_INSERT):
        part = rows[i : i + ROWS_PER_INSERT]
        db.execute(_insert_sql(len(part)), [x for row in part for x in row])


class Checkpointer:
    """A connection of its own for WAL checkpoints of a store, so that copying the log
    into the database file does not hold the store's connection (and every read queued
    behind it: 12-86 ms each under a gateway's load). Its calls may run in any thread,
    one at a time."""

    def __init__(self, path: str, busy_timeout: float = 30.0):
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_timeout)
        self._lock = threading.Lock()

    def checkpoint(self, mode: str = "PASSIVE") -> None:
        with self._lock:
            self._db.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()


class InsertFailed(Exception):
    """A background block insert failed other than in SQLite (its cause chained)."""


class _Connection:
    """The SQLite connection, with at most one block insert running in the background.

    A flush of blocks runs on a second core while the writing thread goes on hashing
    and building the tree. Every other use of the connection first waits for that
    insert to finish, so the connection is never used by two threads at once.
    """

    def __init__(self, db: sqlite3.Connection):
        self.db = db
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def wait(self) -> None:
        """Wait for the background insert (and raise its error, if it failed: as
        InsertFailed unless it is SQLite's own, so that no caller takes it for an error
        of its own work)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if self._error is not None:
                err, self._error = self._error, None
                if isinstance(err, sqlite3.Error):
                    raise err
                raise InsertFailed(f"a block insert failed: {err!r}") from err

    def execute(self, sql: str, params=()):
        self.wait()
        return self.db.execute(sql, params)

    def executemany(self, sql: str, rows):
        self.wait()
        return self.db.executemany(sql, rows)

    def executescript(self, sql: str):
        self.wait()
        return self.db.executescript(sql)

    def close(self) -> None:
        self.wait()
        self.db.close()

    def insert_blocks(self, rows: list[tuple[bytes, bytes]], background: bool) -> None:
        """Insert rows, now or in a background thread (after the one before)."""
        self.wait()
        if not background:
            _insert_blocks(self.db, rows)
            return

        def work() -> None:
            try:
                _insert_blocks(self.db, rows)
            except BaseException as exc:  # re-raised in the writing thread by wait()
                self._error = exc

        self._thread = threading.Thread(target=work, name="pttd-block-insert", daemon=True)
        self._thread.start()


class Writer:
    """Blocks written inside one store transaction, flushed in sorted batches; a full
    batch is inserted in the background while more blocks are made."""

    def __init__(self, conn: _Connection):
        self._conn = conn
        self._pending: dict[bytes, bytes] = {}
        self._pending_bytes = 0

    def emit(self, address: bytes, block: bytes) -> None:
        if address not in self._pending:
            self._pending[address] = block
            self._pending_bytes += len(block)
            if len(self._pending) >= FLUSH_BLOCKS or self._pending_bytes >= FLUSH_BYTES:
                self.flush(background=True)

    def get(self, address: bytes) -> bytes | None:
        return self._pending.get(address)

    def flush(self, background: bool = False) -> None:
        """Insert the pending blocks; without ``background``, wait until all are in."""
        # Sorted by address, the UNIQUE index is updated in order.
        pending = self._pending
        rows = [(a, pending[a]) for a in sorted(pending)]  # keys alone sort 2-3x faster than items
        self._pending = {}
        self._pending_bytes = 0
        self._conn.insert_blocks(rows, background)


class Store:
    def __init__(
        self,
        path: str,
        *,
        synchronous: str = "FULL",
        create: bool = False,
        page_size: int = 0,
        busy_timeout: float = 30.0,
        checkpoints: bool = True,
    ):
        self.path = path
        self._busy_ms = int(busy_timeout * 1000)
        if synchronous.upper() not in SYNC_MODES:
            raise DataDirError(f"store synchronous mode must be one of {', '.join(SYNC_MODES)}, not {synchronous!r}")
        if not create and not os.path.exists(path):
            raise DataDirError(f"no store at {path}")
        try:
            self._db = _Connection(
                sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_timeout)
            )
            # takes effect only when the file is created
            self._db.execute(f"PRAGMA page_size={page_size or PAGE_SIZE}")
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise DataDirError(f"store {path}: could not switch to WAL mode (got {mode})")
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._synchronous = synchronous.upper()
            self._db.execute("PRAGMA cache_size=-16384")
            # Checkpoints run when we choose (after a write, past WAL_CHECKPOINT_BYTES,
            # and on close), not inside whichever commit crosses 1000 pages: a large
            # commit then costs one write of its data, not two.
            self._db.execute("PRAGMA wal_autocheckpoint=0")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise DataDirError(f"store {path} cannot be opened: {exc}") from None
        if row is None:
            self._db.execute("INSERT INTO meta(key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) < SCHEMA_VERSION:  # the new tables were created above
            try:
                self._add_columns()
            except sqlite3.DatabaseError as exc:
                raise DataDirError(f"store {path} cannot be upgraded: {exc}") from None
            log.info("store %s upgraded from schema %s to %d", path, row[0], SCHEMA_VERSION)
            self._db.execute("UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA_VERSION),))
        elif int(row[0]) > SCHEMA_VERSION:
            raise DataDirError(
                f"store {path} has schema {row[0]}, newer than this pttd understands ({SCHEMA_VERSION}); upgrade pttd"
            )
        self._lock = threading.RLock()
        self.defer_checkpoints = False  # set while a call runs on the daemon's event loop
        # False: another process checkpoints this store (a gateway's writer process)
        self.checkpoints = checkpoints
        self._overlay: dict[bytes, bytes] | None = None
        self._nodes: dict[tuple[int, bytes], object] = {}
        self._node_sizes: dict[tuple[int, bytes], int] = {}
        self._nodes_bytes = 0
        self._served: dict[bytes, bytes] = {}
        self._served_bytes = 0
        self._unstored: dict[bytes, bytes] = {}  # hold_unstored
        self._commits: dict[bytes, SignedCommit] = {}
        # Addresses known to be stored with their whole subtree (so a sync skips them
        # without a query): leaves once stored, interior blocks once their sync's commit
        # is accepted. Emptied by gc, and when it grows past COMPLETE_CACHE.
        self.known_complete: set[bytes] = set()
        self._writer: Writer | None = None
        self.blocks_read = 0

    def _add_columns(self) -> None:
        """Columns that a table of an older store lacks (its new tables were created
        with the schema). Schema 9: gw_dms.members, the channel members of a direct
        message (its rows from before are NULL: not known without opening them)."""
        cols = {r[1] for r in self._db.execute("PRAGMA table_info(gw_dms)").fetchall()}
        if "members" not in cols:
            try:
                self._db.execute("ALTER TABLE gw_dms ADD COLUMN members BLOB")
            except sqlite3.OperationalError as exc:
                if "duplicate column" not in str(exc):  # another process added it just now
                    raise

    @contextmanager
    def idle(self) -> Iterator[bool]:
        """Whether the store is free right now (no other thread inside it), holding it
        while true: for a short call made in place instead of on the store thread."""
        if not self._lock.acquire(blocking=False):
            yield False
            return
        self.defer_checkpoints = True  # a checkpoint can take long: the next write does it
        try:
            yield True
        finally:
            self.defer_checkpoints = False
            self._lock.release()

    def close(self) -> None:
        with self._lock:
            if self.checkpoints:
                try:  # not waiting for another process's lock: its own close copies the log
                    self._db.execute("PRAGMA busy_timeout=0")
                    busy = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
                    if busy:
                        log.info("checkpoint on close skipped: another process is using the store")
                except sqlite3.OperationalError as exc:  # another process is reading: fine
                    log.info("checkpoint on close skipped: %s", exc)
            self._db.close()

    def wal_bytes(self) -> int:
        try:
            return os.path.getsize(self.path + "-wal")
        except FileNotFoundError:
            return 0

    def checkpoint_due(self) -> bool:
        return self.wal_bytes() > WAL_CHECKPOINT_BYTES

    def checkpoint(self, mode: str = "TRUNCATE") -> None:
        """Copy committed pages from the WAL into the database file. TRUNCATE (the
        default) also empties the WAL file, so its size is again a measure of what has
        not been copied (PASSIVE leaves the file at its largest, and every later write
        would then find a checkpoint due)."""
        with self._lock:
            self._db.execute(f"PRAGMA wal_checkpoint({mode})")

    def _checkpoint_now(self) -> None:
        """A TRUNCATE checkpoint that does not wait: with another process reading, it
        would wait for it (the busy timeout, 30 s) holding the store's lock, and every
        call of this process behind it. Skipped then; the next write tries again."""
        with self._lock:
            self._db.execute("PRAGMA busy_timeout=0")
            try:
                busy = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            finally:
                self._db.execute(f"PRAGMA busy_timeout={self._busy_ms}")
            if busy:
                log.info("checkpoint after a write skipped: another process is reading (retried after the next write)")

    # --- meta -------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def query(self, sql: str, params=()) -> list[tuple]:
        """Rows of one SQL statement (for the tables a mode keeps beside the blocks)."""
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def execute(self, sql: str, params=()) -> int:
        """One SQL statement; the last inserted row id. Inside ``write()`` it is part of
        that transaction; outside, a transaction of its own."""
        with self._lock:
            return self._db.execute(sql, params).lastrowid

    def data_version(self) -> int:
        """SQLite's count of the commits of other connections (other processes' too) seen
        by this one: unchanged means nobody else wrote since it was last read. Read
        inside ``write()``, it holds until that transaction ends."""
        with self._lock:
            return self._db.execute("PRAGMA data_version").fetchone()[0]

    def executemany(self, sql: str, rows) -> None:
        """One SQL statement for each of ``rows``."""
        with self._lock:
            self._db.executemany(sql, rows)

    # --- transactions -----------------------------------------------------------------

    @contextmanager
    def write(self, durable: bool = True) -> Iterator[Writer]:
        """One write transaction; blocks go through the yielded Writer.

        ``durable=False`` (data fetched from peers, which can be fetched again): the
        transaction survives a crash of the process but is not synced to the disk on
        its own; the next durable transaction syncs it with its own (WAL order).
        """
        with self._lock:
            if self._writer is not None:
                raise RuntimeError("nested write transaction")
            relaxed = not durable and self._synchronous != "NORMAL"
            if relaxed:
                self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                with self._transaction() as writer:
                    yield writer
            finally:
                if relaxed:
                    self._db.execute(f"PRAGMA synchronous={self._synchronous}")

    @contextmanager
    def _transaction(self) -> Iterator[Writer]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if "locked" in str(exc) or "busy" in str(exc):
                    raise StoreBusy(
                        f"the store {self.path} is being written by another process (a pttd daemon or pttctl) "
                        "and stayed locked past the busy timeout: try again"
                    ) from None
                raise
            writer = self._writer = Writer(self._db)
            try:
                yield writer
                writer.flush()
                self._db.execute("COMMIT")
            except BaseException:
                try:
                    self._db.wait()
                except Exception as exc:
                    log.error("a block insert failed in a write that is rolled back: %s", exc)
                if self._db.db.in_transaction:  # SQLite rolled back itself (a full disk, say)
                    self._db.execute("ROLLBACK")
                raise
            finally:
                self._writer = None
            if self.checkpoints and not self.defer_checkpoints and self.wal_bytes() > WAL_CHECKPOINT_BYTES:
                try:  # the transaction is durable already: a failed checkpoint is retried later
                    self._checkpoint_now()
                except sqlite3.Error as exc:
                    log.warning("checkpoint after a write failed (retried after the next write): %s", exc)

    # --- blocks -----------------------------------------------------------------------

    def get_block(self, address: bytes) -> bytes:
        """The block's bytes, checked against its address."""
        with self._lock:
            if self._overlay is not None:
                block = self._overlay.get(address)
                if block is not None:  # fetched and checked, about to be stored
                    return block
            if self._writer is not None:
                pending = self._writer.get(address)
                if pending is not None:
                    return pending
            if self._unstored:
                block = self._unstored.get(address)
                if block is not None:  # fetched and checked, to be stored soon
                    return block
            row = self._db.execute("SELECT data FROM blocks WHERE hash=?", (address,)).fetchone()
            self.blocks_read += 1
        if row is None:
            raise MissingBlock(address)
        data = row[0]
        if blake3(data).digest() != address:
            raise CorruptBlock(address)
        return data

    def classify(self, addresses: list[bytes]) -> tuple[set[bytes], set[bytes]]:
        """Of ``addresses``: those stored, and of those the ones marked partial."""
        present: set[bytes] = set()
        partial: set[bytes] = set()
        with self._lock:
            for i in range(0, len(addresses), 900):
                part = addresses[i : i + 900]
                marks = ",".join("?" * len(part))
                present.update(r[0] for r in self._db.execute(f"SELECT hash FROM blocks WHERE hash IN ({marks})", part))
                partial.update(
                    r[0] for r in self._db.execute(f"SELECT hash FROM partial WHERE hash IN ({marks})", part)
                )
        partial &= present
        self._remember_complete(present - partial)
        return present, partial

    def _remember_complete(self, addresses) -> None:
        if len(self.known_complete) > COMPLETE_CACHE:
            self.known_complete = set()
        self.known_complete.update(addresses)

    def get_blocks(self, addresses: list[bytes], budget: int | None = None) -> tuple[list[bytes], list[bytes]]:
        """(blocks found, addresses not held), each found block checked against its hash.
        With ``budget`` (bytes), only the blocks held that fit in it are read (one at
        least), in the order asked: the addresses after the last one read are neither
        returned nor missing (asked for again). A part's sizes are read first (from the
        rows' headers, no value read), so a peer's want of 4,096 blocks of megabytes
        reads about one answer, however their sizes are mixed."""
        found: dict[bytes, bytes] = {}
        asked = addresses
        with self._lock:
            if budget is None:
                for i in range(0, len(addresses), 900):
                    part = addresses[i : i + 900]
                    marks = ",".join("?" * len(part))
                    found.update(self._db.execute(f"SELECT hash, data FROM blocks WHERE hash IN ({marks})", part))
            else:
                total = 0
                for i in range(0, len(addresses), GET_PART):
                    part = addresses[i : i + GET_PART]
                    marks = ",".join("?" * len(part))
                    # each row's size, and its bytes when small: a large one is read only
                    # if it fits (SQLite takes a value's size from the row's header)
                    rows = {
                        h: (n, d)
                        for h, n, d in self._db.execute(
                            f"SELECT hash, length(data), CASE WHEN length(data) <= {GET_SMALL} THEN data END "
                            f"FROM blocks WHERE hash IN ({marks})",
                            part,
                        )
                    }
                    full = False
                    for j, a in enumerate(part):
                        row = rows.get(a)
                        if row is None:
                            continue
                        size, data = row
                        if total + size + 5 > budget and found:  # and its msgpack header
                            asked, full = addresses[: i + j], True
                            break
                        if data is None:
                            one = self._db.execute("SELECT data FROM blocks WHERE hash=?", (a,)).fetchone()
                            if one is None:
                                continue
                            data = one[0]
                        found[a] = data
                        total += size + 5
                    if full:
                        break
            self.blocks_read += len(found)
        out: list[bytes] = []
        missing: list[bytes] = []
        for a in asked:
            data = found.get(a)
            if data is None:
                missing.append(a)
            elif blake3(data).digest() != a:
                log.error("corrupt block %s not served", a.hex())
                missing.append(a)
            else:
                out.append(data)
        return out, missing

    def read_with(self, blocks: dict[bytes, bytes], read):
        """``read()`` seeing ``blocks`` (fetched and checked against their addresses,
        not yet stored) as if they were stored."""
        with self._lock:
            self._overlay = blocks
            try:
                return read()
            finally:
                self._overlay = None

    def hold_unstored(self, rows: list[tuple[bytes, bytes]]) -> None:
        """Blocks fetched and checked, readable as if stored until ``put_fetched``
        stores them (or the process ends: they can be fetched again)."""
        with self._lock:
            self._unstored.update(rows)

    def put_fetched(self, rows: list[tuple[bytes, bytes]], partial: list[bytes]) -> None:
        """Store blocks received from a peer (already checked against their addresses),
        marking the interior ones ``partial`` until their subtree is complete."""
        with self.write(durable=False) as w:
            for a, b in rows:
                w.emit(a, b)
            w.flush()
            if partial:
                self._db.db.executemany("INSERT OR IGNORE INTO partial(hash) VALUES (?)", [(a,) for a in partial])
        self._remember_complete(a for a, b in rows if b[0] == KIND_VALUE or b[0] == KIND_CHUNK)
        self.drop_unstored(rows)

    def drop_unstored(self, rows: list[tuple[bytes, bytes]]) -> None:
        """Forget held blocks (stored now, or given up on)."""
        if self._unstored:
            with self._lock:
                for a, _ in rows:
                    self._unstored.pop(a, None)

    def clear_partial(self, addresses: list[bytes]) -> None:
        with self._lock:
            self._clear_partial(addresses)

    def _clear_partial(self, addresses) -> None:
        self._db.wait()
        self._db.db.executemany("DELETE FROM partial WHERE hash=?", [(a,) for a in addresses])

    def has_block(self, address: bytes) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM blocks WHERE hash=?", (address,)).fetchone() is not None

    def node_block(self, address: bytes) -> tuple[Node, bytes]:
        """A tree node, decoded (from the cache when it is there), and its block's bytes,
        read once and checked against its address (to send it on). The bytes of the
        nodes served most often (the top of each tree, on every path a peer asks for)
        are kept too: a random read of a large store costs ~0.1 ms here."""
        data = self._served.get(address)
        if data is None:
            data = self.get_block(address)
            if len(self._served) >= SERVED_CACHE or self._served_bytes + len(data) > SERVED_CACHE_BYTES:
                for k in list(self._served)[: max(1, len(self._served) // 4)]:
                    old = self._served.pop(k, None)
                    if old is not None:
                        self._served_bytes -= len(old)
            if len(data) <= SERVED_CACHE_BYTES // 8:
                self._served[address] = data
                self._served_bytes += len(data)
        return self._decoded(address, KIND_NODE, decode_node, data), data

    def _decoded(self, address: bytes, kind: int, decode, data: bytes | None = None):
        node = self._nodes.get((kind, address))
        if node is not None:
            return node
        if data is None:
            data = self.get_block(address)
        if data[0] != kind:
            raise CorruptBlock(address, f"expected a block of kind {kind}, found kind {data[0]}")
        try:
            node = decode(data[1:])
        except FormatError as exc:
            raise CorruptBlock(address, str(exc)) from None
        self._cache_node((kind, address), node, len(data))
        return node

    def _cache_node(self, key: tuple[int, bytes], node, size: int) -> None:
        if size > NODE_CACHE_BYTES // 16:
            return  # not one that crowds out hundreds of others
        if len(self._nodes) >= NODE_CACHE or self._nodes_bytes + size > NODE_CACHE_BYTES:
            # Drop the oldest quarter: nodes are immutable, so a miss only costs a read.
            # (pop: the event loop may remember a node while the store thread evicts)
            for k in list(self._nodes)[: max(1, len(self._nodes) // 4)]:
                self._nodes.pop(k, None)
                self._node_sizes.pop(k, None)
            # counted again: the event loop (remember_node) and the store thread both add,
            # and their sums could drift
            self._nodes_bytes = sum(self._node_sizes.values())
        if key not in self._nodes:
            self._nodes_bytes += size
        else:
            self._nodes_bytes += size - self._node_sizes.get(key, 0)
        self._nodes[key] = node
        self._node_sizes[key] = size

    def remember_node(self, address: bytes, node: Node) -> None:
        """A node this process just made or fetched and checked (and is storing): kept
        decoded for the next read (weighed by an estimate of its block's size)."""
        self._cache_node((KIND_NODE, address), node, 40 * len(node.keys) + sum(map(len, node.keys)))

    def load_node(self, address: bytes) -> Node:
        return self._decoded(address, KIND_NODE, decode_node)

    def load_chunk_node(self, address: bytes) -> ChunkNode:
        return self._decoded(address, KIND_CHUNK_NODE, decode_chunk_node)

    def drop_cache(self) -> None:
        self._nodes.clear()
        self._node_sizes.clear()
        self._nodes_bytes = 0
        self._served.clear()
        self._served_bytes = 0

    def block_stats(self) -> tuple[int, int]:
        """(number of blocks, total bytes)."""
        with self._lock:
            n, size = self._db.execute("SELECT count(*), coalesce(sum(length(data)), 0) FROM blocks").fetchone()
        return n, size

    def iter_all_blocks(self, batch: int = 2000) -> Iterator[tuple[bytes, bytes]]:
        last = 0
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT id, hash, data FROM blocks WHERE id > ? ORDER BY id LIMIT ?", (last, batch)
                ).fetchall()
            if not rows:
                return
            for _, h, d in rows:
                yield h, d
            last = rows[-1][0]

    # --- repositories -----------------------------------------------------------------

    def add_repo(self, key: bytes, owned: bool) -> RepoRow:
        with self._lock:
            try:
                cur = self._db.execute(
                    "INSERT INTO repos(key, owned, created) VALUES (?, ?, ?)", (key, int(owned), int(time.time()))
                )
            except sqlite3.IntegrityError:
                raise ForkDetected(f"repository {key.hex()} is already in this store") from None
            return RepoRow(cur.lastrowid, key, owned)

    def find_repo(self, key: bytes) -> RepoRow | None:
        with self._lock:
            row = self._db.execute("SELECT id, key, owned FROM repos WHERE key=?", (key,)).fetchone()
        return RepoRow(row[0], row[1], bool(row[2])) if row else None

    def list_repos(self) -> list[RepoRow]:
        with self._lock:
            rows = self._db.execute("SELECT id, key, owned FROM repos ORDER BY id").fetchall()
        return [RepoRow(r[0], r[1], bool(r[2])) for r in rows]

    # --- commits ----------------------------------------------------------------------

    def head_seq(self, repo: RepoRow) -> int | None:
        with self._lock:
            row = self._db.execute("SELECT max(seq) FROM commits WHERE repo=?", (repo.id,)).fetchone()
        return row[0]

    def load_commit(self, repo: RepoRow, seq: int) -> SignedCommit:
        """The commit at ``seq``, its address and signature checked."""
        with self._lock:
            row = self._db.execute(
                "SELECT hash, block, sig, seq FROM commits WHERE repo=? AND seq=?", (repo.id, seq)
            ).fetchone()
        if row is None:
            raise NotFound(f"version {seq} of {repo.key.hex()} is not stored")
        return self._checked_commit(repo, row)

    def head_commit(self, repo: RepoRow) -> SignedCommit | None:
        """The newest commit (one query), checked; None for a repository with none."""
        with self._lock:
            row = self._db.execute(
                "SELECT hash, block, sig, seq FROM commits WHERE repo=? ORDER BY seq DESC LIMIT 1", (repo.id,)
            ).fetchone()
        return None if row is None else self._checked_commit(repo, row)

    def head_commits(self, repos: list[RepoRow], damaged: dict[int, CorruptBlock]) -> dict[int, SignedCommit]:
        """The newest commit of each of ``repos`` (one query), checked; by repository
        row id, without the repositories that have none. A head that fails its check is
        left out and put in ``damaged`` instead."""
        out: dict[int, SignedCommit] = {}
        by_id = {r.id: r for r in repos}
        ids = list(by_id)
        with self._lock:
            for i in range(0, len(ids), 900):
                part = ids[i : i + 900]
                # max(seq) per repository as a subquery of its own, which SQLite answers
                # from the end of the (repo, seq) index; a GROUP BY over the IN list
                # read every commit of those repositories (4 ms for 21 repositories of
                # 1,000 commits each, growing with their histories).
                rows = self._db.execute(
                    "SELECT c.repo, c.hash, c.block, c.sig, c.seq FROM repos r JOIN commits c "
                    "ON c.repo = r.id AND c.seq = (SELECT max(seq) FROM commits WHERE repo = r.id) "
                    f"WHERE r.id IN ({','.join('?' * len(part))})",
                    part,
                ).fetchall()
                for repo_id, *row in rows:
                    try:
                        out[repo_id] = self._checked_commit(by_id[repo_id], row)
                    except CorruptBlock as exc:
                        damaged[repo_id] = exc
        return out

    def _checked_commit(self, repo: RepoRow, row) -> SignedCommit:
        address, block, sig, seq = row
        cached = self._commits.get(address)
        if (
            cached is not None
            and cached.signature == sig
            and cached.block == block
            and cached.commit.repo == repo.key
            and cached.seq == seq
        ):
            return cached  # checked when first read (an Ed25519 check costs ~0.1 ms)
        if blake3(block).digest() != address:
            raise CorruptBlock(address, f"commit seq {seq} does not match its hash")
        try:
            sc = verify_commit(block, sig, repo.key)
        except (FormatError, SignatureError) as exc:
            raise CorruptBlock(address, f"commit seq {seq}: {exc}") from None
        if sc.seq != seq:
            raise CorruptBlock(address, f"commit stored as seq {seq} says seq {sc.seq}")
        self._remember_commit(sc)
        return sc

    def commit_seqs(self, repo: RepoRow) -> list[int]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT seq FROM commits WHERE repo=? ORDER BY seq", (repo.id,))]

    def insert_commit(self, repo: RepoRow, sc: SignedCommit) -> None:
        """Record a commit; the caller holds a write transaction and checked it."""
        self._db.execute(
            "INSERT INTO commits(repo, seq, hash, block, sig) VALUES (?, ?, ?, ?, ?)",
            (repo.id, sc.seq, sc.address, sc.block, sc.signature),
        )
        # made or checked by the caller: its next read needs no signature check (a
        # rolled-back insert leaves an entry no stored row will match)
        self._remember_commit(sc)

    def insert_commits(self, rows: list[tuple[RepoRow, SignedCommit]]) -> None:
        """Record several commits at once (a gateway's group); inside a write."""
        self._db.executemany(
            "INSERT INTO commits(repo, seq, hash, block, sig) VALUES (?, ?, ?, ?, ?)",
            [(repo.id, sc.seq, sc.address, sc.block, sc.signature) for repo, sc in rows],
        )
        for _repo, sc in rows:
            self._remember_commit(sc)

    def _remember_commit(self, sc: SignedCommit) -> None:
        """A commit checked (or made) here, so that reading it back costs no signature
        check (~0.1 ms). The oldest quarter goes when full: a gateway's heads move on
        with every write, and clearing all at once made every user's next write check
        its head again."""
        if len(self._commits) >= COMMIT_CACHE:
            for k in list(self._commits)[: COMMIT_CACHE // 4]:
                del self._commits[k]
        self._commits[sc.address] = sc

    def accept_commit(
        self,
        repo: RepoRow,
        block: bytes,
        signature: bytes,
        complete: list[bytes] | tuple = (),
        rows: list[tuple[bytes, bytes]] | tuple = (),
        partial: list[bytes] | tuple = (),
        verified: SignedCommit | None = None,
    ) -> SignedCommit:
        """Check a commit received from elsewhere and make it the head if it is newer.

        Refuses a bad signature, a commit for another repository, one older than the
        head (no rollback), and records fork evidence (a different commit at a seq
        already held, or a next commit whose prev is not the head) before refusing it.
        ``complete``: interior blocks whose subtrees the caller fetched, no longer partial
        once the commit is in; ``rows`` and ``partial``: the last fetched blocks, stored
        in the same transaction (one fsync for the end of a sync, not two).
        ``verified``: this same commit, already checked by the caller.
        """
        if verified is not None and verified.block == block and verified.signature == signature:
            sc = verified  # checked on arrival (pttd.node.on_head) against this repository's key
        else:
            sc = verify_commit(block, signature, repo.key)
        if sc.commit.repo != repo.key:
            raise SignatureError(f"commit is for repository {sc.commit.repo.hex()}, not {repo.key.hex()}")
        fork: str | None = None
        # Not synced to the disk on its own: after a power cut the follower may hold an
        # older head and fetch this one again (never a torn store: WAL). Local writes
        # stay durable.
        with self.write(durable=False) as w:
            if rows:
                for a, b in rows:
                    w.emit(a, b)
                w.flush()
                if partial:
                    done = set(complete)
                    self._db.db.executemany(
                        "INSERT OR IGNORE INTO partial(hash) VALUES (?)", [(a,) for a in partial if a not in done]
                    )
            known = self.forks(repo)
            if known:
                raise ForkDetected(f"repository {repo.key.hex()} forked at seq {known[0][0]}: no longer following it")
            head = self.head_seq(repo)
            if head is not None:
                held = self._commit_row(repo, sc.seq)
                if held == sc.address:  # walked again (prefixes widened): what it completed
                    if complete:
                        self._clear_partial(complete)
                    return sc
                if held is not None:
                    fork = f"repository {repo.key.hex()} signed two different commits at seq {sc.seq}"
                elif sc.seq < head:
                    raise RollbackRefused(f"commit seq {sc.seq} of {repo.key.hex()} is older than the head seq {head}")
                elif sc.seq == head + 1 and sc.commit.prev != self._commit_row(repo, head):
                    fork = f"commit seq {sc.seq} of {repo.key.hex()} does not follow the head seq {head}"
            if fork is not None:
                # The evidence is kept (committed) even though the commit is refused.
                self._record_fork(repo, sc)
            else:
                self.insert_commit(repo, sc)
                if complete:
                    self._clear_partial(complete)
        if fork is not None:
            raise ForkDetected(fork)
        self._remember_complete(complete)
        self._remember_complete(a for a, b in rows if b[0] == KIND_VALUE or b[0] == KIND_CHUNK)
        return sc

    def _commit_row(self, repo: RepoRow, seq: int) -> bytes | None:
        row = self._db.execute("SELECT hash FROM commits WHERE repo=? AND seq=?", (repo.id, seq)).fetchone()
        return row[0] if row else None

    def _record_fork(self, repo: RepoRow, sc: SignedCommit) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO forks(repo, seq, hash, block, sig, seen) VALUES (?, ?, ?, ?, ?, ?)",
            (repo.id, sc.seq, sc.address, sc.block, sc.signature, int(time.time())),
        )
        log.warning("fork evidence for %s at seq %d recorded", repo.key.hex(), sc.seq)

    def forks(self, repo: RepoRow) -> list[tuple[int, bytes]]:
        with self._lock:
            return [(r[0], r[1]) for r in self._db.execute("SELECT seq, hash FROM forks WHERE repo=?", (repo.id,))]

    def prune_commits(self, repo: RepoRow, keep: int) -> int:
        """Delete all but the newest ``keep`` commits (by seq; gaps allowed)."""
        with self._lock:
            cur = self._db.execute(
                "DELETE FROM commits WHERE repo=? AND seq < "
                "(SELECT seq FROM commits WHERE repo=? ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                (repo.id, repo.id, keep - 1),
            )
            return cur.rowcount

    # --- follows ----------------------------------------------------------------------

    def set_follow(self, key: bytes, prefixes: list[str], peers: list[str]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO follows(repo, prefixes, peers, added) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(repo) DO UPDATE SET prefixes=excluded.prefixes, peers=excluded.peers",
                (key, json.dumps(prefixes), json.dumps(peers), int(time.time())),
            )

    def remove_follow(self, key: bytes) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM follows WHERE repo=?", (key,)).rowcount > 0

    def list_follows(self) -> list[tuple[bytes, list[str], list[str]]]:
        with self._lock:
            rows = self._db.execute("SELECT repo, prefixes, peers FROM follows ORDER BY added").fetchall()
        return [(r[0], json.loads(r[1]), json.loads(r[2])) for r in rows]

    # --- garbage collection -----------------------------------------------------------

    def all_roots(self) -> list[tuple[RepoRow, int, bytes]]:
        out = []
        for repo in self.list_repos():
            for seq in self.commit_seqs(repo):
                out.append((repo, seq, self.load_commit(repo, seq).commit.root))
        return out

    def sweep(self, live: set[bytes]) -> tuple[int, int]:
        """Delete every block whose address is not in ``live``: (blocks, bytes) removed.

        The caller marks ``live`` inside the same write transaction (see repo.collect_garbage).
        """
        dead: list[int] = []
        freed = 0
        for row in self._db.execute("SELECT id, hash, length(data) FROM blocks"):
            if row[1] not in live:
                dead.append(row[0])
                freed += row[2]
        for i in range(0, len(dead), 5000):
            part = dead[i : i + 5000]
            self._db.execute(f"DELETE FROM blocks WHERE id IN ({','.join('?' * len(part))})", part)
        self._db.execute("DELETE FROM partial WHERE hash NOT IN (SELECT hash FROM blocks)")
        self.drop_cache()
        self.known_complete = set()
        return len(dead), freed

    def vacuum(self) -> None:
        """Rebuild the database file so that freed pages (deleted data) leave the disk."""
        with self._lock:
            self._db.execute("VACUUM")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def file_size(self) -> int:
        total = 0
        for suffix in ("", "-wal"):
            try:
                total += os.path.getsize(self.path + suffix)
            except FileNotFoundError:
                pass
        return total
