"""SNP guest messages with the emulated secure processor (docs/key-release.md, steps 1-3): the SECRETS page
it writes at launch, and SNP_GUEST_REQUEST in AMD's envelope under VMPCK0, refusing what a host could try
(a changed byte, a replayed or skipped sequence number, another message type)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from confplan.sev import snp_guest_msg as gm
from confplan.sev.memory import BytearrayGuestMemory
from confplan.sev.policy import encode_snp_policy
from confplan.sev.psp import EmulatedSecureProcessor, SecureProcessorError, SnpGuest
from confplan.sev.snp import PageType, SnpLaunchDigest
from confplan.sev.snp_report import AttestationReport

SECRETS_GPA = 0x3000


def _launched(tmp_path: Path) -> tuple[SnpGuest, bytes, BytearrayGuestMemory]:
    psp = EmulatedSecureProcessor.open(tmp_path)
    memory = BytearrayGuestMemory(0x10000)
    guest = psp.new_snp_guest(memory)
    guest.launch_start(encode_snp_policy(api_major=1, api_minor=51))
    guest.launch_update(0x1000, b"firmware".ljust(4096, b"\x00"))
    guest.launch_update(SECRETS_GPA, b"", PageType.SECRETS)
    guest.launch_finish()
    vmpck0 = memory.read(SECRETS_GPA + gm.VMPCK0_OFFSET, gm.VMPCK_LEN)
    return guest, vmpck0, memory


def _request(vmpck0: bytes, seqno: int, report_data: bytes) -> bytes:
    return gm.seal(gm.GuestMsg(seqno, gm.MsgType.REPORT_REQ, gm.report_request(report_data)), vmpck0)


def test_secrets_page_holds_fresh_vmpcks_and_is_measured_without_its_contents(tmp_path: Path) -> None:
    guest, vmpck0, memory = _launched(tmp_path)
    page = memory.read(SECRETS_GPA, 4096)
    assert struct.unpack_from("<I", page, 0)[0] == gm.SECRETS_VERSION and any(vmpck0)
    assert len({page[0x20 + 32 * i : 0x40 + 32 * i] for i in range(4)}) == 4  # four distinct keys
    digest = SnpLaunchDigest()
    digest.update_region(0x1000, b"firmware".ljust(4096, b"\x00"))
    digest.update_region(SECRETS_GPA, b"", PageType.SECRETS)
    assert guest.launch_digest == digest.digest  # the VMPCKs are not in the digest
    assert _launched(tmp_path)[1] != vmpck0  # another launch, other keys


def test_report_request_round_trip_and_sequence_numbers(tmp_path: Path) -> None:
    guest, vmpck0, _ = _launched(tmp_path)
    for seqno in (1, 3):  # request n, answer n + 1, next request n + 2
        data = os.urandom(64)
        answer = gm.open_msg(guest.guest_request(_request(vmpck0, seqno, data)), vmpck0)
        assert answer.seqno == seqno + 1 and answer.msg_type is gm.MsgType.REPORT_RSP
        status, size = struct.unpack_from("<II", answer.payload, 0)
        assert (status, size, len(answer.payload)) == (0, gm.REPORT_LEN, gm.REPORT_RSP_LEN)
        report = AttestationReport.parse(answer.payload[0x20:])
        assert report.report_data == data and report.measurement == guest.launch_digest
    for seqno in (3, 4, 6):  # a replay, the answer's own number, one skipped
        with pytest.raises(SecureProcessorError, match="expected 5"):
            guest.guest_request(_request(vmpck0, seqno, bytes(64)))


@pytest.mark.parametrize("offset", [0, 15, 0x20, 0x30, 0x34, 0x3C, 0x60, 0x60 + 95])
def test_a_changed_byte_is_refused(tmp_path: Path, offset: int) -> None:
    guest, vmpck0, _ = _launched(tmp_path)
    message = bytearray(_request(vmpck0, 1, bytes(64)))
    message[offset] ^= 0x01
    with pytest.raises(SecureProcessorError, match="INVALID_PARAM"):
        guest.guest_request(bytes(message))
    guest.guest_request(_request(vmpck0, 1, bytes(64)))  # the refusal used up no number


def test_only_the_guests_vmpck_and_report_requests(tmp_path: Path) -> None:
    guest, vmpck0, _ = _launched(tmp_path)
    with pytest.raises(SecureProcessorError, match="does not open"):
        guest.guest_request(_request(os.urandom(32), 1, bytes(64)))
    other = gm.seal(gm.GuestMsg(1, gm.MsgType.REPORT_RSP, gm.report_request(bytes(64))), vmpck0)
    with pytest.raises(SecureProcessorError, match="unexpected REPORT_RSP"):
        guest.guest_request(other)
