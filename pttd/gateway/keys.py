"""The gateway key: it seals every hosted user's secret key in the store.

From a key file (32 random bytes as hex, created 0600 on first start) or, when the
environment variable named in the config is set, from a passphrase through Argon2id
(salt kept in the store). A check value in the store tells at start-up whether the key
opens what is sealed there, so a wrong key file or passphrase is refused at once, never
discovered at the first login. Login tokens are signed with a key derived from it.
"""

from __future__ import annotations

import logging
import os

from blake3 import blake3
from nacl import pwhash
from nacl.exceptions import CryptoError
from nacl.secret import SecretBox
from nacl.signing import SigningKey
from nacl.utils import random

from ..errors import DataDirError, PttError
from ..store import Store

log = logging.getLogger("pttd.gateway")

_CHECK = b"pttd gateway key check v1"


def _read_key_file(path: str) -> bytes:
    try:
        st = os.stat(path)
        with open(path) as f:
            text = f.read().strip()
    except OSError as exc:
        raise DataDirError(f"cannot read gateway key file {path}: {exc.strerror}") from None
    if os.name == "posix" and st.st_mode & 0o077:
        raise DataDirError(f"gateway key file {path} is readable by others (mode {st.st_mode & 0o777:o}); chmod 600 it")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != SecretBox.KEY_SIZE:
        raise DataDirError(f"gateway key file {path} does not hold a key (64 hex digits)")
    return key


def _write_key_file(path: str, key: bytes) -> None:
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, key.hex().encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)


class GatewayKey:
    def __init__(self, key: bytes):
        self._box = SecretBox(key)
        self.token_secret = blake3(key, derive_key_context="pttd gateway login tokens v1").digest()

    @classmethod
    def load(cls, store: Store, key_file: str, passphrase: str | None) -> GatewayKey:
        if passphrase is not None:
            salt_hex = store.get_meta("gateway_kdf_salt")
            if salt_hex is None:
                salt_hex = random(pwhash.argon2id.SALTBYTES).hex()
                store.set_meta("gateway_kdf_salt", salt_hex)
            key = pwhash.argon2id.kdf(
                SecretBox.KEY_SIZE,
                passphrase.encode(),
                bytes.fromhex(salt_hex),
                opslimit=pwhash.argon2id.OPSLIMIT_MODERATE,
                memlimit=pwhash.argon2id.MEMLIMIT_MODERATE,
            )
            source = "the passphrase"
        else:
            if not os.path.exists(key_file):
                if store.get_meta("gateway_key_check") is not None:
                    raise DataDirError(
                        f"gateway key file {key_file} is missing, but this store holds keys sealed with one: "
                        "restore it from your backup (see docs/operations.md)"
                    )
                _write_key_file(key_file, random(SecretBox.KEY_SIZE))
                log.info("created gateway key file %s (back it up: it opens the hosted users' keys)", key_file)
            key = _read_key_file(key_file)
            source = f"key file {key_file}"
        gk = cls(key)
        check = store.get_meta("gateway_key_check")
        if check is None:
            store.set_meta("gateway_key_check", gk._box.encrypt(_CHECK).hex())
        else:
            try:
                ok = gk._box.decrypt(bytes.fromhex(check)) == _CHECK
            except CryptoError:
                ok = False
            if not ok:
                raise DataDirError(f"the gateway key from {source} does not open this store's sealed user keys")
        return gk

    def seal(self, sk: SigningKey) -> bytes:
        return bytes(self._box.encrypt(bytes(sk)))

    def unseal(self, sealed: bytes) -> SigningKey:
        try:
            return SigningKey(self._box.decrypt(sealed))
        except CryptoError:
            raise PttError("a hosted user's sealed key does not open with the gateway key") from None
