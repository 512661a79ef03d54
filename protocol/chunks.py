"""Large values: content-defined chunks under a chunk tree of their own.

A value longer than CHUNKING_THRESHOLD is cut by FastCDC 2020 (pyfastcdc: average
size parameter 8 KiB, minimum 4 KiB, maximum 32 KiB, normalized chunking 2, gear seed
0), so an edit moves only the chunks around it. Each chunk is a KIND_CHUNK block.

The chunk addresses, in order, form a sequence tree cut the same way as the path tree:
a chunk's *level* is the number of leading zero 4-bit groups of its address (fanout 16);
level 0 is cut right after every chunk of level >= 1, level L+1 (the list of level-L
nodes, each carrying the level of its last chunk) right after every node whose last
chunk has level >= L+2; the root is the first level with one node. A one-byte edit in
the middle of 64 MiB rewrites one or two chunks and one node per level (a few KiB),
where a flat list of chunk addresses would be 200 KiB.

Chunk-tree node payload (after the KIND_CHUNK_NODE byte), canonical msgpack:
``[level, [address...], [size...]]``: at level 0 the chunks and their lengths, above
the child nodes and the total bytes under each.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from pyfastcdc import FastCDC

from .encoding import pack_fast, unpack_canonical
from .errors import FormatError
from .hashing import HASH_SIZE, KIND_CHUNK, KIND_CHUNK_NODE, make_block
from .tree import CHUNKING_THRESHOLD, LevelStacker

__all__ = ["CHUNKING_THRESHOLD", "ChunkTreeBuilder", "chunk_file", "chunk_value"]

CDC_AVG, CDC_MIN, CDC_MAX, CDC_NORMALIZATION = 8192, 4096, 32768, 2
CHUNK_FANOUT_BITS = 4
MAX_CHUNK_LEVEL = 64 // CHUNK_FANOUT_BITS

Emit = Callable[[bytes, bytes], None]


def chunker() -> FastCDC:
    return FastCDC(CDC_AVG, min_size=CDC_MIN, max_size=CDC_MAX, normalized_chunking=CDC_NORMALIZATION)


def chunk_level(address: bytes) -> int:
    x = int.from_bytes(address[:8], "big")
    return (64 - x.bit_length()) // CHUNK_FANOUT_BITS


@dataclass(frozen=True, slots=True)
class ChunkNode:
    level: int
    addrs: list[bytes]
    sizes: list[int]


def encode_chunk_node(level: int, addrs: list[bytes], sizes: list[int]) -> bytes:
    return pack_fast([level, addrs, sizes])


def decode_chunk_node(payload: bytes) -> ChunkNode:
    obj = unpack_canonical(payload, "chunk-tree node", maps=False)
    if not (isinstance(obj, list) and len(obj) == 3):
        raise FormatError("chunk-tree node: expected [level, addresses, sizes]")
    level, addrs, sizes = obj
    if not (type(level) is int and 0 <= level <= MAX_CHUNK_LEVEL):
        raise FormatError(f"chunk-tree node: bad level {level!r}")
    if not (isinstance(addrs, list) and isinstance(sizes, list) and len(addrs) == len(sizes) and addrs):
        raise FormatError("chunk-tree node: bad columns")
    for a, s in zip(addrs, sizes):
        if not (isinstance(a, bytes) and len(a) == HASH_SIZE and type(s) is int and s > 0):
            raise FormatError("chunk-tree node: bad entry")
        if level == 0 and s > CDC_MAX:
            raise FormatError("chunk-tree node: chunk longer than the maximum")
    return ChunkNode(level, addrs, sizes)


class ChunkTreeBuilder:
    """Feed chunks in order with ``add``; ``finish`` returns ``(root, total_size)``."""

    def __init__(self, emit: Emit):
        self._emit = emit

        def close(level: int, items: list, is_root: bool) -> tuple:
            addrs = [it[0] for it in items]
            sizes = [it[1] for it in items]
            h, b = make_block(KIND_CHUNK_NODE, encode_chunk_node(level, addrs, sizes))
            emit(h, b)
            return (h, sum(sizes), items[-1][2])

        self._stacker = LevelStacker(close)
        self._size = 0

    def add(self, chunk: bytes | memoryview) -> None:
        h, b = make_block(KIND_CHUNK, chunk)  # one copy, also from a memoryview
        self._emit(h, b)
        self._size += len(chunk)
        self._stacker.add(0, (h, len(chunk), chunk_level(h)))

    def finish(self) -> tuple[bytes, int]:
        if self._size == 0:
            raise ValueError("a chunked value cannot be empty")
        root, size, _ = self._stacker.finish()
        return root, size


def chunk_value(data: bytes | memoryview, emit: Emit) -> tuple[bytes, int]:
    """Chunk a value held in memory; return its chunk-tree root and size."""
    builder = ChunkTreeBuilder(emit)
    for c in chunker().cut_buf(data):
        builder.add(c.data)
    return builder.finish()


def chunk_file(path: str, emit: Emit) -> tuple[bytes, int]:
    """Chunk a file without reading it whole into memory."""
    builder = ChunkTreeBuilder(emit)
    for c in chunker().cut_file(path):
        builder.add(c.data)
    return builder.finish()


LoadChunkNode = Callable[[bytes], ChunkNode]


def iter_chunk_addrs(root: bytes, load: LoadChunkNode, size: int) -> Iterator[tuple[bytes, int]]:
    """Yield ``(chunk address, length)`` in order for a value of ``size`` bytes.

    Checks on the way that every child is one level below its parent and holds exactly
    the bytes its parent says, and that the whole tree holds ``size`` bytes.
    """
    stack: list[tuple[bytes, int | None, int]] = [(root, None, size)]
    while stack:
        addr, level, total = stack.pop()
        node = load(addr)
        if level is not None and node.level != level:
            raise FormatError(f"chunk-tree node {addr.hex()} is at level {node.level}, expected {level}")
        if sum(node.sizes) != total:
            raise FormatError(f"chunk-tree node {addr.hex()} holds {sum(node.sizes)} bytes, expected {total}")
        if node.level == 0:
            yield from zip(node.addrs, node.sizes)
        else:
            for j in range(len(node.addrs) - 1, -1, -1):
                stack.append((node.addrs[j], node.level - 1, node.sizes[j]))


def walk_chunk_tree(root: bytes, load: LoadChunkNode, seen: set[bytes]) -> Iterable[tuple[int, bytes]]:
    """Yield ``(kind, address)`` of every node and chunk below ``root`` not yet in ``seen``."""
    stack = [root]
    while stack:
        node = load(stack.pop())
        kind = KIND_CHUNK if node.level == 0 else KIND_CHUNK_NODE
        for a in node.addrs:
            if a not in seen:
                seen.add(a)
                yield kind, a
                if node.level > 0:
                    stack.append(a)
