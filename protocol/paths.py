"""Repository paths: the keys of a repository's map.

A path is text: it starts with ``/``, its segments are separated by single ``/``, no
segment is empty, ``.`` or ``..``, it has no NUL or other control characters, and its
UTF-8 form is at most MAX_PATH_BYTES long. The tree orders paths by their UTF-8 bytes.
"""

from __future__ import annotations

import re

from .errors import PathError

MAX_PATH_BYTES = 1024
_CONTROL = re.compile("[\x00-\x1f\x7f]")


def validate_path(path: str) -> bytes:
    """Return the UTF-8 key for ``path``, or raise PathError naming the problem."""
    if not isinstance(path, str):
        raise PathError("path must be text")
    if not path.startswith("/"):
        raise PathError(f"path {path!r} is not absolute (must start with '/')")
    if path == "/":
        raise PathError("path '/' names the whole repository, not an entry")
    try:
        key = path.encode("utf-8")
    except UnicodeEncodeError:
        raise PathError(f"path {path!r} is not valid UTF-8") from None
    if len(key) > MAX_PATH_BYTES:
        raise PathError(f"path is {len(key)} bytes long, more than {MAX_PATH_BYTES}")
    if _CONTROL.search(path):
        raise PathError(f"path {path!r} contains a control character")
    # Whole-string searches (C speed) first; the per-segment loop only to name the problem.
    padded = path + "/"
    if "//" in padded or "/./" in padded or "/../" in padded:
        for segment in path[1:].split("/"):
            if segment == "":
                raise PathError(f"path {path!r} has an empty segment")
            if segment in (".", ".."):
                raise PathError(f"path {path!r} has a '{segment}' segment")
    return key


def validate_prefix(prefix: str) -> bytes:
    """A listing prefix: '' or '/' for everything, else a path, optionally ending in '/'."""
    if prefix in ("", "/"):
        return b"/"
    body = prefix[:-1] if prefix.endswith("/") else prefix
    key = validate_path(body)
    return key + b"/" if prefix.endswith("/") else key


def key_to_path(key: bytes) -> str:
    return key.decode("utf-8")
