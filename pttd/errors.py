"""Errors the daemon reports to its users: each message is one line naming the problem."""

import sqlite3

from protocol.errors import FormatError, PathError, SignatureError


class PttError(Exception):
    """Base of every error pttd reports to a user (never shown as a traceback)."""


class NotFound(PttError):
    """A path, version or repository that does not exist."""


class Conflict(PttError):
    """A request that contradicts what is stored (already exists, lower seq, fork)."""


class CorruptBlock(PttError):
    """A stored block whose bytes no longer match its address."""

    def __init__(self, address: bytes, detail: str = "does not match its hash"):
        super().__init__(f"corrupt block {address.hex()}: {detail}")
        self.address = address


class MissingBlock(PttError):
    """A block the tree refers to that the store does not hold."""

    def __init__(self, address: bytes):
        super().__init__(f"missing block {address.hex()}")
        self.address = address


class DataDirError(PttError):
    """A data directory that is missing, not initialized, or unusable."""


class RollbackRefused(Conflict):
    """A signed commit older than the head already held."""


class ForkDetected(Conflict):
    """Two different signed commits with the same seq: the writer forked its history."""


class Unauthorized(PttError):
    """A missing, expired or forged token, or wrong credentials (HTTP 401)."""


class Forbidden(PttError):
    """A call this daemon does not allow (HTTP 403)."""


class TooLarge(PttError):
    """A request body over its limit (HTTP 413)."""


class TooMany(PttError):
    """Too many attempts (HTTP 429, with Retry-After)."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after
        self.headers = {"Retry-After": str(retry_after)}

    def __reduce__(self):  # rebuilt from its parts (it may cross from the writer process)
        return (TooMany, (str(self), self.retry_after))


class Busy(PttError):
    """The daemon cannot take this request now (HTTP 503, with Retry-After)."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after
        self.headers = {"Retry-After": str(retry_after)}


class ServerError(PttError):
    """A failure of the daemon, not of the request (HTTP 500)."""


class StoreBusy(ServerError, sqlite3.OperationalError):
    """The store's write lock stayed with another process past the busy timeout. Still
    an sqlite3 error, so that whatever fails a group of writes on a store failure does."""


USER_ERRORS = (PttError, FormatError, PathError, SignatureError)
