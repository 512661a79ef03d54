"""Hub mode: joins, sparse following of the joined repositories, the combined view, and
the live streams of its changes.

A join is a row of ``hub_joins`` and a persistent follow of the repository under
``/profile.json`` and ``/topics/`` (not friends or channels), from the addresses it gave
and any connected peer that serves it. The view (``pttd.hub.view``) is a cache: built
from the stored repositories at start-up, then kept up to date from each new version's
diff under those prefixes (work in proportion to the change). Every change becomes a
numbered delta for the streams: ``update`` (the topic's new, changed or removed
messages) and ``profiles`` (the changed profiles); a stream resumed with a recent
Last-Event-ID gets the deltas it missed, an older one a new snapshot.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from dataclasses import dataclass

import trio
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from protocol import tree
from protocol.paths import key_to_path

from ..config import parse_address
from ..errors import USER_ERRORS, Forbidden, NotFound, PttError
from ..gateway.chat import BadInput, check_key
from ..repo import Repository
from .view import Changes, Limits, Oversized, View, entry_kind

log = logging.getLogger("pttd.hub")

PREFIXES = ["/profile.json", "/topics/"]
_BPREFIXES = [p.encode() for p in PREFIXES]
MAX_ADDRESSES = 8
LEAVE_WINDOW = 300  # seconds a leave signature is good for after the time it says
LEAVE_AHEAD = 30  # seconds its time may be ahead of the hub's clock (a replay after a rejoin fits only here)
STREAM_BUFFER = 256


class HubError(Forbidden):
    """A join or leave this hub refuses (HTTP 403)."""


@dataclass
class Delta:
    id: int
    kind: str  # "update" or "profiles"
    topic: str | None
    data: dict  # update: {"changed": [(author, id)], "removed": [(author, id)]}; profiles: {"authors": [...]}
    public: dict | None = None  # the payload for readers without their own moderation, made once


class HubStream:
    def __init__(self, reader: str | None):
        self.reader = reader
        self.send, self.receive = trio.open_memory_channel[Delta](STREAM_BUFFER)

    def offer(self, d: Delta) -> None:
        try:
            self.send.send_nowait(d)
        except trio.WouldBlock:
            self.send.close()  # too far behind: the client resumes from its Last-Event-ID
        except trio.ClosedResourceError:
            pass


class Hub:
    def __init__(self, node):
        self.node = node
        self.store = node.store
        self.cfg = node.cfg.hub
        c = self.cfg
        self.view = View(set(c.moderators), Limits(c.max_topics_per_repo, c.max_messages_per_repo, c.max_message_bytes))
        self.joined: dict[str, list[str]] = {}  # repository hex -> addresses
        self._membership = trio.Lock()  # joins and leaves, one at a time
        self.epoch = os.urandom(4).hex()  # event ids are "<epoch>-<n>": a restart is noticed
        self.deltas: deque[Delta] = deque(maxlen=c.stream_history)
        self.next_id = 1
        self.streams: set[HubStream] = set()
        self.ready = trio.Event()
        self.announced: dict = {}  # peer -> (its addresses, the repositories it said it serves)
        self._incomplete: set[str] = set()  # repositories whose view is to be read whole again

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        # syncs that land while the view is built wait for it (applying a change twice is harmless)
        self.node.synced_hooks.append(self._on_synced)
        rows = await self.node.db(self.store.query, "SELECT repo, addresses FROM hub_joins")
        blocked = set(self.cfg.blocked)
        for key, addrs in rows:
            if key.hex() in blocked:
                await self._forget(key.hex())
                continue
            self.joined[key.hex()] = json.loads(addrs)
        started = time.perf_counter()
        for author in list(self.joined):
            await self._load(author)  # nobody is streaming yet: the changes go nowhere
        log.info(
            "hub view built from %d repositories in %.2f s: %d topics",
            len(self.joined),
            time.perf_counter() - started,
            len(self.view.topics),
        )
        self.node.rendezvous = self  # wire joins and lookups from here on
        for author, addrs in list(self.joined.items()):
            await self._follow(author, addrs)
        self.ready.set()
        task_status.started()

    # --- joins ----------------------------------------------------------------------

    async def join(self, key_hex, addresses, token, by_owner: bool = False) -> dict:
        """A join, or a join again with addresses. ``by_owner``: made over the wire by the
        repository's own node (its handshake proved the key)."""
        if self.cfg.join_token and token != self.cfg.join_token:
            raise HubError("this hub needs a join token")
        key = _key(key_hex, "public_key")
        if key.hex() in self.cfg.blocked:
            raise HubError("this repository is blocked on this hub")
        if key == self.node.id:
            raise HubError("that is the hub's own repository")
        addrs = _addresses(addresses)
        k = key.hex()
        async with self._membership:  # joins and leaves one at a time: the limit holds
            if k not in self.joined and len(self.joined) >= self.cfg.max_repos:
                raise HubError(f"this hub is full ({self.cfg.max_repos} repositories)")
            # A join proves nothing of the key (anyone can send one): its addresses come
            # after those recorded, so that a stranger's cannot push the owner's out of
            # the list. The owner's own node, or the holder of the hub's join token, puts
            # its addresses first (an address that changed).
            known = self.joined.get(k, [])
            proven = by_owner or bool(self.cfg.join_token)
            merged = list(dict.fromkeys(addrs + known if proven else known + addrs))[:MAX_ADDRESSES]
            await self.node.db(
                self.store.execute,
                # joined: when this membership began (ms; seconds in rows of earlier versions),
                # kept by a join of a repository already in
                "INSERT INTO hub_joins(repo, addresses, joined) VALUES (?, ?, ?) "
                "ON CONFLICT(repo) DO UPDATE SET addresses=excluded.addresses",
                (key, json.dumps(merged), int(time.time() * 1000)),
            )
            new = k not in self.joined
            self.joined[k] = merged
            await self._follow(k, merged)
            if new:
                log.info("hub: %s joined (addresses: %s)", k[:16], ", ".join(merged) or "none given")
                self._publish(await self._load(k))
        return {"public_key": k, "addresses": merged, "joined": True}

    def leave_message(self, key: bytes, when_ms: int) -> bytes:
        """What a repository signs to leave this hub: the hub, the repository and the
        time, so that a signature cannot be replayed after the repository joins again."""
        return b"pttd hub leave\n" + self.node.id + key + when_ms.to_bytes(8, "big")

    async def leave(self, key_hex, signature=None, token=None, when_ms=None) -> dict:
        """A repository leaves: asked with its own signature of ``leave_message`` made
        within LEAVE_WINDOW of now and after its latest join, or by whoever holds the
        hub's join token."""
        key = _key(key_hex, "public_key")
        k = key.hex()
        by_operator = bool(self.cfg.join_token) and token == self.cfg.join_token
        need_signature = "leaving needs the repository's signature of the hub's leave message (see docs/hub.md)"
        if not by_operator:
            if not signature:
                raise HubError(need_signature)
            if type(when_ms) is not int or not 0 <= when_ms < 2**63:
                raise HubError("leaving needs the time it was signed at (time: milliseconds since 1970)")
            try:
                VerifyKey(key).verify(self.leave_message(key, when_ms), bytes.fromhex(signature or ""))
            except (BadSignatureError, ValueError, TypeError):
                raise HubError(need_signature) from None
            now_ms = time.time() * 1000
            if not now_ms - LEAVE_WINDOW * 1000 <= when_ms <= now_ms + LEAVE_AHEAD * 1000:
                raise HubError(
                    f"this leave was signed at a time more than {LEAVE_WINDOW} s ago or {LEAVE_AHEAD} s ahead: "
                    "sign it again"
                )
        async with self._membership:  # not in the middle of its join
            if k not in self.joined:
                raise NotFound(f"{k} has not joined this hub")
            if not by_operator:
                rows = await self.node.db(self.store.query, "SELECT joined FROM hub_joins WHERE repo=?", (key,))
                joined = rows[0][0] if rows else 0
                joined_ms = joined if joined > 10**11 else joined * 1000  # seconds in rows before ms
                if when_ms <= joined_ms:
                    raise HubError("this leave was signed before the repository's latest join (a replay?)")
            await self._forget(k)
        log.info("hub: %s left", k[:16])
        return {"public_key": k, "joined": False}

    async def _forget(self, k: str) -> None:
        await self.node.db(self.store.execute, "DELETE FROM hub_joins WHERE repo=?", (bytes.fromhex(k),))
        self.joined.pop(k, None)
        await self.node.unfollow(bytes.fromhex(k))
        self._publish(self.view.remove_repo(k))

    async def _follow(self, k: str, addresses: list[str]) -> None:
        f = self.node.follows.get(bytes.fromhex(k))
        if f is not None and f.persistent and f.prefixes == PREFIXES and set(addresses) == set(f.peers):
            return  # followed so already (restarted from the store with the daemon)
        try:  # the addresses of the join replace those before: no growing list to dial
            await self.node.follow(bytes.fromhex(k), PREFIXES, addresses, replace_peers=True)
        except PttError as exc:
            log.warning("hub: cannot follow %s: %s", k[:16], exc)

    # --- rendezvous (over the wire) --------------------------------------------------

    @staticmethod
    def _peer_addresses(peer, ports: list[int]) -> list[str]:
        host = peer.conn.remote.rsplit(":", 1)[0].strip("[]")
        host = f"[{host}]" if ":" in host else host
        return [f"{host}:{p}" for p in ports]

    async def join_from_peer(self, peer, msg: dict) -> tuple[bool, str]:
        """A ``join`` over the wire: the addresses given, and the peer's own address at
        the ports it listens on."""
        # the address the hub saw first: it is known to reach the joiner
        addrs = self._peer_addresses(peer, msg["ports"]) + list(msg["addresses"])
        try:
            res = await self.join(
                msg["repo"].hex(),
                list(dict.fromkeys(addrs))[:MAX_ADDRESSES],
                msg["token"] or None,
                peer.id == msg["repo"],
            )
        except USER_ERRORS as exc:
            return False, str(exc)[:1000]
        return True, f"joined with addresses {', '.join(res['addresses'])}"[:1000]

    def announce(self, peer, repos: list[bytes], ports: list[int]) -> None:
        """What a peer serves, kept per peer: its latest announcement replaces its earlier
        ones (bounded: peers x 4096 keys), and is forgotten when the peer leaves."""
        if peer not in self.announced:
            self.node.on_peer_gone(peer, lambda: self.announced.pop(peer, None))
        self.announced[peer] = (self._peer_addresses(peer, ports), set(repos[:4096]))

    def lookup(self, key: bytes) -> list[str]:
        out = list(self.joined.get(key.hex(), []))
        for addresses, repos in self.announced.values():
            if key in repos:
                out += [a for a in addresses if a not in out]
        return out[:16]

    # --- the view -------------------------------------------------------------------

    # The store thread only reads: it collects the entries, and the view (read by the
    # event loop at any time) is changed on the event loop, never beside it.

    def _read_repo(self, author: str) -> tuple[list[tuple[str, bytes | None]], bool]:
        """On the store thread: ``author``'s entries under the prefixes as stored; and
        whether that was all of them (not: not synced that far yet)."""
        entries: list[tuple[str, bytes | None]] = []
        row = self.store.find_repo(bytes.fromhex(author))
        if row is None or self.store.head_seq(row) is None:
            return entries, True
        repo = Repository(self.store, row, None)
        root = repo.head().commit.root
        complete = True
        # Only what the view may take is read: paths it reads, and of messages and
        # records twice what it keeps of one repository (the rest could be any number of
        # entries, each value stored once however many paths share it). Twice: entries
        # the view skips (not JSON, a topic past its limit) do not hide the good ones
        # after them, unless a repository writes that many.
        most = 2 * self.cfg.max_messages_per_repo
        left = {"profile": 1, "message": most, "record": most}
        unread = oversized = 0
        for prefix in _BPREFIXES:
            try:
                for key, ref in tree.iterate(root, prefix, self.store.load_node):
                    path = key_to_path(key)
                    kind = entry_kind(path)
                    if kind is None:
                        continue
                    if not left[kind]:
                        unread += 1
                        continue
                    value = self._value(repo, ref)
                    if isinstance(value, Oversized):  # skipped by the view: not even its path is kept
                        oversized += 1
                        continue
                    left[kind] -= 1
                    entries.append((path, value))
            except USER_ERRORS as exc:
                log.info("hub: %s not complete yet: %s", author[:16], exc)
                complete = False
        if unread or oversized:
            log.info(
                "hub: skipped from %s: %d entries larger than %d bytes, %d past %d messages or records, unread",
                author[:16],
                oversized,
                self.cfg.max_message_bytes,
                unread,
                most,
            )
        return entries, complete

    def _value(self, repo: Repository, ref) -> bytes | Oversized | None:
        if ref is None or isinstance(ref, bytes):
            return ref
        size = tree.ref_size(ref)
        if size > self.cfg.max_message_bytes:
            return Oversized(size)  # refused by size, unread
        try:
            return b"".join(repo._read_ref(ref))
        except USER_ERRORS:
            return None

    def _diff_entries(self, author: str, old_root: bytes, new_root: bytes) -> tuple[list, bool, bool]:
        """On the store thread: the entries that changed under the prefixes, whether all
        were read, and whether they are the repository whole instead (a change larger
        than the view keeps of a repository is read as a first read is, within limits)."""
        entries: list[tuple[str, bytes | None]] = []
        repo = Repository(self.store, self.store.find_repo(bytes.fromhex(author)), None)
        most = 4 * self.cfg.max_messages_per_repo + 1  # what a whole read takes
        try:
            for key, _old, new in tree.diff(old_root, new_root, self.store.load_node, _BPREFIXES):
                path = key_to_path(key)
                if entry_kind(path) is None:
                    continue
                if len(entries) >= most:
                    return (*self._read_repo(author), True)
                entries.append((path, self._value(repo, new)))
        except USER_ERRORS as exc:
            log.info("hub: diff of %s stopped: %s", author[:16], exc)
            return entries, False, False
        return entries, True, False

    def _feed(self, author: str, entries, complete: bool, whole: bool) -> Changes:
        """On the event loop: the entries into the view (``whole``: they are all of the
        repository, what is not among them goes)."""
        ch = self.view.remove_repo(author) if whole else Changes()
        for path, value in entries:
            try:
                ch.merge(self.view.apply(author, path, value))
            except Exception:  # a bug of ours on some entry: that entry is skipped, not the rest
                log.exception("hub: entry %s of %s not taken", path, author[:16])
        if not complete:
            self._incomplete.add(author)  # read whole at its next sync
        return ch

    async def _load(self, author: str) -> Changes:
        entries, complete = await self.node.db(self._read_repo, author)
        if author not in self.joined:  # left while it was read: not back into the view
            return Changes()
        return self._feed(author, entries, complete, whole=author in self.view.repos)

    async def _on_synced(self, key: bytes, old_root: bytes | None, new_root: bytes) -> None:
        await self.ready.wait()
        author = key.hex()
        if author not in self.joined:
            return
        if old_root is None or author in self._incomplete:
            self._incomplete.discard(author)
            self._publish(await self._load(author))
            return
        entries, complete, whole = await self.node.db(self._diff_entries, author, old_root, new_root)
        if author not in self.joined:  # left while it was read (store calls run in order: not yet seen)
            return
        self._publish(self._feed(author, entries, complete, whole=whole))

    # --- deltas and streams ---------------------------------------------------------

    def _publish(self, ch: Changes) -> None:
        if not ch:
            return
        by_topic: dict[str, dict] = {}
        for (topic, author, mid), present in ch.messages.items():
            d = by_topic.setdefault(topic, {"changed": [], "removed": []})
            d["changed" if present else "removed"].append((author, mid))
        out = []
        for topic, data in by_topic.items():
            out.append(Delta(self.next_id, "update", topic, data))
            self.next_id += 1
        if ch.profiles:
            out.append(Delta(self.next_id, "profiles", None, {"authors": sorted(ch.profiles)}))
            self.next_id += 1
        for d in out:
            self.deltas.append(d)
            for s in list(self.streams):
                s.offer(d)

    def since(self, event_id: str | None) -> list[Delta] | None:
        """The deltas after ``event_id``, or None when they are no longer all here."""
        if not event_id:
            return None
        epoch, _, n = event_id.partition("-")
        if epoch != self.epoch or not (n.isascii() and n.isdigit() and len(n) <= 19):  # int() takes 4300 digits
            return None
        n = int(n)
        if n >= self.next_id:
            return None
        if n + 1 < (self.deltas[0].id if self.deltas else self.next_id):
            return None
        return [d for d in self.deltas if d.id > n]

    def event_id(self, n: int) -> str:
        return f"{self.epoch}-{n}"

    def payload(self, d: Delta, reader: str | None) -> dict:
        """What a stream sends for ``d``: messages as the view shows them to ``reader``
        (the same for every stream without a reader: made once, not once per client)."""
        if reader is None:
            if d.public is None:
                d.public = self._payload(d, None)
            return d.public
        return self._payload(d, reader)

    def _payload(self, d: Delta, reader: str | None) -> dict:
        if d.kind == "profiles":
            profiles = self.view.profiles(d.data["authors"])
            return {"profiles": profiles, "removed": [a for a in d.data["authors"] if a not in profiles]}
        changed, removed = [], [{"author": a, "id": m} for a, m in d.data["removed"]]
        trusted = self.view.trusted(d.topic, reader)
        for a, m in d.data["changed"]:
            msg = self.view.render(d.topic, a, m)
            if msg is None or self.view.hidden(d.topic, a, m, trusted=trusted):
                removed.append({"author": a, "id": m})
            else:
                changed.append(msg)
        return {"topic": d.topic, "messages": changed, "removed": removed}

    def snapshot(self, reader: str | None) -> dict:
        return {
            "topics": {t["id"]: self.view.messages(t["id"], reader) for t in self.view.topic_list()},
            "profiles": self.view.profiles(),
        }

    def describe(self) -> dict:
        return {
            "name": self.cfg.name,
            "description": self.cfg.description,
            "key": self.node.id.hex(),
            "moderators": sorted(self.cfg.moderators),
            "joined": len(self.joined),
            "join_token_required": bool(self.cfg.join_token),
            "listen": self.node.listen_addresses,
        }


def _key(value, field: str) -> bytes:
    try:
        return check_key(value, field)
    except BadInput as exc:
        raise HubBadInput(field, str(exc).split(": ", 1)[1]) from None


def _addresses(value) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_ADDRESSES:
        raise HubBadInput("addresses", f"must be a list of at most {MAX_ADDRESSES} HOST:PORT")
    out = []
    for i, a in enumerate(value):
        if not isinstance(a, str) or len(a) > 255:
            raise HubBadInput(f"addresses[{i}]", "must be HOST:PORT")
        try:
            parse_address(a, dial=True)
        except PttError as exc:
            raise HubBadInput(f"addresses[{i}]", str(exc)) from None
        out.append(a)
    return out


class HubBadInput(PttError):
    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
