"""The migration stream's wire format, version 2: the one module that owns its layout (docs/wire.md).

Every frame is a 32-byte header {magic, version, type, flags, payload_len, seq, payload_crc32c,
header_crc32c} and a payload, and on a protected stream a 16-byte tag after the payload (flag PROTECTED;
docs/stream-security.md, ``confplan.core.frameauth``). The per-page frames (SHARED_PAGES, SEALED_PAGES)
are built and checked by the C core (``confplan.core.pages``); the small control frames are encoded here
with ``struct``, and their header is still built and checked by the C core, so there is one
implementation of the header.
"""

from __future__ import annotations

import ctypes
import enum
import struct
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from confplan.core._buffers import Memory, pinned
from confplan.core._lib import ErrorC, FrameHeaderC, lib
from confplan.core.status import CoreStatus, PageCoreError, raise_for

MAGIC = 0x4C504643  # b"CFPL"
WIRE_VERSION = 4
HEADER_SIZE = 32
PAGE_SIZE = 4096
MAX_PAYLOAD = 16 << 20
MAX_FRAME_PAGES = 2048
PAGES_PREFIX_SIZE = 8  # {count u32, reserved u32}
SHARED_ENTRY_SIZE = 16  # {gpa u64, flags u32, reserved u32} (+ 4096 bytes unless ZERO)
SEALED_HEADER_SIZE = 64
SEALED_PAGE_SIZE = SEALED_HEADER_SIZE + PAGE_SIZE
PAGE_ZERO = 0x1  # SHARED_PAGES entry flag
SEAL_OK = 0
MIGRATION_ID_SIZE = 16
NONCE_SIZE = 32  # HELLO's and CHALLENGE's handshake nonces
PROOF_SIZE = 32  # CHALLENGE's and AUTH's HMAC-SHA256 key proofs
TAG_SIZE = 16  # AES-256-GCM tag after a PROTECTED frame's payload (not counted in payload_len)
HF_PROTECTED = 0x1  # frame header flag
MAX_ERROR_MESSAGE = 4096

# struct cp_sealed_page without the ciphertext: gpa, generation, status, nonce, key_id, tag, reserved
SEALED_HEADER = struct.Struct("<QII12sI16s16s")
# AEAD additional data of a sealed page: gpa, generation, migration id
SEALED_AAD = struct.Struct("<QI16s")


class FrameType(enum.IntEnum):
    """enum cp_frame_type."""

    HELLO = 1
    SHARED_PAGES = 2
    SEALED_PAGES = 3
    ROUND_END = 4
    VCPU_STATE = 5
    DEVICE_STATE = 6
    MANIFEST = 7
    DONE = 8
    ERROR = 9
    CHALLENGE = 10
    AUTH = 11
    HANDOVER = 12


class HelperMode(enum.IntEnum):
    """How the migration helper runs (HELLO.helper_mode)."""

    AUX_VCPU = 1
    MIRROR_VM = 2


def shared_frame_capacity(npages: int) -> int:
    """Bytes a SHARED_PAGES frame of ``npages`` pages can take at most (no page zero)."""
    return HEADER_SIZE + PAGES_PREFIX_SIZE + npages * (SHARED_ENTRY_SIZE + PAGE_SIZE)


def sealed_frame_size(nrecords: int) -> int:
    """Bytes of a SEALED_PAGES frame of ``nrecords`` records (always exactly this)."""
    return HEADER_SIZE + PAGES_PREFIX_SIZE + nrecords * SEALED_PAGE_SIZE


def sealed_aad(gpa: int, generation: int, migration_id: bytes) -> bytes:
    """The AEAD additional data the migration helper binds to a sealed page."""
    return SEALED_AAD.pack(gpa, generation, migration_id)


def pack_sealed_header(
    gpa: int, generation: int, nonce: bytes, tag: bytes, *, key_id: int = 0, status: int = SEAL_OK
) -> bytes:
    """The 64-byte header of a sealed page record (the migration helper writes the same bytes)."""
    return SEALED_HEADER.pack(gpa, generation, status, nonce, key_id, tag, bytes(16))


# ---------------------------------------------------------------------------------------------------------
# Frame header


@dataclass(frozen=True)
class FrameHeader:
    """A checked frame header."""

    type: FrameType
    flags: int
    seq: int
    payload_len: int
    payload_crc32c: int

    @property
    def frame_len(self) -> int:
        """Header and payload: what the core checks and unframes (a PROTECTED frame's tag comes after)."""
        return HEADER_SIZE + self.payload_len

    @property
    def protected(self) -> bool:
        return bool(self.flags & HF_PROTECTED)

    @classmethod
    def _from_c(cls, h: FrameHeaderC) -> Self:
        return cls(FrameType(h.type), int(h.flags), int(h.seq), int(h.payload_len), int(h.payload_crc32c))


def parse_header(buf: Memory) -> FrameHeader:
    """Check the first 32 bytes of ``buf`` (magic, version, header CRC, type, flags, payload_len bound)."""
    out, err = FrameHeaderC(), ErrorC()
    with pinned(buf, writable=False, what="frame header") as (addr, n):
        rc = lib().cp_header_check(addr, n, ctypes.byref(out), ctypes.byref(err))
    raise_for(rc, err, "frame header refused")
    return FrameHeader._from_c(out)


def check_frame(frame: Memory) -> FrameHeader:
    """Check a whole frame: header, that the payload is all there, and its CRC."""
    out, err = FrameHeaderC(), ErrorC()
    with pinned(frame, writable=False, what="frame") as (addr, n):
        rc = lib().cp_frame_check(addr, n, ctypes.byref(out), ctypes.byref(err))
    raise_for(rc, err, "frame refused")
    return FrameHeader._from_c(out)


def finish_frame(frame: Memory, ftype: FrameType, seq: int, payload_len: int) -> None:
    """Write the header in front of a payload already at ``frame[HEADER_SIZE:]`` (both CRCs computed)."""
    err = ErrorC()
    with pinned(frame, writable=True, what="frame") as (addr, n):
        rc = lib().cp_frame_finish(addr, n, int(ftype), 0, seq, payload_len, ctypes.byref(err))
    raise_for(rc, err, f"building {ftype.name} frame {seq}")


def build_frame(ftype: FrameType, payload: bytes, seq: int) -> bytearray:
    """A complete frame around ``payload``."""
    frame = bytearray(HEADER_SIZE + len(payload))
    frame[HEADER_SIZE:] = payload
    finish_frame(frame, ftype, seq, len(payload))
    return frame


# ---------------------------------------------------------------------------------------------------------
# Control frames


def _refuse(ftype: FrameType, what: str, value: int = 0, expected: int = 0) -> PageCoreError:
    return PageCoreError(
        f"{ftype.name} frame refused: {what}",
        code=CoreStatus.PAYLOAD_LEN,
        value=value,
        expected=expected,
        hint="the peer is not a matching confplan or the stream is corrupted: abort and rerun the migration",
    )


def _split(
    ftype: FrameType, layout: struct.Struct, payload: bytes, *, exact: bool
) -> tuple[tuple[Any, ...], bytes]:
    """The fixed part of a control payload, unpacked, and the bytes after it."""
    size = layout.size
    if len(payload) < size or (exact and len(payload) != size):
        raise _refuse(ftype, f"payload of {len(payload)} bytes, expected {size}", len(payload), size)
    return layout.unpack_from(payload), payload[layout.size :]


@dataclass(frozen=True)
class Hello:
    """First frame of a stream: who is sending, the guest geometry the target must match, and the source's
    handshake nonce (the handshake, ``confplan.core.streamauth``, draws it; the engines leave it zero)."""

    TYPE: ClassVar[FrameType] = FrameType.HELLO
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<HHIQII16s32sHHI")

    ram_size: int
    migration_id: bytes
    helper_mode: HelperMode
    vcpus: int
    page_size: int = PAGE_SIZE
    sealed_record_size: int = SEALED_PAGE_SIZE
    wire_version: int = WIRE_VERSION
    nonce: bytes = bytes(NONCE_SIZE)
    channels: int = 1  # wire v4: the stream's TCP connections (one per helper vCPU at most)
    channel: int = 0  # which of them this connection is: 0 the main one, 1.. the extra sealed channels

    def pack(self) -> bytes:
        if len(self.migration_id) != MIGRATION_ID_SIZE:
            raise ValueError(f"migration_id must be {MIGRATION_ID_SIZE} bytes, got {len(self.migration_id)}")
        if len(self.nonce) != NONCE_SIZE:
            raise ValueError(f"nonce must be {NONCE_SIZE} bytes, got {len(self.nonce)}")
        return self.LAYOUT.pack(
            self.wire_version,
            int(self.helper_mode),
            self.page_size,
            self.ram_size,
            self.sealed_record_size,
            self.vcpus,
            self.migration_id,
            self.nonce,
            self.channels,
            self.channel,
            0,
        )

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        (version, mode, page, ram, rec, vcpus, mid, nonce, channels, channel, reserved), _ = _split(
            cls.TYPE, cls.LAYOUT, payload, exact=True
        )
        if mode not in HelperMode.__members__.values():
            raise _refuse(cls.TYPE, f"unknown helper mode {mode}", mode)
        if reserved:
            raise _refuse(cls.TYPE, f"reserved bytes {reserved:#x} are not zero", reserved)
        if not 0 <= channel < channels:
            raise _refuse(cls.TYPE, f"channel {channel} of {channels} channels", channel)
        geometry = (int(ram), bytes(mid), HelperMode(mode), int(vcpus), int(page), int(rec), int(version))
        return cls(*geometry, bytes(nonce), int(channels), int(channel))

    def require_match(self, local: Hello) -> None:
        """Raise a ConfplanError naming every field where the peer's migration id or geometry differs from
        ``local``'s (the nonce is the handshake's, not compared)."""
        fields = ("wire_version", "migration_id", "page_size", "sealed_record_size", "ram_size", "vcpus",
                  "helper_mode")  # fmt: skip
        diffs = [
            f"{f}: peer {_show(getattr(self, f))}, here {_show(getattr(local, f))}"
            for f in fields
            if getattr(self, f) != getattr(local, f)
        ]
        if diffs:
            raise PageCoreError(
                "the peer's HELLO does not match this side: " + "; ".join(diffs),
                code=CoreStatus.VERSION if self.wire_version != local.wire_version else CoreStatus.ARG,
                hint="give the source and the target the same plan and migration (guest memory, vCPUs, "
                "helper mode, migration id)",
            )


def _show(value: object) -> str:
    return value.hex() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class Challenge:
    """Handshake, target to source: the target's nonce and its proof of the stream key."""

    TYPE: ClassVar[FrameType] = FrameType.CHALLENGE
    LAYOUT: ClassVar[struct.Struct] = struct.Struct(f"<{NONCE_SIZE}s{PROOF_SIZE}s")

    nonce: bytes
    proof: bytes

    def pack(self) -> bytes:
        return self.LAYOUT.pack(self.nonce, self.proof)

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        (nonce, proof), _ = _split(cls.TYPE, cls.LAYOUT, payload, exact=True)
        return cls(bytes(nonce), bytes(proof))


@dataclass(frozen=True)
class Auth:
    """Handshake, source to target: the source's proof of the stream key over the transcript."""

    TYPE: ClassVar[FrameType] = FrameType.AUTH
    LAYOUT: ClassVar[struct.Struct] = struct.Struct(f"<{PROOF_SIZE}s")

    proof: bytes

    def pack(self) -> bytes:
        return self.LAYOUT.pack(self.proof)

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        (proof,), _ = _split(cls.TYPE, cls.LAYOUT, payload, exact=True)
        return cls(bytes(proof))


@dataclass(frozen=True)
class RoundEnd:
    """End of a precopy round (``final`` marks the stop-and-copy round)."""

    TYPE: ClassVar[FrameType] = FrameType.ROUND_END
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<IIQQQ")
    FINAL: ClassVar[int] = 0x1

    round: int
    shared_pages: int
    zero_pages: int
    sealed_pages: int
    final: bool = False

    def pack(self) -> bytes:
        flags = self.FINAL if self.final else 0
        return self.LAYOUT.pack(self.round, flags, self.shared_pages, self.zero_pages, self.sealed_pages)

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        (rnd, flags, shared, zero, sealed), _ = _split(cls.TYPE, cls.LAYOUT, payload, exact=True)
        if flags & ~cls.FINAL:
            raise _refuse(cls.TYPE, f"unknown flags {flags:#x}", flags)
        return cls(rnd, shared, zero, sealed, bool(flags & cls.FINAL))


@dataclass(frozen=True)
class VcpuState:
    """One vCPU's saved state; ``blob`` is owned by the VMM (its own versioned format)."""

    TYPE: ClassVar[FrameType] = FrameType.VCPU_STATE
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<II")

    vcpu: int
    format_version: int
    blob: bytes

    def pack(self) -> bytes:
        return self.LAYOUT.pack(self.vcpu, self.format_version) + self.blob

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        (vcpu, fmt), rest = _split(cls.TYPE, cls.LAYOUT, payload, exact=False)
        return cls(vcpu, fmt, rest)


@dataclass(frozen=True)
class DeviceState:
    """One device's saved state, named; ``blob`` is owned by the device."""

    TYPE: ClassVar[FrameType] = FrameType.DEVICE_STATE
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<HHI")

    name: str
    format_version: int
    blob: bytes

    def pack(self) -> bytes:
        name = self.name.encode()
        return self.LAYOUT.pack(len(name), 0, self.format_version) + name + self.blob

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        (name_len, reserved, fmt), rest = _split(cls.TYPE, cls.LAYOUT, payload, exact=False)
        if reserved or name_len > len(rest):
            left = len(rest)
            raise _refuse(cls.TYPE, f"name length {name_len} with {left} bytes left", name_len, left)
        try:
            name = rest[:name_len].decode()
        except UnicodeDecodeError as exc:
            raise _refuse(cls.TYPE, f"device name is not UTF-8: {exc}") from exc
        return cls(name, fmt, rest[name_len:])


@dataclass(frozen=True)
class Manifest:
    """The sealed manifest of what was sent (produced and checked by the migration helpers)."""

    TYPE: ClassVar[FrameType] = FrameType.MANIFEST
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<II")

    format_version: int
    blob: bytes

    def pack(self) -> bytes:
        return self.LAYOUT.pack(self.format_version, 0) + self.blob

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        (fmt, reserved), rest = _split(cls.TYPE, cls.LAYOUT, payload, exact=False)
        if reserved:
            raise _refuse(cls.TYPE, f"reserved field {reserved:#x}", reserved)
        return cls(fmt, rest)


@dataclass(frozen=True)
class Done:
    """The source has sent everything; totals let the target cross-check what it received."""

    TYPE: ClassVar[FrameType] = FrameType.DONE
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<IIQQ")

    rounds: int
    shared_pages: int
    sealed_pages: int

    def pack(self) -> bytes:
        return self.LAYOUT.pack(self.rounds, 0, self.shared_pages, self.sealed_pages)

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        (rounds, reserved, shared, sealed), _ = _split(cls.TYPE, cls.LAYOUT, payload, exact=True)
        if reserved:
            raise _refuse(cls.TYPE, f"reserved field {reserved:#x}", reserved)
        return cls(rounds, shared, sealed)


@dataclass(frozen=True)
class ErrorReport:
    """The peer gives up: a code (the sender's own) and a UTF-8 message for the user."""

    TYPE: ClassVar[FrameType] = FrameType.ERROR
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<II")

    code: int
    message: str

    def pack(self) -> bytes:
        text = self.message.encode()[:MAX_ERROR_MESSAGE]
        return self.LAYOUT.pack(self.code, 0) + text

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        (code, reserved), rest = _split(cls.TYPE, cls.LAYOUT, payload, exact=False)
        if reserved or len(rest) > MAX_ERROR_MESSAGE:
            raise _refuse(cls.TYPE, f"reserved {reserved:#x}, message of {len(rest)} bytes", len(rest))
        # a message cut at MAX_ERROR_MESSAGE may end mid-character: keep what decodes
        return cls(code, rest.decode(errors="replace"))


class HandoverCode(enum.IntEnum):
    """The handover's messages (docs/handover.md), as the wire numbers them."""

    COMMIT = 1  # source -> target: resume (answered with the target's state if it already decided)
    ABORT = 2  # source -> target: the source runs the guest again; release your copy
    VERIFIED = 3  # target -> source: the copy checks out, paused, waiting for COMMIT
    REFUSED = 4  # target -> source: the check failed (``text`` says why); never resumes
    RESUMED = 5  # target -> source: the guest runs here now
    RELEASED = 6  # target -> source: released; never resumes this attempt


@dataclass(frozen=True)
class Handover:
    """One handover message of attempt ``attempt``, with an optional UTF-8 ``text`` (a refusal's reason)."""

    TYPE: ClassVar[FrameType] = FrameType.HANDOVER
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<HHIQ")  # code, reserved, reserved, attempt

    code: HandoverCode
    attempt: int
    text: str = ""

    def pack(self) -> bytes:
        return self.LAYOUT.pack(self.code, 0, 0, self.attempt) + self.text.encode()[:MAX_ERROR_MESSAGE]

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        (code, reserved, more, attempt), rest = _split(cls.TYPE, cls.LAYOUT, payload, exact=False)
        reserved |= more
        if reserved or len(rest) > MAX_ERROR_MESSAGE or code not in HandoverCode._value2member_map_:
            raise _refuse(cls.TYPE, f"code {code}, reserved {reserved:#x}, text of {len(rest)} bytes", code)
        return cls(HandoverCode(code), attempt, rest.decode(errors="replace"))


Control = (
    Hello | RoundEnd | VcpuState | DeviceState | Manifest | Done | ErrorReport | Challenge | Auth | Handover
)
_CONTROL_TYPES: tuple[type[Control], ...] = (
    Hello, RoundEnd, VcpuState, DeviceState, Manifest, Done, ErrorReport, Challenge, Auth, Handover,
)  # fmt: skip
_CONTROL: dict[FrameType, type[Control]] = {cls.TYPE: cls for cls in _CONTROL_TYPES}


def encode(msg: Control, seq: int) -> bytearray:
    """The frame carrying control message ``msg`` as frame number ``seq``."""
    return build_frame(msg.TYPE, msg.pack(), seq)


def decode(frame: Memory) -> tuple[FrameHeader, Control]:
    """Check a control frame completely and decode its payload."""
    header = check_frame(frame)
    cls = _CONTROL.get(header.type)
    if cls is None:
        raise PageCoreError(
            f"frame {header.seq} is a {header.type.name} frame, not a control frame",
            code=CoreStatus.TYPE,
            value=int(header.type),
            hint="page frames go to confplan.core.pages.unframe_shared_pages / unframe_sealed_pages",
        )
    payload = bytes(memoryview(frame)[HEADER_SIZE : header.frame_len])
    return header, cls.unpack(payload)
