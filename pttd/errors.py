"""Errors the daemon reports to its users: each message is one line naming the problem."""

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


USER_ERRORS = (PttError, FormatError, PathError, SignatureError)
