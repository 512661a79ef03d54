"""The transport handshake and framing, sans-IO: two peers in memory."""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nacl.signing import SigningKey

from protocol.framing import FrameDecoder, FrameTooLarge, encode_frame
from protocol.noise import Handshake, HandshakeError


def handshake(a_key, b_key, expect_b=None, expect_a=None, tamper=None):
    a = Handshake(a_key, initiator=True, expect=expect_b)
    b = Handshake(b_key, initiator=False, expect=expect_a)
    msgs = []
    m1 = a.write_message()
    msgs.append(m1)
    b.read_message(tamper(0, m1) if tamper else m1)
    m2 = b.write_message()
    a.read_message(tamper(1, m2) if tamper else m2)
    m3 = a.write_message()
    b.read_message(tamper(2, m3) if tamper else m3)
    return a, b


def test_both_sides_learn_each_other_and_can_talk():
    ka, kb = SigningKey.generate(), SigningKey.generate()
    a, b = handshake(ka, kb, expect_b=bytes(kb.verify_key))
    assert a.session.peer_id == bytes(kb.verify_key)
    assert b.session.peer_id == bytes(ka.verify_key)
    assert a.session.handshake_hash == b.session.handshake_hash
    for i in range(3):
        ct = a.session.send.encrypt(b"", b"hello %d" % i)
        assert b"hello" not in ct
        assert b.session.recv.decrypt(b"", ct) == b"hello %d" % i
    assert a.session.recv.decrypt(b"", b.session.send.encrypt(b"", b"back")) == b"back"


def test_wrong_expected_identity_is_refused():
    ka, kb, other = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    with pytest.raises(HandshakeError, match="not the expected"):
        handshake(ka, kb, expect_b=bytes(other.verify_key))
    with pytest.raises(HandshakeError, match="not the expected"):
        handshake(ka, kb, expect_a=bytes(other.verify_key))


@pytest.mark.parametrize("which", [1, 2])
@pytest.mark.parametrize("where", [0, 40, -1])
def test_any_flipped_byte_fails_the_handshake(which, where):
    def tamper(i, m):
        if i != which:
            return m
        b = bytearray(m)
        b[where] ^= 1
        return bytes(b)

    with pytest.raises(HandshakeError):
        handshake(SigningKey.generate(), SigningKey.generate(), tamper=tamper)


def test_messages_out_of_turn_and_short_messages_are_refused():
    a = Handshake(SigningKey.generate(), initiator=True)
    with pytest.raises(HandshakeError, match="out of turn"):
        a.read_message(b"x" * 32)
    b = Handshake(SigningKey.generate(), initiator=False)
    with pytest.raises(HandshakeError, match="expected 32"):
        b.read_message(b"short")
    with pytest.raises(HandshakeError, match="out of turn"):
        b.write_message()


def test_a_low_order_key_is_refused():
    b = Handshake(SigningKey.generate(), initiator=False)
    b.read_message(bytes(32))  # the all-zero point
    with pytest.raises(HandshakeError, match="invalid X25519"):
        b.write_message()


def test_replayed_transport_message_fails():
    a, b = handshake(SigningKey.generate(), SigningKey.generate())
    ct = a.session.send.encrypt(b"", b"once")
    assert b.session.recv.decrypt(b"", ct) == b"once"
    with pytest.raises(HandshakeError):
        b.session.recv.decrypt(b"", ct)


def test_frames_split_anywhere_reassemble():
    payloads = [b"", b"a", b"x" * 70000, b"end"]
    wire = b"".join(encode_frame(p) for p in payloads)
    for cut in (1, 3, 4, 5, 999, len(wire)):
        dec = FrameDecoder()
        got = []
        for i in range(0, len(wire), cut):
            got += dec.feed(wire[i : i + cut])
        assert got == payloads and dec.buffered == 0


def test_oversized_frame_is_refused_from_its_header():
    dec = FrameDecoder(max_frame=1000)
    with pytest.raises(FrameTooLarge, match="1001 bytes"):
        dec.feed((1001).to_bytes(4, "big"))
    with pytest.raises(FrameTooLarge):
        encode_frame(b"x" * 1001, max_frame=1000)


@given(st.lists(st.binary(max_size=50), max_size=20))
def test_frame_decoder_never_crashes_on_garbage(chunks):
    dec = FrameDecoder(max_frame=64)
    try:
        for c in chunks:
            for frame in dec.feed(c):
                assert len(frame) <= 64
    except FrameTooLarge:
        pass


@given(st.binary(max_size=200))
def test_handshake_never_crashes_on_garbage(data):
    b = Handshake(SigningKey.generate(), initiator=False)
    try:
        b.read_message(data)
        b.write_message()
    except HandshakeError:
        pass
    a = Handshake(SigningKey.generate(), initiator=True)
    a.write_message()
    try:
        a.read_message(data)
    except HandshakeError:
        pass


class _AcceptAnyPayload(Handshake):
    """Our handshake with the identity check replaced, to run against a reference
    Noise implementation that does not speak our identity payload."""

    def _check_identity(self, payload, h_before):
        self.peer_payload = payload
        self._peer_id = bytes(32)


def test_interoperates_with_a_reference_noise_implementation():
    noise = pytest.importorskip("noise.connection")
    for we_initiate in (True, False):
        ours = _AcceptAnyPayload(SigningKey.generate(), initiator=we_initiate)
        ref = noise.NoiseConnection.from_name(b"Noise_XX_25519_ChaChaPoly_BLAKE2b")
        ref.set_prologue(b"pttd/wire/1")
        ref.set_keypair_from_private_bytes(noise.Keypair.STATIC, bytes(range(32)))
        (ref.set_as_responder if we_initiate else ref.set_as_initiator)()
        ref.start_handshake()
        if we_initiate:
            assert ref.read_message(ours.write_message()) == b""
            ours.read_message(ref.write_message(b"reference says hi"))
            ref_saw = ref.read_message(ours.write_message())
        else:
            ours.read_message(ref.write_message())
            ref_saw = ref.read_message(ours.write_message())
            ours.read_message(ref.write_message(b"reference says hi"))
        assert ours.peer_payload == b"reference says hi"
        assert ref_saw.startswith(b"\x82")  # our identity map, decrypted by the reference
        assert ref.handshake_finished and ours.done
        assert ours.session.handshake_hash == ref.get_handshake_hash()
        assert ref.decrypt(ours.session.send.encrypt(b"", b"ping")) == b"ping"
        assert ours.session.recv.decrypt(b"", ref.encrypt(b"pong")) == b"pong"


def test_the_worked_examples_in_protocol_md_are_what_the_code_prints():
    """docs/protocol.md section 12 (messages, frames, and the handshake with fixed keys)
    shows bytes printed by docs/examples/protocol_example.py: each block it prints must
    be in the page, so a change of the formats or of the handshake changes the page."""
    import os
    import re
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, os.path.join(root, "docs", "examples", "protocol_example.py")],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    page = re.sub(r"\s+", "", open(os.path.join(root, "docs", "protocol.md")).read())
    dumps = re.findall(r"^--- (.*)\n((?:    [0-9a-f ]+\n)+)", out, re.M)
    shown_whole = [  # the others the page gives in part, or in words
        "hello",
        "sub",
        "head (answer to sub)",
        "want id 1 ",
        "blocks id 1",
        "want id 2 ",
        "blocks id 2",
        "get id 3",
        "ping id 5",
        "want id 1 as an encrypted frame ",
        "handshake message 1",
        "handshake message 2",
        "handshake message 3",
        "handshake hash h after message 3 ",
        "the initiator's first transport frame, ping id 1",
    ]
    for title in shown_whole:
        dump = next(d for t, d in dumps if t.startswith(title))
        assert re.sub(r"\s+", "", dump) in page, title
