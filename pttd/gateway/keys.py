"""The gateway key: it seals every hosted user's secret key in the store.

From a key file (32 random bytes as hex, created 0600 on first start) or, when the
environment variable named in the config is set, from a passphrase through Argon2id
(salt kept in the store). A check value in the store tells at start-up whether the key
opens what is sealed there, so a wrong key file or passphrase is refused at once, never
discovered at the first login. The secret that signs login tokens is random, kept in the
store sealed with the gateway key: rotating the gateway key (``rekey``) re-seals it, so
nobody is logged out by a rotation.
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
        self.token_secret = b""  # set by load(): from the store
        self.old_secret: bytes | None = None  # the one before a rotation, accepted until old_until
        self.old_until = 0.0

    @staticmethod
    def from_passphrase(passphrase: str, salt: bytes) -> bytes:
        return pwhash.argon2id.kdf(
            SecretBox.KEY_SIZE,
            passphrase.encode(),
            salt,
            opslimit=pwhash.argon2id.OPSLIMIT_MODERATE,
            memlimit=pwhash.argon2id.MEMLIMIT_MODERATE,
        )

    @classmethod
    def load(cls, store: Store, key_file: str, passphrase: str | None, passphrase_env: str = "") -> GatewayKey:
        """The gateway key from ``passphrase`` when given (from ``$passphrase_env``), else
        from ``key_file`` (created on a store that has sealed nothing yet)."""
        if passphrase is not None and not passphrase:
            raise DataDirError(f"${passphrase_env or 'the passphrase variable'} is set but empty")
        if passphrase is None and store.get_meta("gateway_kdf_salt") is not None:
            raise DataDirError(
                f"this store's user keys are sealed with a passphrase: set ${passphrase_env or 'PTTD_GATEWAY_PASSPHRASE'}"
            )
        if passphrase is not None:
            salt_hex = store.get_meta("gateway_kdf_salt")
            if salt_hex is None:
                if store.get_meta("gateway_key_check") is not None:
                    raise DataDirError("this store's user keys are sealed with a key file, not a passphrase")
                salt_hex = random(pwhash.argon2id.SALTBYTES).hex()
                store.set_meta("gateway_kdf_salt", salt_hex)
            key = cls.from_passphrase(passphrase, bytes.fromhex(salt_hex))
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
        log.info("hosted users' keys are sealed with the gateway key from %s", source)
        sealed = store.get_meta("gateway_token_secret")
        if sealed is None:
            secret = random(32)
            store.set_meta("gateway_token_secret", gk._box.encrypt(secret).hex())
        else:
            try:
                secret = gk._box.decrypt(bytes.fromhex(sealed))
            except (CryptoError, ValueError):
                raise DataDirError(
                    "the token-signing secret in this store does not open with the gateway key"
                ) from None
        gk.token_secret = secret
        old = store.get_meta("gateway_token_old")
        if old is not None:
            try:
                until, sealed_old = old.split(":", 1)
                gk.old_secret, gk.old_until = gk._box.decrypt(bytes.fromhex(sealed_old)), float(until)
            except (CryptoError, ValueError):
                raise DataDirError("the previous token-signing secret does not open with the gateway key") from None
        return gk

    @staticmethod
    def kid(secret: bytes) -> str:
        """Names a signing secret in a token's header, without revealing it."""
        return blake3(secret, derive_key_context="pttd gateway token key id v1").hexdigest()[:16]

    def secret_for(self, kid: str | None, now: float) -> bytes | None:
        """The secret a token's ``kid`` names: the current one (also for no kid), or the
        one before a rotation until its tokens have expired."""
        if kid is None or kid == self.kid(self.token_secret):
            return self.token_secret
        if self.old_secret is not None and kid == self.kid(self.old_secret) and now < self.old_until:
            return self.old_secret
        return None

    def accepts(self, secret: bytes, now: float) -> bool:
        """Whether tokens signed with ``secret`` (as returned by ``secret_for``) are still
        accepted: it is the current secret, or the one before within its grace."""
        return secret is self.token_secret or (secret is self.old_secret and now < self.old_until)

    def rotate_token_secret(self, store: Store, keep_old_for: float) -> str:
        """A new token-signing secret; the current one still accepted for ``keep_old_for``
        seconds (its tokens' lifetime), so nobody is logged out at once."""
        import time

        new = random(32)
        until = time.time() + keep_old_for
        with store.write():
            store.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('gateway_token_secret', ?)",
                (self._box.encrypt(new).hex(),),
            )
            store.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('gateway_token_old', ?)",
                (f"{until}:{self._box.encrypt(self.token_secret).hex()}",),
            )
        self.old_secret, self.old_until, self.token_secret = self.token_secret, until, new
        return self.kid(new)

    def seal(self, sk: SigningKey) -> bytes:
        return bytes(self._box.encrypt(bytes(sk)))

    def seal_bytes(self, data: bytes) -> bytes:
        return bytes(self._box.encrypt(data))

    def unseal(self, sealed: bytes) -> SigningKey:
        try:
            return SigningKey(self._box.decrypt(sealed))
        except CryptoError:
            raise PttError("a hosted user's sealed key does not open with the gateway key") from None


def rekey(store: Store, old: GatewayKey, new_key_file: str | None, new_passphrase: str | None) -> int:
    """Seal everything sealed with ``old`` with a new gateway key instead, in one
    transaction: the hosted users' keys, the token-signing secret and the check value.
    The new key comes from a key file (created if it does not exist) or a passphrase.
    Returns the number of user keys re-sealed."""
    salt_hex = None
    if new_passphrase is not None:
        salt_hex = random(pwhash.argon2id.SALTBYTES).hex()
        new_key = GatewayKey.from_passphrase(new_passphrase, bytes.fromhex(salt_hex))
    else:
        if not os.path.exists(new_key_file):
            _write_key_file(new_key_file, random(SecretBox.KEY_SIZE))
            log.info("created gateway key file %s", new_key_file)
        new_key = _read_key_file(new_key_file)
    new = GatewayKey(new_key)
    # users logged in with their own key have nothing sealed here (sealed_key is empty)
    rows = store.query("SELECT name, sealed_key FROM gw_users WHERE length(sealed_key) > 0")
    resealed = [(new.seal(old.unseal(sealed)), name) for name, sealed in rows]  # all opened before any write
    with store.write():
        for sealed, name in resealed:
            store.execute("UPDATE gw_users SET sealed_key=? WHERE name=?", (sealed, name))
        store.execute(
            "INSERT OR REPLACE INTO meta(key, value) VALUES ('gateway_key_check', ?)", (new._box.encrypt(_CHECK).hex(),)
        )
        store.execute(
            "INSERT OR REPLACE INTO meta(key, value) VALUES ('gateway_token_secret', ?)",
            (new._box.encrypt(old.token_secret).hex(),),
        )
        if old.old_secret is not None:
            store.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('gateway_token_old', ?)",
                (f"{old.old_until}:{new._box.encrypt(old.old_secret).hex()}",),
            )
        if salt_hex is not None:
            store.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('gateway_kdf_salt', ?)", (salt_hex,))
        else:
            store.execute("DELETE FROM meta WHERE key='gateway_kdf_salt'")
    return len(resealed)
