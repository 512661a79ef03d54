"""The daemon core: peers, follows and sync, on top of the store.

* Connections: a listener for the wire protocol, a dialer per known address (static
  peers and the peers of each follow) that reconnects with exponential backoff, limits
  on connections in total and per remote address.
* Serving: any stored block to any peer (``want``), a path with its proof (``get``),
  heads to subscribers (``sub``), new heads pushed at once with the blocks they added.
* Following: a followed repository is subscribed on every session. A head offered by a
  peer is checked (signature, no rollback, fork evidence) before anything is fetched;
  then the tree is fetched (pttd.fetch) and the commit accepted in one transaction.
  One sync per repository at a time; a newer head arriving meanwhile is taken next.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from bisect import bisect_left
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from itertools import islice

import trio
from blake3 import blake3
from msgpack import ExtType
from nacl.signing import SigningKey

from protocol import tree
from protocol.commit import SignedCommit, verify_commit
from protocol.errors import FormatError, PathError, SignatureError
from protocol.framing import MAX_FRAME
from protocol.hashing import HASH_SIZE, KIND_NODE
from protocol.paths import validate_path

from .config import Config, parse_address
from .datadir import DataDir
from .errors import ForkDetected, MissingBlock, NotFound, PttError, RollbackRefused, TooLarge
from .fetch import Fetcher, FetchError, FetchStats, Need
from .peer import Misbehaved, Peer, PeerGone
from .wire import Connection, WireError

log = logging.getLogger("pttd.node")

MAX_PUSHED_BLOCKS = 64
MAX_SUBS = 65_536  # repositories one peer may follow live from us in one session
MAX_FOUND = 16  # addresses a follow dials on the hubs' word
QUICK_ROWS = 64  # a write of at most this many blocks may be made in place (db_quick)
QUICK_BYTES = 256 << 10  # ... and of at most this many bytes
STORE_LATER_DELAY = 0.05  # s: blocks of on-demand reads wait this long to be stored together
CLEAN_ENDS = ("peer closed the connection",)  # not worth a warning
ANSWER_BYTES = MAX_FRAME - (64 << 10)  # room for the message's own fields
# A sync slower than this over a check's interval gives way to another peer offering
# as new a head (what it fetched is kept: the next sync resumes). A peer answering each
# request just inside request_timeout held a repository's only sync for good.
SLOW_SYNC_CHECK = 10.0  # seconds
SLOW_SYNC_BYTES = 16 << 10  # per second
ANNOUNCE_EVERY = 1.0  # seconds at least between two announcements to the hubs (changes wait, gathered)


class SlowSync(FetchError):
    """A sync given up for being slow while another peer offers as new a version."""


def _widens(old: list[str], new: list[str]) -> bool:
    """Whether prefixes ``new`` cover a path that ``old`` do not."""
    return any(not any(p.startswith(o) for o in old) for p in new)


def _fit(blocks: list[bytes], missing: list[bytes]) -> list[bytes]:
    """The first blocks that fit in one answer; the asker asks again for the rest."""
    total = len(missing) * 34
    for i, b in enumerate(blocks):
        total += len(b) + 5  # msgpack bin header
        if total > ANSWER_BYTES and i:
            return blocks[:i]
    return blocks


@dataclass
class Offer:
    commit: SignedCommit
    prefetched: dict[bytes, bytes]


@dataclass
class Follow:
    key: bytes
    prefixes: list[str]
    peers: list[str]
    persistent: bool = True
    live: bool = True
    state: str = "waiting"  # waiting | syncing | synced | forked
    local_seq: int | None = None
    local_hash: bytes | None = None
    local_root: bytes | None = None
    newest_seen: int | None = None
    last_sync: float | None = None  # unix time
    error: str | None = None
    progress: FetchStats | None = None
    fetched_blocks: int = 0  # over every attempt, for status and for checking resumes
    fetched_bytes: int = 0
    offers: dict[Peer, Offer] = field(default_factory=dict)
    no_head: set[Peer] = field(default_factory=set)
    wake: trio.Event = field(default_factory=trio.Event)
    changed: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope | None = None
    row: object = None  # the store's RepoRow, once looked up
    found: set[str] = field(default_factory=set)  # addresses the hubs gave for it (dialed, at most MAX_FOUND)
    # The held commit is to be walked again (its prefixes widened, or an explicit sync):
    # a head equal to it is synced, not skipped, and what the prefixes cover is fetched.
    rewalk: bool = False

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def info(self) -> dict:
        lag = None
        if self.newest_seen is not None:
            lag = max(0, self.newest_seen - (self.local_seq if self.local_seq is not None else -1))
        p = self.progress
        return {
            "repository": self.key.hex(),
            "prefixes": self.prefixes,
            "peers": self.peers,
            "followed": self.persistent,
            "state": self.state,
            "version": self.local_seq,
            "newest_seen": self.newest_seen,
            "lag": lag,
            "last_sync": self.last_sync,
            "error": self.error,
            "fetched_blocks": self.fetched_blocks + (p.blocks if p and self.state == "syncing" else 0),
            "fetched_bytes": self.fetched_bytes + (p.bytes if p and self.state == "syncing" else 0),
        }


class _NotThere(Exception):
    """A peer answered that it does not hold what was asked."""


def _store_then(store, rows, partial, then):
    if rows:
        store.put_fetched(rows, partial)
    return then() if then is not None else None


ALONE_TIMEOUT = 120.0  # seconds gc waits for the syncs under way to end


class SyncGate:
    """Syncs run together; garbage collection runs alone (it would delete the blocks of
    a sync whose commit is not accepted yet)."""

    def __init__(self) -> None:
        self.active = 0
        self.exclusive = False
        self._cond = trio.Condition()

    @asynccontextmanager
    async def sync(self):
        async with self._cond:
            while self.exclusive:
                await self._cond.wait()
            self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            with trio.CancelScope(shield=True):
                async with self._cond:
                    self._cond.notify_all()

    @asynccontextmanager
    async def alone(self, timeout: float = ALONE_TIMEOUT):
        """Wait until no sync runs (new ones wait meanwhile), for at most ``timeout``
        seconds: a sync a slow peer keeps alive must not hold gc, and every other sync
        behind it, for ever. PttError if they did not end in time (nothing held)."""
        async with self._cond:
            mine = False
            with trio.move_on_after(timeout):
                while self.exclusive:
                    await self._cond.wait()
                self.exclusive = mine = True
                while self.active:
                    await self._cond.wait()
            if not mine or self.active:
                if mine:
                    self.exclusive = False
                    self._cond.notify_all()
                raise PttError(f"syncs under way did not end within {timeout:g} s: not run; try again later")
        try:
            yield
        finally:
            self.exclusive = False
            with trio.CancelScope(shield=True):
                async with self._cond:
                    self._cond.notify_all()


class Node:
    def __init__(self, dd: DataDir, cfg: Config, identity: SigningKey, mode: str = "node"):
        self.dd = dd
        self.store = dd.store
        self.cfg = cfg
        self.identity = identity
        self.id = bytes(identity.verify_key)
        self.mode = mode
        self.peers: set[Peer] = set()
        self.follows: dict[bytes, Follow] = {}
        self.listen_addresses: list[str] = []
        self.gate = SyncGate()
        self._db_limiter = trio.CapacityLimiter(1)
        self._checkpointing = False
        self.others_write = False  # another process writes this store too (db_quick_write)
        # blocks of on-demand reads, answered and not yet stored (_store_later)
        self._later_rows: list[tuple[bytes, bytes]] = []
        self._later_partial: list[bytes] = []
        self._later_done: trio.Event | None = None
        self._later_now = trio.Event()
        self._storing: set[trio.Event] = set()  # writes of held blocks under way
        self._dialers: dict[str, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None
        self._announce_wanted = trio.Event()  # what we serve changed: tell the hubs (_announcer)
        self._per_address: dict[str, int] = {}
        self._incoming = 0  # connections accepted and open, in their handshake or session
        # called after a followed repository's new version is stored: (key, old root or None, new root)
        self.synced_hooks: list = []
        self.rendezvous = None  # a hub: answers join and lookup, hears announce
        self.replicator = None  # a replicator: answers pin
        self._gone_hooks: dict[Peer, list] = {}
        self.peer_joined = trio.Event()

    async def db(self, fn, *args, **kwargs):
        """Run a store call on the store's thread (one at a time)."""
        return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs), limiter=self._db_limiter)

    async def _checkpoint(self) -> None:
        try:
            await self.db(self.store.checkpoint)
        finally:
            self._checkpointing = False

    async def db_quick(self, fn, *args, **kwargs):
        """A short store call (a few indexed reads, or a small write that is not synced
        on its own): made in place when the store is idle, which saves the ~0.4 ms trip
        to the store thread that dominates a live update or an on-demand read; on the
        store thread otherwise. Never for calls that may take long."""
        if self._db_limiter.borrowed_tokens == 0:
            with self.store.idle() as idle:
                if idle:
                    result = fn(*args, **kwargs)
                    checkpoint = self.store.checkpoint_due()
            if idle:
                if checkpoint and not self._checkpointing and self._nursery is not None:
                    # deferred by the call made in place: done on the store thread
                    self._checkpointing = True
                    self._nursery.start_soon(self._checkpoint)
                # the call's effects are done: let others run, but never lose its result
                await trio.lowlevel.cancel_shielded_checkpoint()
                return result
        return await self.db(fn, *args, **kwargs)

    async def db_quick_write(self, fn, *args, **kwargs):
        """A short write: made like ``db_quick`` unless another process also writes this
        store (a gateway's writer process), whose lock could keep the event loop waiting."""
        if self.others_write:
            return await self.db(fn, *args, **kwargs)
        return await self.db_quick(fn, *args, **kwargs)

    # --- running --------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        host, port = parse_address(self.cfg.wire.listen)
        try:
            listeners = await trio.open_tcp_listeners(port, host=host or None)
        except OSError as exc:
            raise PttError(f"cannot listen on {self.cfg.wire.listen}: {exc.strerror or exc}") from None
        for lst in listeners:
            h, p = lst.socket.getsockname()[:2]
            self.listen_addresses.append(f"[{h}]:{p}" if ":" in h else f"{h}:{p}")
        try:
            await self._serve(listeners, task_status)
        finally:
            self._store_held_now()

    async def _serve(self, listeners, task_status) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(functools.partial(trio.serve_listeners, self._accept, listeners))
            nursery.start_soon(self._announcer)
            for key, prefixes, peers in await self.db(self.store.list_follows):
                await self._start_follow(key, prefixes, peers, persistent=True, live=True)
            for addr in self.cfg.peers + self.cfg.hubs:
                self.ensure_dial(addr)
            log.info("listening for peers on %s", ", ".join(self.listen_addresses))
            task_status.started()

    def stop(self) -> None:
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    # --- connections ----------------------------------------------------------------

    async def _accept(self, stream: trio.SocketStream) -> None:
        try:
            host, port = stream.socket.getpeername()[:2]
        except OSError:
            await stream.aclose()
            return
        remote = f"{host}:{port}"
        w = self.cfg.wire
        # counted from the accept: a flood of handshakes that never finish fills it too
        open_now = self._incoming + sum(1 for p in self.peers if p.outbound)
        if open_now >= w.max_connections:
            log.warning("refused connection from %s: %d connections already (max_connections)", remote, open_now)
            await stream.aclose()
            return
        if self._per_address.get(host, 0) >= w.max_connections_per_address:
            log.warning("refused connection from %s: %d from that address already", remote, self._per_address[host])
            await stream.aclose()
            return
        self._per_address[host] = self._per_address.get(host, 0) + 1
        self._incoming += 1
        try:
            await self._session(stream, remote, outbound=False)
        finally:
            self._incoming -= 1
            self._per_address[host] -= 1
            if not self._per_address[host]:
                del self._per_address[host]

    def ensure_dial(self, addr: str) -> None:
        if addr in self._dialers or self._nursery is None:
            return
        try:
            parse_address(addr, dial=True)
        except PttError as exc:  # e.g. an address a hub told us: never fatal
            log.warning("not dialing %r: %s", addr, exc)
            return
        scope = trio.CancelScope()
        self._dialers[addr] = scope
        self._nursery.start_soon(self._dial_loop, addr, scope)

    def _stop_unneeded(self, addresses: set[str]) -> None:
        """Stop dialing those of ``addresses`` that no follow and no setting needs."""
        needed = {a for g in self.follows.values() for a in set(g.peers) | g.found}
        needed |= set(self.cfg.peers) | set(self.cfg.hubs)
        for a in addresses - needed:
            self.stop_dial(a)

    def stop_dial(self, addr: str) -> None:
        scope = self._dialers.pop(addr, None)
        if scope is not None:
            scope.cancel()

    async def _dial_loop(self, addr: str, scope: trio.CancelScope) -> None:
        w = self.cfg.wire
        delay = w.reconnect_min
        host, port = parse_address(addr)
        with scope:
            while True:
                started = trio.current_time()
                try:
                    with trio.fail_after(w.handshake_timeout):
                        stream = await trio.open_tcp_stream(host, port)
                except (OSError, trio.TooSlowError) as exc:
                    log.debug("cannot reach %s: %s", addr, exc)
                except Exception as exc:  # a name the resolver refuses, say: never fatal to the daemon
                    log.warning("cannot dial %s: %r", addr, exc)
                else:
                    again = await self._session(stream, addr, outbound=True, dialed=addr)
                    if not again:
                        return
                    if trio.current_time() - started > 10 * w.reconnect_min:
                        delay = w.reconnect_min
                await trio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, w.reconnect_max)

    async def _session(self, stream, remote: str, outbound: bool, dialed: str | None = None) -> bool:
        """Run one session; returns False if it must not be redialed (it was ourselves)."""
        conn = Connection(stream, self.cfg.wire, remote)
        try:
            await conn.establish(self.identity, initiator=outbound, mode=self.mode)
        except WireError as exc:
            log.warning("peer %s: %s", conn.name, exc)
            await conn.aclose()
            return True
        if conn.peer_id == self.id:
            log.info("peer %s is this daemon itself: not dialing it again", remote)
            await conn.aclose()
            return False
        peer = Peer(self, conn, outbound, dialed)
        self.peers.add(peer)
        self.peer_joined.set()  # wakes whoever waits for a session (peer_for)
        self.peer_joined = trio.Event()
        log.info("peer %s connected (%s, %r)", peer.name, "out" if outbound else "in", conn.peer_mode)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._subscribe_all, peer)
                await peer.run()
                nursery.cancel_scope.cancel()
        except* Exception as group:  # a bug of ours: this session ends, the daemon goes on
            log.error("peer %s: session ended by an internal error", peer.name, exc_info=group)
            peer.reason = peer.reason or "internal error"
        finally:
            self.peers.discard(peer)
            for fn in self._gone_hooks.pop(peer, ()):
                fn()
            for f in self.follows.values():
                f.offers.pop(peer, None)
                f.no_head.discard(peer)
            if peer.reason and peer.reason not in CLEAN_ENDS:
                log.warning("peer %s: closed: %s", peer.name, peer.reason)
            else:
                log.info("peer %s disconnected", peer.name)
        return True

    async def _subscribe_all(self, peer: Peer) -> None:
        for f in list(self.follows.values()):
            try:
                await peer.send({"t": "sub", "repo": f.key, "prefixes": f.prefixes, "live": f.live})
            except PeerGone:
                return
        if peer.dialed in self.cfg.hubs:  # tell a hub what we serve, for its lookups
            served = await self.db(self._served)
            try:
                await peer.send({"t": "announce", "repos": served, "ports": self.listen_ports()})
            except PeerGone:
                return

    # --- serving --------------------------------------------------------------------

    async def answer(self, peer: Peer, msg: dict) -> dict | None:
        """The answer to a peer's request (None: it needs none). Never raises but
        PeerGone; an internal error ends the session, never the daemon."""
        t = msg["t"]
        try:
            if t == "want":
                # each hash read once, however often it is named
                blocks, missing = await self.db(self.store.get_blocks, list(dict.fromkeys(msg["hashes"])), ANSWER_BYTES)
                return {"t": "blocks", "id": msg["id"], "blocks": _fit(blocks, missing), "missing": missing}
            if t == "get":
                blocks, missing = await self.db_quick(self._path_blocks, msg["root"], msg["path"])
                return {"t": "blocks", "id": msg["id"], "blocks": _fit(blocks, missing), "missing": missing}
            if t == "ping":
                return {"t": "pong", "id": msg["id"]}
            if t == "sub":
                if msg["live"]:
                    if msg["repo"] not in peer.subs and len(peer.subs) >= MAX_SUBS:
                        peer.close(f"more than {MAX_SUBS} live subscriptions")
                        raise PeerGone(peer.name)
                    peer.subs.add(msg["repo"])
                head = await self.db_quick(self._head_message, msg["repo"], False)
                return head or {"t": "head", "repo": msg["repo"], "commit": None, "sig": None, "blocks": []}
            if t == "unsub":
                peer.subs.discard(msg["repo"])
            if t == "join":
                if self.rendezvous is None:
                    return {"t": "joined", "id": msg["id"], "ok": False, "message": "this daemon is not a hub"}
                ok, text = await self.rendezvous.join_from_peer(peer, msg)
                return {"t": "joined", "id": msg["id"], "ok": ok, "message": text}
            if t == "pin":  # answered like a join: joined {ok, message}
                if self.replicator is None:
                    return {"t": "joined", "id": msg["id"], "ok": False, "message": "this daemon is not a replicator"}
                try:
                    await self.replicator.pin_from_peer(peer.id, msg["repo"])
                except PttError as exc:
                    return {"t": "joined", "id": msg["id"], "ok": False, "message": str(exc)[:1000]}
                return {"t": "joined", "id": msg["id"], "ok": True, "message": "pinned"}
            if t == "lookup":
                found = self.rendezvous.lookup(msg["repo"]) if self.rendezvous is not None else []
                return {"t": "found", "id": msg["id"], "addresses": found[:16]}
            return None
        except PeerGone:
            raise
        except Exception:  # a bug of ours
            log.exception("internal error answering %s from %s", t, peer.name)
            peer.close(f"internal error answering {t}")
            raise PeerGone(peer.name) from None

    def _path_blocks(self, root: bytes, path: str) -> tuple[list[bytes], list[bytes]]:
        """The nodes from ``root`` down to ``path`` and its value block (or the root of
        its chunk tree): everything a reader needs to check and read it. One walk, each
        block read once (the answer to a cold read: its latency is the reader's)."""
        try:
            validate_path(path)
        except PathError:
            return [], [root]  # no such entry can exist
        key = path.encode()
        store = self.store
        try:
            node, block = store.node_block(root)
            blocks = [block]
            while node.level > 0 and node.keys:
                i = min(bisect_left(node.keys, key), len(node.keys) - 1)
                child, block = store.node_block(node.vals[i])
                if child.level != node.level - 1 or not child.keys or child.keys[-1] != node.keys[i]:
                    raise FormatError(f"tree node {node.vals[i].hex()} does not fit under its parent")
                blocks.append(block)
                node = child
            i = bisect_left(node.keys, key)
            if i < len(node.keys) and node.keys[i] == key and isinstance(node.vals[i], ExtType):
                blocks.append(store.get_block(node.vals[i].data[:HASH_SIZE]))
            return blocks, []
        except (MissingBlock, FormatError, PttError):  # not held here, or only part of that tree
            return [], [root]

    def _head_message(self, key: bytes, with_blocks: bool) -> dict | None:
        row = self.store.find_repo(key)
        if row is None:
            return None
        seq = self.store.head_seq(row)
        if seq is None:
            return None
        sc = self.store.load_commit(row, seq)
        blocks: list[bytes] = []
        if with_blocks and seq > 0:
            try:
                blocks = self._new_blocks(self.store.load_commit(row, seq - 1).commit.root, sc.commit.root)
            except (NotFound, MissingBlock):
                blocks = []
        return {"t": "head", "repo": key, "commit": sc.block, "sig": sc.signature, "blocks": blocks}

    def _new_blocks(self, old_root: bytes, new_root: bytes) -> list[bytes]:
        """The blocks a small commit added (paths to its changes and their values), so a
        follower needs no round trip; nothing for a large commit."""
        load = self.store.load_node
        changes = list(islice(tree.diff(old_root, new_root, load), 17))
        if len(changes) > 16:
            return []
        addrs: dict[bytes, None] = {}
        for key, _old, new in changes:
            for a in tree.path_nodes(new_root, key, load):
                addrs[a] = None
            if isinstance(new, ExtType) and new.code == tree.EXT_BLOCK:
                addrs[new.data[:HASH_SIZE]] = None
        blocks, _ = self.store.get_blocks(list(addrs))
        out, total = [], 0
        for b in blocks:
            total += len(b)
            if total > self.cfg.wire.push_bytes:
                break
            out.append(b)
        return out

    def has_subscribers(self, key: bytes) -> bool:
        return any(key in p.subs for p in self.peers)

    def write_and_head(self, key: bytes, with_head: bool, write, *args, **kwargs):
        """On the store thread: run a local write, then (``with_head``: someone follows
        ``key`` live) build the head message to push, in the same trip to the store."""
        result = write(*args, **kwargs)
        return result, self._head_message(key, True) if with_head else None

    async def publish(self, key: bytes, msg: dict | None = None) -> None:
        """A repository has a new head: push it to every peer subscribed to it."""
        subscribers = [p for p in self.peers if key in p.subs]
        if not subscribers:
            return
        if msg is None:
            msg = await self.db_quick(self._head_message, key, True)
            if msg is None:
                return
        for p in subscribers:
            p.push(key, msg)

    # --- following ------------------------------------------------------------------

    async def follow(
        self, key: bytes, prefixes: list[str], peers: list[str], persistent: bool = True, replace_peers: bool = False
    ) -> Follow:
        """Follow ``key`` under ``prefixes`` from ``peers`` (and anyone who serves it).
        An existing follow takes the new prefixes, and the peers added to its own
        (``replace_peers``: instead of its own)."""
        for p in prefixes:
            validate_path(p.rstrip("/") or "/") if p != "/" else None
        for a in peers:
            parse_address(a, dial=True)
        if key == self.id:
            raise PttError("this is the daemon's own repository")
        f = self.follows.get(key)
        if f is not None and f.persistent and persistent:
            dropped = set(f.peers) - set(peers) if replace_peers else set()
            widened = _widens(f.prefixes, prefixes or ["/"])
            f.prefixes = prefixes or ["/"]
            if widened and f.local_seq is not None:
                f.rewalk = True  # the head held lacks what the new prefixes cover
            f.peers = sorted(set(peers)) if replace_peers else sorted(set(f.peers) | set(peers))
            self._stop_unneeded(dropped)
            await self.db(self.store.set_follow, key, f.prefixes, f.peers)
            for a in peers:
                self.ensure_dial(a)
            await self._resubscribe(f)
            return f
        if f is not None:
            if persistent and not f.persistent:
                f.persistent, f.live = True, True
                f.prefixes, f.peers = prefixes or ["/"], sorted(set(peers))
                await self.db(self.store.set_follow, key, f.prefixes, f.peers)
                await self._resubscribe(f)
            for a in peers:
                self.ensure_dial(a)
            return f
        if persistent:
            await self.db(self.store.set_follow, key, prefixes or ["/"], peers)
        return await self._start_follow(key, prefixes or ["/"], peers, persistent=persistent, live=persistent)

    async def _start_follow(self, key: bytes, prefixes, peers, persistent: bool, live: bool) -> Follow:
        row = await self.db(self._repo_row, key)
        f = Follow(key, list(prefixes), list(peers), persistent=persistent, live=live)
        seq = await self.db(self.store.head_seq, row)
        if seq is not None:
            sc = await self.db(self.store.load_commit, row, seq)
            f.local_seq, f.local_hash, f.local_root = seq, sc.address, sc.commit.root
            f.state = "synced"
        forks = await self.db(self.store.forks, row)
        if forks:
            f.state = "forked"
            f.error = f"fork evidence at seq {forks[0][0]}"
        self.follows[key] = f
        f.scope = trio.CancelScope()
        self._nursery.start_soon(self._follow_worker, f)
        if self.cfg.hubs:
            self._nursery.start_soon(self._rendezvous, f)
        for a in peers:
            self.ensure_dial(a)
        await self._resubscribe(f)
        return f

    def _repo_row(self, key: bytes):
        row = self.store.find_repo(key)
        return row if row is not None else self.store.add_repo(key, owned=False)

    async def _resubscribe(self, f: Follow) -> None:
        for p in list(self.peers):
            try:
                await p.send({"t": "sub", "repo": f.key, "prefixes": f.prefixes, "live": f.live})
            except PeerGone:
                pass

    async def unfollow(self, key: bytes) -> bool:
        f = self.follows.pop(key, None)
        removed = await self.db(self.store.remove_follow, key)
        if f is None:
            return removed
        f.notify()  # wakes anyone waiting on it (wait_version)
        if f.scope is not None:
            f.scope.cancel()
        for p in list(self.peers):
            try:
                await p.send({"t": "unsub", "repo": key})
            except PeerGone:
                pass
        self._stop_unneeded(set(f.peers) | f.found)
        return True

    async def _rendezvous(self, f: Follow) -> None:
        """Ask the hubs who serves a followed repository, and dial them, until one of
        them has given us a version (or the follow ends)."""
        delay = 0.2
        while self.follows.get(f.key) is f and f.local_seq is None:
            for a in await self.look_up(f.key):
                if len(f.found) >= MAX_FOUND:  # a hub cannot make us dial without end
                    break
                if a not in self.listen_addresses and a not in f.found:
                    f.found.add(a)
                    self.ensure_dial(a)
            await trio.sleep(delay)
            delay = min(delay * 2, 30.0)

    def on_peer_gone(self, peer: Peer, fn) -> None:
        """Call ``fn()`` when the session with ``peer`` ends."""
        if peer in self.peers:
            self._gone_hooks.setdefault(peer, []).append(fn)
        else:
            fn()

    def on_announce(self, peer: Peer, msg: dict) -> None:
        """A peer says it serves these repositories (a hub keeps that for lookups)."""
        if self.rendezvous is not None:
            self.rendezvous.announce(peer, msg["repos"], msg["ports"])

    def listen_ports(self) -> list[int]:
        return sorted({int(a.rsplit(":", 1)[1]) for a in self.listen_addresses})

    async def peer_for(self, address: str, timeout: float) -> Peer:
        """The session with the peer dialed at ``address`` (dialing it if need be)."""
        self.ensure_dial(address)
        with trio.move_on_after(timeout):
            while True:
                for p in self.peers:
                    if p.dialed == address and not p.reason:
                        return p
                await self.peer_joined.wait()
        raise PttError(f"no session with {address} within {timeout:g} s")

    async def join_hub(self, hub: str, key: bytes, token: str, timeout: float = 30.0) -> str:
        """Ask the hub at ``hub`` (a wire address) to take ``key`` in, served here."""
        peer = await self.peer_for(hub, timeout)
        try:
            ans = await peer.request(
                {"t": "join", "repo": key, "addresses": [], "ports": self.listen_ports(), "token": token}
            )
        except PeerGone as exc:
            raise PttError(f"hub {hub}: {exc}") from None
        if ans["t"] != "joined":
            raise PttError(f"hub {hub} answered {ans['t']}")
        if not ans["ok"]:
            raise PttError(f"hub {hub} refused: {ans['message']}")
        return ans["message"]

    def _served(self) -> list[bytes]:
        return [
            r[0] for r in self.store.query("SELECT key FROM repos WHERE owned=1 UNION SELECT repo FROM pins LIMIT 4096")
        ]

    async def announce_to_hubs(self) -> None:
        """Tell the connected hubs at once all we serve (an announcement replaces the last)."""
        served = await self.db(self._served)

        async def tell(p: Peer) -> None:
            try:
                await p.send({"t": "announce", "repos": served, "ports": self.listen_ports()})
            except PeerGone:
                pass

        async with trio.open_nursery() as nursery:  # a slow hub holds up no other
            for p in list(self.peers):
                if p.dialed in self.cfg.hubs and not p.reason:
                    nursery.start_soon(tell, p)

    def announce_soon(self) -> None:
        """What we serve changed: the hubs are told in the background, several changes
        in one announcement (a whole list each: not one per pin of a thousand)."""
        self._announce_wanted.set()

    async def _announcer(self) -> None:
        while True:
            await self._announce_wanted.wait()
            self._announce_wanted = trio.Event()
            try:
                await self.announce_to_hubs()
            except Exception:  # a bug of ours: the next change tries again
                log.exception("announcing to the hubs failed")
            await trio.sleep(ANNOUNCE_EVERY)

    async def ask_to_pin(self, replicator: str, key: bytes, timeout: float = 30.0) -> str:
        """Ask the replicator at ``replicator`` (a wire address) to keep ``key``."""
        peer = await self.peer_for(replicator, timeout)
        try:
            ans = await peer.request({"t": "pin", "repo": key})
        except PeerGone as exc:
            raise PttError(f"replicator {replicator}: {exc}") from None
        if ans["t"] != "joined" or not ans["ok"]:
            raise PttError(f"replicator {replicator} refused: {ans.get('message')}")
        return ans["message"]

    async def look_up(self, key: bytes) -> list[str]:
        """Addresses serving ``key``, from the connected hubs (``[peers] hubs``)."""
        found: list[str] = []
        for p in list(self.peers):
            if p.dialed in self.cfg.hubs and not p.reason:
                try:
                    ans = await p.request({"t": "lookup", "repo": key})
                except PeerGone:
                    continue
                if ans["t"] == "found":
                    found += [a for a in ans["addresses"] if a not in found]
        return found

    def on_head(self, peer: Peer, msg: dict) -> None:
        """A peer told us a head (answering our sub, or pushed). Checked here, at once;
        fetched by the follow's worker."""
        key = msg["repo"]
        f = self.follows.get(key)
        if msg["commit"] is None:
            if f is not None:
                f.no_head.add(peer)
                f.notify()
            return
        try:
            sc = verify_commit(msg["commit"], msg["sig"], key)
        except (FormatError, SignatureError) as exc:
            raise Misbehaved(f"head of {key.hex()[:16]} refused: {exc}") from None
        if f is None:
            return  # not (or no longer) followed
        if f.newest_seen is None or sc.seq > f.newest_seen:
            f.newest_seen = sc.seq
        if f.local_seq is not None and sc.seq < f.local_seq:
            log.info(
                "peer %s: head seq %d of %s refused: older than ours (%d)",
                peer.name,
                sc.seq,
                key.hex()[:16],
                f.local_seq,
            )
            f.no_head.add(peer)
            f.notify()
            return
        if f.local_seq == sc.seq and f.local_hash == sc.address and not f.rewalk:
            f.no_head.add(peer)  # nothing newer there
            f.notify()
            return
        prefetched = {}
        for b in msg["blocks"][:MAX_PUSHED_BLOCKS]:
            prefetched[blake3(b).digest()] = b
        f.offers[peer] = Offer(sc, prefetched)
        f.wake.set()

    async def _follow_worker(self, f: Follow) -> None:
        with f.scope:
            while True:
                await f.wake.wait()
                f.wake = trio.Event()
                while f.state != "forked":
                    offer_peer = self._best_offer(f)
                    if offer_peer is None:
                        break
                    peer, offer = offer_peer
                    del f.offers[peer]
                    try:
                        await self._sync_offer(f, peer, offer)
                    except Exception as exc:  # a bug of ours: this follow waits, the daemon goes on
                        log.exception("sync of %s from %s failed by an internal error", f.key.hex()[:16], peer.name)
                        f.state, f.error = "waiting", f"internal error: {exc.__class__.__name__}: {exc}"
                    f.notify()
                f.notify()

    def _best_offer(self, f: Follow) -> tuple[Peer, Offer] | None:
        # The newest; of equals, one that is not the commit held (at the held seq, that
        # is a fork's evidence: picked before the offers of the held one clear them all).
        best, best_rank = None, None
        for p, o in f.offers.items():
            if p.reason or p.conn.closed:
                continue
            sc = o.commit
            rank = (sc.seq, not (sc.seq == f.local_seq and sc.address == f.local_hash))
            if best is None or rank > best_rank:
                best, best_rank = (p, o), rank
        if best is None:
            return None
        sc = best[1].commit
        held = sc.seq == f.local_seq and sc.address == f.local_hash and not f.rewalk
        if f.local_seq is not None and (sc.seq < f.local_seq or held):
            f.no_head.update(f.offers)  # they answered: nothing newer there (sync_once waits for that)
            f.offers.clear()
            return None
        return best

    async def _fetch_unless_slow(self, f: Follow, peer: Peer, sc, fetcher: Fetcher) -> None:
        """The fetch of ``sc``'s tree from ``peer``, given up (FetchError) when it is slower
        than SLOW_SYNC_BYTES a second over SLOW_SYNC_CHECK seconds while another peer
        offers a head as new."""
        slow = False
        fetch, watching = trio.CancelScope(), trio.CancelScope()

        def progress() -> int:  # bytes fetched, and blocks walked in the store (as 1 KiB each)
            st = fetcher.stats
            return st.bytes + ((st.local + st.skipped) << 10)

        async def watch() -> None:  # beside the fetch, whose errors so reach the caller as they are
            nonlocal slow
            with watching:
                done = progress()
                while True:
                    await trio.sleep(SLOW_SYNC_CHECK)
                    rate = (progress() - done) / SLOW_SYNC_CHECK
                    done = progress()
                    other = any(o.commit.seq >= sc.seq and p is not peer and not p.reason for p, o in f.offers.items())
                    if rate < SLOW_SYNC_BYTES and other:
                        slow = True
                        fetch.cancel()
                        return

        self._nursery.start_soon(watch)
        try:
            with fetch:
                await fetcher.run([Need(sc.commit.root, KIND_NODE)], store_last=False)
        finally:
            watching.cancel()
        if slow and fetch.cancelled_caught:
            raise SlowSync(
                f"slower than {SLOW_SYNC_BYTES // 1024} KiB/s for {SLOW_SYNC_CHECK:g} s while another peer offers "
                "as new a version: left for that one"
            )

    async def _sync_offer(self, f: Follow, peer: Peer, offer: Offer) -> None:
        sc = offer.commit
        key = f.key
        short = key.hex()[:16]
        f.state = "syncing"
        f.error = None
        started = trio.current_time()
        fetcher = None
        f.no_head.add(peer)  # it answered; a newer head from it comes as a new offer
        try:
            async with self.gate.sync():
                if f.row is None:
                    f.row = await self.db(self._repo_row, key)
                row = f.row
                # same seq, other commit: fork evidence, nothing to fetch (the same commit:
                # walked again for what widened prefixes cover)
                if f.local_seq != sc.seq or sc.address == f.local_hash:
                    w = self.cfg.wire
                    fetcher = Fetcher(
                        self.store,
                        self.db,
                        peer.request,
                        prefixes=f.prefixes,
                        prefetched=offer.prefetched,
                        window=w.window,
                        want_batch=w.want_batch,
                        progress=lambda st: (setattr(f, "progress", st), f.notify()),
                        fresh=f.local_seq is None,
                        run_db_quick=self.db_quick,
                    )
                    f.progress = fetcher.stats
                    try:
                        await self._fetch_unless_slow(f, peer, sc, fetcher)
                    finally:
                        f.fetched_blocks += fetcher.stats.blocks
                        f.fetched_bytes += fetcher.stats.bytes
                    rows, partial = fetcher.take_rows()
                    # a small update's last write is short (and not synced on its own)
                    small = len(rows) <= QUICK_ROWS and len(fetcher.complete) <= QUICK_ROWS
                    accept = self.db_quick_write if small else self.db
                    await accept(
                        self.store.accept_commit, row, sc.block, sc.signature, fetcher.complete, rows, partial, sc
                    )
                else:
                    await self.db(self.store.accept_commit, row, sc.block, sc.signature, verified=sc)
        except PeerGone as exc:
            f.state = "waiting"
            f.error = str(exc)
            log.info("sync of %s seq %d from %s interrupted: %s", short, sc.seq, peer.name, exc)
            return
        except FetchError as exc:
            f.state = "waiting"
            f.error = f"{peer.name}: {exc}"
            if isinstance(exc, SlowSync) and not peer.reason:
                # offered again, after the others: should they be slow too, it is taken
                # back (each attempt resumes where the last stopped)
                f.offers.setdefault(peer, offer)
            if exc.hostile:
                log.warning("peer %s: sync of %s refused: %s", peer.name, short, exc)
                peer.close(f"sent a bad block for {short}: {exc}")
            else:
                log.info("sync of %s seq %d from %s failed: %s", short, sc.seq, peer.name, exc)
            return
        except ForkDetected as exc:
            f.state = "forked"
            f.error = str(exc)
            log.warning("peer %s: %s; fork evidence kept, no longer following %s", peer.name, exc, short)
            return
        except RollbackRefused as exc:
            log.info("peer %s: %s", peer.name, exc)
            f.state = "synced" if f.local_seq is not None else "waiting"
            return
        old_root = f.local_root
        f.local_seq, f.local_hash, f.local_root = sc.seq, sc.address, sc.commit.root
        f.state = "synced"
        f.rewalk = False  # walked with the prefixes as they are now
        f.last_sync = time.time()
        for hook in self.synced_hooks:
            try:
                await hook(key, old_root, sc.commit.root)
            except Exception:
                log.exception("after the sync of %s: a hook failed", short)
        st = fetcher.stats if fetcher else FetchStats()
        log.info(
            "synced %s seq %d from %s: %d blocks, %d bytes, %d requests in %.3f s",
            short,
            sc.seq,
            peer.name,
            st.blocks,
            st.bytes,
            st.requests,
            trio.current_time() - started,
        )
        await self.publish(key)

    # --- on-demand reads ------------------------------------------------------------

    async def _root(self, key: bytes, version: int | None) -> bytes:
        f = self.follows.get(key)
        if f is not None and f.local_root is not None and version in (None, f.local_seq):
            return f.local_root
        return await self.db(self._stored_root, key, version)

    def _stored_root(self, key: bytes, version: int | None) -> bytes:
        row = self.store.find_repo(key)
        seq = self.store.head_seq(row) if row else None
        if seq is None:
            raise NotFound(f"no version of {key.hex()} is stored")
        return self.store.load_commit(row, seq if version is None else version).commit.root

    async def fetch_path(
        self, key: bytes, path: str, version: int | None = None, then=None, max_value: int | None = None
    ) -> tuple[dict, object]:
        """Fetch one path of a followed repository that is not stored (outside the
        followed prefixes): one ``get`` round trip brings the path from the root with
        its value; a large value's chunks follow in ``want`` batches. ``then``: a store
        call run in the same trip to the store as the last write (the read that needed
        the path). Returns (what was fetched from whom, ``then``'s result)."""
        root = await self._root(key, version)
        f = self.follows.get(key)
        offering = [p for p in self.peers if f is not None and p in f.offers]
        candidates = offering + [p for p in self.peers if p not in offering]

        async def attempt(peer: Peer):
            started = trio.current_time()
            reply = await peer.request({"t": "get", "repo": key, "root": root, "path": path})
            if reply.get("t") != "blocks":
                raise FetchError(f"answered get with {reply.get('t')}", hostile=True)
            if reply["missing"]:
                raise _NotThere(f"{peer.name} does not hold that version")
            prefetched = {blake3(b).digest(): b for b in reply["blocks"][: tree.MAX_LEVEL + 2]}
            fetcher = self._fetcher(peer, [path], prefetched, exact=True)
            fetcher.max_value = max_value
            async with self.gate.sync():
                # the blocks on the path stay partial: their siblings are not fetched
                await fetcher.run([Need(root, KIND_NODE)], store_last=False)
                if fetcher.too_large is not None:
                    raise TooLarge(f"{path} is {fetcher.too_large} bytes, more than {max_value} may be fetched")
                rows, partial = fetcher.take_rows()
                for address, node in fetcher.decoded.items():  # the read below walks them
                    self.store.remember_node(address, node)
                small = len(rows) <= QUICK_ROWS and sum(len(b) for _, b in rows) <= QUICK_BYTES
                if small and then is not None:
                    # Answer from the fetched blocks first and store them a little later,
                    # with those of the reads that follow: neither this reader nor the
                    # next waits for the write (~0.5 ms each with 64 KiB pages).
                    result = await self.db_quick(self.store.read_with, dict(rows), then)
                    if rows:
                        self._store_later(rows, partial)
                else:
                    result = await (self.db_quick_write if small else self.db)(
                        _store_then, self.store, rows, partial, then
                    )
            info = {
                "from": peer.name,
                "ms": round((trio.current_time() - started) * 1000, 3),
                "blocks": fetcher.stats.blocks,
                "bytes": fetcher.stats.bytes,
            }
            return info, result

        return await self._from_peers(key, path, candidates, attempt)

    def _store_later(self, rows: list[tuple[bytes, bytes]], partial: list[bytes]) -> None:
        """Blocks of on-demand reads (checked against their addresses), stored together
        within STORE_LATER_DELAY; readable from memory until then. They can be fetched
        again, so a crash before that loses nothing that matters."""
        self.store.hold_unstored(rows)
        self._later_rows += rows
        self._later_partial += partial
        if self._later_done is None:
            done = trio.Event()
            try:
                self._nursery.start_soon(self._store_held, done)
            except RuntimeError:  # the node is stopping: they are stored on its way out
                return
            self._later_done = done
        elif len(self._later_rows) >= QUICK_ROWS:
            self._later_now.set()

    async def _store_held(self, done: trio.Event) -> None:
        try:
            with trio.move_on_after(STORE_LATER_DELAY):
                await self._later_now.wait()
            async with self.gate.sync():
                # taken only now: until here, a shutdown stores them (_store_held_now)
                rows, partial = self._later_rows, self._later_partial
                self._later_rows, self._later_partial = [], []
                self._later_done, self._later_now = None, trio.Event()
                self._storing.add(done)
                run = self.db_quick_write if len(rows) <= QUICK_ROWS else self.db
                try:
                    await run(self.store.put_fetched, rows, partial)
                except Exception as exc:  # the disk, most likely: the blocks can be fetched again
                    log.warning("%d blocks of on-demand reads not stored: %r", len(rows), exc)
                    self.store.drop_unstored(rows)
                except BaseException:  # cancelled: the node stops, and stores them on its way out
                    self._later_rows += rows
                    self._later_partial += partial
                    raise
        finally:
            self._storing.discard(done)
            done.set()

    def _store_held_now(self) -> None:
        """On the way out: the blocks of on-demand reads still held are stored, so that
        what was read stays readable here after a restart."""
        rows, partial = self._later_rows, self._later_partial
        self._later_rows, self._later_partial = [], []
        if rows:
            try:
                self.store.put_fetched(rows, partial)
            except Exception as exc:
                log.warning("%d blocks of on-demand reads not stored on the way out: %r", len(rows), exc)

    async def fetched_stored(self) -> None:
        """Wait until the blocks of on-demand reads answered before being stored are."""
        if self._later_done is not None:
            self._later_now.set()
            await self._later_done.wait()
        for done in list(self._storing):
            await done.wait()

    async def fetch_prefix(self, key: bytes, prefix: str, version: int | None = None) -> None:
        """Fetch everything under ``prefix`` of a stored version (default: the head)."""
        root = await self._root(key, version)

        async def attempt(peer: Peer) -> None:
            async with self.gate.sync():
                await self._fetcher(peer, [prefix]).run([Need(root, KIND_NODE)])

        await self._from_peers(key, prefix, list(self.peers), attempt)

    def _fetcher(self, peer: Peer, prefixes: list[str], prefetched: dict | None = None, exact: bool = False) -> Fetcher:
        w = self.cfg.wire
        return Fetcher(
            self.store,
            self.db,
            peer.request,
            prefixes=prefixes,
            prefetched=prefetched,
            window=w.window,
            want_batch=w.want_batch,
            run_db_quick=self.db_quick,
            exact=exact,
        )

    async def _from_peers(self, key: bytes, what: str, peers: list[Peer], attempt):
        """``attempt(peer)`` on each peer until one succeeds; its result."""
        errors = []
        for peer in peers:
            try:
                return await attempt(peer)
            except _NotThere as exc:
                errors.append(str(exc))
            except PeerGone as exc:
                errors.append(str(exc))
            except FetchError as exc:
                errors.append(f"{peer.name}: {exc}")
                if exc.hostile:
                    peer.close(f"sent a bad block for {key.hex()[:16]}: {exc}")
        detail = "; ".join(errors) if errors else "no peer connected"
        raise NotFound(f"{what} of {key.hex()} is not stored here and could not be fetched ({detail})")

    # --- one-shot sync --------------------------------------------------------------

    async def sync_once(
        self, key: bytes, peers: list[str], timeout: float, progress=None, rewalk: bool = False
    ) -> Follow:
        """Bring ``key`` up to the newest head the connected (and given) peers offer.
        ``rewalk``: and fetch what the held version lacks under the prefixes (a sync
        asked for by hand: a widening before a restart is completed so)."""
        f = self.follows.get(key)
        if f is None:
            f = await self.follow(key, [], peers, persistent=False)
        else:
            for a in peers:
                self.ensure_dial(a)
            if rewalk and f.local_seq is not None:
                f.rewalk = True
        # ask every session afresh, so that the answer reflects what they hold now
        f.no_head.clear()
        await self._resubscribe(f)
        with trio.move_on_after(timeout) as scope:
            while True:
                connected = [p for p in self.peers if not p.reason]
                busy = f.state == "syncing" or f.offers
                answered = connected and all(p in f.no_head for p in connected)
                if not busy and answered:
                    break
                if progress is not None:
                    progress(f)
                await f.changed.wait()
        if scope.cancelled_caught:
            raise PttError(f"sync of {key.hex()} did not finish within {timeout:g} s ({f.error or f.state})")
        if f.state == "forked":
            raise ForkDetected(f.error or "fork detected")
        return f

    async def wait_version(self, key: bytes, version: int, timeout: float) -> Follow:
        """Wait until a followed repository holds ``version`` (or newer)."""
        f = self.follows.get(key)
        if f is None:
            raise NotFound(f"not following {key.hex()}")
        with trio.move_on_after(timeout):
            while (f.local_seq is None or f.local_seq < version) and f.state != "forked":
                await f.changed.wait()
                if self.follows.get(key) is not f:
                    raise PttError(f"no longer following {key.hex()}")
        if f.state == "forked":
            raise ForkDetected(f.error or "fork detected")
        if f.local_seq is None or f.local_seq < version:
            have = "nothing" if f.local_seq is None else f"version {f.local_seq}"
            raise PttError(f"{key.hex()} did not reach version {version} within {timeout:g} s (holds {have})")
        return f

    def status(self) -> dict:
        return {
            "node": self.id.hex(),
            "mode": self.mode,
            "listen": self.listen_addresses,
            "peers": [p.info() for p in self.peers],
            "follows": [f.info() for f in self.follows.values()],
        }
