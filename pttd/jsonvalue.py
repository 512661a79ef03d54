"""JSON values as pttd takes them from clients and peers and writes them back: only
what every client's JSON parser reads the same.

orjson (Rust) parses and writes; it is 10-20 times faster than the standard library
here (a post's body, its stored value, its event and its answer went through json four
times, ~25 us of a post's ~750 us) and stricter where strictness matters: it refuses the
constants NaN and Infinity, numbers beyond a double's range such as 1e400 (Python's json
reads them as infinity and writes them back as ``Infinity``, which no other parser
reads), lone surrogates and invalid UTF-8; ``parse_json`` refuses nesting deeper than
MAX_DEPTH levels. Integers beyond 64 bits are read as doubles, as JavaScript
clients read them.
"""

from __future__ import annotations

import json

import orjson

MAX_DEPTH = 64  # arrays and objects inside each other, at most


class TooDeep(ValueError):
    """JSON nesting arrays and objects deeper than MAX_DEPTH levels."""


def parse_json(raw):
    """The value of the JSON text ``raw`` (bytes or str); ValueError if it is not JSON,
    holds what a client could not read back (see the module's docstring), or nests
    arrays and objects deeper than MAX_DEPTH levels (no chat value needs more, and
    Python's own recursion, pickling a write for the writer process say, gives out
    long before orjson's 1,024)."""
    try:
        value = orjson.loads(raw)  # orjson.JSONDecodeError is a ValueError
    except orjson.JSONDecodeError as exc:
        if str(exc).startswith("depth limit exceeded"):  # orjson's own, at 1,024
            raise TooDeep(f"arrays and objects nested deeper than {MAX_DEPTH} levels") from None
        raise
    if isinstance(value, (dict, list)) and _too_deep(value):
        raise TooDeep(f"arrays and objects nested deeper than {MAX_DEPTH} levels")
    return value


def _too_deep(value) -> bool:
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        for child in v.values() if isinstance(v, dict) else v:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return False


def dumps(obj, sort_keys: bool = False) -> bytes:
    """``obj`` as compact UTF-8 JSON (keys sorted with ``sort_keys``: a stored value's
    bytes depend only on its content)."""
    try:
        return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS if sort_keys else 0)
    except TypeError:  # what orjson does not write (keys that are not strings, say)
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False, sort_keys=sort_keys).encode()
