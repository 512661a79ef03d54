"""Signed commits: one version of a repository.

Body (after the KIND_COMMIT byte), a canonical msgpack map of six fields: ``prev``
(address, nil for seq 0), ``repo`` (32-byte public key), ``root`` (tree address),
``seq`` (uint), ``time`` (uint milliseconds since the Unix epoch), ``v`` (1). Canonical
order sorts keys by their encoded bytes (shorter fixstr first): v, seq, prev, repo,
root, time. The commit's address is
blake3 of the block (kind byte + body). The signature is Ed25519 by the repository key
over ``SIGN_CONTEXT + block``; it is carried beside the block, not inside it, so the
address names the content alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from .encoding import pack_fast, unpack_canonical
from .errors import FormatError, SignatureError
from .hashing import HASH_SIZE, KIND_COMMIT, hash_bytes

SIGN_CONTEXT = b"pttd/commit/v1\n"
COMMIT_VERSION = 1
MAX_COMMIT_BYTES = 512


@dataclass(frozen=True, slots=True)
class Commit:
    repo: bytes
    seq: int
    root: bytes
    prev: bytes | None
    time: int

    def encode(self) -> bytes:
        # The map in its canonical key order already (v, seq, prev, repo, root, time:
        # by encoded key bytes), so it is packed as it is, without sorting.
        body = pack_fast(
            {
                "v": COMMIT_VERSION,
                "seq": self.seq,
                "prev": self.prev,
                "repo": self.repo,
                "root": self.root,
                "time": self.time,
            }
        )
        return bytes((KIND_COMMIT,)) + body


@dataclass(frozen=True, slots=True)
class SignedCommit:
    commit: Commit
    block: bytes  # kind byte + body
    signature: bytes

    @property
    def address(self) -> bytes:
        return hash_bytes(self.block)

    @property
    def seq(self) -> int:
        return self.commit.seq


def sign_commit(commit: Commit, key: SigningKey) -> SignedCommit:
    if bytes(key.verify_key) != commit.repo:
        raise ValueError("signing key does not belong to the commit's repository")
    block = commit.encode()
    sig = key.sign(SIGN_CONTEXT + block).signature
    return SignedCommit(commit, block, sig)


def decode_commit(block: bytes) -> Commit:
    if len(block) > MAX_COMMIT_BYTES:
        raise FormatError("commit: too long")
    if not block or block[0] != KIND_COMMIT:
        raise FormatError("commit: wrong kind byte")
    obj = unpack_canonical(block[1:], "commit")
    if not isinstance(obj, dict) or set(obj) != {"prev", "repo", "root", "seq", "time", "v"}:
        raise FormatError("commit: expected the fields prev, repo, root, seq, time, v")
    if type(obj["v"]) is not int or obj["v"] != COMMIT_VERSION:
        raise FormatError(f"commit: unknown version {obj['v']!r}")
    repo, root, prev, seq, time = obj["repo"], obj["root"], obj["prev"], obj["seq"], obj["time"]
    for name, val in (("repo", repo), ("root", root)):
        if not (isinstance(val, bytes) and len(val) == HASH_SIZE):
            raise FormatError(f"commit: {name} is not 32 bytes")
    if prev is not None and not (isinstance(prev, bytes) and len(prev) == HASH_SIZE):
        raise FormatError("commit: prev is not 32 bytes")
    if not (type(seq) is int and seq >= 0 and type(time) is int and time >= 0):
        raise FormatError("commit: seq and time must be non-negative integers")
    if (seq == 0) != (prev is None):
        raise FormatError("commit: only seq 0 has no prev")
    return Commit(repo, seq, root, prev, time)


def verify_commit(block: bytes, signature: bytes, repo: bytes | None = None) -> SignedCommit:
    """Decode and check a signed commit; ``repo`` if given must be its repository."""
    commit = decode_commit(block)
    if repo is not None and commit.repo != repo:
        raise FormatError(f"commit is for repository {commit.repo.hex()}, not {repo.hex()}")
    try:
        VerifyKey(commit.repo).verify(SIGN_CONTEXT + block, signature)
    except (BadSignatureError, ValueError, TypeError):
        raise SignatureError(f"commit seq {commit.seq} of {commit.repo.hex()}: bad signature") from None
    return SignedCommit(commit, block, signature)
