"""SEV-SNP guest messages (AMD SEV-SNP ABI, "SNP_GUEST_REQUEST"; Linux drivers/virt/coco/sev-guest): the
AES-256-GCM envelope a guest and its secure processor talk in under a VMPCK, and the MSG_REPORT_REQ/RSP
payloads. docs/key-release.md shows where they are used.

Header (0x60 bytes): AUTHTAG[32] @0 (GCM uses the first 16), MSG_SEQNO u64 @0x20, ALGO u8 @0x30 (1 =
AES-256-GCM), HDR_VERSION u8 @0x31, HDR_SZ u16 @0x32, MSG_TYPE u8 @0x34, MSG_VERSION u8 @0x35, MSG_SZ u16
@0x36, MSG_VMPCK u8 @0x3C. GCM: IV = MSG_SEQNO as 8 little-endian bytes then 4 zero bytes, AAD = header
bytes 0x30..0x5F. The guest's request carries an odd-or-even sequence number n, the answer n + 1.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

HEADER_LEN = 0x60
AAD = slice(0x30, 0x60)
ALGO_AES_256_GCM = 1
HDR_VERSION = 1
MSG_VERSION = 1
VMPCK_LEN = 32
REPORT_REQ_LEN = 0x60  # REPORT_DATA[64], VMPL u32, reserved[28]
REPORT_RSP_LEN = 0x4C0  # STATUS u32, REPORT_SIZE u32, reserved[24], report[0x4A0]
REPORT_LEN = 0x4A0
SECRETS_VERSION = 3
VMPCK0_OFFSET = 0x20  # secrets page: VERSION u32 @0, IMI_EN @4, FMS @8, GOSVW[16] @0x10, VMPCK0..3 @0x20..


class MsgType(enum.IntEnum):
    REPORT_REQ = 5
    REPORT_RSP = 6


class GuestMsgError(ValueError):
    """A guest message that is malformed or does not open (the caller maps it to its own status)."""


@dataclass(frozen=True)
class GuestMsg:
    seqno: int
    msg_type: MsgType
    payload: bytes
    vmpck: int = 0


def _iv(seqno: int) -> bytes:
    return struct.pack("<Q", seqno) + bytes(4)


def header(seqno: int, msg_type: int, size: int, *, algo: int = 1, vmpck: int = 0) -> bytearray:
    """A message header, AUTHTAG still zero (``seal_header`` fills it)."""
    head = bytearray(HEADER_LEN)
    struct.pack_into("<Q", head, 0x20, seqno)
    struct.pack_into("<BBHBBH", head, 0x30, algo, HDR_VERSION, HEADER_LEN, msg_type, MSG_VERSION, size)
    head[0x3C] = vmpck
    return head


def seal_header(head: bytearray, payload: bytes, vmpck: bytes) -> bytes:
    """Seal ``payload`` under ``head`` as it is (its MSG_SEQNO gives the IV): header with the tag, then
    the ciphertext."""
    seqno = struct.unpack_from("<Q", head, 0x20)[0]
    sealed = AESGCM(vmpck).encrypt(_iv(seqno), payload, bytes(head[AAD]))
    head[0:16] = sealed[-16:]
    return bytes(head) + sealed[:-16]


def seal(msg: GuestMsg, vmpck: bytes) -> bytes:
    """The message as it travels: header with the tag, then the encrypted payload."""
    return seal_header(header(msg.seqno, msg.msg_type, len(msg.payload), vmpck=msg.vmpck), msg.payload, vmpck)


def open_msg(raw: bytes, vmpck: bytes) -> GuestMsg:
    """Check the header's fixed fields and the sizes, then open; ``GuestMsgError`` says what was wrong."""
    if len(raw) < HEADER_LEN:
        raise GuestMsgError(f"a guest message is at least {HEADER_LEN:#x} bytes, got {len(raw)}")
    seqno, = struct.unpack_from("<Q", raw, 0x20)
    algo, hdr_version, hdr_sz, msg_type, msg_version, msg_sz = struct.unpack_from("<BBHBBH", raw, 0x30)
    if (algo, hdr_version, hdr_sz, msg_version) != (ALGO_AES_256_GCM, HDR_VERSION, HEADER_LEN, MSG_VERSION):
        raise GuestMsgError("unsupported message header (algo, header version or size, message version)")
    if msg_type not in iter(MsgType) or len(raw) != HEADER_LEN + msg_sz:
        raise GuestMsgError(f"message type {msg_type} with {msg_sz} bytes in a {len(raw)}-byte message")
    try:
        payload = AESGCM(vmpck).decrypt(_iv(seqno), raw[HEADER_LEN:] + raw[:16], raw[AAD])
    except InvalidTag:
        raise GuestMsgError("the message does not open under the VMPCK (tag)") from None
    return GuestMsg(seqno, MsgType(msg_type), payload, raw[0x3C])


def report_request(report_data: bytes, vmpl: int = 0) -> bytes:
    """MSG_REPORT_REQ's payload."""
    return report_data.ljust(64, b"\x00") + struct.pack("<I", vmpl) + bytes(28)


def report_response(report: bytes, status: int = 0) -> bytes:
    """MSG_REPORT_RSP's payload."""
    return struct.pack("<II", status, len(report)) + bytes(24) + report


def secrets_page(vmpcks: list[bytes]) -> bytes:
    """The SNP secrets page the secure processor writes at a SECRETS page (VMPCK0..3, the rest zero)."""
    page = bytearray(4096)
    struct.pack_into("<I", page, 0, SECRETS_VERSION)
    for i, key in enumerate(vmpcks):
        page[VMPCK0_OFFSET + VMPCK_LEN * i : VMPCK0_OFFSET + VMPCK_LEN * (i + 1)] = key
    return bytes(page)
