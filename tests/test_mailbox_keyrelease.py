"""Mailbox v6, the SNP key release (docs/key-release.md), on the host build of the MH engine (the same C as
the guest's) through the real mailbox client. Python plays the secure processor (SNP guest messages under
VMPCK0, MSG_REPORT_REQ / MSG_REPORT_RSP) and the owner's broker (X25519, HKDF-SHA256, AES-256-GCM over the
report) in tests/snp_party.py, byte for byte as the protocol page says, with ``cryptography``. Every refusal
status is produced by the move that should produce it."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from snp_party import (
    HDR,
    OWNER_PUBLIC,
    REPORT_RSP,
    header,
    key_op,
    make_report,
    open_request,
    psp_response,
    seal_msg,
    secrets_page,
    wrap_key,
)

from confplan.migration import mailbox_layout as mbx
from confplan.migration.host_mh import HostGuest, build_host_library, host_cpu_features
from confplan.migration.mailbox import Mailbox
from confplan.sev.secret_table import (
    CONFPLAN_MIGRATION_ID_GUID,
    CONFPLAN_TRANSPORT_KEY_GUID,
    build_secret_table,
)

St, Op = mbx.MhStatus, mbx.Op
RAM = 6 << 20
P = 2**255 - 19
LOW_ORDER = [0, 1, P - 1, 0x00B8495F16056286FDB1329CEB8D09DA6AC49FF1FAE35616AEB8413B7C7AEBE0]
HAS_RDRAND = "rdrand" in Path("/proc/cpuinfo").read_text(encoding="utf-8").split()
pytestmark = pytest.mark.skipif(
    not HAS_RDRAND, reason="no RDRAND on this CPU: the helper refuses with ENTROPY"
)


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    return build_host_library(tmp_path_factory.mktemp("mh-keyrelease"))


# ---- driving the helper ----


@dataclass
class Exchange:
    """One KEY_REQUEST and its PSP answer, as the VMM relays them."""

    nonce: bytes
    request: bytes
    response: bytes = b""
    report: bytes = b""


@dataclass
class SnpGuest:
    guest: HostGuest
    vmpck0: bytes

    @property
    def mb(self) -> Mailbox:
        return self.guest.mailboxes.mailboxes[0]

    def request(self, nonce: bytes | None = None) -> Exchange:
        nonce = os.urandom(32) if nonce is None else nonce
        status, msg = key_op(self.mb, Op.KEY_REQUEST, nonce)
        assert status == St.OK, St(status)
        return Exchange(nonce, msg)

    def answered(self, nonce: bytes | None = None, **psp: object) -> Exchange:
        ex = self.request(nonce)
        ex.response, ex.report = psp_response(self.vmpck0, ex.request, **psp)  # type: ignore[arg-type]
        return ex

    def reported(self) -> Exchange:
        ex = self.answered()
        status, report = key_op(self.mb, Op.KEY_REPORT, ex.response)
        assert status == St.OK and report == ex.report, St(status)
        return ex


@pytest.fixture
def snp(lib: ctypes.CDLL) -> Iterator[SnpGuest]:
    vmpck0 = os.urandom(32)
    with HostGuest(lib, ram_size=RAM, secret=secrets_page(vmpck0), snp=True, mh_vcpus=2,
                   owner_key=OWNER_PUBLIC) as guest:
        yield SnpGuest(guest, vmpck0)


def table(key: bytes, migration_id: bytes) -> bytes:
    return build_secret_table({CONFPLAN_TRANSPORT_KEY_GUID: key, CONFPLAN_MIGRATION_ID_GUID: migration_id})


def flip(data: bytes, at: int, bit: int = 0x01) -> bytes:
    return data[:at] + bytes([data[at] ^ bit]) + data[at + 1 :]


# ---- the exchange ----


def test_full_exchange_then_init_gives_the_owners_key_to_every_helper(
    lib: ctypes.CDLL, snp: SnpGuest
) -> None:
    key, mig = os.urandom(32), os.urandom(16)
    ex = snp.answered()
    seqno, report_data, vmpl = open_request(snp.vmpck0, ex.request)
    assert (seqno, vmpl, report_data[:32]) == (1, 0, ex.nonce)  # the first request is MSG_SEQNO 1
    assert key_op(snp.mb, Op.INIT, b"")[0] == St.SECRET_HEADER  # nothing released yet
    assert key_op(snp.mb, Op.KEY_REPORT, ex.response) == (St.OK, ex.report)
    status, out = key_op(snp.mb, Op.KEY_RELEASE, wrap_key(ex.report, ex.nonce, table(key, mig)))
    assert status == St.OK and len(out) == len(table(key, mig))  # n_ok = the table's length ...
    assert key not in bytes(snp.mb.slots) and key not in bytes(snp.mb.control)  # ... never the table itself
    with HostGuest(lib, ram_size=RAM, secret=table(key, mig)) as sev:  # the same table as a launch secret
        expected = sev.mailboxes.init()
    for mb in snp.guest.mailboxes.mailboxes:  # helper 1 reads helper 0's release from the shared block
        info = mb.init()
        assert (info.migration_id, info.key_id) == (mig, expected.key_id)


def test_sequence_numbers_move_by_two_whatever_the_answer(snp: SnpGuest) -> None:
    seqnos = [open_request(snp.vmpck0, snp.reported().request)[0]]
    bad = snp.answered()
    assert key_op(snp.mb, Op.KEY_REPORT, flip(bad.response, 0x100))[0] == St.KEY_MSG_AUTH
    seqnos.append(open_request(snp.vmpck0, bad.request)[0])
    seqnos.append(open_request(snp.vmpck0, snp.request().request)[0])  # never answered
    seqnos.append(open_request(snp.vmpck0, snp.reported().request)[0])
    assert seqnos == [1, 3, 5, 7]


def test_a_new_request_draws_a_new_key(snp: SnpGuest) -> None:
    nonce = os.urandom(32)
    keys = {open_request(snp.vmpck0, snp.request(nonce).request)[1][32:] for _ in range(4)}
    assert len(keys) == 4


# ---- refusals: the PSP's response ----

# Header bytes the helper checks itself: AUTHTAG[16:32] and 0x28..0x2F (zero: the tag does not cover them),
# MSG_SEQNO, ALGO, HDR_VERSION, HDR_SZ, MSG_TYPE, MSG_VERSION, MSG_SZ, MSG_VMPCK. Any other byte is under
# the tag (AUTHTAG[0:16], the rest of the AAD, the ciphertext).
CHECKED_HEADER = frozenset(range(16, 0x38)) | {0x3C}


def test_a_flipped_byte_anywhere_in_the_response_is_refused(snp: SnpGuest) -> None:
    positions = [*range(HDR), *range(HDR, mbx.KEY_RESPONSE_BYTES, 37), mbx.KEY_RESPONSE_BYTES - 1]
    for at in positions:
        ex = snp.answered()
        status, _ = key_op(snp.mb, Op.KEY_REPORT, flip(ex.response, at))
        assert status == (St.KEY_MSG if at in CHECKED_HEADER else St.KEY_MSG_AUTH), (hex(at), St(status))
        assert key_op(snp.mb, Op.KEY_RELEASE, b"x" * 100)[0] == St.KEY_STATE  # nothing was reported
    snp.reported()  # and a good answer still passes after all that


@pytest.mark.parametrize(
    ("psp", "status"),
    [({"status": 0x16}, St.KEY_PSP), ({"report_size": 0x498}, St.KEY_PSP), ({"seq_delta": 3}, St.KEY_MSG)],
    ids=["psp-status", "report-size", "seqno"],
)
def test_psp_refusals_and_wrong_sequence_numbers(snp: SnpGuest, psp: dict[str, int], status: St) -> None:
    ex = snp.answered(**psp)
    assert key_op(snp.mb, Op.KEY_REPORT, ex.response)[0] == status


def test_a_report_about_something_else_is_refused(snp: SnpGuest) -> None:
    """An authentic answer whose report does not bind what the helper asked for: another nonce, another
    public key, another VMPL."""
    variants = (lambda rd: make_report(flip(rd, 0)), lambda rd: make_report(flip(rd, 40)),
                lambda rd: make_report(rd, vmpl=1))  # fmt: skip
    for variant in variants:
        ex = snp.request()
        _, report_data, _ = open_request(snp.vmpck0, ex.request)
        response, _ = psp_response(snp.vmpck0, ex.request, report=variant(report_data))
        assert key_op(snp.mb, Op.KEY_REPORT, response)[0] == St.KEY_PSP


def test_a_replayed_response_is_refused(snp: SnpGuest) -> None:
    old = snp.reported()
    fresh = snp.answered()
    assert key_op(snp.mb, Op.KEY_REPORT, old.response)[0] == St.KEY_MSG  # its MSG_SEQNO is the old one
    fresh = snp.answered()
    renumbered = bytearray(old.response)  # the replay with the expected number: the IV no longer matches
    renumbered[0x20:0x28] = fresh.response[0x20:0x28]
    assert key_op(snp.mb, Op.KEY_REPORT, bytes(renumbered))[0] == St.KEY_MSG_AUTH
    assert key_op(snp.mb, Op.KEY_REPORT, fresh.response)[0] == St.KEY_STATE  # that request was spent


def test_a_response_of_the_wrong_length_is_refused(snp: SnpGuest) -> None:
    for length in (0, mbx.KEY_RESPONSE_BYTES - 1, mbx.KEY_RESPONSE_BYTES + 1, 4000):
        ex = snp.answered()
        assert key_op(snp.mb, Op.KEY_REPORT, ex.response, arg1=length)[0] == St.KEY_MSG, length


def test_a_response_under_another_vmpck_is_refused(snp: SnpGuest) -> None:
    ex = snp.request()
    seqno = open_request(snp.vmpck0, ex.request)[0]
    forged = seal_msg(header(seqno + 1, REPORT_RSP, 0x4C0), bytes(0x4C0), os.urandom(32))
    assert key_op(snp.mb, Op.KEY_REPORT, forged)[0] == St.KEY_MSG_AUTH


# ---- refusals: the wrapped key ----


def test_a_flipped_byte_anywhere_in_the_wrap_is_refused_and_does_not_burn_the_key(snp: SnpGuest) -> None:
    ex = snp.reported()
    key, mig = os.urandom(32), os.urandom(16)
    good = wrap_key(ex.report, ex.nonce, table(key, mig))
    for at in [*range(0, 8 + 32 + 12), *range(52, len(good), 5), len(good) - 1]:
        status, _ = key_op(snp.mb, Op.KEY_RELEASE, flip(good, at))
        assert status == (St.KEY_WRAP if at < 8 else St.KEY_AUTH), (at, St(status))
    assert key_op(snp.mb, Op.INIT, b"")[0] == St.SECRET_HEADER  # nothing was installed
    assert key_op(snp.mb, Op.KEY_RELEASE, good)[0] == St.OK  # still REPORTED: the good wrap opens
    assert snp.mb.init().migration_id == mig


def test_wraps_for_another_report_nonce_or_key_are_refused(snp: SnpGuest) -> None:
    ex = snp.reported()
    t = table(os.urandom(32), os.urandom(16))
    other_report = bytearray(ex.report)
    other_report[0x140] ^= 1  # another REPORT_ID
    stranger = X25519PrivateKey.generate().public_key().public_bytes_raw()
    to_stranger = bytearray(ex.report)
    to_stranger[0x70:0x90] = stranger  # wrapped to a key the host made
    for bad in (wrap_key(bytes(other_report), ex.nonce, t), wrap_key(ex.report, os.urandom(32), t),
                wrap_key(bytes(to_stranger), ex.nonce, t)):  # fmt: skip
        assert key_op(snp.mb, Op.KEY_RELEASE, bad)[0] == St.KEY_AUTH
    assert key_op(snp.mb, Op.KEY_RELEASE, wrap_key(ex.report, ex.nonce, t))[0] == St.OK


def test_a_wrap_made_without_the_owners_static_key_is_refused(snp: SnpGuest) -> None:
    """The host sees G in the report and can wrap a key of its own choosing to it; without the owner's
    static key (measured into the guest) the KEK is not the helper's, so nothing is installed."""
    ex = snp.reported()
    t = table(os.urandom(32), os.urandom(16))
    forged = wrap_key(ex.report, ex.nonce, t, owner=X25519PrivateKey.generate())
    assert key_op(snp.mb, Op.KEY_RELEASE, forged)[0] == St.KEY_AUTH
    assert key_op(snp.mb, Op.KEY_RELEASE, wrap_key(ex.report, ex.nonce, t))[0] == St.OK


@pytest.mark.parametrize("u", LOW_ORDER, ids=["0", "1", "p-1", "order8"])
def test_a_low_order_owner_key_is_refused(snp: SnpGuest, u: int) -> None:
    snp.reported()
    wrap = mbx.KEY_WRAP_MAGIC + u.to_bytes(32, "little") + os.urandom(12) + os.urandom(100 + 16)
    assert key_op(snp.mb, Op.KEY_RELEASE, wrap)[0] == St.KEY_AUTH


def test_wraps_of_the_wrong_length_are_refused(snp: SnpGuest) -> None:
    ex = snp.reported()
    good = wrap_key(ex.report, ex.nonce, table(os.urandom(32), os.urandom(16)))
    too_long = wrap_key(ex.report, ex.nonce, os.urandom(mbx.KEY_TABLE_MAX + 1))
    assert len(too_long) == mbx.KEY_WRAP_MAX + 1
    for bad in (good[: mbx.KEY_WRAP_MIN - 1], b"", too_long):
        assert key_op(snp.mb, Op.KEY_RELEASE, bad)[0] == St.KEY_WRAP
    largest = wrap_key(ex.report, ex.nonce, os.urandom(mbx.KEY_TABLE_MAX))
    status, out = key_op(snp.mb, Op.KEY_RELEASE, largest)
    assert status == St.OK and len(out) == mbx.KEY_TABLE_MAX


# ---- refusals: order, guest, helper, entropy ----


def test_out_of_order_ops_are_refused(snp: SnpGuest) -> None:
    assert key_op(snp.mb, Op.KEY_REPORT, bytes(mbx.KEY_RESPONSE_BYTES))[0] == St.KEY_STATE  # NONE
    assert key_op(snp.mb, Op.KEY_RELEASE, bytes(200))[0] == St.KEY_STATE
    ex = snp.answered()
    assert key_op(snp.mb, Op.KEY_RELEASE, bytes(200))[0] == St.KEY_STATE  # REQUESTED
    assert key_op(snp.mb, Op.KEY_REPORT, ex.response)[0] == St.OK
    assert key_op(snp.mb, Op.KEY_REPORT, ex.response)[0] == St.KEY_STATE  # REPORTED


def test_the_private_key_is_wiped_after_release(snp: SnpGuest) -> None:
    ex = snp.reported()
    public = ex.report[0x70:0x90]
    ctx = snp.guest._ctxs[0]  # the helper's private memory: the VMM cannot look, a test can

    def holders() -> list[int]:
        raw = ctx.raw
        return [at for at in range(0, len(raw) - 32, 8) if raw[at : at + 32] != bytes(32)
                and X25519PrivateKey.from_private_bytes(raw[at : at + 32]).public_key().public_bytes_raw()
                == public]  # fmt: skip

    assert len(holders()) == 1  # the search finds g while the helper holds it
    wrap = wrap_key(ex.report, ex.nonce, table(os.urandom(32), os.urandom(16)))
    assert key_op(snp.mb, Op.KEY_RELEASE, wrap)[0] == St.OK
    assert holders() == []
    assert key_op(snp.mb, Op.KEY_RELEASE, wrap)[0] == St.KEY_STATE  # RELEASED: no second release


def test_key_ops_need_an_snp_guest(lib: ctypes.CDLL) -> None:
    vmpck0 = os.urandom(32)
    with HostGuest(lib, ram_size=RAM, secret=secrets_page(vmpck0)) as guest:
        mb = guest.mailboxes.mailboxes[0]
        for op in (Op.KEY_REQUEST, Op.KEY_REPORT, Op.KEY_RELEASE):
            assert key_op(mb, op, os.urandom(32))[0] == St.NOT_SNP


def test_key_ops_run_on_helper_zero_only(snp: SnpGuest) -> None:
    other = snp.guest.mailboxes.mailboxes[1]
    for op in (Op.KEY_REQUEST, Op.KEY_REPORT, Op.KEY_RELEASE):
        assert key_op(other, op, os.urandom(32))[0] == St.KEY_HELPER
    snp.reported()  # helper 0 is unaffected


def test_no_rdrand_means_no_key(lib: ctypes.CDLL) -> None:
    cp_cpu_rdrand = 1 << 12
    features = host_cpu_features(lib) & ~cp_cpu_rdrand
    with HostGuest(lib, ram_size=RAM, secret=secrets_page(os.urandom(32)), snp=True,
                   cpu_features=features) as guest:  # fmt: skip
        assert key_op(guest.mailboxes.mailboxes[0], Op.KEY_REQUEST, os.urandom(32))[0] == St.ENTROPY
    assert lib.cp_mh_features_from_bp(1 << 11) == cp_cpu_rdrand  # CP_FEAT_RDRAND -> CP_CPU_RDRAND
