"""The gateway's writes: each request names an operation of the chat schema; a group of
them is applied in one store transaction (group commit) by a ``GroupWriter``.

The GroupWriter runs either on the daemon's store thread (``[gateway] writer =
"thread"``) or, by default, in a process of its own (``python -m pttd.gateway.writes``)
with its own connection to the same SQLite database. Building a commit (the tree
update, canonical encoding, hashing, the Ed25519 signature, the rows) is Python that
holds the interpreter's lock: in its own process it runs on a second core beside the
HTTP server instead of taking turns with it. Requests and answers are plain values, so
they cross the pipe as they are (4-byte big-endian length, then a pickle: both ends are
this daemon).

Each request is checked and its commit built without writing a row, so one that fails
leaves nothing behind; then the commits and the gateway's rows of all that succeeded are
written together and the transaction commits: one sync to the disk for the group.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sqlite3
import sys
import time
from dataclasses import dataclass, field

from nacl.signing import SigningKey

from .. import jsonvalue
from ..errors import USER_ERRORS, CorruptBlock, Forbidden, MissingBlock, ServerError
from ..gctune import quiet_gc
from ..repo import Batch, Repository
from ..store import InsertFailed, RepoRow, Store
from . import chat

log = logging.getLogger("pttd.gateway.writes")

# A user hosted here: a row of gw_users whose repository did not move to another home
# (an exported user keeps the row, to log in and read; their repository is written
# elsewhere now, and followed like any other for its direct messages).
HOSTED_SQL = "SELECT 1 FROM gw_users WHERE repo=? AND repo NOT IN (SELECT repo FROM gw_moved)"

TRIM_EVERY = 1024  # events written between two trims of the old ones
IN_TOPIC_CACHE = 200_000
HEADS_KEPT = 65_536  # newest commits of repositories kept by the writer (~0.5 KB each)
BUSY_TIMEOUT = 3600.0  # seconds a group waits for the store's lock (the daemon's gc)


@dataclass
class Event:
    id: int
    kind: str  # "post" or "dm"
    topic: str | None
    user: bytes | None
    body: dict
    plain: dict | None = None  # a dm's opened message, when known at once


@dataclass
class Tx:
    """What a write does besides its commit: rows of the gateway's tables, written in the
    same transaction right after the commit's own row (so a request that fails before
    that leaves nothing to undo), and events for the live streams."""

    events: list[Event] = field(default_factory=list)
    follows: list[bytes] = field(default_factory=list)
    in_topic: list[tuple[str, bytes]] = field(default_factory=list)
    _rows: list = field(default_factory=list)

    def event(self, kind: str, topic: str | None, user: bytes | None, body: dict, plain: dict | None = None) -> None:
        self._rows.append((kind, topic, user, body, plain))

    def sql(self, query: str, params=()) -> None:
        self._rows.append((query, params))


def flush_rows(store: Store, txs: list[Tx]) -> int:
    """Write the rows of ``txs`` (one statement per kind of row), number their events;
    how many events were written."""
    now = int(time.time())
    by_query: dict[str, list] = {}
    events: list[tuple[Tx, tuple]] = []
    for tx in txs:
        for row in tx._rows:
            if len(row) == 2:
                by_query.setdefault(row[0], []).append(row[1])
            else:
                events.append((tx, row))
        tx._rows = []
    for query, params in by_query.items():
        store.executemany(query, params)
    if not events:
        return 0
    top = store.query("SELECT coalesce(max(id), 0) FROM gw_events")[0][0]
    store.executemany(
        "INSERT INTO gw_events(kind, topic, user, body, time) VALUES (?, ?, ?, ?, ?)",
        [(k, t, u, jsonvalue.dumps(b).decode(), now) for _tx, (k, t, u, b, _p) in events],
    )
    ids = [r[0] for r in store.query("SELECT id FROM gw_events WHERE id > ? ORDER BY id", (top,))]
    if len(ids) != len(events):
        raise ServerError(f"{len(events)} events written, {len(ids)} found")
    for eid, (tx, (k, t, u, b, p)) in zip(ids, events):
        tx.events.append(Event(eid, k, t, u, b, p))
    return len(events)


def trim_events(store: Store, retention: int) -> None:
    """Inside a write: drop the events older than the newest ``retention``."""
    top = store.query("SELECT coalesce(max(id), 0) FROM gw_events")[0][0]
    if top > retention:
        store.execute("DELETE FROM gw_events WHERE id <= ?", (top - retention,))


# --- the operations -------------------------------------------------------------------


@dataclass
class Author:
    """The user a write is for, as the writer knows them."""

    key: bytes
    name: str
    sk: SigningKey

    @property
    def hex(self) -> str:
        return self.key.hex()


def _post_event(w: GroupWriter, tx: Tx, u: Author, topic: str, action: str, post: dict) -> None:
    if (topic, u.key) not in w.in_topic:
        tx.sql("INSERT OR IGNORE INTO gw_topics(topic, repo) VALUES (?, ?)", (topic, u.key))
        tx.in_topic.append((topic, u.key))
    tx.event("post", topic, None, {"action": action, "author": u.hex, "topic": topic, "post": post})


def op_post(w: GroupWriter, u: Author, b: Batch, tx: Tx, topic: str, data):
    post = chat.post_message(b, topic, data)
    _post_event(w, tx, u, topic, "new", post)
    return post


def op_create_topic(w: GroupWriter, u: Author, b: Batch, tx: Tx, topic: str):
    post = chat.create_topic(b, topic)
    _post_event(w, tx, u, topic, "new", post)
    return {"id": topic, "post": post}


def op_edit(w: GroupWriter, u: Author, b: Batch, tx: Tx, topic: str, post_id: str, data):
    post = chat.edit_message(b, topic, post_id, data)
    _post_event(w, tx, u, topic, "edit", post)
    return post


def op_delete(w: GroupWriter, u: Author, b: Batch, tx: Tx, topic: str, post_id: str):
    res = chat.delete_message(b, topic, post_id)
    _post_event(w, tx, u, topic, "delete", res)
    return res


FOLDER_WRITERS = {"curators": chat.add_curator, "moderation": chat.add_moderation, "reactions": chat.add_reaction}


def op_folder_add(w: GroupWriter, u: Author, b: Batch, tx: Tx, kind: str, topic: str, data):
    return FOLDER_WRITERS[kind](b, topic, data)


def op_folder_delete(w: GroupWriter, u: Author, b: Batch, tx: Tx, kind: str, topic: str, record: str):
    return chat.delete_record(b, topic, kind, record)


def op_add_friend(w: GroupWriter, u: Author, b: Batch, tx: Tx, data, max_friends: int):
    rec = chat.add_friend(b, u.sk, data)
    friend = bytes.fromhex(rec["key"])
    n = w.store.query("SELECT count(*) FROM gw_friends WHERE user=?", (u.key,))[0][0]
    if n >= max_friends and not w.store.query("SELECT 1 FROM gw_friends WHERE user=? AND friend=?", (u.key, friend)):
        raise Forbidden(f"at most {max_friends} friends per user on this gateway")
    tx.sql("INSERT OR IGNORE INTO gw_friends(friend, user) VALUES (?, ?)", (friend, u.key))
    if not w.is_hosted(friend):
        tx.follows.append(friend)
    return rec


def op_send_dm(w: GroupWriter, u: Author, b: Batch, tx: Tx, recipients: list[bytes], msg: dict, channel):
    sent = chat.send_envelopes(b, u.sk, recipients, msg, channel)
    for i, (r, path, plain) in enumerate(sent):
        members = chat.members_blob(plain)
        if i == 0:  # the sender's own index: one entry per message, not per recipient
            tx.sql(
                "INSERT OR IGNORE INTO gw_dms(user, sender, path, peer, date, members) VALUES (?, ?, ?, ?, ?, ?)",
                (u.key, u.key, path, r, plain["date"], members),
            )
            # and to the sender's own streams (their other tabs and devices); ``peer``:
            # whom the envelope is between, to open it again on a resumed stream
            tx.event("dm", None, u.key, {"sender": u.hex, "path": path, "peer": r.hex()}, plain)
        if w.is_hosted(r) or r == w.node_id:
            tx.sql(
                "INSERT OR IGNORE INTO gw_dms(user, sender, path, peer, date, members) VALUES (?, ?, ?, ?, ?, ?)",
                (r, u.key, path, u.key, plain["date"], members),
            )
            tx.event("dm", None, r, {"sender": u.hex, "path": path}, plain)
    return [p for _r, _path, p in sent]


def op_deliver_dms(w: GroupWriter, u: None, b: None, tx: Tx, found: list[tuple]):
    """Direct messages from elsewhere for hosted users, opened by the daemon: indexed
    for each recipient, with a ``dm`` event; never twice."""
    for user, sender, path, date, plain in found:
        if (user, sender, path) in w.delivered or w.store.query(
            "SELECT 1 FROM gw_dms WHERE user=? AND sender=? AND path=?", (user, sender, path)
        ):
            continue
        w.delivered.add((user, sender, path))
        tx.sql(
            "INSERT INTO gw_dms(user, sender, path, peer, date, members) VALUES (?, ?, ?, ?, ?, ?)",
            (user, sender, path, sender, date, chat.members_blob(plain)),
        )
        tx.event("dm", None, user, {"sender": sender.hex(), "path": path}, plain)


def op_store_file(w: GroupWriter, u: Author, b: Batch, tx: Tx, fid: str, content: bytes):
    path = f"/files/{fid}"
    if not b.exists(path):
        b.put(path, content)
    return fid


def op_add_pchannel(w: GroupWriter, u: Author, b: Batch, tx: Tx, data):
    return chat.add_pchannel(b, u.sk, data)


def op_set_profile(w: GroupWriter, u: Author, b: Batch, tx: Tx, data):
    return chat.set_profile(b, chat.profile(b, u.name), data)  # as this group left it


OPS = {
    "post": op_post,
    "create_topic": op_create_topic,
    "edit": op_edit,
    "delete": op_delete,
    "folder_add": op_folder_add,
    "folder_delete": op_folder_delete,
    "add_friend": op_add_friend,
    "send_dm": op_send_dm,
    "deliver_dms": op_deliver_dms,  # no user, no commit: rows and events only
    "store_file": op_store_file,
    "add_pchannel": op_add_pchannel,
    "set_profile": op_set_profile,
}


# --- the group writer -----------------------------------------------------------------

# Failures of the store, not of one request: the whole group fails (a block insert of
# an earlier request may be what failed, and no commit is stored without its blocks).
STORE_FAILURES = (sqlite3.Error, OSError, MemoryError, InsertFailed)


def _unexpected(r: dict, exc: Exception) -> ServerError:
    """A request's operation failed in a way no request should (a bug it met): it alone
    is refused, with nothing of it stored; the other writes of its group go on."""
    who = r["key"].hex() if r["key"] is not None else "the gateway"
    log.error("a %s write for %s failed, refused alone: %r", r["op"], who, exc, exc_info=exc)
    return ServerError(f"this write failed ({exc.__class__.__name__}); nothing of it was stored")


def request(op: str, args: tuple, key: bytes, row: int, name: str, seed: bytes) -> dict:
    """One write, as a GroupWriter takes it (plain values, to cross a pipe)."""
    return {"op": op, "args": args, "key": key, "row": row, "name": name, "seed": seed}


class GroupWriter:
    """Applies groups of write requests to the store, one transaction per group."""

    def __init__(self, store: Store, node_id: bytes, event_retention: int, cache_state: bool = False):
        """``cache_state``: the store's connection is this writer's alone (a writer
        process), so that SQLite's data_version tells every commit not its own."""
        self.store = store
        self.cache_state = cache_state
        self.node_id = node_id
        self.event_retention = event_retention
        self.in_topic: set[tuple[str, bytes]] = set()  # (topic, user) known to be in gw_topics
        self._keys: dict[bytes, SigningKey] = {}
        # What this writer knows of the store as of SQLite's data_version: the newest
        # commit of the repositories it wrote, and keys it found not exported. Nothing
        # but its own commits changed them while no other connection committed; any
        # other commit (the daemon's: a login, an export, a sync) and they are read again.
        self._version: int | None = None
        self._heads: dict[bytes, object] = {}
        self._not_moved: set[bytes] = set()
        self._events_added = 0
        self.delivered: set[tuple] = set()  # direct messages delivered in this group

    def is_hosted(self, key: bytes) -> bool:
        return bool(self.store.query(HOSTED_SQL, (key,)))

    def _author(self, r: dict) -> Author:
        sk = self._keys.get(r["key"])
        if sk is None:
            sk = SigningKey(r["seed"])
            if bytes(sk.verify_key) != r["key"]:
                raise ServerError("a write came with a key that is not its repository's")
            if len(self._keys) >= 65536:
                self._keys.clear()
            self._keys[r["key"]] = sk
        return Author(r["key"], r["name"], sk)

    def apply(self, reqs: list[dict]) -> list[dict]:
        """The answers, in order: ``{"result", "committed", "events", "follows"}`` or
        ``{"error": exception}``. Raises (and stores nothing of the group) when the
        store fails: a later request of the group may meet the same failure unknowingly
        (a block insert running in the background), and no commit may be stored without
        its blocks."""
        store = self.store
        out: list[dict] = []
        commits = []
        txs: list[Tx] = []
        self.delivered = set()
        try:
            with store.write() as w:
                heads, moved, damaged, asked = self._read_state(reqs)
                for r in reqs:
                    if r["key"] is not None and r["row"] in damaged:
                        log.error("repository %s cannot be written: %s", r["key"].hex(), damaged[r["row"]])
                        out.append({"error": ServerError("this repository's newest version is damaged in the store")})
                        continue
                    out.append(self._apply_one(r, w, heads, moved, commits, txs))
                store.insert_commits(commits)
                self._events_added += flush_rows(store, txs)
                if self._events_added >= TRIM_EVERY:
                    self._events_added = 0
                    trim_events(store, self.event_retention)
        except BaseException:
            self._version = None  # rolled back: what it learnt may have been this group's
            raise
        if self._version is not None:
            self._heads.update(heads)
            self._not_moved.update(k for k in asked if k not in moved)
        if len(self.in_topic) > IN_TOPIC_CACHE:
            self.in_topic.clear()
        for tx in txs:
            self.in_topic.update(tx.in_topic)
        for a in out:
            tx = a.pop("tx", None)
            if tx is not None:
                a["events"], a["follows"] = tx.events, tx.follows
        return out

    def _read_state(self, reqs: list[dict]) -> tuple[dict, set, dict, list]:
        """Inside the group's transaction: the newest commit of each repository written
        (by key), the keys exported, the repositories whose head is damaged (by row id),
        and the keys looked up in gw_moved. What this writer knows from its own commits
        is not read again while no other connection committed."""
        store = self.store
        if self.cache_state:
            version = store.data_version()  # under the write lock: nobody commits until we do
            if version != self._version or len(self._heads) > HEADS_KEPT:
                self._heads.clear()
                self._not_moved.clear()
                self._version = version
        heads: dict[bytes, object] = {k: self._heads[k] for r in reqs if (k := r["key"]) in self._heads}
        asked = list({k for r in reqs if (k := r["key"]) is not None and k not in self._not_moved})
        moved: set[bytes] = set()
        if asked:
            marks = ",".join("?" * len(asked))
            moved = {k for (k,) in store.query(f"SELECT repo FROM gw_moved WHERE repo IN ({marks})", asked)}
        rows = {
            r["row"]: RepoRow(r["row"], r["key"], True) for r in reqs if r["key"] is not None and r["key"] not in heads
        }
        # a damaged head fails the writes to its repository, not the whole group
        damaged: dict[int, CorruptBlock] = {}
        if rows:  # one query for the group
            for row_id, sc in store.head_commits(list(rows.values()), damaged).items():
                heads[rows[row_id].key] = sc
        return heads, moved, damaged, asked

    def _apply_one(self, r: dict, w, heads: dict, moved: set, commits: list, txs: list) -> dict:
        if r["key"] is None:  # rows and events only
            tx = Tx()
            try:
                result = OPS[r["op"]](self, None, None, tx, *r["args"])
            except USER_ERRORS as exc:
                if isinstance(exc, (MissingBlock, CorruptBlock)):
                    raise
                return {"error": exc}
            except STORE_FAILURES:
                raise
            except Exception as exc:
                return {"error": _unexpected(r, exc)}
            txs.append(tx)
            return {"result": result, "committed": False, "tx": tx}
        if r["key"] in moved:  # exported while this write waited for its group
            return {"error": Forbidden("this account was exported to another home: it is written there, not here")}
        u = self._author(r)
        repo = Repository(self.store, RepoRow(r["row"], u.key, True), u.sk)
        tx = Tx()
        try:
            with repo.batch_in(w, head=heads.get(u.key), insert=False) as b:
                result = OPS[r["op"]](self, u, b, tx, *r["args"])
        except USER_ERRORS as exc:  # what a request can do wrong: it alone is refused
            if isinstance(exc, (MissingBlock, CorruptBlock)):
                raise  # the store, not the request: the whole group fails
            return {"error": exc}
        except STORE_FAILURES:
            raise
        except Exception as exc:
            return {"error": _unexpected(r, exc)}
        if b.commit is not None:
            heads[u.key] = b.commit
            commits.append((repo.row, b.commit))
        txs.append(tx)
        return {"result": result, "committed": b.commit is not None, "tx": tx}


# --- the writer process ---------------------------------------------------------------


def _read_exact(f, n: int) -> bytes | None:
    data = f.read(n)
    return data if len(data) == n else None


def _portable(answer: dict) -> dict:
    """An answer that unpickles on the other end (an exception that does not is sent as
    a server error naming it)."""
    exc = answer.get("error")
    if exc is not None:
        try:
            pickle.loads(pickle.dumps(exc))
        except Exception:
            answer["error"] = ServerError(f"{exc.__class__.__name__}: {exc}")
    return answer


def _sendable(answer: dict) -> dict:
    """``answer``, or an error in its place if it does not pickle (its write is stored:
    the daemon answers 500, "may or may not be stored")."""
    try:
        pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
        return answer
    except Exception as exc:
        log.error("an answer cannot be sent back to the daemon: %r", exc)
        return {"error": ServerError(f"the answer of this write could not be sent back: {exc.__class__.__name__}")}


def serve(inp, out, writer: GroupWriter) -> None:
    """Answer groups read from ``inp`` on ``out`` until ``inp`` ends (the daemon closed
    it, or died). Each frame is ``(requests, finish_checkpoint)``: with the latter, once
    the group is answered, the WAL's pages not yet copied into the database are (the
    daemon's passive checkpoint copied the rest), so that the next write can start the
    log afresh (Gateway._checkpoints)."""
    while True:
        head = _read_exact(inp, 4)
        if head is None:
            return
        body = _read_exact(inp, int.from_bytes(head, "big"))
        if body is None:
            return
        reqs, finish_checkpoint = pickle.loads(body)
        try:
            answer = {"answers": [_portable(a) for a in writer.apply(reqs)]}
        except Exception as exc:  # the transaction failed: nothing of the group is stored
            log.error("a group of %d writes failed, nothing of it stored: %r", len(reqs), exc)
            answer = {"failed": f"{exc.__class__.__name__}: {exc}"}
        try:
            data = pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # an answer that does not pickle: that request alone gets an error
            answer = {"answers": [_sendable(a) for a in answer["answers"]]}
            data = pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            out.write(len(data).to_bytes(4, "big") + data)
            out.flush()
        except BrokenPipeError:  # the daemon is gone (its group is stored or not, as it went)
            return
        if finish_checkpoint:
            try:
                writer.store.checkpoint("PASSIVE")
            except sqlite3.Error as exc:  # the daemon's next checkpoint copies it
                log.warning("checkpoint after a group failed: %s", exc)


def main(argv: list[str]) -> int:
    """``python -m pttd.gateway.writes DB SYNCHRONOUS NODE_ID EVENT_RETENTION LOG_LEVEL``"""
    path, synchronous, node_id, retention, level = argv
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # The daemon stops it by closing its input, after the group it holds: a Ctrl-C or
    # SIGTERM meant for the daemon's process group must not cut that group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # the answers go to the daemon on the real stdout; anything printed goes to stderr
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    # a long gc or checkpoint by the daemon holds the store's lock: wait for it, as the
    # writes did on the daemon's store thread
    # Checkpoints are the daemon's (Gateway._checkpoints): one here would wait for the
    # daemon's readers with every write held up behind it.
    store = Store(path, synchronous=synchronous, busy_timeout=BUSY_TIMEOUT, checkpoints=False)
    # Its caches (nodes, commits, keys) are long-lived and large, and a group makes
    # tens of thousands of short-lived objects: with the collector's defaults ~5% of a
    # group's time went to collections that found nothing.
    quiet_gc()
    try:
        serve(sys.stdin.buffer, out, GroupWriter(store, bytes.fromhex(node_id), int(retention), cache_state=True))
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    # run as the module's real name: the classes pickled back (Event) must be found there
    from pttd.gateway import writes

    sys.exit(writes.main(sys.argv[1:]))
