"""The other parties of the SNP key release (docs/key-release.md), played in Python for the helper's tests:
the secure processor (SNP guest messages under VMPCK0: MSG_REPORT_REQ in, MSG_REPORT_RSP out) and the
owner's broker (X25519, HKDF-SHA256, AES-256-GCM over the report), byte for byte as the protocol page says,
with ``cryptography``: independent code, not the helper's C agreeing with itself."""

from __future__ import annotations

import os
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from confplan.migration import mailbox_layout as mbx
from confplan.migration.mailbox import Mailbox

HDR = 0x60
REPORT_REQ, REPORT_RSP = 5, 6


def secrets_page(vmpck0: bytes) -> bytes:
    """The PSP's SNP secrets page: VERSION at 0, VMPCK0..3 at 0x20..0x80 (only VMPCK0 matters here)."""
    page = bytearray(4096)
    struct.pack_into("<I", page, 0, 3)
    page[0x20:0x40] = vmpck0
    page[0x40:0xA0] = os.urandom(0x60)
    return bytes(page)


def msg_iv(seqno: int) -> bytes:
    return struct.pack("<Q", seqno) + bytes(4)


def header(seqno: int, msg_type: int, size: int, *, algo: int = 1, vmpck: int = 0) -> bytearray:
    """An SNP guest message header (AMD layout), AUTHTAG still zero."""
    h = bytearray(HDR)
    struct.pack_into("<Q", h, 0x20, seqno)
    struct.pack_into("<BBHBBH", h, 0x30, algo, 1, HDR, msg_type, 1, size)
    h[0x3C] = vmpck
    return h


def seal_msg(key: bytes, hdr: bytearray, payload: bytes) -> bytes:
    seqno = struct.unpack_from("<Q", hdr, 0x20)[0]
    sealed = AESGCM(key).encrypt(msg_iv(seqno), payload, bytes(hdr[0x30:HDR]))
    hdr[0:16] = sealed[-16:]
    return bytes(hdr) + sealed[:-16]


def open_request(vmpck0: bytes, msg: bytes) -> tuple[int, bytes, int]:
    """The PSP's side of MSG_REPORT_REQ: (seqno, REPORT_DATA, VMPL); raises on anything malformed."""
    assert len(msg) == mbx.KEY_REQUEST_BYTES
    seqno = struct.unpack_from("<Q", msg, 0x20)[0]
    assert msg[0x30:0x38] == struct.pack("<BBHBBH", 1, 1, HDR, REPORT_REQ, 1, 0x60)
    assert msg[0x3C] == 0 and msg[16:32] == bytes(16) and msg[0x28:0x30] == bytes(8)
    payload = AESGCM(vmpck0).decrypt(msg_iv(seqno), msg[HDR:] + msg[:16], msg[0x30:HDR])
    assert payload[68:] == bytes(28)
    return seqno, payload[:64], struct.unpack_from("<I", payload, 64)[0]


def make_report(report_data: bytes, *, vmpl: int = 0, measurement: bytes | None = None,
                report_id: bytes | None = None) -> bytes:  # fmt: skip
    """An attestation report (AMD layout, version 2) with that REPORT_DATA; the signature is filler: only
    the broker checks it (sev.snp_verify), the helper binds the signed bytes into the wrap instead."""
    r = bytearray(mbx.KEY_REPORT_BYTES)
    struct.pack_into("<IIQ", r, 0, 2, 0, 0x30000)  # version, guest_svn, policy
    struct.pack_into("<II", r, 0x30, vmpl, 1)  # VMPL, signature algorithm (ECDSA P-384)
    r[0x50:0x90] = report_data
    r[0x90:0xC0] = measurement if measurement is not None else os.urandom(48)
    r[0x140:0x160] = report_id if report_id is not None else os.urandom(32)
    r[0x2A0:] = os.urandom(mbx.KEY_REPORT_BYTES - 0x2A0)
    return bytes(r)


def psp_response(vmpck0: bytes, request: bytes, *, status: int = 0, report_size: int = 0x4A0,
                 report: bytes | None = None, seq_delta: int = 1) -> tuple[bytes, bytes]:  # fmt: skip
    """SNP_GUEST_REQUEST: opens the request, answers MSG_REPORT_RSP (its seqno + 1): (response, report)."""
    seqno, report_data, vmpl = open_request(vmpck0, request)
    report = make_report(report_data, vmpl=vmpl) if report is None else report
    payload = struct.pack("<II24x", status, report_size) + report
    return seal_msg(vmpck0, header(seqno + seq_delta, REPORT_RSP, 0x4C0), payload), report


def kek(nonce: bytes, shared: bytes, report: bytes) -> bytes:
    info = mbx.KEY_KDF_INFO + report[0x90:0xC0] + report[0x140:0x160]
    return HKDF(hashes.SHA256(), 32, nonce, info).derive(shared)


def wrap_key(report: bytes, nonce: bytes, table: bytes, *, owner: X25519PrivateKey | None = None) -> bytes:
    """The broker's wrap: "CPSNPKR2" || O || IV || AES-GCM(kek, IV, table, AAD = report[0:0x2A0])."""
    owner = X25519PrivateKey.generate() if owner is None else owner
    guest = X25519PublicKey.from_public_bytes(report[0x70:0x90])
    iv = os.urandom(12)
    aead = AESGCM(kek(nonce, owner.exchange(guest), report))
    sealed = aead.encrypt(iv, table, report[: mbx.KEY_REPORT_SIGNED])
    return mbx.KEY_WRAP_MAGIC + owner.public_key().public_bytes_raw() + iv + sealed


def key_op(mb: Mailbox, op: mbx.Op, data: bytes, *, arg1: int | None = None) -> tuple[int, bytes]:
    """Post a key op with ``data`` at the data area (slot 0); (status, the data area's first n_ok bytes:
    KEY_REQUEST's message, KEY_REPORT's report; KEY_RELEASE's n_ok is the table's length, not written)."""
    mb.slots[: len(data)] = data
    seq = mb.post(op, arg1=len(data) if arg1 is None else arg1)
    status = mb.wait(op, seq)
    n_ok = mb.result(seq)[1]
    return status, bytes(mb.slots[:n_ok]) if status == mbx.MhStatus.OK else b""
