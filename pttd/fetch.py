"""Fetching a tree from a peer: only the blocks we lack, only under the wanted prefixes.

The walk starts at a root (a commit's tree, or a large value's chunk tree) and goes
down level by level. Each address is first classified against the store, in batches:

* not stored: asked of the peer (``want``, up to ``want_batch`` hashes per request,
  ``window`` requests in flight);
* stored and not marked partial: its whole subtree is stored, so it is skipped;
* stored and partial (an earlier sync was cut, or a sparse follow fetched only part of
  it): read locally and walked on.

Every block that arrives is checked: its blake3 must be an address we asked for, its
kind what the parent says, its content well-formed, and it must fit where its parent
put it (level, last key, key range, byte sizes). Anything else is ``FetchError`` with
``hostile=True``, and nothing of that answer is stored.

Blocks are stored as they arrive (in batches); interior ones are marked partial, and
the caller clears the marks of the completed subtrees in the transaction that accepts
the commit. A cut connection therefore loses nothing already received: the next
attempt finds those blocks stored and does not fetch them again.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio
from blake3 import blake3
from msgpack import ExtType

from protocol.chunks import decode_chunk_node
from protocol.errors import FormatError
from protocol.hashing import HASH_SIZE, KIND_CHUNK, KIND_CHUNK_NODE, KIND_NODE, KIND_VALUE
from protocol.tree import EXT_BLOCK, decode_node

from .store import Store

WANT_BYTES = 2 << 20  # the blocks one want asks for, at most (by their known sizes)
NODE_ESTIMATE = 4096  # a tree node's size is not known before it arrives
FLUSH_BLOCKS = 20_000
FLUSH_BYTES = 8 << 20
CHECK_BATCH = 4096


class FetchError(Exception):
    """The peer cannot or will not give us what we need. ``hostile``: it sent something
    no honest peer sends (a block that fails its checks)."""

    def __init__(self, message: str, hostile: bool = False):
        super().__init__(message)
        self.hostile = hostile


@dataclass(slots=True)
class Need:
    addr: bytes
    kind: int
    level: int = -1  # the level the node must have (-1: a root, any)
    last: bytes | None = None  # the last key a tree node must have (None: a root)
    low: bytes | None = None  # keys of this subtree are above this (None: no bound)
    size: int = -1  # bytes a value, chunk or chunk-tree node must hold (-1: not known)


@dataclass
class FetchStats:
    blocks: int = 0
    bytes: int = 0
    requests: int = 0
    skipped: int = 0  # addresses found complete in the store
    local: int = 0  # partial interior blocks walked from the store


Request = Callable[[dict], Awaitable[dict]]
RunDb = Callable[..., Awaitable]


def _prefix_end(p: bytes) -> bytes:
    return p + b"\xff"  # no UTF-8 path byte is 0xff, so this is above every key under p


class Fetcher:
    def __init__(
        self,
        store: Store,
        run_db: RunDb,
        request: Request,
        *,
        prefixes: list[str] | None = None,
        prefetched: dict[bytes, bytes] | None = None,  # blake3(block) -> block
        window: int = 8,
        want_batch: int = 1024,
        progress: Callable[[FetchStats], None] | None = None,
        fresh: bool = False,
        run_db_quick: RunDb | None = None,
        exact: bool = False,
        max_value: int | None = None,
    ):
        self.store = store
        self.db = run_db
        self.db_quick = run_db_quick or run_db  # for short store calls (see Node.db_quick)
        self.request = request
        # exact: the prefixes are whole paths (an on-demand read): only the child that can
        # hold each is taken. As prefixes, a path that ends a child's range would also
        # take the next child (its keys could start with the path), one more round trip.
        self.exact = exact
        self.decoded: dict[bytes, object] = {}  # exact mode: the nodes taken, decoded
        # values larger than this are not fetched; the largest one skipped is noted
        self.max_value = max_value
        self.too_large: int | None = None
        full = not exact and (not prefixes or "/" in prefixes)
        self.prefixes = None if full else [p.encode() for p in prefixes]
        self._bounds = None if full else [(p, _prefix_end(p)) for p in self.prefixes]
        self.prefetched = prefetched or {}
        self.window = window
        self.want_batch = want_batch
        self.progress = progress
        # fresh: nothing of this repository is stored yet (a first sync). The children
        # of a block that came over the network are then asked for without looking in
        # the store: a stored block's parent is stored too (blocks are stored in the
        # order they arrive), so only children of partial blocks read back from the
        # store can already be here. (A block shared with another repository may be
        # fetched twice; it is stored once.)
        self.fresh = fresh
        self.stats = FetchStats()
        self._flush_done: trio.Event | None = None
        self._flush_error: BaseException | None = None
        self.complete: list[bytes] = []  # interior blocks whose subtree is (now) complete
        self._queued: set[bytes] = set()  # every address queued once, however often referenced
        self._check: deque[Need] = deque()
        self._fetch: deque[Need] = deque()
        self._rows: list[tuple[bytes, bytes]] = []
        self._rows_bytes = 0
        self._partial: list[bytes] = []

    # --- prefixes -------------------------------------------------------------------

    def _wanted_children(self, keys: list[bytes], low: bytes | None) -> list[int]:
        """The children of an interior node (child j holds the keys in (keys[j-1],
        keys[j]], the first from ``low``) that hold keys under a prefix: found by
        bisection, not by testing every child (a node has dozens)."""
        found: set[int] = set()
        last = len(keys) - 1
        if self.exact:  # the one child whose range (keys[j-1], keys[j]] holds the path
            for p in self.prefixes:
                j = bisect_left(keys, p)
                if j <= last and (low is None or j or low < p):
                    found.add(j)
            return sorted(found)
        for p, end in self._bounds:
            for j in range(bisect_left(keys, p), min(bisect_left(keys, end), last) + 1):
                below = keys[j - 1] if j else low
                if below is None or below < end:
                    found.add(j)
        return sorted(found)

    def _wanted_keys(self, keys: list[bytes]) -> list[int]:
        """The keys of a leaf under a prefix (``p <= key < p + 0xff`` is ``key`` starting
        with ``p``: no UTF-8 path byte is 0xff)."""
        found: set[int] = set()
        for p, end in self._bounds:
            start = bisect_left(keys, p)
            if self.exact:
                if start < len(keys) and keys[start] == p:
                    found.add(start)
            else:
                found.update(range(start, bisect_left(keys, end)))
        return sorted(found)

    def _range_covered(self, low: bytes | None, high: bytes | None) -> bool:
        if self.prefixes is None:
            return True
        if low is None or high is None or self.exact:
            return False
        return any(low.startswith(p) and high.startswith(p) for p in self.prefixes)

    # --- the walk -------------------------------------------------------------------

    async def run(self, needs: list[Need], store_last: bool = True) -> FetchStats:
        """Walk from ``needs``. With ``store_last=False`` the last blocks are left in
        ``take_rows()`` for the caller to store with the commit."""
        for n in needs:
            self._child(n, network=False)
        try:
            await self._walk()
        except FetchError as exc:
            if exc.hostile:  # nothing more from a peer that lied
                self._rows, self._partial, self._rows_bytes = [], [], 0
            else:
                await self._flush()
            raise
        except BaseException:
            # Keep what arrived and checked out (a cut connection, a shutdown): the next
            # attempt finds it stored and does not ask for it again.
            with trio.CancelScope(shield=True):
                await self._flush()
            raise
        if store_last:
            await self._flush()
        return self.stats

    def take_rows(self) -> tuple[list[tuple[bytes, bytes]], list[bytes]]:
        rows, partial = self._rows, self._partial
        self._rows, self._partial, self._rows_bytes = [], [], 0
        return rows, partial

    async def _walk(self) -> None:
        # The requests run as tasks of this nursery; an error is raised outside it, so
        # that callers see the error itself rather than an exception group.
        error: Exception | None = None
        async with trio.open_nursery() as nursery:
            try:
                await self._loop(nursery)
                await self._wait_flush()
            except Exception as exc:
                error = exc
            nursery.cancel_scope.cancel()
        if error is not None:
            raise error

    async def _loop(self, nursery: trio.Nursery) -> None:
        send, recv = trio.open_memory_channel(math.inf)
        inflight = 0
        while self._check or self._fetch or inflight:
            if self._check:
                await self._classify()
            while self._fetch and inflight < self.window:
                group = self._next_group()
                inflight += 1
                nursery.start_soon(self._ask, group, send)
            if inflight and not self._check:
                group, reply = await recv.receive()
                inflight -= 1
                if isinstance(reply, BaseException):
                    raise reply
                self._arrived(group, reply)
                if self._rows_bytes >= FLUSH_BYTES or len(self._rows) >= FLUSH_BLOCKS:
                    await self._flush_in_background(nursery)
                if self.progress:
                    self.progress(self.stats)

    def _next_group(self) -> list[Need]:
        group: list[Need] = []
        append = group.append
        popleft = self._fetch.popleft
        budget = WANT_BYTES
        for _ in range(min(self.want_batch, len(self._fetch))):
            n = popleft()
            append(n)
            # a value's or chunk's size is its block's; a node's (even a chunk-tree node,
            # whose size says how much value lies under it) is not known yet
            kind = n.kind
            budget -= n.size if kind == KIND_VALUE or kind == KIND_CHUNK else NODE_ESTIMATE
            if budget <= 0:
                break
        return group

    async def _ask(self, group: list[Need], send: trio.MemorySendChannel) -> None:
        self.stats.requests += 1
        try:
            reply = await self.request({"t": "want", "hashes": [n.addr for n in group]})
        except Exception as exc:  # handed to the walk, which raises it
            reply = exc
        await send.send((group, reply))

    async def _classify(self) -> None:
        batch = [self._check.popleft() for _ in range(min(CHECK_BATCH, len(self._check)))]
        known = self.store.known_complete
        unknown = [n for n in batch if n.addr not in known]
        self.stats.skipped += len(batch) - len(unknown)
        batch = unknown
        if not batch:  # a small update's untouched neighbours: no store round trip
            return
        run = self.db_quick if len(batch) <= 64 else self.db
        present, partial = await run(self.store.classify, [n.addr for n in batch])
        local: list[Need] = []
        for n in batch:
            if n.addr not in present:
                block = self.prefetched.pop(n.addr, None)
                if block is not None:
                    self._take(n, block, store=True)
                else:
                    self._fetch.append(n)
            elif n.addr in partial:
                block = self.prefetched.pop(n.addr, None)
                if block is not None:  # sent with the answer: no trip to the store for it
                    self.stats.local += 1
                    self._take(n, block, store=False)
                else:
                    local.append(n)
            else:
                self.stats.skipped += 1
        if local:
            blocks, missing = await self.db(self.store.get_blocks, [n.addr for n in local])
            if missing:  # removed (gc) or corrupt since classify: fetch them again
                gone = set(missing)
                self._fetch.extend(n for n in local if n.addr in gone)
                local = [n for n in local if n.addr not in gone]
            for n, block in zip(local, blocks):
                self.stats.local += 1
                self._take(n, block, store=False)

    def _child(self, need: Need, network: bool) -> None:
        if need.addr in self._queued:
            return
        self._queued.add(need.addr)
        block = self.prefetched.pop(need.addr, None)  # keyed by the blocks' own hashes
        if block is not None:
            # Pushed with the head: new, almost surely (stored once if not). Taken at
            # once, without a store lookup, so a small update costs no round trips.
            self._take(need, block, store=True)
            return
        if network and self.fresh:
            self._fetch.append(need)
        else:
            self._check.append(need)

    def _arrived(self, group: list[Need], reply: dict) -> None:
        if reply.get("t") != "blocks":
            raise FetchError(f"answered want with {reply.get('t')}", hostile=True)
        if reply["missing"]:
            raise FetchError(f"peer does not hold {len(reply['missing'])} of the blocks asked for")
        by_addr = {n.addr: n for n in group}
        blocks = reply["blocks"]
        if not blocks:
            raise FetchError(f"peer answered a want of {len(group)} blocks with none")
        # One pass, the bulk of a sync: each block must hash to an address asked for;
        # a leaf (value or chunk) is then checked by its size and queued for the store,
        # nodes are taken after the pass. Nothing here reaches the store if a later
        # block fails (the walk drops unwritten blocks on a hostile error).
        pop = by_addr.pop
        rows_append = self._rows.append
        nodes = []
        leaves = nbytes = 0
        for block in blocks:
            addr = blake3(block).digest()
            n = pop(addr, None)
            if n is None:
                raise FetchError(
                    f"sent a block that was not asked for or does not match its hash ({addr.hex()})", hostile=True
                )
            kind = block[0]
            if kind == n.kind and (kind == KIND_VALUE or kind == KIND_CHUNK):
                if n.size >= 0 and len(block) - 1 != n.size:
                    raise FetchError(
                        f"block {addr.hex()} holds {len(block) - 1} bytes, its reference says {n.size}", hostile=True
                    )
                rows_append((addr, block))
                leaves += 1
                nbytes += len(block)
            else:
                nodes.append((n, block))
        # An answer may stop short (it must fit in one frame): ask again for the rest.
        if by_addr:
            self._fetch.extendleft(reversed(list(by_addr.values())))
        for n, block in nodes:
            self._take(n, block, store=True)
        self.stats.blocks += leaves
        self.stats.bytes += nbytes
        self._rows_bytes += nbytes

    # --- one block --------------------------------------------------------------------

    def _take(self, n: Need, block: bytes, store: bool) -> None:
        """Check ``block`` against what its parent says it is and queue its children."""
        if block[0] != n.kind:
            raise FetchError(f"block {n.addr.hex()} is of kind {block[0]}, expected {n.kind}", hostile=True)
        interior = False
        try:
            if n.kind == KIND_NODE:
                interior = self._take_node(n, block, store)
            elif n.kind == KIND_CHUNK_NODE:
                interior = self._take_chunk_node(n, block, store)
            elif n.size >= 0 and len(block) - 1 != n.size:
                raise FormatError(f"holds {len(block) - 1} bytes, its reference says {n.size}")
        except FormatError as exc:
            raise FetchError(f"block {n.addr.hex()}: {exc}", hostile=True) from None
        if store:
            self.stats.blocks += 1
            self.stats.bytes += len(block)
            self._rows.append((n.addr, block))
            self._rows_bytes += len(block)
            if interior:
                self._partial.append(n.addr)

    def _take_node(self, n: Need, block: bytes, network: bool) -> bool:
        node = decode_node(block[1:])
        if n.level >= 0 and node.level != n.level:
            raise FormatError(f"tree node at level {node.level} where level {n.level} belongs")
        if n.last is not None and (not node.keys or node.keys[-1] != n.last):
            raise FormatError("tree node does not end with the key its parent names")
        if n.low is not None and node.keys and node.keys[0] <= n.low:
            raise FormatError("tree node holds keys outside its parent's range")
        if self.exact:  # an on-demand read: the read that follows walks these same nodes
            self.decoded[n.addr] = node
        keys, vals = node.keys, node.vals
        children = 0
        child = self._child
        full = self.prefixes is None
        if node.level > 0:
            level = node.level - 1
            for j in range(len(vals)) if full else self._wanted_children(keys, n.low):
                child(Need(vals[j], KIND_NODE, level, keys[j], keys[j - 1] if j else n.low), network)
                children += 1
            covered = self._range_covered(n.low, n.last)
        else:
            wanted = range(len(keys)) if full else self._wanted_keys(keys)
            for j in wanted:
                v = vals[j]
                if type(v) is ExtType:
                    size = int.from_bytes(v.data[HASH_SIZE:], "big")
                    if self.max_value is not None and size > self.max_value:
                        self.too_large = max(size, self.too_large or 0)
                        continue
                    kind = KIND_VALUE if v.code == EXT_BLOCK else KIND_CHUNK_NODE
                    child(Need(v.data[:HASH_SIZE], kind, size=size), network)
                    children += 1
            covered = len(wanted) == len(keys)
        if covered:
            self.complete.append(n.addr)
        return children > 0 or not covered

    def _take_chunk_node(self, n: Need, block: bytes, network: bool) -> bool:
        node = decode_chunk_node(block[1:])
        if n.level >= 0 and node.level != n.level:
            raise FormatError(f"chunk-tree node at level {node.level} where level {n.level} belongs")
        if n.size >= 0 and sum(node.sizes) != n.size:
            raise FormatError(f"chunk-tree node holds {sum(node.sizes)} bytes, its parent says {n.size}")
        kind = KIND_CHUNK if node.level == 0 else KIND_CHUNK_NODE
        for a, s in zip(node.addrs, node.sizes):
            self._child(Need(a, kind, node.level - 1 if node.level else -1, size=s), network)
        self.complete.append(n.addr)
        return True

    async def _flush_in_background(self, nursery: trio.Nursery) -> None:
        """Store the received blocks on the store thread while the walk goes on (one
        flush at a time, so blocks reach the store in the order they arrived)."""
        await self._wait_flush()
        rows, partial = self._rows, self._partial
        self._rows, self._partial, self._rows_bytes = [], [], 0
        done = self._flush_done = trio.Event()

        async def work() -> None:
            try:
                # shielded: once begun, a write completes even if the walk is cut short
                with trio.CancelScope(shield=True):
                    await self.db(self.store.put_fetched, rows, partial)
            except Exception as exc:  # raised by the walk at its next flush
                self._flush_error = exc
            finally:
                done.set()

        nursery.start_soon(work)

    async def _wait_flush(self) -> None:
        if self._flush_done is not None:
            with trio.CancelScope(shield=True):  # the write is shielded; so is waiting for it
                await self._flush_done.wait()
            self._flush_done = None
        if self._flush_error is not None:
            err, self._flush_error = self._flush_error, None
            raise err

    async def _flush(self) -> None:
        await self._wait_flush()
        if not self._rows:
            return
        rows, partial = self._rows, self._partial
        self._rows, self._partial, self._rows_bytes = [], [], 0
        await self.db(self.store.put_fetched, rows, partial)
