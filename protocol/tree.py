"""The path tree: a Merkle index over a repository's paths whose shape depends only on
the set of entries.

Every path (key) has a *level*: the number of leading zero 3-bit groups of
``blake3(0x10 || key)``, so a key has level >= 1 with probability 1/8, >= 2 with 1/64,
and so on. Level 0 of the tree is the sorted list of entries cut into nodes right after
every key whose level is >= 1; level L+1 is the list of level-L nodes (each named by its
last key) cut right after every node whose last key has level >= L+2. The root is the
first level that has a single node. Because the cuts come from the keys alone, two
replicas with the same entries build the same nodes and the same root hash whatever
order the entries were written in, and two versions share every node their change did
not touch. The average node holds 8 items (fanout 8).

Node payload (after the KIND_NODE byte), canonical msgpack:
``[level, [prefix_len...], [suffix...], [value...]]`` where key i is
``key[i-1][:prefix_len[i]] + suffix[i]``; in a leaf (level 0) each value is a value
reference, in an inner node the 32-byte address of the child node.

Value references (leaf values):
* ``bin`` of at most INLINE_MAX bytes: the value itself, inline;
* ext type 1, 36 bytes: the address of a KIND_VALUE block holding the value, then the
  value's size as 4 bytes big-endian (so listings and sizes never read the value);
* ext type 2, 40 bytes: the root address of a chunk tree (protocol.chunks) then the
  value's total size as 8 bytes big-endian.

Everything here is pure: the algorithms read nodes through a ``load(address)`` callable
and hand new blocks to an ``emit(address, block)`` callable.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache

from blake3 import blake3
from msgpack import ExtType

from .encoding import pack_fast, unpack_canonical
from .errors import FormatError, PathError
from .hashing import HASH_SIZE, KIND_CHUNK_NODE, KIND_NODE, KIND_VALUE, make_block
from .paths import _SUSPECT, MAX_PATH_BYTES, validate_path

INLINE_MAX = 64
CHUNKING_THRESHOLD = 32 * 1024  # values longer than this are chunked (protocol.chunks)
MAX_NODE_BYTES = 1 << 20  # a tree node written larger is refused: a peer must be able to receive it
EXT_BLOCK = 1
EXT_CHUNKED = 2
FANOUT_BITS = 3  # fanout 8
MAX_LEVEL = 64 // FANOUT_BITS

ValueRef = bytes | ExtType
Load = Callable[[bytes], "Node"]
Emit = Callable[[bytes, bytes], None]

_LEVEL_PREFIX = b"\x10"


@lru_cache(maxsize=1 << 16)  # a write recomputes the levels of its nodes' neighbours
def key_level(key: bytes) -> int:
    x = int.from_bytes(blake3(_LEVEL_PREFIX + key).digest()[:8], "big")
    return (64 - x.bit_length()) // FANOUT_BITS


def common_prefix_len(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    x = int.from_bytes(a[:n], "big") ^ int.from_bytes(b[:n], "big")
    return n - (x.bit_length() + 7) // 8


@dataclass(frozen=True, slots=True)
class Node:
    level: int
    keys: list[bytes]
    vals: list  # ValueRef at level 0, child addresses above
    # The keys' encoded columns (prefix lengths, suffixes), when known: a node rewritten
    # with one key changed re-encodes only the keys next to it.
    cols: tuple[list[int], list[bytes]] | None = field(default=None, compare=False, repr=False)


def columns(keys: list[bytes]) -> tuple[list[int], list[bytes]]:
    """The prefix-compressed columns of sorted keys: each key's length of prefix shared
    with the key before it (maximal), and the rest of it."""
    if not keys:
        return [], []
    plens = [0]
    sufs = [keys[0]]
    prev = keys[0]
    from_bytes = int.from_bytes
    for k in keys[1:]:
        # common_prefix_len, inlined: this loop runs once per entry of a node built whole.
        n = min(len(prev), len(k))
        p = n - ((from_bytes(prev[:n], "big") ^ from_bytes(k[:n], "big")).bit_length() + 7) // 8
        plens.append(p)
        sufs.append(k[p:])
        prev = k
    return plens, sufs


def _columns_after(node: Node, keys: list[bytes], i: int, inserted: bool) -> tuple[list[int], list[bytes]]:
    """The columns of ``keys``: ``node``'s keys with the key at ``i`` replaced, or a key
    inserted at ``i``. Only the entries at ``i`` and ``i + 1`` are computed again."""
    if node.cols is None:
        return columns(keys)
    plens, sufs = list(node.cols[0]), list(node.cols[1])
    if inserted:
        plens.insert(i, 0)
        sufs.insert(i, b"")
    for j in (i, i + 1):
        if j >= len(keys):
            break
        if j == 0:
            plens[0], sufs[0] = 0, keys[0]
        else:
            p = common_prefix_len(keys[j - 1], keys[j])
            plens[j], sufs[j] = p, keys[j][p:]
    return plens, sufs


def encode_node(level: int, keys: list[bytes], vals: list, cols: tuple | None = None) -> bytes:
    plens, sufs = cols if cols is not None else columns(keys)
    return pack_fast([level, plens, sufs, vals])


def node_block(level: int, keys: list[bytes], vals: list, cols: tuple | None = None) -> tuple[bytes, bytes]:
    h, b = make_block(KIND_NODE, encode_node(level, keys, vals, cols))
    if len(b) > MAX_NODE_BYTES:
        # Paths chosen so that no key is a cut make one node of them all; past this size
        # no peer could receive it (one block per frame at most), and the repository
        # could no longer be synced. Refused when written, not when read.
        raise FormatError(
            f"this write would make a tree node of {len(b)} bytes, over {MAX_NODE_BYTES}: "
            f"{len(keys)} paths fall into one node (spread them over more path names)"
        )
    return h, b


def _check_value_ref(v: object) -> None:
    if isinstance(v, bytes):
        if len(v) > INLINE_MAX:
            raise FormatError(f"inline value of {len(v)} bytes, more than {INLINE_MAX}")
    elif isinstance(v, ExtType):
        if v.code == EXT_BLOCK and len(v.data) == HASH_SIZE + 4:
            if not INLINE_MAX < int.from_bytes(v.data[HASH_SIZE:], "big") <= CHUNKING_THRESHOLD:
                raise FormatError("a value block reference with a size outside the block range")
            return
        if v.code == EXT_CHUNKED and len(v.data) == HASH_SIZE + 8:
            if int.from_bytes(v.data[HASH_SIZE:], "big") <= CHUNKING_THRESHOLD:
                raise FormatError("a value this small must not be chunked")
            return
        raise FormatError(f"bad value reference (ext type {v.code}, {len(v.data)} bytes)")
    else:
        raise FormatError("value reference is neither bytes nor a reference")


def decode_node(payload: bytes) -> Node:
    """Decode a node payload (the block without its kind byte), checking every rule."""
    obj = unpack_canonical(payload, "tree node", maps=False)
    if not (isinstance(obj, list) and len(obj) == 4):
        raise FormatError("tree node: expected [level, prefix_lens, suffixes, values]")
    level, plens, sufs, vals = obj
    if not (type(level) is int and 0 <= level <= MAX_LEVEL):
        raise FormatError(f"tree node: bad level {level!r}")
    if not (isinstance(plens, list) and isinstance(sufs, list) and isinstance(vals, list)):
        raise FormatError("tree node: columns must be arrays")
    if not (len(plens) == len(sufs) == len(vals)):
        raise FormatError("tree node: columns of different lengths")
    if level > 0 and not vals:
        raise FormatError("tree node: an inner node with no children")
    keys: list[bytes] = []
    prev = b""
    suspect = _SUSPECT.search
    for p, s in zip(plens, sufs):
        if not (type(p) is int and type(s) is bytes) or p < 0 or p > len(prev):
            raise FormatError("tree node: bad key compression")
        k = prev[:p] + s
        if keys:
            if k <= prev:
                raise FormatError("tree node: keys out of order")
            # k shares p bytes with prev; the prefix is maximal unless the next bytes agree
            if s and p < len(prev) and s[0] == prev[p]:
                raise FormatError("tree node: key prefix not maximal (non-canonical)")
        elif p != 0:
            raise FormatError("tree node: first key has a prefix")
        try:
            path = k.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError("tree node: a key is not a valid path") from None
        if path[:1] != "/" or suspect(path) or len(k) > MAX_PATH_BYTES:
            try:
                validate_path(path)
            except PathError:
                raise FormatError("tree node: a key is not a valid path") from None
        keys.append(k)
        prev = k
    if level == 0:
        for v in vals:
            # the common case first: a value block reference of the right size
            if type(v) is ExtType and v.code == EXT_BLOCK and len(v.data) == HASH_SIZE + 4:
                if INLINE_MAX < int.from_bytes(v.data[HASH_SIZE:], "big") <= CHUNKING_THRESHOLD:
                    continue
            _check_value_ref(v)
    else:
        for v in vals:
            if not (type(v) is bytes and len(v) == HASH_SIZE):
                raise FormatError("tree node: child address is not 32 bytes")
    return Node(level, keys, vals, (plens, sufs))


def empty_tree(emit: Emit) -> bytes:
    h, b = node_block(0, [], [])
    emit(h, b)
    return h


# --- value references -------------------------------------------------------------


def block_ref(value: bytes) -> tuple[ExtType, bytes, bytes]:
    """Reference to ``value`` stored as one block: ``(ref, address, block)``."""
    h, b = make_block(KIND_VALUE, value)
    return _ext(EXT_BLOCK, h + len(value).to_bytes(4, "big")), h, b


def _ext(code: int, data: bytes) -> ExtType:
    # ExtType's constructor re-checks its arguments in Python; ours are known good.
    return tuple.__new__(ExtType, (code, data))


def chunked_ref(root: bytes, size: int) -> ExtType:
    return ExtType(EXT_CHUNKED, root + size.to_bytes(8, "big"))


def ref_size(ref: ValueRef) -> int:
    """The size of the value a reference names (every form carries it)."""
    if isinstance(ref, bytes):
        return len(ref)
    return int.from_bytes(ref.data[HASH_SIZE:], "big")


# --- building -----------------------------------------------------------------------


class LevelStacker:
    """Streams sorted items into a canonical tree, one pending node per level.

    ``close(level, items, is_root) -> item`` writes a node and returns the item that
    names it one level up; items are tuples whose last element is the boundary level.
    A level's first node is passed up only once a second one exists, so no node is
    ever written above the root. Memory is O(depth x node size).
    """

    def __init__(self, close: Callable[[int, list, bool], tuple]):
        self._close = close
        self._pending: list[list] = [[]]
        self._held: list[tuple | None] = [None]
        self._closed: list[int] = [0]

    def add(self, level: int, item: tuple) -> None:
        if level == len(self._pending):
            self._pending.append([])
            self._held.append(None)
            self._closed.append(0)
        self._pending[level].append(item)
        if item[-1] > level:
            self._flush(level)

    def _flush(self, level: int) -> None:
        items = self._pending[level]
        self._pending[level] = []
        up = self._close(level, items, False)
        self._closed[level] += 1
        if self._closed[level] == 1:
            self._held[level] = up
            return
        if self._closed[level] == 2:
            held, self._held[level] = self._held[level], None
            self.add(level + 1, held)
        self.add(level + 1, up)

    def finish(self) -> tuple:
        """Close every level; return the root's item."""
        level = 0
        while True:
            if self._closed[level] == 0:
                # The whole level is one node (at level 0 possibly empty): the root.
                return self._close(level, self._pending[level], True)
            if self._pending[level]:
                self._flush(level)
            if self._closed[level] == 1:
                return self._held[level]
            level += 1


def build_tree(items: Iterator[tuple[bytes, ValueRef]], emit: Emit) -> bytes:
    """Root address of the tree holding ``items`` (sorted by key, unique)."""
    keys: list[bytes] = []
    vals: list = []
    for k, v in items:
        keys.append(k)
        vals.append(v)
    return build_sorted(keys, vals, emit)


def build_sorted(keys: list[bytes], vals: list, emit: Emit, level: int = 0, levels: list[int] | None = None) -> bytes:
    """Root address of the tree over sorted unique ``keys``, one level at a time.

    ``level`` > 0 builds from the items of that level (child addresses named by their
    last keys). Cuts are found with one pass over the key levels, nodes are slices.
    """
    if not keys:
        return empty_tree(emit)
    if levels is None:
        from_bytes = int.from_bytes
        levels = [  # key_level, inlined
            (64 - from_bytes(blake3(_LEVEL_PREFIX + k).digest()[:8], "big").bit_length()) // FANOUT_BITS for k in keys
        ]
    while True:
        n = len(keys)
        cuts = [i + 1 for i, lv in enumerate(levels) if lv > level]
        if not cuts or cuts[-1] != n:
            cuts.append(n)
        if len(cuts) == 1:
            h, b = node_block(level, keys, vals)
            emit(h, b)
            return h
        up_keys, up_vals, up_levels = [], [], []
        start = 0
        for end in cuts:
            h, b = node_block(level, keys[start:end], vals[start:end])
            emit(h, b)
            up_keys.append(keys[end - 1])
            up_vals.append(h)
            up_levels.append(levels[end - 1])
            start = end
        keys, vals, levels = up_keys, up_vals, up_levels
        level += 1


# --- reading -----------------------------------------------------------------------


def lookup(root: bytes, key: bytes, load: Load) -> ValueRef | None:
    found = seek(root, key, load)
    return found[1] if found is not None and found[0] == key else None


def seek(root: bytes, key: bytes, load: Load) -> tuple[bytes, ValueRef] | None:
    """The first entry whose key is ``key`` or after it, or None: one path down (an
    inner node names each child by its last key, so the child holding the first key at
    or after ``key`` is the first one named at or after it)."""
    node = load(root)
    while True:
        i = bisect_left(node.keys, key)
        if i == len(node.keys):
            return None
        if node.level == 0:
            return node.keys[i], node.vals[i]
        node = _child(node, i, load)


def path_nodes(root: bytes, key: bytes, load: Load) -> list[bytes]:
    """Addresses of the nodes from the root down to where ``key`` is or would be."""
    out = [root]
    node = load(root)
    while node.level > 0:
        i = min(bisect_left(node.keys, key), len(node.keys) - 1)
        out.append(node.vals[i])
        node = _child(node, i, load)
    return out


def _child(node: Node, i: int, load: Load) -> Node:
    child = load(node.vals[i])
    if child.level != node.level - 1 or not child.keys or child.keys[-1] != node.keys[i]:
        raise FormatError(f"tree node {node.vals[i].hex()} does not fit under its parent")
    return child


def iterate(root: bytes, prefix: bytes, load: Load) -> Iterator[tuple[bytes, ValueRef]]:
    """Entries whose key starts with ``prefix``, in key order."""

    def walk(node: Node) -> Iterator[tuple[bytes, ValueRef]]:
        i = bisect_left(node.keys, prefix)
        if node.level == 0:
            for j in range(i, len(node.keys)):
                k = node.keys[j]
                if not k.startswith(prefix):
                    return
                yield k, node.vals[j]
            return
        for j in range(i, len(node.keys)):
            if j > i and not node.keys[j - 1].startswith(prefix):
                return
            yield from walk(_child(node, j, load))

    yield from walk(load(root))


# --- changing ------------------------------------------------------------------------


class _Level:
    """Finds the nodes of one level of the old tree, through the root."""

    def __init__(self, root: Node, level: int, load: Load):
        self.root, self.level, self.load = root, level, load

    def node_for(self, key: bytes) -> tuple[Node, bool]:
        """The node of this level where ``key`` is or would go; and whether it is last."""
        node, last = self.root, True
        while node.level > self.level:
            i = bisect_left(node.keys, key)
            if i >= len(node.keys) - 1:
                i = len(node.keys) - 1
            else:
                last = False
            node = _child(node, i, self.load)
        return node, last

    def node_after(self, last_key: bytes) -> tuple[Node, bool] | None:
        """The node of this level that follows the one ending at ``last_key``."""
        node, last = self.root, True
        if node.level == self.level:
            return None
        while node.level > self.level:
            i = bisect_right(node.keys, last_key)
            if i == len(node.keys):
                return None
            if i < len(node.keys) - 1:
                last = False
            node = _child(node, i, self.load)
        return node, last


def mutate(root: bytes, changes: dict[bytes, ValueRef | None], load: Load, emit: Emit, remember=None) -> bytes:
    """Apply ``changes`` (key -> new value, or None to delete) and return the new root.

    Work is proportional to the number of changes times the tree depth: only the nodes
    on the changed paths (and a neighbour where a cut disappears) are rebuilt.
    ``remember(address, node)``, if given, receives each new node (a cache of decoded
    nodes: the next write to the tree starts from them without decoding).
    """
    if not changes:
        return root
    old_root = load(root)
    if old_root.level == 0 and not old_root.keys:
        # No (key, value) tuples: a million-entry first commit stays small in memory.
        keys = sorted(k for k, v in changes.items() if v is not None)
        return build_sorted(keys, [changes[k] for k in keys], emit)
    if len(changes) == 1:
        ((key, value),) = changes.items()
        new_root = _change_one(root, old_root, key, value, load, emit, remember)
        if new_root is not None:
            return new_root

    new_nodes: dict[bytes, Node] = {}

    def emit_node(level: int, keys: list[bytes], vals: list) -> bytes:
        cols = columns(keys)
        h, b = node_block(level, keys, vals, cols)
        new_nodes[h] = Node(level, keys, vals, cols if remember is not None else None)
        emit(h, b)
        return h

    levels_cache: dict[bytes, int] = {}

    def lvl(k: bytes) -> int:
        v = levels_cache.get(k)
        if v is None:
            v = levels_cache[k] = key_level(k)
        return v

    muts = sorted(changes.items())
    height = old_root.level
    level = 0
    while True:
        finder = _Level(old_root, level, load)
        removed: list[bytes] = []
        made: list[tuple[bytes, bytes]] = []  # (last key, address) of new nodes
        carry_k: list[bytes] = []
        carry_v: list = []
        mkeys = [k for k, _ in muts]
        mi = 0
        cur: tuple[Node, bool] | None = None
        while True:
            if cur is None:
                if mi >= len(muts):
                    break
                cur = finder.node_for(muts[mi][0])
            node, is_last = cur
            removed.append(node.keys[-1] if node.keys else b"")
            # Changes that fall into this node: keys up to its last key (all, if last).
            hi = len(muts) if is_last else bisect_right(mkeys, node.keys[-1], mi)
            _merge(node.keys, node.vals, muts[mi:hi], carry_k, carry_v)
            mi = hi
            # Cut the carried items after every boundary key of this level.
            start = 0
            for j, k in enumerate(carry_k):
                if lvl(k) > level:
                    made.append((k, emit_node(level, carry_k[start : j + 1], carry_v[start : j + 1])))
                    start = j + 1
            del carry_k[:start], carry_v[:start]
            if carry_k and not is_last:
                # No cut at the end: the items flow into the next node of the level.
                cur = finder.node_after(node.keys[-1])
                if cur is None:  # cannot happen in a well-formed tree
                    raise FormatError("tree: a node that is not last has no successor")
            else:
                if carry_k:
                    made.append((carry_k[-1], emit_node(level, carry_k, carry_v)))
                    carry_k, carry_v = [], []
                cur = None
        if level >= height:
            break
        up: dict[bytes, bytes | None] = {k: None for k in removed}
        for k, h in made:
            up[k] = h
        muts = sorted(up.items())
        level += 1

    # `made` holds the new nodes of the old root's level.
    if not made:
        return empty_tree(emit)
    if len(made) > 1:
        # The root split: build levels above it from the new nodes.
        return build_sorted([k for k, _ in made], [h for _, h in made], emit, level + 1, [lvl(k) for k, _ in made])
    new_root = made[0][1]
    node = new_nodes[new_root]
    while node.level > 0 and len(node.keys) == 1:  # the tree got shallower
        new_root = node.vals[0]
        node = new_nodes.get(new_root) or load(new_root)
    if remember is not None:
        for h, n in new_nodes.items():
            remember(h, n)
    return new_root


def _change_one(root: bytes, old_root: Node, key: bytes, value, load: Load, emit: Emit, remember) -> bytes | None:
    """The new root after one change, or None to leave it to the general path: the
    delete of a key of a higher level or one that would empty a node, or a change that
    would split the root (an append past a last key that is a cut at the root's level,
    a new key inside the tree of a level above the root's).

    A level-0 key is never a cut, so adding, changing or removing it moves no node
    boundary at any level: the leaf where it belongs is rewritten, and each node above
    it takes the new child's address and last key. (Past the tree's last key, that
    holds while the last key is no cut either.) Changing the value of any key moves no
    boundary either; nor does appending a key of any level past the tree's last key, as
    a cut only ends its node and nothing follows. A new key of a higher level inside the
    tree splits the nodes it lands in below its level (``_insert_cut``). That is exactly
    what ``mutate`` builds, in a fraction of the work (one write of a chat post is one
    such change).
    """
    high = key_level(key) != 0
    if high and value is None:
        return None
    path: list[tuple[Node, int]] = []
    node = old_root
    while node.level > 0:
        i = bisect_left(node.keys, key)
        if i == len(node.keys):  # past the tree's last key: down the last children
            i -= 1
        path.append((node, i))
        node = _child(node, i, load)
    keys, vals = node.keys, node.vals
    j = bisect_left(keys, key)
    if high and j < len(keys) and keys[j] != key:
        # a new cut inside the tree: the nodes where it lands split below its level
        return _insert_cut(old_root, key, value, keys, vals, j, path, emit, remember)
    if j == len(keys) and value is not None:
        cut = key_level(keys[-1])
        if cut:
            # Past the tree's last key, a cut under its level: the new key starts a
            # node of its own on each level below that one, and joins the last node
            # there. (Where that level is the root's, the root would split: the
            # general path builds that.)
            if cut >= old_root.level:
                return None
            h = value
            for level in range(cut):
                h = _emit_new(level, [key], [h], emit, remember)
            while path[-1][0].level < cut:
                path.pop()
            parent, _ = path.pop()
            keys = parent.keys + [key]
            cols = _columns_after(parent, keys, len(keys) - 1, inserted=True)
            return _rewrite_up(cut, keys, parent.vals + [h], path, emit, remember, cols)
    found = j < len(keys) and keys[j] == key
    if value is None:
        if not found:
            return root
        if len(keys) == 1:
            return None
        keys = keys[:j] + keys[j + 1 :]
        vals = vals[:j] + vals[j + 1 :]
        cols = None
    elif found:
        if vals[j] == value:
            return root
        vals = list(vals)
        vals[j] = value
        cols = node.cols
    else:
        keys = keys[:j] + [key] + keys[j:]
        vals = vals[:j] + [value] + vals[j:]
        cols = _columns_after(node, keys, j, inserted=True)
    return _rewrite_up(0, keys, vals, path, emit, remember, cols)


def _insert_cut(
    old_root: Node, key: bytes, value, keys: list[bytes], vals: list, j: int, path: list, emit: Emit, remember
) -> bytes | None:
    """A new key of level L >= 1 inside the tree (before the leaf's key at ``j``): it
    ends its node on each level below L, so there the node it lands in splits in two
    right after it (the left part named by the key, the right keeping the old name); on
    level L its node takes both parts; above, only addresses change. None where the
    root itself would split (the general path builds the new levels)."""
    cut = key_level(key)
    if cut > old_root.level:
        return None
    left_k, left_v = keys[:j] + [key], vals[:j] + [value]
    right_k, right_v = keys[j:], vals[j:]
    level = 0
    while True:
        h_left = _emit_new(level, left_k, left_v, emit, remember)
        h_right = _emit_new(level, right_k, right_v, emit, remember)
        parent, i = path.pop()
        level = parent.level
        # the child at i keeps its name (its last key), after the new left part
        k = parent.keys[:i] + [key] + parent.keys[i:]
        v = parent.vals[:i] + [h_left, h_right] + parent.vals[i + 1 :]
        if level >= cut:  # no cut on this level: the node holds both parts
            return _rewrite_up(level, k, v, path, emit, remember, _columns_after(parent, k, i, inserted=True))
        left_k, left_v = k[: i + 1], v[: i + 1]
        right_k, right_v = k[i + 1 :], v[i + 1 :]


def _emit_new(level: int, keys: list[bytes], vals: list, emit: Emit, remember, cols: tuple | None = None) -> bytes:
    if cols is None:
        cols = columns(keys)
    h, b = node_block(level, keys, vals, cols)
    emit(h, b)
    if remember is not None:
        remember(h, Node(level, keys, vals, cols))
    return h


def _rewrite_up(
    level: int, keys: list[bytes], vals: list, path: list[tuple[Node, int]], emit: Emit, remember, cols=None
) -> bytes:
    """Emit the new node (level, keys, vals; ``cols``, its columns when known), then
    each node of ``path`` above it (its ancestors, the parent last) pointing at the new
    child by its last key."""
    while True:
        h = _emit_new(level, keys, vals, emit, remember, cols)
        if not path:
            return h
        parent, i = path.pop()
        last = keys[-1]
        keys, vals = list(parent.keys), list(parent.vals)
        unchanged = keys[i] == last
        keys[i], vals[i] = last, h
        cols = parent.cols if unchanged else _columns_after(parent, keys, i, inserted=False)
        level = parent.level


def _merge(keys: list[bytes], vals: list, muts: list, out_k: list, out_v: list) -> None:
    """Append to out the sorted union of a node's items and changes (None deletes)."""
    i = 0
    n = len(keys)
    for k, v in muts:
        while i < n and keys[i] < k:
            out_k.append(keys[i])
            out_v.append(vals[i])
            i += 1
        if i < n and keys[i] == k:
            i += 1
        if v is not None:
            out_k.append(k)
            out_v.append(v)
    out_k.extend(keys[i:])
    out_v.extend(vals[i:])


# --- comparing -------------------------------------------------------------------------


def diff(
    root_a: bytes, root_b: bytes, load: Load, prefixes: list[bytes] | None = None
) -> Iterator[tuple[bytes, ValueRef | None, ValueRef | None]]:
    """Yield ``(key, old, new)`` for every key whose value differs between two trees.

    Subtrees with the same address on both sides are skipped unread, so the work is
    proportional to the size of the change times the depth, not to the tree. With
    ``prefixes``, only keys under them: subtrees whose key range holds none are not read
    at all (a sparse replica has not got them), by the rule a sparse sync fetches by.
    """
    # Stacks of pending items, reversed (next item last):
    # ("T", level, addr, low) for a subtree of keys above ``low``, or ("E", key, val)
    a: list[tuple] = [("T", None, root_a, None)]
    b: list[tuple] = [("T", None, root_b, None)]

    def wanted_range(low: bytes | None, high: bytes) -> bool:
        return any(high >= p and (low is None or low < p + b"\xff") for p in prefixes)

    def expand(stack: list[tuple]) -> None:
        _, level, addr, low = stack.pop()
        node = load(addr)
        if level is not None and node.level != level:
            raise FormatError(f"tree node {addr.hex()} is at level {node.level}, expected {level}")
        if node.level == 0:
            items = [("E", k, v) for k, v in zip(node.keys, node.vals)]
            if prefixes is not None:
                items = [it for it in items if any(it[1].startswith(p) for p in prefixes)]
        else:
            items = []
            for k, h in zip(node.keys, node.vals):
                if prefixes is None or wanted_range(low, k):
                    items.append(("T", node.level - 1, h, low))
                low = k
        stack.extend(reversed(items))

    while a or b:
        x = a[-1] if a else None
        y = b[-1] if b else None
        if x is not None and x[0] == "T":
            if y is not None and y[0] == "T":
                if x[2] == y[2]:
                    a.pop()
                    b.pop()
                    continue
                lx = _level_of(x, load)
                ly = _level_of(y, load)
                if lx >= ly:
                    expand(a)
                if ly >= lx:
                    expand(b)
            else:
                expand(a)
            continue
        if y is not None and y[0] == "T":
            expand(b)
            continue
        if x is None:
            b.pop()
            yield y[1], None, y[2]
        elif y is None:
            a.pop()
            yield x[1], x[2], None
        elif x[1] < y[1]:
            a.pop()
            yield x[1], x[2], None
        elif x[1] > y[1]:
            b.pop()
            yield y[1], None, y[2]
        else:
            a.pop()
            b.pop()
            if x[2] != y[2]:
                yield x[1], x[2], y[2]


def _level_of(item: tuple, load: Load) -> int:
    if item[1] is None:  # a root: its level is in the node
        return load(item[2]).level
    return item[1]


# --- walking (verify, gc) ------------------------------------------------------------------


def walk_refs(root: bytes, load: Load, seen: set[bytes]) -> Iterator[tuple[int, bytes]]:
    """Yield ``(kind, address)`` of every block reachable from ``root`` not in ``seen``.

    Tree nodes are loaded (and so checked); value blocks and chunk-tree roots are
    yielded without reading them. Subtrees already in ``seen`` are skipped whole.
    """
    if root in seen:
        return
    seen.add(root)
    yield KIND_NODE, root
    stack = [root]
    while stack:
        node = load(stack.pop())
        if node.level == 0:
            for v in node.vals:
                if isinstance(v, ExtType):
                    h = v.data[:HASH_SIZE]
                    if h not in seen:
                        seen.add(h)
                        yield (KIND_VALUE if v.code == EXT_BLOCK else KIND_CHUNK_NODE), h
        else:
            for h in node.vals:
                if h not in seen:
                    seen.add(h)
                    yield KIND_NODE, h
                    stack.append(h)


def check_shape(root: bytes, load: Load) -> None:
    """Raise FormatError unless the tree is in its canonical shape (cuts by key level)."""

    def visit(addr: bytes, is_last: bool) -> None:
        node = load(addr)
        for j, k in enumerate(node.keys):
            boundary = key_level(k) > node.level
            final = j == len(node.keys) - 1
            if boundary and not final:
                raise FormatError(f"tree node {addr.hex()} is not cut after a boundary key")
            if final and not boundary and not is_last:
                raise FormatError(f"tree node {addr.hex()} ends without a boundary key")
        if node.level > 0:
            for j in range(len(node.vals)):
                _child(node, j, load)
                visit(node.vals[j], is_last and j == len(node.vals) - 1)

    root_node = load(root)
    if root_node.level > 0 and len(root_node.keys) == 1:
        raise FormatError("tree root has a single child")
    visit(root, True)


__all__ = [
    "INLINE_MAX",
    "KIND_CHUNK_NODE",
    "Node",
    "build_tree",
    "diff",
    "iterate",
    "lookup",
    "mutate",
]
