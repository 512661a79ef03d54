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


class FrameTooLarge(FormatError):
    """A frame announced more bytes than the limit."""


def encode_frame(payload: bytes, max_frame: int = MAX_FRAME) -> bytes:
    if len(payload) > max_frame:
        raise FrameTooLarge(f"frame of {len(payload)} bytes is over the {max_frame}-byte limit")
    return len(payload).to_bytes(HEADER, "big") + payload


class FrameDecoder:
    def __init__(self, max_frame: int = MAX_FRAME):
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the frames now complete (possibly none)."""
        self._buf += data
        frames = []
        while len(self._buf) >= HEADER:
            n = int.from_bytes(self._buf[:HEADER], "big")
            if n > self.max_frame:
                raise FrameTooLarge(f"peer announced a frame of {n} bytes, over the {self.max_frame}-byte limit")
            if len(self._buf) < HEADER + n:
                break
            frames.append(bytes(self._buf[HEADER : HEADER + n]))
            del self._buf[: HEADER + n]
        return frames

    @property
    def buffered(self) -> int:
        return len(self._buf)
