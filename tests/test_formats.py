"""Formats: canonical encoding, node and commit decoding, paths, hashing."""

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nacl.signing import SigningKey

from protocol import tree
from protocol.chunks import decode_chunk_node
from protocol.commit import Commit, decode_commit, sign_commit, verify_commit
from protocol.encoding import pack, unpack_canonical
from protocol.errors import FormatError, PathError, SignatureError
from protocol.hashing import KIND_NODE, check_block, make_block
from protocol.paths import validate_path, validate_prefix


def test_kind_byte_separates_domains():
    h1, b1 = make_block(1, b"same")
    h2, b2 = make_block(2, b"same")
    assert h1 != h2 and b1[1:] == b2[1:]
    check_block(h1, b1)
    with pytest.raises(FormatError):
        check_block(h1, b2)


def test_canonical_maps_are_sorted_and_others_rejected():
    assert pack({"b": 1, "a": 2}) == pack({"a": 2, "b": 1})
    unsorted = msgpack.packb({"b": 1, "a": 2})
    with pytest.raises(FormatError, match="canonical"):
        unpack_canonical(unsorted)
    long_int = b"\xcd\x00\x05"  # uint16 holding 5: not the shortest form
    with pytest.raises(FormatError, match="canonical"):
        unpack_canonical(long_int)


def test_node_decoder_rejects_bad_nodes():
    good = tree.encode_node(0, [b"/a", b"/b"], [b"x", b"y"])
    assert tree.decode_node(good).keys == [b"/a", b"/b"]
    bad = [
        msgpack.packb([0, [0, 0], [b"/b", b"/a"], [b"x", b"y"]]),  # out of order
        msgpack.packb([0, [0], [b"/a"], [b"x" * 65]]),  # inline value too long
        msgpack.packb([1, [0], [b"/a"], [b"short"]]),  # child address not 32 bytes
        msgpack.packb([0, [0, 5], [b"/a", b"b"], [b"x", b"y"]]),  # prefix longer than previous key
        msgpack.packb([0, [0], [b"/a"]]),  # wrong arity
        msgpack.packb([0, [0, 0], [b"/a", b"/b"], [b"x", b"y"]]),  # prefix not maximal: non-canonical
        msgpack.packb([False, [0], [b"/a"], [b"x"]]),  # a boolean is not a level
        msgpack.packb([0, [0], [b"no-slash"], [b"x"]]),  # a key that is not a path
        msgpack.packb([0, [0], [b"/\xff"], [b"x"]]),  # a key that is not UTF-8
        msgpack.packb([0, [0], [b"/a"], [msgpack.ExtType(2, b"h" * 32 + (10).to_bytes(8, "big"))]]),  # tiny chunked
        msgpack.packb([0, [0], [b"/a"], [msgpack.ExtType(1, b"h" * 32)]]),  # block reference without its size
        msgpack.packb([0, [0], [b"/a"], [msgpack.ExtType(1, b"h" * 32 + (10).to_bytes(4, "big"))]]),  # inline-sized
        b"\xc1",  # never-used msgpack byte
    ]
    for payload in bad:
        with pytest.raises(FormatError):
            tree.decode_node(payload)


@given(st.binary(max_size=200))
def test_node_and_chunk_decoders_never_crash_on_garbage(data):
    for decode in (tree.decode_node, decode_chunk_node, lambda d: decode_commit(b"\x05" + d)):
        try:
            decode(data)
        except FormatError:
            pass


def test_commit_sign_verify_and_tamper():
    sk = SigningKey(bytes(32))
    repo = bytes(sk.verify_key)
    sc = sign_commit(Commit(repo, 1, b"r" * 32, b"p" * 32, 1700000000000), sk)
    assert verify_commit(sc.block, sc.signature, repo).commit == sc.commit
    assert decode_commit(sc.block).seq == 1
    flipped = bytearray(sc.block)
    flipped[-2] ^= 1
    with pytest.raises((SignatureError, FormatError)):
        verify_commit(bytes(flipped), sc.signature, repo)
    other = SigningKey(bytes([1]) * 32)
    with pytest.raises(FormatError, match="not"):
        verify_commit(sc.block, sc.signature, bytes(other.verify_key))
    with pytest.raises(ValueError):
        sign_commit(Commit(repo, 1, b"r" * 32, b"p" * 32, 1), other)


def test_node_block_kind():
    h, b = tree.node_block(0, [], [])
    assert b[0] == KIND_NODE


@pytest.mark.parametrize(
    "path,problem",
    [
        ("relative", "not absolute"),
        ("/a//b", "empty segment"),
        ("/a/../b", "'..'"),
        ("/a/./b", "'.'"),
        ("/a/", "empty segment"),
        ("/", "whole repository"),
        ("/a\x00b", "control"),
        ("/" + "x" * 1024, "more than"),
        ("/\udcff", "UTF-8"),
    ],
)
def test_bad_paths_are_refused_with_the_reason(path, problem):
    with pytest.raises(PathError, match=problem):
        validate_path(path)


def test_good_paths_and_prefixes():
    assert validate_path("/topics/général/1700000000") == "/topics/général/1700000000".encode()
    assert validate_prefix("") == b"/"
    assert validate_prefix("/topics/") == b"/topics/"
    assert validate_prefix("/topics") == b"/topics"


def _reference_path_ok(path: str) -> bool:
    if not path.startswith("/") or path == "/":
        return False
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        return False
    try:
        if len(path.encode("utf-8")) > 1024:
            return False
    except UnicodeEncodeError:
        return False
    return all(seg not in ("", ".", "..") for seg in path[1:].split("/"))


@given(st.text(alphabet="/a.\x00\x7fé\udcff", max_size=12))
def test_path_validation_matches_the_rules(path):
    try:
        validate_path(path)
        ok = True
    except PathError:
        ok = False
    assert ok == _reference_path_ok(path)


def test_chunk_tree_sizes_are_checked_on_read():
    import random

    from protocol.chunks import chunk_value, decode_chunk_node, encode_chunk_node, iter_chunk_addrs
    from protocol.hashing import KIND_CHUNK_NODE

    blocks = {}
    data = random.Random(7).randbytes(3_000_000)  # ~300 chunks: the root is an inner node
    root, size = chunk_value(data, lambda h, b: blocks.__setitem__(h, b))

    def load(h):
        return decode_chunk_node(blocks[h][1:])

    assert sum(n for _, n in iter_chunk_addrs(root, load, size)) == size
    with pytest.raises(FormatError, match="holds"):
        list(iter_chunk_addrs(root, load, size + 1))
    node = load(root)
    assert node.level > 0
    lying = list(node.sizes)
    lying[0] += 1  # the parent claims one byte more than its first child holds
    h, b = make_block(KIND_CHUNK_NODE, encode_chunk_node(node.level, node.addrs, lying))
    blocks[h] = b
    with pytest.raises(FormatError, match="holds"):
        list(iter_chunk_addrs(h, load, size + 1))


def test_the_threads_packer_does_not_keep_a_large_buffer():
    """pack_fast reuses one packer per thread; one that packed over 1 MiB (a big node
    of a first commit, say) is let go, so that the thread does not hold that much for
    its life. Its output is the same as a fresh packer's, before and after."""
    import threading

    from protocol import encoding

    small = [0, [b"a" * 10], [b"b"]]
    big = [0, [b"k%07d" % i for i in range(40_000)], [b"v" * 20] * 40_000]
    out: dict = {}

    def work() -> None:
        out["small"] = encoding.pack_fast(small)
        first = encoding._local.packer
        out["big"] = encoding.pack_fast(big)
        out["dropped"] = encoding._local.packer is None
        out["again"] = encoding.pack_fast(small)
        out["new"] = encoding._local.packer is not None and encoding._local.packer is not first

    t = threading.Thread(target=work)  # a thread of its own: its own packer
    t.start()
    t.join(30)
    assert len(out["big"]) > 1 << 20 and out["big"] == msgpack.packb(big, use_bin_type=True)
    assert out["dropped"] and out["new"]
    assert out["small"] == out["again"] == msgpack.packb(small, use_bin_type=True)
