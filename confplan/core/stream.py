"""Frames on a socket: a writer that numbers (and protects) them and a reader that checks each header, the
sequence and, on a protected stream, each tag.

The reader reads the 32-byte header, checks it in C, reads exactly ``payload_len`` more bytes (and the
16-byte tag of a protected frame) into one reusable buffer (so a page frame lands in memory the core
unframes from, no copy), and refuses a gap or a repeat in ``seq``. On a protected stream
(docs/stream-security.md) it verifies the tag and decrypts the payload in place before it hands the frame
out. The payload's structure is checked by whoever consumes the frame (``wire.decode`` or the
``pages.unframe_*`` functions), which is also where a payload CRC is verified once.

Without a ``FrameKey`` both ends speak the unprotected mode (CRCs only): for tests and benches. A protected
reader refuses unprotected frames and the reverse.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass

from confplan.core._buffers import Memory
from confplan.core.frameauth import FrameKey
from confplan.core.status import CoreStatus, PageCoreError
from confplan.core.wire import (
    HEADER_SIZE,
    MAX_PAYLOAD,
    TAG_SIZE,
    Control,
    FrameHeader,
    encode,
    parse_header,
)
from confplan.errors import ConfplanError


@dataclass(frozen=True)
class Frame:
    """A received frame: its checked header and a view of the whole frame (header and plaintext payload,
    no tag), valid until the next recv()."""

    header: FrameHeader
    data: memoryview


class FrameWriter:
    """Sends frames on ``sock`` and owns the stream's sequence number; with ``key``, protects each frame."""

    def __init__(self, sock: socket.socket, key: FrameKey | None = None) -> None:
        self._sock = sock
        self._key = key
        if key is not None:
            key.claim_for_sending()
        self.seq = key.first_seq if key is not None else 0  # the seq the next frame must carry

    @property
    def protected(self) -> bool:
        return self._key is not None

    @property
    def key(self) -> FrameKey | None:
        """The frame key (the core's data loop sends under this writer's claim and seq)."""
        return self._key

    def send_control(self, msg: Control) -> None:
        self.send(encode(msg, self.seq))

    def send(self, frame: Memory) -> None:
        """Send a complete unprotected frame built with ``seq == self.seq`` (page frames take it as an
        argument); on a protected stream it goes out protected. ``frame`` is not changed."""
        view = memoryview(frame)
        if self._key is None:
            header = parse_header(view[:HEADER_SIZE])
            self._check_seq(header)
            self._sock.sendall(view[: header.frame_len])
        else:
            header, parts = self._key.protect(view)
            self._check_seq(header)
            send_parts(self._sock, parts)
        self.seq += 1

    def _check_seq(self, header: FrameHeader) -> None:
        if header.seq != self.seq:
            raise ValueError(f"frame carries seq {header.seq}, the stream is at {self.seq}")


def send_parts(sock: socket.socket, parts: Sequence[Memory]) -> None:
    """sendall() of several buffers in one system call where the kernel takes them all (no copy, and no
    small trailing write for Nagle to hold back)."""
    views = [memoryview(p).cast("B") for p in parts]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= len(views[0]):
            sent -= len(views.pop(0))
        if sent:
            views[0] = views[0][sent:]


INITIAL_BUFFER = 1 << 20


class FrameReader:
    """Receives frames from ``sock`` into one buffer that grows to the largest frame seen (a bytearray is
    zeroed, i.e. resident, in full: sizing it for the 16 MiB maximum up front cost every VMM 16 MiB).
    With ``key``, the stream is protected: every frame's tag is checked before the frame is handed out."""

    def __init__(self, sock: socket.socket, peer: str, key: FrameKey | None = None) -> None:
        self._sock = sock
        self._peer = peer
        self._key = key
        self._buf = bytearray(INITIAL_BUFFER)
        self._view = memoryview(self._buf)
        self.seq = key.first_seq if key is not None else 0  # the seq the next frame must carry
        self._pending: bytes | None = None  # a header the core's data loop read and handed back

    @property
    def key(self) -> FrameKey | None:
        return self._key

    @property
    def peer(self) -> str:
        return self._peer

    def pending_header(self) -> bytes:
        """The header push_header() handed in, not yet read by recv() (empty if none)."""
        return self._pending or b""

    def push_header(self, header: bytes) -> None:
        """The next frame's header, already read from the socket (by the core's data loop): recv() starts
        from it and reads the rest."""
        self._pending = header

    def _grow(self, size: int) -> None:
        """A buffer for a ``size``-byte frame (at most HEADER_SIZE + MAX_PAYLOAD + TAG_SIZE), keeping the
        header read; the old buffer goes when the caller drops the last frame that views it."""
        size = min(-(-size // INITIAL_BUFFER) * INITIAL_BUFFER, HEADER_SIZE + MAX_PAYLOAD + TAG_SIZE)
        bigger = bytearray(size)
        bigger[:HEADER_SIZE] = self._view[:HEADER_SIZE]
        self._buf, self._view = bigger, memoryview(bigger)

    def recv(self) -> Frame:
        """The next frame. Raises ConfplanError on a closed stream, PageCoreError on a bad header, seq or
        tag."""
        if self._pending is not None:
            self._view[:HEADER_SIZE], self._pending = self._pending, None
        else:
            self._read_exactly(self._view[:HEADER_SIZE], "a frame header")
        header = parse_header(self._view[:HEADER_SIZE])
        if header.protected != (self._key is not None):
            raise self._flag_error(header)
        if header.seq != self.seq:
            raise PageCoreError(
                f"{header.type.name} frame from {self._peer} has seq {header.seq}, expected {self.seq}: "
                "frames were lost, repeated or replayed",
                code=CoreStatus.SEQUENCE,
                value=header.seq,
                expected=self.seq,
                hint="the stream is broken or was tampered with: abort and rerun the migration",
            )
        total = header.frame_len + (TAG_SIZE if header.protected else 0)
        if total > len(self._buf):
            self._grow(total)
        self._read_exactly(self._view[HEADER_SIZE:total], f"the payload of frame {header.seq}")
        if self._key is not None:
            self._key.check(self._view[:total], header)
        self.seq += 1
        return Frame(header, self._view[: header.frame_len])

    def _flag_error(self, header: FrameHeader) -> PageCoreError:
        if header.protected:
            what = "a protected frame, but this side has no stream key"
            hint = "both VMMs must be given the migration's stream key (or neither, in tests)"
        else:
            what = "an unprotected frame on a protected stream"
            hint = "the peer does not protect its frames: an older or misconfigured confplan, or an injection"
        return PageCoreError(
            f"{header.type.name} frame {header.seq} from {self._peer} is {what}",
            code=CoreStatus.UNPROTECTED,
            value=int(header.protected),
            expected=int(self._key is not None),
            hint=hint,
        )

    def _read_exactly(self, into: memoryview, what: str) -> None:
        got = 0
        while got < len(into):
            n = self._sock.recv_into(into[got:])
            if n == 0:
                raise ConfplanError(
                    f"{self._peer} closed the migration stream while {what} was expected "
                    f"({got} of {len(into)} bytes received): the stream is truncated",
                    hint="see the peer's log for why it stopped",
                )
            got += n
