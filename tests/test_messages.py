"""The message codec and the frame decoder, fuzzed: whatever the bytes, the result is a
well-formed message or a clear error, never a crash."""

from __future__ import annotations

import msgpack
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from protocol import messages
from protocol.errors import FormatError
from protocol.framing import FrameDecoder, FrameTooLarge, encode_frame
from pttd.config import WireConfig
from pttd.wire import Connection, WireError

H = st.binary(min_size=32, max_size=32)
VALID = st.one_of(
    st.builds(
        lambda v: {"t": "hello", "versions": v, "mode": "node", "agent": "x"},
        st.lists(st.integers(1, 9), min_size=1, max_size=4),
    ),
    st.builds(
        lambda r, p, live: {"t": "sub", "repo": r, "prefixes": p, "live": live},
        H,
        st.lists(st.just("/a/"), max_size=3),
        st.booleans(),
    ),
    st.builds(
        lambda i, hs: {"t": "want", "id": i, "hashes": hs},
        st.integers(0, 2**32 - 1),
        st.lists(H, min_size=1, max_size=20),
    ),
    st.builds(
        lambda i, bs, m: {"t": "blocks", "id": i, "blocks": bs, "missing": m},
        st.integers(0, 99),
        st.lists(st.binary(min_size=1), max_size=5),
        st.lists(H, max_size=3),
    ),
    st.builds(lambda i: {"t": "ping", "id": i}, st.integers(0, 99)),
    st.builds(lambda c, m: {"t": "error", "code": c, "message": m}, st.text(max_size=20), st.text(max_size=50)),
)
ANY = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.binary(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.text(max_size=8) | st.sampled_from(["t", "id", "repo", "hashes", "blocks"]), inner, max_size=5
        )
    ),
    max_leaves=20,
)


@given(VALID)
def test_valid_messages_round_trip(msg):
    assert messages.decode(messages.encode(msg)) == msg


@given(st.binary(max_size=300))
@settings(max_examples=500)
def test_random_bytes_decode_or_fail_cleanly(data):
    try:
        msg = messages.decode(data)
    except messages.ProtocolError:
        return
    assert isinstance(msg, dict) and msg["t"] in messages.FIELDS


@given(ANY, st.sampled_from(sorted(messages.FIELDS)))
@settings(max_examples=500)
def test_random_structures_decode_or_fail_cleanly(obj, t):
    if isinstance(obj, dict):
        obj = {**obj, "t": t}
    try:
        data = msgpack.packb(obj, use_bin_type=True)
    except (OverflowError, TypeError, ValueError):
        return
    try:
        msg = messages.decode(data)
    except messages.ProtocolError:
        return
    assert msg["t"] == t


def test_specific_bad_messages_are_named():
    with pytest.raises(messages.ProtocolError, match="unknown message type 'launch'"):
        messages.decode(messages.encode({"t": "launch"}))
    # a type under a bin key is no type (it read "unknown message type 'None'")
    with pytest.raises(messages.ProtocolError, match="message has no type"):
        messages.decode(msgpack.packb({b"t": "ping", b"id": 1}, use_bin_type=True))
    with pytest.raises(messages.ProtocolError, match="missing field 'hashes'"):
        messages.decode(messages.encode({"t": "want", "id": 1}))
    with pytest.raises(messages.ProtocolError, match="'hashes' must be 32 bytes"):
        messages.decode(messages.encode({"t": "want", "id": 1, "hashes": [b"short"]}))
    with pytest.raises(messages.ProtocolError, match="at most 4096"):
        messages.decode(messages.encode({"t": "want", "id": 1, "hashes": [bytes(32)] * 4097}))
    with pytest.raises(messages.ProtocolError, match="'id'"):
        messages.decode(messages.encode({"t": "ping", "id": True}))


@given(st.lists(st.binary(max_size=200), max_size=8), st.lists(st.integers(1, 50), min_size=1, max_size=10))
def test_frames_reassemble_however_the_bytes_are_split(payloads, cuts):
    stream = b"".join(encode_frame(p) for p in payloads)
    dec = FrameDecoder()
    out, i, k = [], 0, 0
    while i < len(stream):
        n = cuts[k % len(cuts)]
        out += dec.feed(stream[i : i + n])
        i, k = i + n, k + 1
    assert out == payloads and dec.buffered == 0


def test_many_frames_in_one_read_all_come_out_and_the_partial_one_after_them_waits():
    """65,536 empty frames and the start of another in one read (256 KiB of zeros from a
    peer before its handshake, say): every frame comes out of one feed, read in one
    pass (the rest of the buffer was copied after each frame: quadratic), and the
    partial frame completes with the next read."""
    dec = FrameDecoder()
    last = encode_frame(b"payload")
    frames = dec.feed(b"\0" * (256 << 10) + last[:6])
    assert frames == [b""] * 65536 and dec.buffered == 6
    assert dec.feed(last[6:]) == [b"payload"] and dec.buffered == 0


@given(st.binary(max_size=400))
def test_frame_decoder_on_garbage(data):
    dec = FrameDecoder(max_frame=1000)
    try:
        frames = dec.feed(data)
    except FrameTooLarge:
        return
    assert all(len(f) <= 1000 for f in frames)


async def _connected_pair():
    left, right = trio.testing.memory_stream_pair()
    a = Connection(left, WireConfig(), "a")
    b = Connection(right, WireConfig(), "b")
    async with trio.open_nursery() as n:
        n.start_soon(a.establish, SigningKey.generate(), True, "node")
        n.start_soon(b.establish, SigningKey.generate(), False, "node")
    return a, b


@given(st.lists(ANY, min_size=1, max_size=5))
@settings(max_examples=60, deadline=None)
def test_connection_receives_only_checked_messages(objs):
    """Authenticated but arbitrary payloads: receive() yields checked messages or WireError."""

    async def main():
        a, b = await _connected_pair()
        for obj in objs:
            try:
                payload = msgpack.packb(obj, use_bin_type=True)
            except (OverflowError, TypeError, ValueError):
                continue
            await a._send_raw(a._send.encrypt(b"", payload))
            try:
                msg = await b.receive()
            except WireError as exc:
                assert "bad message" in str(exc)
                continue
            assert msg["t"] in messages.FIELDS

    trio.run(main)


async def test_tampered_frame_ends_the_connection():
    a, b = await _connected_pair()
    ct = bytearray(a._send.encrypt(b"", messages.encode({"t": "ping", "id": 1})))
    ct[3] ^= 0x40
    await a._send_raw(bytes(ct))
    with pytest.raises(WireError, match="failed to decrypt"):
        await b.receive()


def test_format_error_is_the_base():
    assert issubclass(messages.ProtocolError, FormatError)
