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
# Anything that may break a rule: a control character, an empty segment (including a
# trailing '/'), or a '.' or '..' segment.
_SUSPECT = re.compile(r"[\x00-\x1f\x7f]|//|/\.\.?(?:/|$)|/$")


def validate_path(path: str) -> bytes:
    """Return the UTF-8 key for ``path``, or raise PathError naming the problem."""
    # One regex and one encode for a good path (this runs once per written entry); the
    # checks below only name what is wrong.
    if type(path) is str and path[:1] == "/" and not _SUSPECT.search(path):
        try:
            key = path.encode("utf-8")
        except UnicodeEncodeError:
            raise PathError(f"path {path!r} is not valid UTF-8") from None
        if len(key) <= MAX_PATH_BYTES:
            return key
        raise PathError(f"path is {len(key)} bytes long, more than {MAX_PATH_BYTES}")
    if not isinstance(path, str):
        raise PathError("path must be text")
    if not path.startswith("/"):
        raise PathError(f"path {path!r} is not absolute (must start with '/')")
    if path == "/":
        raise PathError("path '/' names the whole repository, not an entry")
    if _CONTROL.search(path):
        raise PathError(f"path {path!r} contains a control character")
    for segment in path[1:].split("/"):
        if segment == "":
            raise PathError(f"path {path!r} has an empty segment")
        if segment in (".", ".."):
            raise PathError(f"path {path!r} has a '{segment}' segment")
    raise AssertionError(f"path {path!r} matched no rule")  # _SUSPECT and the rules disagree


def validate_prefix(prefix: str) -> bytes:
    """A listing prefix: '' or '/' for everything, else a path, optionally ending in '/'."""
    if prefix in ("", "/"):
        return b"/"
    body = prefix[:-1] if prefix.endswith("/") else prefix
    key = validate_path(body)
    return key + b"/" if prefix.endswith("/") else key


def key_to_path(key: bytes) -> str:
    return key.decode("utf-8")
