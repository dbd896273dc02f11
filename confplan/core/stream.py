"""Frames on a socket: a writer that numbers them and a reader that checks each header and the sequence.

The reader reads the 32-byte header, checks it in C, reads exactly ``payload_len`` more bytes into one
reusable buffer (so a page frame lands in memory the core unframes from, no copy), and refuses a gap or a
repeat in ``seq``. The payload itself is checked by whoever consumes the frame (``wire.decode`` or the
``pages.unframe_*`` functions), which is where its CRC is verified once.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from confplan.core._buffers import Memory
from confplan.core.status import CoreStatus, PageCoreError
from confplan.core.wire import HEADER_SIZE, MAX_PAYLOAD, Control, FrameHeader, encode, parse_header
from confplan.errors import ConfplanError


@dataclass(frozen=True)
class Frame:
    """A received frame: its checked header and a view of the whole frame, valid until the next recv()."""

    header: FrameHeader
    data: memoryview


class FrameWriter:
    """Sends frames on ``sock`` and owns the stream's sequence number."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.seq = 0  # the seq the next frame must carry

    def send_control(self, msg: Control) -> None:
        self.send(encode(msg, self.seq))

    def send(self, frame: Memory) -> None:
        """Send a complete frame built with ``seq == self.seq`` (page frames take it as an argument)."""
        view = memoryview(frame)
        header = parse_header(view[:HEADER_SIZE])
        if header.seq != self.seq:
            raise ValueError(f"frame carries seq {header.seq}, the stream is at {self.seq}")
        self._sock.sendall(view[: header.frame_len])
        self.seq += 1


INITIAL_BUFFER = 1 << 20


class FrameReader:
    """Receives frames from ``sock`` into one buffer that grows to the largest frame seen (a bytearray is
    zeroed, i.e. resident, in full: sizing it for the 16 MiB maximum up front cost every VMM 16 MiB)."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self._sock = sock
        self._peer = peer
        self._buf = bytearray(INITIAL_BUFFER)
        self._view = memoryview(self._buf)
        self.seq = 0  # the seq the next frame must carry

    def _grow(self, size: int) -> None:
        """A buffer for a ``size``-byte frame (at most HEADER_SIZE + MAX_PAYLOAD), keeping the header read;
        the old buffer goes when the caller drops the last frame that views it."""
        size = min(-(-size // INITIAL_BUFFER) * INITIAL_BUFFER, HEADER_SIZE + MAX_PAYLOAD)
        bigger = bytearray(size)
        bigger[:HEADER_SIZE] = self._view[:HEADER_SIZE]
        self._buf, self._view = bigger, memoryview(bigger)

    def recv(self) -> Frame:
        """The next frame. Raises ConfplanError on a closed stream, PageCoreError on a bad header or seq."""
        self._read_exactly(self._view[:HEADER_SIZE], "a frame header")
        header = parse_header(self._view[:HEADER_SIZE])
        if header.seq != self.seq:
            raise PageCoreError(
                f"frame from {self._peer} has seq {header.seq}, expected {self.seq}: "
                "frames were lost or repeated",
                code=CoreStatus.SEQUENCE,
                value=header.seq,
                expected=self.seq,
                hint="the stream is broken: abort and rerun the migration",
            )
        if header.frame_len > len(self._buf):
            self._grow(header.frame_len)
        self._read_exactly(self._view[HEADER_SIZE : header.frame_len], f"the payload of frame {header.seq}")
        self.seq += 1
        return Frame(header, self._view[: header.frame_len])

    def _read_exactly(self, into: memoryview, what: str) -> None:
        got = 0
        while got < len(into):
            n = self._sock.recv_into(into[got:])
            if n == 0:
                raise ConfplanError(
                    f"{self._peer} closed the migration stream while {what} was expected "
                    f"({got} of {len(into)} bytes received)",
                    hint="see the peer's log for why it stopped",
                )
            got += n
