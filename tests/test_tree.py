"""The path tree: shape from the entry set alone, diff, lookups, listing."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import tree
from tests.conftest import MemoryBlocks

segment_st = st.text(alphabet="abcxyz_0123456789é", min_size=1, max_size=6)
keys_st = st.lists(
    st.lists(segment_st, min_size=1, max_size=3).map(lambda segs: ("/" + "/".join(segs)).encode()),
    max_size=300,
    unique=True,
)


def build(mem, entries):
    return tree.build_tree(iter(sorted(entries.items())), mem.emit)


def apply_in_batches(mem, ops, batch_sizes):
    root = tree.empty_tree(mem.emit)
    i = 0
    for n in batch_sizes:
        if i >= len(ops):
            break
        changes = dict(ops[i : i + n])
        i += n
        root = tree.mutate(root, changes, mem.load, mem.emit)
    if i < len(ops):
        root = tree.mutate(root, dict(ops[i:]), mem.load, mem.emit)
    return root


@settings(max_examples=150, deadline=None)
@given(keys=keys_st, seed=st.integers(0, 2**32), batches=st.lists(st.integers(1, 50), min_size=1, max_size=20))
def test_same_entries_any_order_any_batching_same_root(keys, seed, batches):
    mem = MemoryBlocks()
    entries = {k: b"v" + k for k in keys}
    expected = build(mem, entries)
    ops = list(entries.items())
    random.Random(seed).shuffle(ops)
    assert apply_in_batches(mem, ops, batches) == expected
    # Inserting extra keys and deleting them again also lands on the same root.
    extra = [(b"/zz" + k, b"x") for k in keys[:20]]
    root = tree.mutate(expected, dict(extra), mem.load, mem.emit)
    root = tree.mutate(root, {k: None for k, _ in extra}, mem.load, mem.emit)
    assert root == expected
    tree.check_shape(expected, mem.load)


@settings(max_examples=100, deadline=None)
@given(
    a=st.dictionaries(st.sampled_from([f"/k/{i}".encode() for i in range(200)]), st.binary(max_size=8), max_size=150),
    b=st.dictionaries(st.sampled_from([f"/k/{i}".encode() for i in range(200)]), st.binary(max_size=8), max_size=150),
)
def test_diff_applied_to_a_gives_b(a, b):
    mem = MemoryBlocks()
    ra, rb = build(mem, a), build(mem, b)
    changes = {k: new for k, _old, new in tree.diff(ra, rb, mem.load)}
    for k, old, new in tree.diff(ra, rb, mem.load):
        assert a.get(k) == old and b.get(k) == new
    assert tree.mutate(ra, changes, mem.load, mem.emit) == rb
    patched = dict(a)
    for k, v in changes.items():
        if v is None:
            del patched[k]
        else:
            patched[k] = v
    assert patched == b


def test_diff_reads_few_blocks_for_a_small_change(mem):
    entries = {f"/topics/t{i % 50}/{i:08d}".encode(): b"m%d" % i for i in range(20000)}
    r1 = build(mem, entries)
    r2 = tree.mutate(r1, {b"/topics/t7/x": b"new"}, mem.load, mem.emit)
    mem.reads = 0
    out = list(tree.diff(r1, r2, mem.load))
    assert out == [(b"/topics/t7/x", None, b"new")]
    depth = len(tree.path_nodes(r2, b"/topics/t7/x", mem.load))
    mem.reads = 0
    list(tree.diff(r1, r2, mem.load))
    assert mem.reads <= 2 * depth + 4


def test_lookup_and_prefix_listing(mem):
    entries = {f"/topics/{t}/{i:04d}".encode(): b"%d" % i for t in ("a", "ab", "b") for i in range(300)}
    entries[b"/profile.json"] = b"{}"
    root = build(mem, entries)
    assert tree.lookup(root, b"/topics/ab/0007", mem.load) == b"7"
    assert tree.lookup(root, b"/topics/ab/9999", mem.load) is None
    assert tree.lookup(root, b"/zzz", mem.load) is None
    listed = [k for k, _ in tree.iterate(root, b"/topics/a/", mem.load)]
    assert listed == sorted(k for k in entries if k.startswith(b"/topics/a/"))
    assert len(listed) == 300
    assert [k for k, _ in tree.iterate(root, b"/topics/a", mem.load)] == sorted(
        k for k in entries if k.startswith(b"/topics/a")
    )
    assert list(tree.iterate(root, b"/nothing/", mem.load)) == []


def test_deleting_everything_gives_the_empty_tree(mem):
    entries = {f"/e/{i}".encode(): b"x" for i in range(500)}
    root = build(mem, entries)
    empty = tree.empty_tree(mem.emit)
    assert tree.mutate(root, {k: None for k in entries}, mem.load, mem.emit) == empty
    assert list(tree.iterate(empty, b"/", mem.load)) == []


def test_node_sizes_stay_near_the_fanout(mem):
    entries = {f"/bench/{i:08d}".encode(): b"x" * 10 for i in range(20000)}
    root = build(mem, entries)
    sizes = []
    stack = [root]
    while stack:
        node = mem.load(stack.pop())
        sizes.append(len(node.keys))
        if node.level > 0:
            stack.extend(node.vals)
    mean = sum(sizes) / len(sizes)
    assert 6 <= mean <= 10


_paths = [f"/{top}/{i}".encode() for top in ("a", "ab", "b", "topics", "zz") for i in range(40)]


@settings(max_examples=100, deadline=None)
@given(
    a=st.dictionaries(st.sampled_from(_paths), st.binary(max_size=4), max_size=150),
    b=st.dictionaries(st.sampled_from(_paths), st.binary(max_size=4), max_size=150),
    prefixes=st.lists(st.sampled_from([b"/a", b"/a/", b"/ab/", b"/topics/", b"/zz/1", b"/q"]), min_size=1, max_size=2),
)
def test_diff_under_prefixes_is_the_full_diff_filtered(a, b, prefixes):
    mem = MemoryBlocks()
    ra, rb = build(mem, a), build(mem, b)
    full = [c for c in tree.diff(ra, rb, mem.load) if any(c[0].startswith(p) for p in prefixes)]
    assert list(tree.diff(ra, rb, mem.load, prefixes)) == full


def test_diff_under_a_prefix_reads_only_what_a_sparse_replica_holds(mem):
    entries = {f"/files/{i:06d}".encode(): b"f%d" % i for i in range(5000)}
    entries.update({f"/topics/t{i % 20}/{i:06d}".encode(): b"m%d" % i for i in range(3000)})
    r1 = build(mem, entries)
    r2 = tree.mutate(r1, {b"/topics/t3/new": b"x", b"/files/zzz": b"y", b"/files/000007": None}, mem.load, mem.emit)
    # a sparse replica: only the nodes a sync under /topics/ fetches (the same range rule)
    prefix = b"/topics/"
    wanted: set[bytes] = set()

    def walk(addr, low):
        wanted.add(addr)
        node = mem.load(addr)
        if node.level > 0:
            for k, h in zip(node.keys, node.vals):
                if k >= prefix and (low is None or low < prefix + b"\xff"):
                    walk(h, low)
                low = k

    walk(r1, None)
    walk(r2, None)
    sparse = MemoryBlocks()
    sparse.blocks = {h: mem.blocks[h] for h in wanted}
    assert len(sparse.blocks) < len(mem.blocks) / 2  # the /files/ subtrees are not there
    assert list(tree.diff(r1, r2, sparse.load, [prefix])) == [(b"/topics/t3/new", None, b"x")]


@settings(max_examples=100, deadline=None)
@given(
    start=st.dictionaries(st.sampled_from(_paths), st.binary(min_size=1, max_size=4), max_size=120),
    ops=st.lists(
        st.tuples(st.sampled_from(_paths + [b"/zzz/end", b"/0/first"]), st.none() | st.binary(min_size=1, max_size=4)),
        min_size=1,
        max_size=60,
    ),
)
def test_one_change_at_a_time_lands_on_the_root_of_the_final_set(start, ops):
    """Commits of one entry each (a chat post), puts, changes and deletes in any order,
    at the ends and in the middle of the key range, give the root of the final set."""
    mem = MemoryBlocks()
    root = build(mem, start)
    entries = dict(start)
    kept: dict[bytes, tree.Node] = {}  # nodes as a writer keeps them (with their columns)

    def load(address: bytes) -> tree.Node:
        return kept.get(address) or mem.load(address)

    def remember(address: bytes, node: tree.Node) -> None:
        assert node.cols == tree.columns(node.keys)  # patched columns: as if computed whole
        assert tree.node_block(node.level, node.keys, node.vals)[0] == address
        kept[address] = node

    for n, (key, value) in enumerate(ops):
        if value is None and key not in entries:
            continue
        before = dict(mem.blocks)
        new_root = tree.mutate(root, {key: value}, load if n % 2 else mem.load, mem.emit, remember)
        if value is None:
            del entries[key]
        else:
            entries[key] = value
        assert new_root == build(MemoryBlocks(), entries)
        tree.check_shape(new_root, mem.load)
        if value is not None and tree.key_level(key) == 0 and mem.load(new_root).level == mem.load(root).level:
            # a key that is no cut moves no boundary: one new node per level at most
            assert len(set(mem.blocks) - set(before)) <= mem.load(new_root).level + 1
        root = new_root
    assert dict(tree.iterate(root, b"/", mem.load)) == entries


def test_a_put_of_the_same_value_writes_nothing(mem):
    entries = {f"/t/{i:04d}".encode(): b"v%d" % i for i in range(300)}
    root = build(mem, entries)
    before = dict(mem.blocks)
    for k in list(entries)[::37]:
        assert tree.mutate(root, {k: entries[k]}, mem.load, mem.emit) == root
    assert mem.blocks == before


def test_appending_one_key_at_a_time_lands_on_the_built_root(mem):
    """Time-ordered keys (chat posts), each in a commit of its own, past a last key
    that is now and then a cut at one level or several: the root of the whole set."""
    entries = {f"/p/{i:05d}".encode(): b"s" for i in range(0, 600, 2)}
    root = build(mem, entries)
    for i in range(600, 1800):
        key = f"/p/{i:05d}".encode()
        root = tree.mutate(root, {key: b"a"}, mem.load, mem.emit)
        entries[key] = b"a"
        if i % 100 == 0:
            assert root == build(MemoryBlocks(), entries)
    assert root == build(MemoryBlocks(), entries)
    tree.check_shape(root, mem.load)


@given(keys=keys_st, probes=st.lists(st.binary(min_size=0, max_size=12), max_size=30))
def test_seek_finds_the_first_entry_at_or_after_a_key(keys, probes):
    mem = MemoryBlocks()
    entries = {k: b"v" + k[:8] for k in keys}
    root = build(mem, entries)
    ordered = sorted(entries)
    for probe in probes + ordered[:5] + [k + b"\x00" for k in ordered[:5]]:
        after = [k for k in ordered if k >= probe]
        assert tree.seek(root, probe, mem.load) == ((after[0], entries[after[0]]) if after else None)


def test_new_keys_of_every_level_inside_a_deep_tree_land_on_the_built_root():
    """One key at a time into the middle of a 3,000-entry tree (a post into a topic with
    paths after it): keys of a higher level split the nodes they land in."""
    rnd = random.Random(5)
    mem = MemoryBlocks()
    entries = {f"/t/{i * 1000:09d}".encode(): b"v" for i in range(3000)}
    root = build(mem, entries)
    levels = set()
    for n in range(400):
        key = f"/t/{rnd.randrange(3_000_000):09d}x".encode()
        levels.add(tree.key_level(key))
        entries[key] = b"n%d" % n
        root = tree.mutate(root, {key: entries[key]}, mem.load, mem.emit)
        if n % 25 == 0:
            assert root == build(MemoryBlocks(), entries)
    assert root == build(MemoryBlocks(), entries)
    assert max(levels) >= 2  # cuts on several levels were inserted
    tree.check_shape(root, mem.load)
