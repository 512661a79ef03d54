"""Canonical msgpack: one byte sequence per value, so hashes are reproducible.

Rules (docs/repository.md): integers and lengths in their shortest msgpack form, byte
strings as ``bin``, text as ``str``, maps with keys sorted by their encoded bytes, no
floats. msgpack-python's packer already emits the shortest forms; ``unpack_canonical``
rejects any input that does not re-encode to exactly the same bytes.
"""

from __future__ import annotations

import threading
from typing import Any

import msgpack

from .errors import FormatError


def _sort_maps(obj: Any) -> Any:
    if isinstance(obj, msgpack.ExtType):
        return obj
    if isinstance(obj, dict):
        items = [(msgpack.packb(k, use_bin_type=True), k, _sort_maps(v)) for k, v in obj.items()]
        items.sort(key=lambda t: t[0])
        return {k: v for _, k, v in items}
    if isinstance(obj, (list, tuple)):
        return [_sort_maps(x) for x in obj]
    return obj


def pack(obj: Any) -> bytes:
    """Canonical encoding of ``obj`` (maps sorted by encoded key)."""
    return msgpack.packb(_sort_maps(obj), use_bin_type=True)


_local = threading.local()


def pack_fast(obj: Any) -> bytes:
    """Encoding of an object known to be canonical as it is: no maps (tree nodes), or
    maps whose keys are already in canonical order (a commit's)."""
    # One packer per thread: msgpack.packb makes (and allocates a buffer for) a new one
    # per call, a third of the cost of encoding a tree node.
    packer = getattr(_local, "packer", None)
    if packer is None:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    out = packer.pack(obj)
    if len(out) > 1 << 20:
        _local.packer = None  # its buffer grew to this size: not kept for the thread's life
    return out


def unpack_canonical(data: bytes, what: str = "object", maps: bool = True) -> Any:
    """Decode ``data`` and insist that it is the canonical encoding of its value.

    With ``maps=False`` (tree nodes) the value must hold no maps, and the check skips
    the map-sorting pass.
    """
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise FormatError(f"{what}: not valid msgpack ({exc.__class__.__name__})") from None
    try:
        again = pack(obj) if maps else pack_fast(obj)
    except Exception:
        raise FormatError(f"{what}: holds values with no canonical encoding") from None
    if again != data:
        raise FormatError(f"{what}: not in canonical encoding")
    return obj
