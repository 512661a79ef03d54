"""Frames on the wire: a 4-byte big-endian length, then that many bytes.

During the handshake a frame carries one handshake message; afterwards one
ChaCha20-Poly1305 ciphertext of a canonical msgpack map. ``FrameDecoder`` is sans-IO:
feed it whatever bytes arrived, take complete frames out. A length above the limit is
refused as soon as its 4 bytes are in, before anything is buffered.
"""

from __future__ import annotations

from .errors import FormatError

MAX_FRAME = 4 << 20  # bytes of payload per frame
HEADER = 4
SMALL = 64 * 1024  # pieces smaller than this are gathered before being kept


class FrameTooLarge(FormatError):
    """A frame announced more bytes than the limit."""


def encode_frame(payload: bytes, max_frame: int = MAX_FRAME) -> bytes:
    if len(payload) > max_frame:
        raise FrameTooLarge(f"frame of {len(payload)} bytes is over the {max_frame}-byte limit")
    return len(payload).to_bytes(HEADER, "big") + payload


class FrameDecoder:
    def __init__(self, max_frame: int = MAX_FRAME):
        self.max_frame = max_frame
        # Received bytes not yet returned: large pieces as they came, small ones gathered
        # in a tail buffer, so a large frame is joined once when complete (instead of
        # being grown and shifted piece by piece) and a trickle costs no more per byte.
        self._pieces: list[bytes] = []
        self._tail = bytearray()
        self._size = 0
        self._need = -1  # length of the frame being received (-1: header not yet in)

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the frames now complete (possibly none)."""
        if data:
            if len(data) >= SMALL and not self._tail:
                self._pieces.append(bytes(data))
            else:
                self._tail += data
                if len(self._tail) >= SMALL:
                    self._pieces.append(bytes(self._tail))
                    self._tail.clear()
            self._size += len(data)
        frames: list[bytes] = []
        if self._size < HEADER or (self._need >= 0 and self._size < HEADER + self._need):
            return frames  # nothing complete: a large frame stays in pieces until it is
        # Walk the buffered bytes once; what follows the last complete frame is kept
        # once (copying the rest after each frame made many small frames quadratic).
        buf = self._joined()
        pos, size = 0, len(buf)
        while True:
            if self._need < 0:
                if size - pos < HEADER:
                    break
                n = int.from_bytes(buf[pos : pos + HEADER], "big")
                if n > self.max_frame:
                    raise FrameTooLarge(f"peer announced a frame of {n} bytes, over the {self.max_frame}-byte limit")
                self._need = n
            end = pos + HEADER + self._need
            if end > size:
                break
            frames.append(buf[pos + HEADER : end])
            pos = end
            self._need = -1
        if pos:
            rest = buf[pos:]
            self._pieces = [rest] if rest else []
            self._size = len(rest)
        return frames

    def _joined(self) -> bytes:
        """Everything buffered as one bytes object (kept as the only piece)."""
        if self._tail:
            self._pieces.append(bytes(self._tail))
            self._tail.clear()
        if len(self._pieces) != 1:
            self._pieces = [b"".join(self._pieces)]
        return self._pieces[0]

    @property
    def buffered(self) -> int:
        return self._size
