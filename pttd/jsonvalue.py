"""JSON values as pttd takes them from clients and peers: only what every client's JSON
parser reads back the same. Python's json takes more than that: the constants NaN and
Infinity, numbers like 1e400 (read as infinity, and written back as ``Infinity``, which
no other parser reads), and nesting deep enough to exhaust the interpreter's stack."""

from __future__ import annotations

import json
import math


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    x = float(text)
    if math.isinf(x):
        raise ValueError(f"{text} is beyond the range of a JSON number")
    return x


def parse_json(raw):
    """The value of the JSON text ``raw`` (bytes or str); ValueError if it is not JSON
    or holds what a client could not read back (see the module's docstring)."""
    try:
        return json.loads(raw, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise ValueError("JSON nested too deep") from None
