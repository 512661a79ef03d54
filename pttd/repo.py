"""Repositories: a signed, versioned map from paths to values over the store.

Every write is a commit: a new tree root signed with the repository key, seq one more
than the head. Any retained version can be read, listed and diffed; old versions can be
pruned and the blocks nothing references any more collected.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from blake3 import blake3
from msgpack import ExtType
from nacl.signing import SigningKey

from protocol import tree
from protocol.chunks import CHUNKING_THRESHOLD, ChunkNode, chunk_file, chunk_value, iter_chunk_addrs, walk_chunk_tree
from protocol.commit import Commit, SignedCommit, sign_commit
from protocol.errors import FormatError
from protocol.hashing import HASH_SIZE, KIND_CHUNK, KIND_CHUNK_NODE, KIND_VALUE, check_block
from protocol.paths import key_to_path, validate_path, validate_prefix

from .errors import CorruptBlock, MissingBlock, NotFound, PttError
from .keys import KeyStore
from .store import RepoRow, Store, Writer

log = logging.getLogger("pttd.repo")


@dataclass(frozen=True)
class EntryInfo:
    path: str
    size: int
    storage: str  # "inline", "block" or "chunked"
    address: str | None  # hex address of the value block or chunk-tree root


@dataclass(frozen=True)
class Change:
    path: str
    change: str  # "added", "changed" or "removed"


_VALUE_PREFIX = bytes((KIND_VALUE,))


def _now_ms() -> int:
    return int(time.time() * 1000)


class Batch:
    """Several writes that become one commit. Made by ``Repository.batch()``."""

    def __init__(self, repo: Repository, writer: Writer, head: SignedCommit):
        self._repo = repo
        self._writer = writer
        self._head = head
        self._changes: dict[bytes, tree.ValueRef | None] = {}
        self.commit: SignedCommit | None = None

    def _exists_before(self, key: bytes) -> bool:
        return tree.lookup(self._head.commit.root, key, self._repo.store.load_node) is not None

    def value(self, path: str) -> bytes | None:
        """The value at ``path`` as this commit leaves it so far, or None."""
        key = validate_path(path)
        ref = (
            self._changes[key]
            if key in self._changes
            else tree.lookup(self._head.commit.root, key, self._repo.store.load_node)
        )
        if ref is None:
            return None
        return ref if isinstance(ref, bytes) else b"".join(self._repo._read_ref(ref))

    def exists(self, path: str) -> bool:
        key = validate_path(path)
        if key in self._changes:
            return self._changes[key] is not None
        return self._exists_before(key)

    def put(self, path: str, value: bytes) -> None:
        key = validate_path(path)
        if type(value) is not bytes:
            if not isinstance(value, (bytearray, memoryview)):
                raise TypeError("value must be bytes")
            value = bytes(value)
        n = len(value)
        if n <= tree.INLINE_MAX:
            self._changes[key] = value
        elif n <= CHUNKING_THRESHOLD:  # the common case, tree.block_ref inlined: the write path
            block = _VALUE_PREFIX + value
            h = blake3(block).digest()
            self._writer.emit(h, block)
            self._changes[key] = tuple.__new__(ExtType, (tree.EXT_BLOCK, h + n.to_bytes(4, "big")))
        else:
            self._changes[key] = make_ref(value, self._writer.emit)

    def put_file(self, path: str, filename: str) -> None:
        """Store a file's contents without reading it whole into memory."""
        key = validate_path(path)
        size = os.path.getsize(filename)
        if size > CHUNKING_THRESHOLD:
            try:
                root, total = chunk_file(filename, self._writer.emit)
            except ValueError:  # nothing left to chunk: it was emptied meanwhile
                total = 0
            if total <= CHUNKING_THRESHOLD:
                # It shrank while being read: a value this small must not be chunked (a
                # leaf holding such a reference is refused by every reader).
                raise PttError(f"{filename} changed while it was being stored: nothing stored, try again")
            self._changes[key] = tree.chunked_ref(root, total)
        else:
            with open(filename, "rb") as f:
                self._changes[key] = make_ref(f.read(), self._writer.emit)

    def delete(self, path: str) -> None:
        key = validate_path(path)
        if key in self._changes and self._changes[key] is None:
            raise NotFound(f"no such path: {path} (already deleted in this commit)")
        pending = key in self._changes
        if self._exists_before(key):
            self._changes[key] = None
        elif pending:
            del self._changes[key]  # put earlier in this batch: the two cancel out
        else:
            raise NotFound(f"no such path: {path}")

    def __len__(self) -> int:
        return len(self._changes)


def make_ref(value: bytes, emit) -> tree.ValueRef:
    if len(value) <= tree.INLINE_MAX:
        return value
    if len(value) <= CHUNKING_THRESHOLD:
        ref, h, b = tree.block_ref(value)
        emit(h, b)
        return ref
    root, size = chunk_value(value, emit)
    return tree.chunked_ref(root, size)


class Repository:
    def __init__(self, store: Store, row: RepoRow, signing_key: SigningKey | None):
        self.store = store
        self.row = row
        self._key = signing_key

    @property
    def key(self) -> bytes:
        return self.row.key

    @property
    def id(self) -> str:
        return self.row.key.hex()

    @property
    def writable(self) -> bool:
        return self._key is not None

    # --- creation ---------------------------------------------------------------------

    @classmethod
    def create(cls, store: Store, keys: KeyStore) -> Repository:
        """A new repository with a fresh key pair and an empty first version (seq 0)."""
        sk = keys.create()
        with store.write() as w:
            row = store.add_repo(bytes(sk.verify_key), owned=True)
            root = tree.empty_tree(w.emit)
            sc = sign_commit(Commit(row.key, 0, root, None, _now_ms()), sk)
            store.insert_commit(row, sc)
        return cls(store, row, sk)

    @classmethod
    def open(cls, store: Store, keys: KeyStore, public_hex: str) -> Repository:
        try:
            key = bytes.fromhex(public_hex)
        except ValueError:
            raise NotFound(f"{public_hex!r} is not a repository key (64 hex digits)") from None
        row = store.find_repo(key) if len(key) == 32 else None
        if row is None:
            raise NotFound(f"no repository {public_hex} in this data directory")
        sk = keys.load(public_hex) if row.owned and keys.has(public_hex) else None
        return cls(store, row, sk)

    # --- versions ---------------------------------------------------------------------

    def head(self) -> SignedCommit:
        sc = self.store.head_commit(self.row)
        if sc is None:
            raise NotFound(f"repository {self.id} has no version yet")
        return sc

    def commit_at(self, version: int | None) -> SignedCommit:
        if version is None:
            return self.head()
        if version < 0:
            raise NotFound(f"version {version} does not exist (versions start at 0)")
        try:
            return self.store.load_commit(self.row, version)
        except NotFound:
            seqs = self.store.commit_seqs(self.row)
            if seqs and version < seqs[0]:
                raise NotFound(f"version {version} was pruned (oldest retained: {seqs[0]})") from None
            newest = seqs[-1] if seqs else None
            raise NotFound(f"version {version} does not exist (newest: {newest})") from None

    def history(self, limit: int | None = None) -> list[SignedCommit]:
        seqs = self.store.commit_seqs(self.row)[::-1]
        if limit is not None:
            seqs = seqs[:limit]
        return [self.store.load_commit(self.row, s) for s in seqs]

    # --- writing ----------------------------------------------------------------------

    @contextmanager
    def batch(self) -> Iterator[Batch]:
        """Collect writes; on leaving the block they become one durable commit.

        If the block raises, nothing is stored. If the writes change nothing (same
        values), no commit is made and ``batch.commit`` stays None.
        """
        self._check_writable()
        with self.store.write() as w:
            with self.batch_in(w) as b:
                yield b

    def _check_writable(self) -> None:
        if self._key is None:
            raise PttError(f"repository {self.id} is read-only here (this data directory holds no key for it)")

    @contextmanager
    def batch_in(self, w: Writer, head: SignedCommit | None = None, insert: bool = True) -> Iterator[Batch]:
        """Like ``batch()``, inside a store transaction the caller holds (several
        repositories' commits in one transaction: a gateway's group commit). ``head``:
        the newest commit when the caller knows it. ``insert=False``: the signed commit
        is left in ``batch.commit`` for the caller to store (``Store.insert_commits``),
        so that nothing of it is written if the caller's later checks fail."""
        self._check_writable()
        if head is None:
            head = self.head()
        b = Batch(self, w, head)
        yield b
        if not b._changes:
            return
        # a small commit keeps its new nodes decoded: the next write to this tree starts there
        remember = self.store.remember_node if len(b._changes) <= 64 else None
        if not remember:
            # a large commit: its last values go in on the other core while the tree is built
            w.flush(background=True)
        new_root = tree.mutate(head.commit.root, b._changes, self.store.load_node, w.emit, remember)
        if new_root == head.commit.root:
            return
        commit = Commit(self.key, head.seq + 1, new_root, head.address, max(_now_ms(), head.commit.time))
        sc = sign_commit(commit, self._key)
        if insert:
            self.store.insert_commit(self.row, sc)
        b.commit = sc

    def put(self, path: str, value: bytes) -> SignedCommit | None:
        with self.batch() as b:
            b.put(path, value)
        return b.commit

    def put_file(self, path: str, filename: str) -> SignedCommit | None:
        with self.batch() as b:
            b.put_file(path, filename)
        return b.commit

    def delete(self, path: str) -> SignedCommit | None:
        with self.batch() as b:
            b.delete(path)
        return b.commit

    # --- reading ----------------------------------------------------------------------

    def _ref(self, path: str, version: int | None) -> tuple[bytes, tree.ValueRef]:
        key = validate_path(path)
        sc = self.commit_at(version)
        ref = tree.lookup(sc.commit.root, key, self.store.load_node)
        if ref is None:
            at = "" if version is None else f" at version {version}"
            raise NotFound(f"no such path{at}: {path}")
        return key, ref

    def get(self, path: str, version: int | None = None) -> bytes:
        return b"".join(self.read(path, version))

    def read(self, path: str, version: int | None = None) -> Iterator[bytes]:
        """The value at ``path`` as a stream of pieces (chunk by chunk for large values)."""
        _, ref = self._ref(path, version)
        return self._read_ref(ref)

    def read_ref(self, ref: tree.ValueRef) -> bytes:
        """The value an entry's reference names (as ``tree.iterate`` yields them)."""
        return ref if isinstance(ref, bytes) else b"".join(self._read_ref(ref))

    def _read_ref(self, ref: tree.ValueRef) -> Iterator[bytes]:
        if isinstance(ref, bytes):
            yield ref
            return
        addr = ref.data[:HASH_SIZE]
        if ref.code == tree.EXT_BLOCK:
            value = self._typed_block(addr, KIND_VALUE)
            if len(value) != tree.ref_size(ref):
                raise CorruptBlock(addr, f"value block is {len(value)} bytes, its entry says {tree.ref_size(ref)}")
            yield value
            return
        try:
            for chunk_addr, size in iter_chunk_addrs(addr, self.store.load_chunk_node, tree.ref_size(ref)):
                data = self._typed_block(chunk_addr, KIND_CHUNK)
                if len(data) != size:
                    raise CorruptBlock(chunk_addr, f"chunk is {len(data)} bytes, its tree says {size}")
                yield data
        except FormatError as exc:
            raise CorruptBlock(addr, str(exc)) from None

    def _typed_block(self, addr: bytes, kind: int) -> bytes:
        block = self.store.get_block(addr)
        if block[0] != kind:
            raise CorruptBlock(addr, f"expected a block of kind {kind}, found kind {block[0]}")
        return block[1:]

    def info(self, path: str, version: int | None = None) -> EntryInfo:
        key, ref = self._ref(path, version)
        return self._info(key, ref)

    def _info(self, key: bytes, ref: tree.ValueRef) -> EntryInfo:
        path = key_to_path(key)
        if isinstance(ref, bytes):
            return EntryInfo(path, len(ref), "inline", None)
        storage = "block" if ref.code == tree.EXT_BLOCK else "chunked"
        return EntryInfo(path, tree.ref_size(ref), storage, ref.data[:HASH_SIZE].hex())

    def list(self, prefix: str = "/", version: int | None = None) -> Iterator[EntryInfo]:
        """Entries under ``prefix`` in path order (a prefix matches whole and partial segments)."""
        p = validate_prefix(prefix)
        sc = self.commit_at(version)
        for key, ref in tree.iterate(sc.commit.root, p, self.store.load_node):
            yield self._info(key, ref)

    def items(self, prefix: str = "/", version: int | None = None) -> Iterator[tuple[str, bytes]]:
        """(path, value) under ``prefix`` in path order."""
        p = validate_prefix(prefix)
        root = self.commit_at(version).commit.root
        for key, ref in tree.iterate(root, p, self.store.load_node):
            yield key_to_path(key), ref if isinstance(ref, bytes) else b"".join(self._read_ref(ref))

    def value(self, path: str, version: int | None = None) -> bytes | None:
        """The value at ``path``, or None where there is none."""
        key = validate_path(path)
        ref = tree.lookup(self.commit_at(version).commit.root, key, self.store.load_node)
        if ref is None:
            return None
        return ref if isinstance(ref, bytes) else b"".join(self._read_ref(ref))

    def diff(self, v1: int, v2: int) -> Iterator[Change]:
        """Paths added, changed or removed from version v1 to version v2."""
        a = self.commit_at(v1).commit.root
        b = self.commit_at(v2).commit.root
        for key, old, new in tree.diff(a, b, self.store.load_node):
            kind = "added" if old is None else "removed" if new is None else "changed"
            yield Change(key_to_path(key), kind)

    # --- pruning ----------------------------------------------------------------------

    def prune(self, keep: int) -> int:
        """Forget all but the newest ``keep`` versions; return how many were dropped.

        The data of dropped versions stays in the store until ``collect_garbage``.
        """
        if keep < 1:
            raise ValueError("keep at least one version")
        with self.store.write():
            return self.store.prune_commits(self.row, keep)


# --- whole-store operations ------------------------------------------------------------


@dataclass
class GcReport:
    versions_pruned: int = 0
    blocks_removed: int = 0
    bytes_removed: int = 0
    blocks_kept: int = 0
    file_bytes_before: int = 0
    file_bytes_after: int = 0
    vacuum_error: str | None = None  # the blocks are deleted; the file was not rebuilt


def collect_garbage(store: Store, keep: int | None = None, vacuum: bool = True) -> GcReport:
    """Prune every repository to its newest ``keep`` versions (if given), delete every
    block no retained version references, then (``vacuum``) rebuild the file so that
    deleted data is gone from the disk. Marking and sweeping happen in one write
    transaction; any missing or corrupt block aborts it before anything is deleted."""
    if keep is not None and keep < 1:
        raise ValueError("keep at least one version")
    report = GcReport(file_bytes_before=store.file_size())
    with store.write():
        if keep is not None:
            for row in store.list_repos():
                report.versions_pruned += store.prune_commits(row, keep)
        live: set[bytes] = set()
        # Owned repositories first: a followed one's walk puts the blocks it never
        # fetched into `live` too, and an owned one sharing such a block must still
        # find it missing (and stop gc) rather than skip it as seen.
        for repo, _seq, root in sorted(store.all_roots(), key=lambda r: not r[0].owned):
            _mark(store, root, live, tolerate_missing=not repo.owned)
        report.blocks_removed, report.bytes_removed = store.sweep(live)
        report.blocks_kept = len(live)
    if vacuum:
        try:
            store.vacuum()
        except sqlite3.Error as exc:  # the sweep is committed: say so, not only that it failed
            log.warning("gc: blocks deleted, but the file could not be rebuilt (VACUUM): %s", exc)
            report.vacuum_error = str(exc)
    report.file_bytes_after = store.file_size()
    return report


class _Tolerant:
    """Loaders for a followed repository's partial tree (sparse follows, on-demand
    reads): a block not fetched reads as an empty node and is counted."""

    def __init__(self, store: Store):
        self.store = store
        self.missing = 0

    def node(self, addr: bytes) -> tree.Node:
        try:
            return self.store.load_node(addr)
        except MissingBlock:
            self.missing += 1
            return tree.Node(0, [], [])

    def chunk_node(self, addr: bytes) -> ChunkNode:
        try:
            return self.store.load_chunk_node(addr)
        except MissingBlock:
            self.missing += 1
            return ChunkNode(0, [], [])


def _mark(store: Store, root: bytes, live: set[bytes], tolerate_missing: bool = False) -> None:
    loader = _Tolerant(store) if tolerate_missing else None
    load_node = loader.node if loader else store.load_node
    load_chunk = loader.chunk_node if loader else store.load_chunk_node
    for kind, addr in tree.walk_refs(root, load_node, live):
        if kind == KIND_CHUNK_NODE:
            for _ in walk_chunk_tree(addr, load_chunk, live):
                pass


@dataclass
class VerifyReport:
    repositories: int = 0
    versions: int = 0
    nodes: int = 0
    values: int = 0
    chunks: int = 0
    blocks_scanned: int = 0
    not_fetched: int = 0  # blocks of followed repositories outside their followed prefixes
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def verify_store(store: Store) -> VerifyReport:
    """Check every stored block against its address, every retained commit's signature
    and chain, and every tree reachable from them (shape, encoding, missing blocks)."""
    rep = VerifyReport()
    store.drop_cache()
    for addr, data in store.iter_all_blocks():
        rep.blocks_scanned += 1
        try:
            check_block(addr, data)
        except FormatError:
            rep.errors.append(f"corrupt block {addr.hex()}: does not match its hash")
    seen: set[bytes] = set()
    # owned repositories first: see collect_garbage (a block a followed repository never
    # fetched is in `seen` after its walk, and would be skipped unchecked after it)
    for row in sorted(store.list_repos(), key=lambda r: not r.owned):
        rep.repositories += 1
        prev: SignedCommit | None = None
        for seq in store.commit_seqs(row):
            try:
                sc = store.load_commit(row, seq)
            except PttError as exc:
                rep.errors.append(str(exc))
                prev = None
                continue
            rep.versions += 1
            if prev is not None and prev.seq == seq - 1 and sc.commit.prev != prev.address:
                rep.errors.append(f"repository {row.key.hex()}: version {seq} does not follow version {seq - 1}")
            prev = sc
            _verify_tree(store, sc.commit.root, seen, rep, tolerate_missing=not row.owned)
        if prev is not None and row.owned:
            try:
                tree.check_shape(prev.commit.root, store.load_node)
            except (PttError, FormatError) as exc:
                rep.errors.append(f"repository {row.key.hex()} head: {exc}")
        for seq, h in store.forks(row):
            rep.errors.append(f"repository {row.key.hex()}: fork evidence at seq {seq} (commit {h.hex()})")
    return rep


class _Reporting:
    """Loaders for an owned repository's tree in verify: a missing or corrupt block is
    reported and read as empty, so that the walk goes on and reports the others (it
    stopped at the first, and what lay under it, marked seen, was never checked)."""

    def __init__(self, store: Store, rep: VerifyReport):
        self.store, self.rep = store, rep

    def node(self, addr: bytes) -> tree.Node:
        try:
            return self.store.load_node(addr)
        except (CorruptBlock, MissingBlock) as exc:
            self.rep.errors.append(str(exc))
            return tree.Node(0, [], [])

    def chunk_node(self, addr: bytes) -> ChunkNode:
        try:
            return self.store.load_chunk_node(addr)
        except (CorruptBlock, MissingBlock) as exc:
            self.rep.errors.append(str(exc))
            return ChunkNode(0, [], [])


def _verify_tree(store: Store, root: bytes, seen: set[bytes], rep: VerifyReport, tolerate_missing: bool) -> None:
    # A followed repository may hold only part of its tree (sparse follows, on-demand
    # reads): what was not fetched is counted, not reported as an error.
    loader = _Tolerant(store) if tolerate_missing else _Reporting(store, rep)
    load_chunk = loader.chunk_node

    def check(addr: bytes, kind: int) -> bool:
        try:
            if _check_kind(store, addr, kind, tolerate_missing):
                return True
            loader.missing += 1
        except (CorruptBlock, MissingBlock) as exc:
            rep.errors.append(str(exc))
        return False

    try:
        for kind, addr in tree.walk_refs(root, loader.node, seen):
            if kind == KIND_CHUNK_NODE:
                load_chunk(addr)
                for k2, a2 in walk_chunk_tree(addr, load_chunk, seen):
                    if k2 == KIND_CHUNK and check(a2, KIND_CHUNK):
                        rep.chunks += 1
            elif kind == KIND_VALUE:
                if check(addr, KIND_VALUE):
                    rep.values += 1
            else:
                rep.nodes += 1
    except (CorruptBlock, MissingBlock, FormatError) as exc:  # a node of the wrong shape
        rep.errors.append(str(exc))
    if tolerate_missing:
        rep.not_fetched += loader.missing


def _check_kind(store: Store, addr: bytes, kind: int, tolerate_missing: bool = False) -> bool:
    try:
        block = store.get_block(addr)
    except MissingBlock:
        if not tolerate_missing:
            raise
        return False
    if block[0] != kind:
        raise CorruptBlock(addr, f"expected a block of kind {kind}, found kind {block[0]}")
    return True
