"""Worked example for docs/protocol.md: the exact bytes of the wire messages that sync a
tiny repository. Run from the repository root:

    python docs/examples/protocol_example.py

Everything is deterministic: the repository key is ``SigningKey(bytes(32))``, the commit
times are fixed and Ed25519 signatures are deterministic, so every run prints the same
bytes. The repository is the one of docs/repository.md, sections 8.2, 8.3 and 8.5
(``/a`` -> ``b"x"``, ``/b`` -> the 100 bytes 00 01 .. 63), so the addresses match that
page.

The messages are built with the same fields, in the same order, as the daemon builds
them (the file and function are named beside each one); each is checked with
``protocol.messages.decode``, exactly as a receiver checks it.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from nacl.signing import SigningKey  # noqa: E402

from protocol import messages  # noqa: E402
from protocol.commit import Commit, sign_commit  # noqa: E402
from protocol.framing import encode_frame  # noqa: E402
from protocol.noise import TAGLEN, CipherState  # noqa: E402
from protocol.tree import block_ref, node_block  # noqa: E402

AGENT = "pttd/0.1"  # pttd.wire.AGENT (not imported: that module needs trio)


def hexdump(data: bytes, indent: str = "    ") -> str:
    lines = []
    for i in range(0, len(data), 32):
        piece = data[i : i + 32].hex()
        lines.append(indent + " ".join(piece[j : j + 8] for j in range(0, len(piece), 8)))
    return "\n".join(lines)


def show(title: str, msg: dict) -> bytes:
    payload = messages.encode(msg)
    messages.decode(payload)  # what a receiver does: raises ProtocolError if not well-formed
    print(f"--- {title}: {len(payload)} bytes")
    print(hexdump(payload))
    return payload


def main() -> None:
    key = SigningKey(bytes(32))
    repo = bytes(key.verify_key)

    # The repository (docs/repository.md 8.2, 8.3, 8.5).
    empty_addr, _empty = node_block(0, [], [])
    ref, value_addr, value_block = block_ref(bytes(range(100)))
    leaf_addr, leaf_block = node_block(0, [b"/a", b"/b"], [b"x", ref])
    c0 = sign_commit(Commit(repo, 0, empty_addr, None, 1699999999000), key)
    c1 = sign_commit(Commit(repo, 1, leaf_addr, c0.address, 1700000000000), key)

    print("repository (public key)", repo.hex())
    print("head: seq 1, commit address", c1.address.hex())
    print("tree root (a leaf, 57 bytes)", leaf_addr.hex())
    print("value block of /b (101 bytes)", value_addr.hex())
    print()

    # 1. After the handshake each side sends hello first (pttd/wire.py, Connection.establish).
    show("hello", {"t": "hello", "versions": list(messages.SUPPORTED_VERSIONS), "mode": "node", "agent": AGENT})

    # 2. The follower subscribes (pttd/node.py, Node._subscribe_all / _resubscribe).
    sub = show("sub", {"t": "sub", "repo": repo, "prefixes": ["/"], "live": True})

    # 3. The owner answers with its head (Node._head_message(key, with_blocks=False)).
    show("head (answer to sub)", {"t": "head", "repo": repo, "commit": c1.block, "sig": c1.signature, "blocks": []})

    # 3b. "I hold no version of that repository" (Node.serve_request, sub).
    show("head (none held)", {"t": "head", "repo": repo, "commit": None, "sig": None, "blocks": []})

    # 4. The follower verifies the commit and walks its tree: the root first
    # (pttd/fetch.py, Fetcher._ask builds {t, hashes}; pttd/peer.py, Peer.request adds id).
    # A first sync walks in fresh mode (Fetcher(fresh=True)): the root is looked up in the
    # store, the children of blocks that came from the peer are asked for directly.
    want1 = show("want id 1 (the root)", {"t": "want", "hashes": [leaf_addr], "id": 1})

    # 5. The answer (Node.serve_request, want; cut by node._fit if over MAX_FRAME - 64 KiB).
    show("blocks id 1", {"t": "blocks", "id": 1, "blocks": [leaf_block], "missing": []})

    # 6. The leaf names one value block (ext type 1); /a's value is inline. The follower
    # stores both in the transaction that accepts seq 1 (Store.accept_commit rows).
    show("want id 2 (the value of /b)", {"t": "want", "hashes": [value_addr], "id": 2})
    show("blocks id 2", {"t": "blocks", "id": 2, "blocks": [value_block], "missing": []})

    # A live push of the same head carries the blocks the commit added
    # (Node._head_message(key, with_blocks=True)), so no want (and no store lookup) is
    # needed: Fetcher._child takes a pushed block as soon as its address is queued.
    show(
        "head (pushed, with blocks)",
        {"t": "head", "repo": repo, "commit": c1.block, "sig": c1.signature, "blocks": [leaf_block, value_block]},
    )

    # On-demand read of one path (Node.fetch_path; Peer.request adds id).
    show("get id 3", {"t": "get", "repo": repo, "root": leaf_addr, "path": "/b", "id": 3})
    show(
        "blocks id 3 (path nodes, then the value block)",
        {"t": "blocks", "id": 3, "blocks": [leaf_block, value_block], "missing": []},
    )
    show("blocks id 4 (a want for a block not held)", {"t": "blocks", "id": 4, "blocks": [], "missing": [value_addr]})
    # A get for a path that is not valid: no such entry can exist (Node._path_blocks).
    show("get id 6 (an invalid path)", {"t": "get", "repo": repo, "root": leaf_addr, "path": "/b/", "id": 6})
    show("blocks id 6 (missing: the root)", {"t": "blocks", "id": 6, "blocks": [], "missing": [leaf_addr]})

    show("ping id 5", {"t": "ping", "id": 5})
    show("pong id 5", {"t": "pong", "id": 5})
    show("unsub", {"t": "unsub", "repo": repo})
    show("error", {"t": "error", "code": "closing", "message": "no answer to a ping within 60 s"})

    # Frames. The plaintext frame is what framing looks like around a message; on the
    # wire after the handshake the payload is the ChaCha20-Poly1305 ciphertext, 16 bytes
    # longer, and the length prefix counts the ciphertext.
    print()
    print(f"--- frame around the sub message, before encryption ({len(sub)} + 4 bytes)")
    print(hexdump(encode_frame(sub)))
    print(f"--- frame around want id 1, before encryption ({len(want1)} + 4 bytes)")
    print(hexdump(encode_frame(want1)))

    # The same message as the first transport frame of a session whose sending key
    # happened to be 32 zero bytes (real keys come from the handshake's Split()):
    # nonce = 00000000 || counter 0 as 8 bytes little-endian, associated data empty.
    cipher = CipherState(bytes(32))
    ct = cipher.encrypt(b"", want1)
    assert len(ct) == len(want1) + TAGLEN
    print(f"--- want id 1 as an encrypted frame (key 00..00, nonce counter 0): 4 + {len(ct)} bytes")
    print(hexdump(encode_frame(ct, len(ct))))

    handshake()


def handshake() -> None:
    """The handshake with fixed keys, for an implementation to check its own against.
    The Noise keys are fresh random X25519 keys in the daemon; here the generator is
    replaced so that they are, in the order the two sides make them: initiator static
    01..01, responder static 02..02, initiator ephemeral 03..03, responder ephemeral
    04..04 (32 bytes each, as X25519 private keys). The identities: Ed25519 seeds 11..11
    (initiator) and 22..22 (responder)."""
    from unittest import mock

    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from protocol import noise

    keys = iter(bytes([i]) * 32 for i in (1, 2, 3, 4))

    def fixed() -> X25519PrivateKey:
        return X25519PrivateKey.from_private_bytes(next(keys))

    with mock.patch.object(noise.X25519PrivateKey, "generate", staticmethod(fixed)):
        initiator = noise.Handshake(SigningKey(bytes([0x11]) * 32), initiator=True)
        responder = noise.Handshake(SigningKey(bytes([0x22]) * 32), initiator=False)
        m1 = initiator.write_message()
        responder.read_message(m1)
        m2 = responder.write_message()
        initiator.read_message(m2)
        m3 = initiator.write_message()
        responder.read_message(m3)
    print()
    for n, m in ((1, m1), (2, m2), (3, m3)):
        print(f"--- handshake message {n}: {len(m)} bytes")
        print(hexdump(m))
    print("--- handshake hash h after message 3 (64 bytes)")
    print(hexdump(initiator.session.handshake_hash))
    ping = messages.encode({"t": "ping", "id": 1})
    ct = initiator.session.send.encrypt(b"", ping)
    print(f"--- the initiator's first transport frame, ping id 1: 4 + {len(ct)} bytes")
    print(hexdump(encode_frame(ct, len(ct))))
    assert responder.session.recv.decrypt(b"", ct) == ping


if __name__ == "__main__":
    main()
