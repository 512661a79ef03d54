"""Errors raised by the format layer. Each names what was wrong, for a one-line report."""


class FormatError(ValueError):
    """Bytes that do not decode to a valid object of the expected kind."""


class PathError(ValueError):
    """A repository path that breaks the path rules (see protocol.paths)."""


class SignatureError(ValueError):
    """A signed object whose signature does not verify against its key."""
