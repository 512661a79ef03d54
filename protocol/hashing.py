"""Content addressing: every stored object is a *block*, one kind byte then a payload.

A block's address is blake3 of its full bytes, kind byte included, so two objects of
different kinds can never share an address (domain separation by construction), and a
receiver checks any block with a single ``blake3(block) == address``.
"""

from __future__ import annotations

from blake3 import blake3

from .errors import FormatError

HASH_SIZE = 32

# Kind bytes: the first byte of every block (and of a few non-block hash inputs).
KIND_VALUE = 0x01  # a whole value stored as one block
KIND_NODE = 0x02  # a node of the path tree (the repository index)
KIND_CHUNK = 0x03  # one content-defined chunk of a large value
KIND_CHUNK_NODE = 0x04  # a node of a large value's chunk tree
KIND_COMMIT = 0x05  # a commit body (signed separately)
KIND_KEY_LEVEL = 0x10  # not a block: hash input for a path's tree level

BLOCK_KINDS = frozenset({KIND_VALUE, KIND_NODE, KIND_CHUNK, KIND_CHUNK_NODE, KIND_COMMIT})


def hash_bytes(data: bytes) -> bytes:
    """blake3-256 of ``data``."""
    return blake3(data).digest()


_KIND_PREFIX = [bytes((k,)) for k in range(256)]


def make_block(kind: int, payload: bytes) -> tuple[bytes, bytes]:
    """Return ``(address, block)`` for a payload of the given kind."""
    block = _KIND_PREFIX[kind] + payload
    return blake3(block).digest(), block


def check_block(address: bytes, block: bytes) -> None:
    """Raise FormatError unless ``block`` hashes to ``address`` and has a known kind."""
    if blake3(block).digest() != address:
        raise FormatError(f"block {address.hex()} does not match its hash")
    if not block or block[0] not in BLOCK_KINDS:
        raise FormatError(f"block {address.hex()} has an unknown kind byte")


def block_kind(block: bytes) -> int:
    if not block:
        raise FormatError("empty block")
    return block[0]
