"""Per-frame protection of the migration stream, wire v2 (docs/stream-security.md, "Frame protection").

A ``FrameKey`` is one direction's AES-256-GCM key from the handshake (``confplan.core.streamauth``).
``protect`` turns an unprotected frame the core built into what travels: the PROTECTED header, then the
payload encrypted with the tag after it, or, for SEALED_PAGES, the records in clear with a GMAC over the
header, the prefix and every record's 64-byte header (gathered by the core: a Python loop over records
costs ~65 us a frame). ``check`` verifies a received frame's tag and decrypts it in place. One call into
the core per frame on each side, into buffers the key owns. The nonce is the direction and the frame's
seq, so a key never sees one nonce twice as long as one writer owns it (``claim_for_sending``).
"""

from __future__ import annotations

import ctypes
import enum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from confplan.core._buffers import Memory, pinned
from confplan.core._lib import ErrorC, FrameHeaderC, lib
from confplan.core.datapath import LoopKey
from confplan.core.status import CoreStatus, PageCoreError, raise_for
from confplan.core.wire import (
    HEADER_SIZE,
    MAX_FRAME_PAGES,
    PAGES_PREFIX_SIZE,
    SEALED_HEADER_SIZE,
    TAG_SIZE,
    FrameHeader,
    FrameType,
)

KEY_SIZE = 32
MAX_SEALED_AAD = HEADER_SIZE + PAGES_PREFIX_SIZE + MAX_FRAME_PAGES * SEALED_HEADER_SIZE


class Direction(enum.Enum):
    """Which way a key protects frames; its value starts every GCM nonce of that direction."""

    SOURCE_TO_TARGET = b"s>t\x00"
    TARGET_TO_SOURCE = b"t>s\x00"


class FrameKey:
    """One direction's AES-256-GCM key, and the seq of the first frame it protects (the handshake's frames
    come before it). Readers may share a key; only one writer may ever send with it."""

    def __init__(self, key: bytes, direction: Direction, first_seq: int) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError(f"a frame key is {KEY_SIZE} bytes, got {len(key)}")
        self._aead = AESGCM(key)
        self._key = key  # for the core's data loops, which compute the same GMAC in C (for_core)
        self.direction = direction
        self.first_seq = first_seq
        self._claimed = False
        # The core writes into these every frame: ctypes arrays, so their addresses need no pinning
        self._header = (ctypes.c_char * HEADER_SIZE)()
        self._aad = (ctypes.c_char * MAX_SEALED_AAD)()  # a sealed frame's gathered record headers
        self._header_view = memoryview(self._header).cast("B")
        self._aad_view = memoryview(self._aad).cast("B")
        self._out = bytearray(0)  # the writer's ciphertext and tag, grown to the largest frame sent

    def claim_for_sending(self) -> None:
        """Bind the key to one writer: a second writer would reuse its nonces (fatal for GCM)."""
        if self._claimed:
            raise ValueError(f"the {self.direction.name} frame key already has a writer")
        self._claimed = True

    def for_core(self) -> LoopKey:
        """The key and nonce prefix for the core's data loops (``datapath.DataLoop``): a writer's loop
        sends under the writer's claim, so the nonces stay unique."""
        return LoopKey(self._key, self.direction.value)

    def nonce(self, seq: int) -> bytes:
        return self.direction.value + seq.to_bytes(8, "big")

    def protect(self, frame: Memory) -> tuple[FrameHeader, list[memoryview | bytes]]:
        """The unprotected frame at the start of ``frame`` as the parts to send, in order: the PROTECTED
        header, then the ciphertext and tag, or (SEALED_PAGES) the records as they are and the tag."""
        hdr, err, aad_len = FrameHeaderC(), ErrorC(), ctypes.c_uint64()
        with pinned(frame, writable=False, what="frame") as (f, flen):
            rc = lib().cp_frame_protect(
                f, flen, ctypes.addressof(self._header), ctypes.addressof(self._aad), MAX_SEALED_AAD,
                ctypes.byref(aad_len), ctypes.byref(hdr), ctypes.byref(err),
            )  # fmt: skip
        raise_for(rc, err, "protecting a frame")
        header = FrameHeader._from_c(hdr)
        nonce = self.nonce(header.seq)
        payload = memoryview(frame)[HEADER_SIZE : header.frame_len]
        if header.type is FrameType.SEALED_PAGES:
            tag = self._aead.encrypt(nonce, b"", self._aad_view[: aad_len.value])
            return header, [self._header_view, payload, tag]
        need = header.payload_len + TAG_SIZE
        if len(self._out) < need:
            self._out = bytearray(need)
        out = memoryview(self._out)[:need]
        self._aead.encrypt_into(nonce, payload, self._header_view, out)
        return header, [self._header_view, out]

    def check(self, frame: memoryview, header: FrameHeader) -> None:
        """Verify the tag of the received frame ``frame`` (header, payload, tag) and decrypt its payload in
        place; ``header`` is its checked header, whose seq the reader has matched. Raises PageCoreError
        (AUTH_TAG) and leaves nothing usable when the tag does not verify."""
        n, nonce = header.payload_len, self.nonce(header.seq)
        tail = frame[HEADER_SIZE : HEADER_SIZE + n + TAG_SIZE]
        try:
            if header.type is FrameType.SEALED_PAGES:
                self._aead.decrypt(nonce, tail[n:], self._aad_view[: self._sealed_aad(frame)])
            else:
                self._aead.decrypt_into(nonce, tail, frame[:HEADER_SIZE], tail[:n])
        except InvalidTag:
            raise PageCoreError(
                f"{header.type.name} frame {header.seq} failed authentication: its tag does not verify "
                "(changed in transit, or not sent by the peer)",
                code=CoreStatus.AUTH_TAG,
                value=header.seq,
                hint="the stream was changed on the way (or a stranger injected it): abort and rerun the "
                "migration; the source guest keeps running",
            ) from None

    def _sealed_aad(self, frame: memoryview) -> int:
        """Gather a received SEALED_PAGES frame's GMAC input; its length."""
        err, n = ErrorC(), ctypes.c_uint64()
        with pinned(frame, writable=False, what="frame") as (f, flen):
            rc = lib().cp_frame_aad(f, flen, ctypes.addressof(self._aad), MAX_SEALED_AAD, ctypes.byref(n),
                                    ctypes.byref(err))  # fmt: skip
        raise_for(rc, err, "SEALED_PAGES frame refused")
        return int(n.value)
