"""Hostile peers: each is refused with a log line naming the peer and the reason, the
store is unchanged, and the daemon's other sessions carry on."""

from __future__ import annotations

import logging
import os

import pytest
import trio
from nacl.signing import SigningKey

from protocol.commit import Commit, sign_commit
from protocol.framing import FrameDecoder, encode_frame
from protocol.noise import Handshake
from pttd.config import WireConfig
from pttd.wire import Connection, WireError
from tests.netutil import daemons, wait_for


def _addr(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


async def raw_connection(address: str, identity: SigningKey | None = None) -> Connection:
    stream = await trio.open_tcp_stream(*_addr(address))
    conn = Connection(stream, WireConfig(), address)
    await conn.establish(identity or SigningKey.generate(), initiator=True, mode="node")
    return conn


class FakePeer:
    """A listening peer that serves a real store's data, with the answers a test
    tampers with."""

    def __init__(self, source, head=None, blocks=None):
        self.source = source  # a running daemon whose store and heads we pass on
        self.head = head  # (msg) -> msg
        self.blocks = blocks  # (list of blocks) -> list of blocks
        self.closed = trio.Event()

    async def start(self, nursery) -> str:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        nursery.start_soon(trio.serve_listeners, self._serve, listeners)
        return f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"

    async def _serve(self, stream) -> None:
        conn = Connection(stream, WireConfig(), "fake")
        node = self.source.node
        try:
            await conn.establish(SigningKey.generate(), initiator=False, mode="node")
            while True:
                msg = await conn.receive()
                if msg["t"] == "sub":
                    head = await node.db(node._head_message, msg["repo"], False)
                    if head is None:
                        head = {"t": "head", "repo": msg["repo"], "commit": None, "sig": None, "blocks": []}
                    elif self.head:
                        head = self.head(head)
                    await conn.send(head)
                elif msg["t"] == "want":
                    blocks, missing = await node.db(node.store.get_blocks, msg["hashes"])
                    if self.blocks:
                        blocks = self.blocks(blocks)
                    await conn.send({"t": "blocks", "id": msg["id"], "blocks": blocks, "missing": missing})
                elif msg["t"] == "ping":
                    await conn.send({"t": "pong", "id": msg["id"]})
        except Exception:
            pass
        finally:
            self.closed.set()
            await conn.aclose()


async def _write(d, items: dict[str, bytes]) -> None:
    def work():
        with d.node.dd.repository().batch() as b:
            for p, v in items.items():
                b.put(p, v)

    await d.node.db(work)
    await d.node.publish(d.node.id)


async def _snapshot(d):
    def work():
        return d.node.store.block_stats(), [(r.key, d.node.store.head_seq(r)) for r in d.node.store.list_repos()]

    return await d.node.db(work)


def _logged(caplog, *needles) -> bool:
    return any(all(n in r.getMessage() for n in needles) for r in caplog.records if r.levelno >= logging.WARNING)


async def _honest_live_update_still_works(a, b) -> None:
    """B follows A (another session of B's) and receives a live update."""
    f = b.node.follows[a.node.id]
    seq = f.local_seq
    await a.call("put", path=f"/still/{os.urandom(4).hex()}", value=b"working")
    await wait_for(lambda: f.local_seq == seq + 1)


@pytest.fixture
async def trio_and_three(tmp_path):
    """Daemons a (honest owner), b (the victim, following a), c (owner of the repository
    the fake peer serves)."""
    async with daemons(tmp_path, 3, frame_timeout=0.5, send_timeout=0.5, handshake_timeout=1.0) as ds:
        a, b, c = ds
        await _write(a, {"/x": b"1" * 100})
        await b.call("follow", repo=a.id, peers=[a.address])
        await wait_for(lambda: b.node.follows[a.node.id].local_seq == 1)
        await _write(c, {f"/c/{i}": os.urandom(300) for i in range(200)})
        yield ds


async def _follow_through_fake(b, c, fake, nursery):
    address = await fake.start(nursery)
    before = await _snapshot(b)
    await b.call("follow", repo=c.id, peers=[address])
    return address, before


async def test_forged_signature(trio_and_three, caplog):
    a, b, c = trio_and_three

    def forge(head):
        sig = bytearray(head["sig"])
        sig[5] ^= 1
        return {**head, "sig": bytes(sig)}

    async with trio.open_nursery() as nursery:
        fake = FakePeer(c, head=forge)
        address, before = await _follow_through_fake(b, c, fake, nursery)
        await wait_for(lambda: _logged(caplog, "closed", "refused", "signature"))
        assert _logged(caplog, "127.0.0.1:", "signature")
        f = b.node.follows[c.node.id]
        assert f.local_seq is None
        blocks_before, _ = before
        assert (await _snapshot(b))[0] == blocks_before
        await _honest_live_update_still_works(a, b)
        nursery.cancel_scope.cancel()


async def test_block_not_matching_its_hash(trio_and_three, caplog):
    a, b, c = trio_and_three

    def corrupt(blocks):
        return [blocks[0][:-1] + bytes([blocks[0][-1] ^ 1])] + blocks[1:]

    async with trio.open_nursery() as nursery:
        fake = FakePeer(c, blocks=corrupt)
        _, before = await _follow_through_fake(b, c, fake, nursery)
        await wait_for(lambda: _logged(caplog, "does not match its hash"))
        await fake.closed.wait()
        assert b.node.follows[c.node.id].local_seq is None
        assert (await _snapshot(b))[0] == before[0]
        await _honest_live_update_still_works(a, b)
        nursery.cancel_scope.cancel()


async def test_older_head_and_fork(trio_and_three, caplog):
    a, b, c = trio_and_three
    caplog.set_level(logging.INFO)
    # B holds seq 2 of A's repository; a peer offering seq 1 is refused.
    await _write(a, {"/y": b"2" * 100})
    f = b.node.follows[a.node.id]
    await wait_for(lambda: f.local_seq == 2)
    old = await a.node.db(lambda: a.node.store.load_commit(a.node.store.find_repo(a.node.id), 1))
    conn = await raw_connection(b.address)
    snap = await _snapshot(b)
    await conn.send({"t": "head", "repo": a.node.id, "commit": old.block, "sig": old.signature, "blocks": []})
    await wait_for(lambda: any("older than ours" in r.getMessage() for r in caplog.records))
    assert f.local_seq == 2 and await _snapshot(b) == snap
    # A fork: a second, different commit signed at seq 2 (the key leaked or was copied).
    key = a.node.dd.keys.load(a.id)
    head2 = await a.node.db(lambda: a.node.store.load_commit(a.node.store.find_repo(a.node.id), 2))
    other = sign_commit(Commit(a.node.id, 2, old.commit.root, old.address, head2.commit.time + 1), key)
    await conn.send({"t": "head", "repo": a.node.id, "commit": other.block, "sig": other.signature, "blocks": []})
    await wait_for(lambda: f.state == "forked")
    assert _logged(caplog, "two different commits at seq 2", "no longer following")
    forks = await b.node.db(lambda: b.node.store.forks(b.node.store.find_repo(a.node.id)))
    assert forks == [(2, other.address)]  # the evidence is kept; the head is not changed
    assert f.local_seq == 2
    await conn.aclose()


async def test_oversized_frame_and_garbage(trio_and_three, caplog):
    a, b, c = trio_and_three
    snap = await _snapshot(b)
    conn = await raw_connection(b.address)
    await conn.stream.send_all((100 << 20).to_bytes(4, "big"))
    await wait_for(lambda: _logged(caplog, "over the", "limit"))
    garbage = await trio.open_tcp_stream(*_addr(b.address))
    await garbage.send_all(os.urandom(5000))
    await wait_for(lambda: _logged(caplog, "handshake failed"))
    await garbage.aclose()
    await conn.aclose()
    assert await _snapshot(b) == snap
    await _honest_live_update_still_works(a, b)


class _LyingHandshake(Handshake):
    def _identity_payload(self) -> bytes:  # claims a key, signs with another
        real = self._identity
        self._identity = SigningKey.generate()
        try:
            from protocol.encoding import pack

            sig = self._identity.sign(b"pttd/handshake-identity/v1\n" + self._ss.h).signature
            return pack({"id": bytes(real.verify_key), "sig": sig})
        finally:
            self._identity = real


async def test_handshake_with_the_wrong_key(trio_and_three, caplog):
    a, b, c = trio_and_three
    stream = await trio.open_tcp_stream(*_addr(b.address))
    hs = _LyingHandshake(SigningKey.generate(), initiator=True)
    await stream.send_all(encode_frame(hs.write_message()))
    decoder = FrameDecoder()
    frames = []
    while not frames:
        frames = decoder.feed(await stream.receive_some(4096))
    hs.read_message(frames[0])
    await stream.send_all(encode_frame(hs.write_message()))
    await wait_for(lambda: _logged(caplog, "handshake failed", "identity signature does not verify"))
    await stream.aclose()
    await _honest_live_update_still_works(a, b)


async def test_slow_reader_is_dropped(trio_and_three, caplog):
    a, b, c = trio_and_three
    big = os.urandom(30000)
    await _write(a, {"/big": big})
    await wait_for(lambda: b.node.follows[a.node.id].local_seq == 2)
    from blake3 import blake3

    addr = blake3(b"\x01" + big).digest()
    conn = await raw_connection(b.address)
    conn.stream.socket.setsockopt(__import__("socket").SOL_SOCKET, __import__("socket").SO_RCVBUF, 4096)
    for i in range(20):  # 20 x 100 x 30 KB asked for, never read
        await conn.send({"t": "want", "id": i, "hashes": [addr] * 100})
    await wait_for(lambda: _logged(caplog, "slow reader"), timeout=15)
    await _honest_live_update_still_works(a, b)
    await conn.aclose()


async def test_trickling_peer_is_dropped(trio_and_three, caplog):
    a, b, c = trio_and_three
    conn = await raw_connection(b.address)
    await conn.stream.send_all(b"\x00")  # the first byte of a frame, then nothing
    await wait_for(lambda: _logged(caplog, "still incomplete"))
    # Before the handshake too: one byte, then silence.
    stream = await trio.open_tcp_stream(*_addr(b.address))
    await stream.send_all(b"\x00")
    await wait_for(lambda: _logged(caplog, "handshake failed", "still incomplete"))
    await stream.aclose()
    await conn.aclose()
    await _honest_live_update_still_works(a, b)


async def test_connection_limits_and_idle_timeout(tmp_path, caplog):
    async with daemons(tmp_path, 1, max_connections_per_address=2, idle_timeout=2.0, keepalive=30.0) as (a,):
        first = await raw_connection(a.address)
        second = await raw_connection(a.address)
        with pytest.raises(Exception):  # noqa: B017 - refused before or during the handshake
            await raw_connection(a.address)
        assert _logged(caplog, "refused connection from 127.0.0.1", "2 from that address already")
        # A peer that says nothing (no frame, not even a ping answer) is dropped.
        await wait_for(lambda: _logged(caplog, "nothing received for 2 s"))
        await wait_for(lambda: not a.node.peers)
        await first.aclose()
        await second.aclose()
        # Slots are free again.
        third = await raw_connection(a.address)
        await wait_for(lambda: len(a.node.peers) == 1)
        await third.aclose()


async def test_connections_in_their_handshake_count_toward_max_connections(tmp_path, caplog):
    """max_connections counts an incoming connection from its accept: connections that
    never finish their handshake cannot push the daemon past its limit."""
    async with daemons(tmp_path, 1, max_connections=2, handshake_timeout=30.0) as (a,):
        silent = [await trio.open_tcp_stream(*_addr(a.address)) for _ in range(2)]  # no handshake
        await wait_for(lambda: a.node._incoming == 2)
        stream = await trio.open_tcp_stream(*_addr(a.address))
        await wait_for(lambda: _logged(caplog, "refused connection from 127.0.0.1", "2 connections already"))
        assert await stream.receive_some(100) == b""  # closed at once
        for s_ in silent + [stream]:
            await s_.aclose()
        await wait_for(lambda: a.node._incoming == 0)
        conn = await raw_connection(a.address)  # slots are free again
        await wait_for(lambda: len(a.node.peers) == 1)
        await conn.aclose()


@pytest.mark.parametrize(
    "address",
    ["a..b:1", "x" * 64 + ".example:1", "[::1:5", "::1]:5", "host:\u0661\u0662", "host:0", "a b:1", "\ud800:1", ""],
)
def test_an_address_that_cannot_be_dialed_is_refused_when_given(address):
    """Hosts the resolver would refuse (empty or over-long labels, spaces, lone
    surrogates), unbalanced brackets, non-ASCII digits and port 0 are refused where an
    address to dial is given (config, a hub's join, a hub's answer), not when dialed."""
    from pttd.config import parse_address
    from pttd.errors import PttError

    with pytest.raises(PttError):
        parse_address(address, dial=True)


async def test_a_dial_that_fails_other_than_by_the_network_does_not_stop_the_daemon(tmp_path, monkeypatch, caplog):
    """Any error of a dial (here the resolver's UnicodeError, which is no OSError) is
    logged and the dial tried again later; it used to end the daemon (and a hub saved
    the address of a join, so it ended again at every start)."""
    import pttd.node

    tried = trio.Event()

    async def refusing(host, port, **kw):
        tried.set()
        raise UnicodeError("encoding with 'idna' codec failed (UnicodeError: label empty or too long)")

    monkeypatch.setattr(pttd.node.trio, "open_tcp_stream", refusing)
    async with daemons(tmp_path, 1) as (d,):
        d.node.ensure_dial("unreachable.example:9987")
        with trio.fail_after(10):
            await tried.wait()
        await wait_for(lambda: any("cannot dial unreachable.example:9987" in m for m in caplog.messages))
        assert (await d.call("status"))["node"] == d.id  # still serving


async def test_a_peer_cannot_make_a_session_hold_more_than_it_needs(trio_and_three, caplog, monkeypatch):
    """What a peer sends is kept only as far as it is needed: a request's unknown fields
    are dropped when it is decoded (not queued with it), a hash named many times in one
    want is read and sent once, and live subscriptions beyond MAX_SUBS end the session
    (each kept a list of prefixes that the serving side never used)."""
    import pttd.node
    from protocol import messages

    a, b, c = trio_and_three
    padded = messages.decode(messages.encode({"t": "ping", "id": 7, "padding": b"x" * 100_000}))
    assert padded == {"t": "ping", "id": 7}

    big = os.urandom(3000)
    await _write(a, {"/dup": big})
    await wait_for(lambda: b.node.follows[a.node.id].local_seq == 2)
    from blake3 import blake3

    addr = blake3(b"\x01" + big).digest()
    conn = await raw_connection(b.address)
    await conn.send({"t": "want", "id": 1, "hashes": [addr] * 4096})
    with trio.fail_after(10):
        while (answer := await conn.receive())["t"] != "blocks":
            pass  # b subscribes to what it follows on every session
    assert answer["t"] == "blocks" and answer["blocks"] == [b"\x01" + big] and answer["missing"] == []

    monkeypatch.setattr(pttd.node, "MAX_SUBS", 3)
    for _ in range(3):
        key = SigningKey.generate().verify_key.encode()
        await conn.send({"t": "sub", "repo": key, "prefixes": ["/" + "p" * 1000] * 64, "live": True})
    await wait_for(lambda: any(len(p.subs) == 3 for p in b.node.peers))
    assert all(isinstance(p.subs, set) for p in b.node.peers)
    await conn.send({"t": "sub", "repo": SigningKey.generate().verify_key.encode(), "prefixes": ["/"], "live": True})
    await wait_for(lambda: _logged(caplog, "more than 3 live subscriptions"))
    await conn.aclose()
    await _honest_live_update_still_works(a, b)


async def test_a_peers_words_are_quoted_in_the_log(trio_and_three, caplog):
    """What a peer says (its error message, its mode) is logged quoted: a newline in it
    cannot start a line that passes for one of ours."""
    a, b, c = trio_and_three
    conn = await raw_connection(b.address)
    forged = "bye\n2026-11-26 12:00:00,000 WARNING pttd.node: peer 10.0.0.1:9987: forged line"
    await conn.send({"t": "error", "code": "closing", "message": forged})
    await wait_for(lambda: _logged(caplog, "peer closed with error 'closing'"))
    assert not any("\n" in r.getMessage() for r in caplog.records if r.name.startswith("pttd"))
    assert _logged(caplog, "'bye\\n2026-11-26")
    await conn.aclose()


async def test_a_cancelled_send_leaves_the_session_readable():
    """A send sealed its frame (taking a nonce) before waiting for its turn: cancelled
    while waiting (an unfollow in the middle of a sync, a client gone), it sent nothing,
    the peer failed to decrypt every later frame, and the session ended for every
    repository on it. A send cancelled with part of its frame out closes the connection
    at once (it cannot go on, and waiting send_timeout held up a daemon's stop)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    accepted: list[Connection] = []
    ready = trio.Event()

    async def handler(stream):
        c = Connection(stream, WireConfig(), "server")
        await c.establish(SigningKey.generate(), initiator=False, mode="node")
        accepted.append(c)
        ready.set()
        await trio.sleep_forever()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, handler, listeners)
            client = Connection(await trio.open_tcp_stream("127.0.0.1", port), WireConfig(), "client")
            await client.establish(SigningKey.generate(), initiator=True, mode="node")
            await ready.wait()
            server = accepted[0]
            # 1. cancelled while another send holds the connection
            release = trio.Event()

            async def busy_sender():
                async with client._send_lock:
                    await release.wait()

            nursery.start_soon(busy_sender)
            await wait_for(client._send_lock.locked)
            with trio.move_on_after(0.1) as waited:
                await client.send({"t": "ping", "id": 1})
            assert waited.cancelled_caught
            release.set()
            await client.send({"t": "ping", "id": 2})
            assert (await server.receive())["id"] == 2
            # 2. cancelled with part of a large frame out (a peer reading nothing): the
            # connection is closed at once, not after send_timeout (nothing after a cut
            # frame could be read)
            big = {"t": "blocks", "id": 3, "blocks": [os.urandom(1 << 20) for _ in range(3)], "missing": []}
            with trio.fail_after(5):  # send_timeout is 30 s
                with trio.move_on_after(0.2) as cut:
                    await client.send(big)
            assert cut.cancelled_caught and client.closed
            with pytest.raises(WireError):
                with trio.fail_after(10):
                    while True:
                        await server.receive()
            nursery.cancel_scope.cancel()


async def test_a_send_cancelled_before_any_byte_went_out_gives_its_nonce_back():
    """Cancelled while the socket took nothing (its buffer full), the sealed frame never
    left: its nonce is used by the next frame, which the peer reads."""
    from protocol.noise import CipherState

    class Socket:
        def __init__(self):
            self.out, self.blocked = b"", True

        async def send(self, data) -> int:
            if self.blocked:
                await trio.sleep_forever()  # the peer reads nothing for now
            self.out += bytes(data)
            return len(data)

    class Stream:
        socket = Socket()

    conn = Connection(Stream(), WireConfig(), "fake")
    key = os.urandom(32)
    conn._send, reader = CipherState(key), CipherState(key)
    with trio.move_on_after(0.1) as scope:
        await conn.send({"t": "ping", "id": 1})
    assert scope.cancelled_caught and not conn.closed and Stream.socket.out == b""
    Stream.socket.blocked = False
    await conn.send({"t": "ping", "id": 2})
    frames = FrameDecoder(1 << 20).feed(Stream.socket.out)
    from protocol import messages

    assert messages.decode(reader.decrypt(b"", frames[0]))["id"] == 2
