"""Secret key files: one per owned repository, ``keys/<public hex>.key``, mode 0600.

A file holds the 32-byte Ed25519 seed as hex and a newline. It is written to a
temporary name, fsynced and renamed, so a crash never leaves half a key.
"""

from __future__ import annotations

import os
import stat

from nacl.signing import SigningKey, VerifyKey

from .errors import DataDirError


def is_public_key(key: bytes) -> bool:
    """Whether 32 bytes are an Ed25519 public key (a point of the curve): what can sign,
    and what a direct message can be sealed to."""
    try:
        VerifyKey(key).to_curve25519_public_key()
    except Exception:  # nacl's errors for a bad point are not all of one type
        return False
    return True


class KeyStore:
    def __init__(self, directory: str):
        self.directory = directory

    def _path(self, public_hex: str) -> str:
        return os.path.join(self.directory, f"{public_hex}.key")

    def create(self) -> SigningKey:
        key = SigningKey.generate()
        self.save(key)
        return key

    def save(self, key: SigningKey) -> None:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        public_hex = bytes(key.verify_key).hex()
        path = self._path(public_hex)
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, bytes(key).hex().encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        dfd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def has(self, public_hex: str) -> bool:
        return os.path.exists(self._path(public_hex))

    def load(self, public_hex: str) -> SigningKey:
        path = self._path(public_hex)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise DataDirError(f"no secret key for repository {public_hex} (expected {path})") from None
        if os.name == "posix" and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise DataDirError(f"secret key file {path} is accessible by other users; run: chmod 600 {path}")
        with open(path, "rb") as f:
            text = f.read().strip()
        try:
            key = SigningKey(bytes.fromhex(text.decode("ascii")))
        except (ValueError, UnicodeDecodeError):
            raise DataDirError(f"secret key file {path} is not a 64-digit hex seed") from None
        if bytes(key.verify_key).hex() != public_hex:
            raise DataDirError(f"secret key file {path} holds the key of another repository")
        return key
