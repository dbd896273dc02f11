"""The other parties of the SNP key release (docs/key-release.md), played in Python for the helper's tests:
the secure processor (SNP guest messages under VMPCK0: MSG_REPORT_REQ in, MSG_REPORT_RSP out) and the
owner's broker (X25519, HKDF-SHA256, AES-256-GCM over the report), with ``confplan.sev``'s message and wrap
code (``cryptography`` underneath): independent of the helper's C. Unlike ``sev.psp``, these take any
sequence number and report, so a test can make every malformed answer a host could relay."""

from __future__ import annotations

import os
import struct

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from confplan.migration import mailbox_layout as mbx
from confplan.migration.mailbox import Mailbox
from confplan.sev import snp_guest_msg as gm
from confplan.sev.snp_release import public_bytes, wrap_to_report

HDR = gm.HEADER_LEN
REPORT_RSP = gm.MsgType.REPORT_RSP
OWNER = X25519PrivateKey.generate()  # the owner's static key of these tests
OWNER_PUBLIC = public_bytes(OWNER)  # what the guest's measured boot parameters carry
header, seal_msg = gm.header, gm.seal_header


def secrets_page(vmpck0: bytes) -> bytes:
    """The PSP's SNP secrets page: VERSION at 0, VMPCK0..3 at 0x20..0x80 (only VMPCK0 matters here)."""
    return gm.secrets_page([vmpck0, *(os.urandom(gm.VMPCK_LEN) for _ in range(3))])


def open_request(vmpck0: bytes, msg: bytes) -> tuple[int, bytes, int]:
    """The PSP's side of MSG_REPORT_REQ: (seqno, REPORT_DATA, VMPL); raises on anything malformed."""
    assert len(msg) == mbx.KEY_REQUEST_BYTES
    assert msg[0x3C] == 0 and msg[16:32] == bytes(16) and msg[0x28:0x30] == bytes(8)
    opened = gm.open_msg(msg, vmpck0)
    assert opened.msg_type is gm.MsgType.REPORT_REQ and opened.payload[68:] == bytes(28)
    return opened.seqno, opened.payload[:64], struct.unpack_from("<I", opened.payload, 64)[0]


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
    return seal_msg(header(seqno + seq_delta, REPORT_RSP, gm.REPORT_RSP_LEN), payload, vmpck0), report


def wrap_key(report: bytes, nonce: bytes, table: bytes, *, owner: X25519PrivateKey = OWNER) -> bytes:
    """The broker's wrap (``sev.snp_release``), made with the static key ``owner``."""
    return wrap_to_report(report, nonce, table, owner).pack()


def key_op(mb: Mailbox, op: mbx.Op, data: bytes, *, arg1: int | None = None) -> tuple[int, bytes]:
    """Post a key op with ``data`` at the data area (slot 0); (status, the data area's first n_ok bytes:
    KEY_REQUEST's message, KEY_REPORT's report; KEY_RELEASE's n_ok is the table's length, not written)."""
    mb.slots[: len(data)] = data
    seq = mb.post(op, arg1=len(data) if arg1 is None else arg1)
    status = mb.wait(op, seq)
    n_ok = mb.result(seq)[1]
    return status, bytes(mb.slots[:n_ok]) if status == mbx.MhStatus.OK else b""
