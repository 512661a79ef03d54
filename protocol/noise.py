"""The transport handshake: Noise_XX_25519_ChaChaPoly_BLAKE2b, sans-IO.

Composed from audited primitives only (X25519 and ChaCha20-Poly1305 from
``cryptography``, BLAKE2b and HMAC from the standard library), following the Noise
Protocol Framework (revision 34) for the XX pattern::

    -> e
    <- e, ee, s, es, payload
    -> s, se, payload

Each side's Noise static key is a fresh X25519 key; the payloads bind it to the
daemon's long-term Ed25519 identity: ``{"id": ed25519 public key, "sig": signature over
IDENTITY_CONTEXT + handshake hash}``, taken after the sender's static key was mixed in,
so a signature is good for this one session only. The prologue carries the protocol
name and version, so peers that disagree fail the handshake.

The objects here take and return bytes; no socket is touched.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from .encoding import pack, unpack_canonical
from .errors import FormatError

PROTOCOL_NAME = b"Noise_XX_25519_ChaChaPoly_BLAKE2b"
PROLOGUE = b"pttd/wire/1"
IDENTITY_CONTEXT = b"pttd/handshake-identity/v1\n"
DHLEN = 32
HASHLEN = 64
TAGLEN = 16
MAX_NONCE = 2**64 - 1


class HandshakeError(Exception):
    """The peer's handshake is malformed, fails to decrypt, or proves the wrong identity."""


def _hash(data: bytes) -> bytes:
    return hashlib.blake2b(data).digest()


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.blake2b).digest()


def _hkdf2(ck: bytes, ikm: bytes) -> tuple[bytes, bytes]:
    temp = _hmac(ck, ikm)
    out1 = _hmac(temp, b"\x01")
    out2 = _hmac(temp, out1 + b"\x02")
    return out1, out2


def _pub(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _dh(key: X25519PrivateKey, remote: bytes) -> bytes:
    try:
        return key.exchange(X25519PublicKey.from_public_bytes(remote))
    except ValueError:  # an all-zero shared secret: a low-order point from the peer
        raise HandshakeError("peer sent an invalid X25519 key") from None


class CipherState:
    """ChaCha20-Poly1305 with a counter nonce (32 zero bits, then 64-bit little-endian)."""

    def __init__(self, key: bytes | None = None):
        self._aead = ChaCha20Poly1305(key) if key is not None else None
        self.n = 0

    @property
    def has_key(self) -> bool:
        return self._aead is not None

    def _nonce(self) -> bytes:
        if self.n >= MAX_NONCE:
            raise HandshakeError("nonce exhausted: the session must be re-established")
        nonce = b"\x00\x00\x00\x00" + self.n.to_bytes(8, "little")
        self.n += 1
        return nonce

    def rewind(self) -> None:
        """The last nonce was not used after all: its ciphertext was never sent (reusing a
        nonce is safe only then)."""
        if self.n:
            self.n -= 1

    def encrypt(self, ad: bytes, plaintext: bytes) -> bytes:
        if self._aead is None:
            return plaintext
        return self._aead.encrypt(self._nonce(), plaintext, ad)

    def decrypt(self, ad: bytes, ciphertext: bytes) -> bytes:
        if self._aead is None:
            return ciphertext
        try:
            return self._aead.decrypt(self._nonce(), ciphertext, ad)
        except InvalidTag:
            raise HandshakeError("message failed authentication") from None


class _SymmetricState:
    def __init__(self) -> None:
        name = PROTOCOL_NAME
        self.h = name + bytes(HASHLEN - len(name)) if len(name) <= HASHLEN else _hash(name)
        self.ck = self.h
        self.cipher = CipherState()

    def mix_key(self, ikm: bytes) -> None:
        self.ck, temp_k = _hkdf2(self.ck, ikm)
        self.cipher = CipherState(temp_k[:32])

    def mix_hash(self, data: bytes) -> None:
        self.h = _hash(self.h + data)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ct = self.cipher.encrypt(self.h, plaintext)
        self.mix_hash(ct)
        return ct

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        pt = self.cipher.decrypt(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return pt

    def split(self) -> tuple[CipherState, CipherState]:
        k1, k2 = _hkdf2(self.ck, b"")
        return CipherState(k1[:32]), CipherState(k2[:32])


@dataclass
class Session:
    """The result of a handshake: the peer's identity and the two transport ciphers."""

    peer_id: bytes  # the peer's Ed25519 public key
    send: CipherState
    recv: CipherState
    handshake_hash: bytes


class Handshake:
    """One side of an XX handshake. Call ``write_message``/``read_message`` in turn:

    initiator: write (msg 1), read (msg 2), write (msg 3) -> ``session``
    responder: read (msg 1), write (msg 2), read (msg 3) -> ``session``

    ``expect`` (optional) is the Ed25519 key the peer must prove; otherwise any
    identity with a valid proof is accepted and reported in ``session.peer_id``.
    """

    def __init__(self, identity: SigningKey, initiator: bool, expect: bytes | None = None):
        self._identity = identity
        self.initiator = initiator
        self._expect = expect
        self._ss = _SymmetricState()
        self._ss.mix_hash(PROLOGUE)
        self._s = X25519PrivateKey.generate()
        self._e: X25519PrivateKey | None = None
        self._re: bytes | None = None
        self._rs: bytes | None = None
        self._step = 0
        self._peer_id: bytes | None = None
        self.session: Session | None = None

    @property
    def done(self) -> bool:
        return self.session is not None

    def _identity_payload(self) -> bytes:
        sig = self._identity.sign(IDENTITY_CONTEXT + self._ss.h).signature
        return pack({"id": bytes(self._identity.verify_key), "sig": sig})

    def _check_identity(self, payload: bytes, h_before: bytes) -> None:
        try:
            obj = unpack_canonical(payload, "handshake identity")
        except FormatError as exc:
            raise HandshakeError(str(exc)) from None
        if not (isinstance(obj, dict) and set(obj) == {"id", "sig"}):
            raise HandshakeError("handshake identity: expected the fields id and sig")
        peer, sig = obj["id"], obj["sig"]
        if not (isinstance(peer, bytes) and len(peer) == 32 and isinstance(sig, bytes) and len(sig) == 64):
            raise HandshakeError("handshake identity: bad field sizes")
        try:
            VerifyKey(peer).verify(IDENTITY_CONTEXT + h_before, sig)
        except (BadSignatureError, ValueError):
            raise HandshakeError("peer's identity signature does not verify") from None
        if self._expect is not None and peer != self._expect:
            raise HandshakeError(f"peer is {peer.hex()}, not the expected {self._expect.hex()}")
        self._peer_id = peer

    def write_message(self) -> bytes:
        ss = self._ss
        if self.initiator and self._step == 0:
            self._e = X25519PrivateKey.generate()
            e = _pub(self._e)
            ss.mix_hash(e)
            ss.mix_hash(b"")  # empty payload, EncryptAndHash with no key
            self._step = 1
            return e
        if not self.initiator and self._step == 1:
            self._e = X25519PrivateKey.generate()
            e = _pub(self._e)
            ss.mix_hash(e)
            ss.mix_key(_dh(self._e, self._re))  # ee
            enc_s = ss.encrypt_and_hash(_pub(self._s))
            ss.mix_key(_dh(self._s, self._re))  # es
            payload = ss.encrypt_and_hash(self._identity_payload())
            self._step = 2
            return e + enc_s + payload
        if self.initiator and self._step == 2:
            enc_s = ss.encrypt_and_hash(_pub(self._s))
            ss.mix_key(_dh(self._s, self._re))  # se
            payload = ss.encrypt_and_hash(self._identity_payload())
            send, recv = ss.split()
            self.session = Session(self._peer_id, send, recv, ss.h)
            self._step = 3
            return enc_s + payload
        raise HandshakeError("handshake message written out of turn")

    def read_message(self, message: bytes) -> None:
        message = bytes(message)
        ss = self._ss
        if not self.initiator and self._step == 0:
            if len(message) != DHLEN:
                raise HandshakeError(f"first handshake message is {len(message)} bytes, expected {DHLEN}")
            self._re = message
            ss.mix_hash(self._re)
            ss.mix_hash(b"")
            self._step = 1
            return
        if self.initiator and self._step == 1:
            if len(message) < DHLEN + DHLEN + TAGLEN + TAGLEN:
                raise HandshakeError("second handshake message is too short")
            self._re = message[:DHLEN]
            ss.mix_hash(self._re)
            ss.mix_key(_dh(self._e, self._re))  # ee
            self._rs = ss.decrypt_and_hash(message[DHLEN : 2 * DHLEN + TAGLEN])
            ss.mix_key(_dh(self._e, self._rs))  # es
            h_before = ss.h
            self._check_identity(ss.decrypt_and_hash(message[2 * DHLEN + TAGLEN :]), h_before)
            self._step = 2
            return
        if not self.initiator and self._step == 2:
            if len(message) < DHLEN + TAGLEN + TAGLEN:
                raise HandshakeError("third handshake message is too short")
            self._rs = ss.decrypt_and_hash(message[: DHLEN + TAGLEN])
            ss.mix_key(_dh(self._e, self._rs))  # se
            h_before = ss.h
            self._check_identity(ss.decrypt_and_hash(message[DHLEN + TAGLEN :]), h_before)
            recv, send = ss.split()
            self.session = Session(self._peer_id, send, recv, ss.h)
            self._step = 3
            return
        raise HandshakeError("handshake message received out of turn")
