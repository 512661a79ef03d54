"""An account export: a hosted user's repository key pair, sealed with a passphrase, so
that the user can take the repository to their own node or to another gateway.

The file is JSON (``pttctl user export NAME -o FILE``)::

    {"format": "pttd-account", "version": 1, "key": "<repository key, hex>",
     "kdf": {"name": "argon2id", "salt": hex, "opslimit": n, "memlimit": n},
     "nonce": hex, "sealed": hex}

``sealed`` is XSalsa20-Poly1305 (PyNaCl's SecretBox) under a key derived from the
passphrase with Argon2id; it opens to JSON ``{"seed": hex, "name", "password", "head"}``:
the Ed25519 seed of the repository key, the login name and its Argon2id password hash (or
null), so that the same login works at the new gateway, and the newest version signed at
the old home, which an import must reach before signing any. The repository's data is not in
the file: it is public and signed, and the new gateway syncs it from the network.
"""

from __future__ import annotations

import json

from nacl import pwhash
from nacl.exceptions import CryptoError
from nacl.secret import SecretBox
from nacl.signing import SigningKey
from nacl.utils import random

from ..errors import PttError

FORMAT = "pttd-account"
VERSION = 1
OPSLIMIT = pwhash.argon2id.OPSLIMIT_MODERATE
MEMLIMIT = pwhash.argon2id.MEMLIMIT_MODERATE
# what an import accepts: a file cannot make us spend more than this (or too little)
MAX_OPSLIMIT = pwhash.argon2id.OPSLIMIT_SENSITIVE
MAX_MEMLIMIT = pwhash.argon2id.MEMLIMIT_MODERATE  # 256 MiB: what an export uses, no more
MIN_PASSPHRASE = 8
MAX_FILE = 64 << 10


class AccountFileError(PttError):
    """An account file that is not one, or a wrong passphrase."""


def _check_passphrase(passphrase) -> bytes:
    if not isinstance(passphrase, str) or len(passphrase) < MIN_PASSPHRASE:
        raise AccountFileError(f"the passphrase must be at least {MIN_PASSPHRASE} characters")
    return passphrase.encode()


def seal_account(
    sk: SigningKey, name: str, password_hash: str | None, passphrase: str, head: int | None = None
) -> dict:
    secret = _check_passphrase(passphrase)
    salt = random(pwhash.argon2id.SALTBYTES)
    box = SecretBox(pwhash.argon2id.kdf(SecretBox.KEY_SIZE, secret, salt, opslimit=OPSLIMIT, memlimit=MEMLIMIT))
    nonce = random(SecretBox.NONCE_SIZE)
    # head: the newest version signed at the old home (an import waits for at least it)
    plain = json.dumps({"seed": bytes(sk).hex(), "name": name, "password": password_hash, "head": head}).encode()
    return {
        "format": FORMAT,
        "version": VERSION,
        "key": bytes(sk.verify_key).hex(),
        "kdf": {"name": "argon2id", "salt": salt.hex(), "opslimit": OPSLIMIT, "memlimit": MEMLIMIT},
        "nonce": nonce.hex(),
        "sealed": box.encrypt(plain, nonce).ciphertext.hex(),
    }


def open_account(doc, passphrase: str) -> tuple[SigningKey, str, str | None, int | None]:
    """(key pair, login name, password hash, head version) of an account file; AccountFileError naming
    what is wrong, and the same error for a wrong passphrase as for a tampered file."""
    secret = _check_passphrase(passphrase)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise AccountFileError("not a pttd account file (format is not pttd-account)")
    if doc.get("version") != VERSION:
        raise AccountFileError(f"account file version {doc.get('version')!r} is not one this pttd reads ({VERSION})")
    try:
        kdf = doc["kdf"]
        if kdf["name"] != "argon2id":
            raise ValueError("kdf is not argon2id")
        salt, nonce = bytes.fromhex(kdf["salt"]), bytes.fromhex(doc["nonce"])
        sealed, key = bytes.fromhex(doc["sealed"]), bytes.fromhex(doc["key"])
        ops, mem = int(kdf["opslimit"]), int(kdf["memlimit"])
        if len(salt) != pwhash.argon2id.SALTBYTES or len(nonce) != SecretBox.NONCE_SIZE or len(key) != 32:
            raise ValueError("salt, nonce or key of the wrong length")
        if not (
            pwhash.argon2id.OPSLIMIT_MIN <= ops <= MAX_OPSLIMIT and pwhash.argon2id.MEMLIMIT_MIN <= mem <= MAX_MEMLIMIT
        ):
            raise ValueError("Argon2id limits out of range")
    except (KeyError, TypeError, ValueError) as exc:
        raise AccountFileError(f"the account file is damaged: {exc}") from None
    box = SecretBox(pwhash.argon2id.kdf(SecretBox.KEY_SIZE, secret, salt, opslimit=ops, memlimit=mem))
    try:
        plain = json.loads(box.decrypt(sealed, nonce))
        sk = SigningKey(bytes.fromhex(plain["seed"]))
        name, password, head = plain["name"], plain.get("password"), plain.get("head")
    except CryptoError:
        raise AccountFileError("wrong passphrase (or the file was changed)") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise AccountFileError(f"the account file is damaged: {exc}") from None
    if bytes(sk.verify_key) != key:
        raise AccountFileError("the account file's key pair does not match its repository key")
    if not isinstance(name, str) or not (password is None or isinstance(password, str)):
        raise AccountFileError("the account file is damaged: name or password of the wrong type")
    if head is not None and (type(head) is not int or head < 0):
        raise AccountFileError("the account file is damaged: head is not a version")
    return sk, name, password, head
