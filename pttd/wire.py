"""One encrypted connection to a peer: the trio I/O around protocol.noise,
protocol.framing and protocol.messages.

``establish`` runs the Noise XX handshake and the hello exchange under a time limit;
afterwards ``send`` and ``receive`` move one message at a time. Every way a peer can
misbehave at this layer (garbage, a frame over the limit, a failed tag, a stalled
frame, silence, not reading what we send) ends in ``WireError`` with a reason fit for
a log line; the caller closes the connection.
"""

from __future__ import annotations

import trio
from nacl.signing import SigningKey

from protocol import messages
from protocol.errors import FormatError
from protocol.framing import MAX_FRAME, FrameDecoder, encode_frame
from protocol.noise import TAGLEN, Handshake, HandshakeError

from .config import WireConfig

AGENT = "pttd/0.1"
RECV_SIZE = 256 * 1024
HANDSHAKE_MAX_FRAME = 1024  # handshake messages are under 200 bytes


class WireError(Exception):
    """The connection cannot go on; the message says why."""


class Connection:
    def __init__(self, stream: trio.abc.Stream, cfg: WireConfig, remote: str):
        self.stream = stream
        self.cfg = cfg
        self.remote = remote  # "host:port" of the other end, for log lines
        self.peer_id: bytes | None = None
        self.peer_mode = "?"
        self.version = 0
        self._decoder = FrameDecoder(HANDSHAKE_MAX_FRAME)  # raised after the handshake
        self._frames: list[bytes] = []
        self._send_lock = trio.Lock()
        self._send = None
        self._recv = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.closed = False

    @property
    def name(self) -> str:
        who = self.peer_id.hex()[:16] if self.peer_id else "?"
        return f"{self.remote} ({who})"

    # --- set-up ---------------------------------------------------------------------

    async def establish(self, identity: SigningKey, initiator: bool, mode: str, expect: bytes | None = None) -> None:
        """Handshake and hello; raises WireError."""
        with trio.move_on_after(self.cfg.handshake_timeout) as scope:
            hs = Handshake(identity, initiator, expect)
            try:
                if initiator:
                    await self._send_raw(hs.write_message())
                    hs.read_message(await self._read_frame(idle=self.cfg.handshake_timeout))
                    await self._send_raw(hs.write_message())
                else:
                    hs.read_message(await self._read_frame(idle=self.cfg.handshake_timeout))
                    await self._send_raw(hs.write_message())
                    hs.read_message(await self._read_frame(idle=self.cfg.handshake_timeout))
            except (HandshakeError, WireError) as exc:
                raise WireError(f"handshake failed: {exc}") from None
            session = hs.session
            self._decoder.max_frame = MAX_FRAME + TAGLEN
            self.peer_id = session.peer_id
            self._send, self._recv = session.send, session.recv
            await self.send({"t": "hello", "versions": list(messages.SUPPORTED_VERSIONS), "mode": mode, "agent": AGENT})
            hello = await self.receive()
            if hello["t"] != "hello":
                raise WireError(f"expected hello, got {hello['t']}")
            version = messages.negotiate(messages.SUPPORTED_VERSIONS, hello["versions"])
            if version is None:
                await self.send_error("version", f"no common protocol version (we speak {messages.SUPPORTED_VERSIONS})")
                raise WireError(
                    f"peer speaks protocol versions {hello['versions']}, we speak {messages.SUPPORTED_VERSIONS}"
                )
            self.version = version
            self.peer_mode = hello["mode"]
        if scope.cancelled_caught:
            raise WireError(f"handshake not complete within {self.cfg.handshake_timeout:g} s")

    # --- frames ---------------------------------------------------------------------

    async def _send_raw(self, payload: bytes, seal=None) -> None:
        """One frame of ``payload`` (``seal``: encrypting it first). A sender cancelled
        while waiting for its turn sends nothing and uses nothing. Once its turn comes
        the frame is sealed (its nonce taken) and written: cancelled before any of it
        went out, the nonce is given back, and the session goes on; cancelled with part
        of it out (a peer reading slowly), the connection is closed, as nothing after a
        cut frame could be read. (A frame skipped with its nonce taken left the peer
        unable to read any later frame: the session ended for every repository on it.)"""
        async with self._send_lock:
            data = encode_frame(seal(b"", payload) if seal is not None else payload, MAX_FRAME + TAGLEN)
            sent = 0
            with trio.move_on_after(self.cfg.send_timeout) as scope:
                try:
                    sent = await self._write(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    raise WireError(f"connection lost while sending ({exc.__class__.__name__})") from None
                except BaseException as exc:  # cancelled
                    sent = getattr(exc, "pttd_sent", 0)
                    if sent:
                        self._break()
                    elif seal is not None:
                        self._send.rewind()
                    raise
            if scope.cancelled_caught:
                self._break()
                raise WireError(f"peer read nothing for {self.cfg.send_timeout:g} s (slow reader)")
        self.bytes_out += len(data)

    async def _write(self, data: bytes) -> int:
        """``data`` to the socket; the bytes written. An exception leaving it carries
        how many had gone out (``pttd_sent``)."""
        sock = getattr(self.stream, "socket", None)
        if sock is None:  # not a socket stream: all or nothing is not known, so all
            with trio.CancelScope(shield=True):
                await self.stream.send_all(data)
            return len(data)
        view = memoryview(data)
        sent = 0
        try:
            while sent < len(data):
                sent += await sock.send(view[sent:])  # a cancellation comes before a send, never inside one
        except BaseException as exc:
            exc.pttd_sent = sent
            raise
        return sent

    def _break(self) -> None:
        """Part of a frame went out: nothing more can be read after it. The connection
        is closed (its reader sees it closed)."""
        self.closed = True
        sock = getattr(self.stream, "socket", None)
        if sock is not None:
            sock.close()

    async def _read_frame(self, idle: float | None = None) -> bytes:
        if self._frames:
            return self._frames.pop(0)
        idle = self.cfg.idle_timeout if idle is None else idle
        now = trio.current_time()
        idle_deadline = now + idle
        frame_deadline = now + self.cfg.frame_timeout if self._decoder.buffered else None
        while True:
            deadline = frame_deadline if frame_deadline is not None else idle_deadline
            with trio.move_on_at(deadline):
                try:
                    data = await self.stream.receive_some(RECV_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    raise WireError(f"connection lost ({exc.__class__.__name__})") from None
                if not data:
                    raise WireError("peer closed the connection")
                self.bytes_in += len(data)
                try:
                    frames = self._decoder.feed(data)
                except FormatError as exc:
                    raise WireError(str(exc)) from None
                if frames:
                    self._frames.extend(frames[1:])
                    return frames[0]
                if frame_deadline is None and self._decoder.buffered:
                    frame_deadline = trio.current_time() + self.cfg.frame_timeout
                continue
            if frame_deadline is not None:
                raise WireError(
                    f"a frame begun {self.cfg.frame_timeout:g} s ago is still incomplete "
                    f"({self._decoder.buffered} bytes of it in; stalled or trickling peer)"
                )
            raise WireError(f"nothing received for {idle:g} s")

    # --- messages -------------------------------------------------------------------

    async def send(self, msg: dict) -> None:
        payload = messages.encode(msg)
        if len(payload) > MAX_FRAME:
            raise WireError(f"refusing to send a {msg.get('t')} message of {len(payload)} bytes (over the frame limit)")
        await self._send_raw(payload, self._send.encrypt)

    async def receive(self) -> dict:
        frame = await self._read_frame()
        try:
            payload = self._recv.decrypt(b"", frame)
        except HandshakeError as exc:
            raise WireError(f"frame failed to decrypt: {exc}") from None
        try:
            return messages.decode(payload)
        except FormatError as exc:
            raise WireError(f"bad message: {exc}") from None

    async def send_error(self, code: str, message: str) -> None:
        """Best effort: tell the peer why we close (it may not be listening)."""
        if self._send is None or self.closed:
            return
        with trio.move_on_after(1):
            try:
                await self.send({"t": "error", "code": code, "message": message[:1000]})
            except WireError:
                pass

    async def aclose(self) -> None:
        self.closed = True
        with trio.CancelScope(shield=True):
            with trio.move_on_after(1):
                try:
                    await self.stream.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
