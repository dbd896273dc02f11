"""SNP chains and reports verified like snpguest verify, against real Milan/Turin material and the
emulated secure processor; every flipped byte of a report is refused; the SNP key release."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from confplan.sev.memory import BytearrayGuestMemory
from confplan.sev.policy import encode_snp_policy
from confplan.sev.psp import EmulatedSecureProcessor
from confplan.sev.signing import VerifyError
from confplan.sev.snp_chain import split_pem_chain, verify_snp_chain
from confplan.sev.snp_release import (
    WrappedKey,
    guest_key_pair,
    open_released_key,
    public_bytes,
    release_to_report,
    report_data_for,
)
from confplan.sev.snp_report import SIGNED_LEN, AttestationReport
from confplan.sev.snp_verify import ReportExpectations, verify_snp_report

DATA = Path(__file__).parent / "data" / "amd"
MILAN_MEASUREMENT = bytes.fromhex(
    "7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b579ea158d3e1a0dc39b2c60bd95b9c480cd81841f"
)


def milan_report() -> bytes:
    return bytes.fromhex((DATA / "report_milan.hex").read_text().strip())


def vcek(name: str = "milan") -> bytes:
    return (DATA / f"vcek_{name}.der").read_bytes()


@pytest.mark.parametrize("product", ["milan", "turin"])
def test_real_vcek_chains_verify_with_builtin_and_kds_anchors(product: str) -> None:
    verdict = verify_snp_chain(vcek(product))
    assert verdict.root.product == product and verdict.vek.kind == "VCEK"
    ask, ark = split_pem_chain((DATA / f"cert_chain_{product}").read_bytes())
    assert verify_snp_chain(vcek(product), ark, ask).root.product == product
    if product == "turin":
        assert set(verdict.vek.tcb) == {"boot_loader", "tee", "snp", "microcode", "fmc"}


def test_a_vcek_under_another_products_chain_is_refused() -> None:
    ask, ark = split_pem_chain((DATA / "cert_chain_turin").read_bytes())
    with pytest.raises(VerifyError, match="issuer") as err:
        verify_snp_chain(vcek("milan"), ark, ask)
    assert err.value.field == "issuer"


def test_a_flipped_vcek_byte_is_refused() -> None:
    raw = bytearray(vcek())
    raw[40] ^= 0xFF  # virtee/sev milan_chain_invalid
    with pytest.raises(VerifyError):
        verify_snp_chain(bytes(raw))


def test_the_real_milan_report_verifies_like_snpguest() -> None:
    want = ReportExpectations(
        measurement=MILAN_MEASUREMENT, policy=0x30000, min_tcb={"snp": 8, "microcode": 115}
    )
    verdict = verify_snp_report(milan_report(), vcek(), expect=want)
    assert verdict.root.product == "milan" and not verdict.root.emulated
    assert "chip_id = VCEK hwID" in verdict.checked and "measurement" in verdict.checked
    assert verdict.report.reported_tcb.snp == 8 and verdict.report.current_version == (1, 52, 4)


@pytest.mark.parametrize(
    ("expect", "field"),
    [
        (ReportExpectations(measurement=bytes(48)), "measurement"),
        (ReportExpectations(policy=0x30001), "policy"),
        (ReportExpectations(vmpl=1), "vmpl"),
        (ReportExpectations(min_tcb={"snp": 9}), "reported_tcb.snp"),
        (ReportExpectations(host_data=b"\x01" * 32), "host_data"),
        (ReportExpectations(report_data=bytes(64)), "report_data"),
        (ReportExpectations(min_guest_svn=1), "guest_svn"),
    ],
)
def test_each_expectation_refuses_by_field(expect: ReportExpectations, field: str) -> None:
    with pytest.raises(VerifyError) as err:
        verify_snp_report(milan_report(), vcek(), expect=expect)
    assert err.value.field == field and field in err.value.message


def test_every_flipped_byte_of_the_real_report_is_refused() -> None:
    key = verify_snp_chain(vcek()).vek_key
    good = milan_report()
    for pos in range(len(good)):
        raw = bytearray(good)
        raw[pos] ^= 0x01
        with pytest.raises(VerifyError):
            AttestationReport.parse(bytes(raw)).verify_signature(key)
    raw = bytearray(good)
    raw[21] ^= 0x80  # virtee/sev milan_report_invalid, through the whole verification
    with pytest.raises(VerifyError, match="signature"):
        verify_snp_report(bytes(raw), vcek())


def test_a_report_of_another_chip_or_tcb_is_refused() -> None:
    with pytest.raises(VerifyError):  # Turin's VCEK did not sign the Milan report
        verify_snp_report(milan_report(), vcek("turin"))


@pytest.fixture(scope="module")
def emulated(tmp_path_factory: pytest.TempPathFactory) -> tuple[EmulatedSecureProcessor, bytes]:
    psp = EmulatedSecureProcessor.open(tmp_path_factory.mktemp("psp"))
    guest = psp.new_snp_guest(BytearrayGuestMemory(0x10000))
    guest.launch_start(encode_snp_policy(api_major=1, api_minor=51))
    guest.launch_update(0x1000, b"firmware".ljust(4096, b"\x00"))
    guest.launch_finish()
    return psp, guest.launch_digest


def _emulated_report(psp: EmulatedSecureProcessor, report_data: bytes) -> bytes:
    guest = psp.new_snp_guest(BytearrayGuestMemory(0x10000))
    guest.launch_start(encode_snp_policy(api_major=1, api_minor=51))
    guest.launch_update(0x1000, b"firmware".ljust(4096, b"\x00"))
    guest.launch_finish()
    return guest.attestation_report(report_data)


def test_the_emulated_platform_is_refused_by_default_and_passes_only_by_choice(
    emulated: tuple[EmulatedSecureProcessor, bytes],
) -> None:
    psp, digest = emulated
    ark, ask, vek = psp.snp_cert_chain()
    report = _emulated_report(psp, b"x")
    with pytest.raises(VerifyError, match="not one of AMD's built-in ARKs") as err:
        verify_snp_report(report, vek, ark, ask, ReportExpectations(measurement=digest))
    assert err.value.field == "ark"
    verdict = verify_snp_report(
        report, vek, ark, ask, ReportExpectations(measurement=digest), trust_emulated=True
    )
    assert verdict.root.emulated and verdict.summary()["emulated_platform"] is True
    with pytest.raises(VerifyError):  # the emulated VCEK under AMD's Milan chain
        verify_snp_report(report, vek, expect=ReportExpectations(measurement=digest), trust_emulated=True)


def test_key_release_binds_the_key_in_report_data(emulated: tuple[EmulatedSecureProcessor, bytes]) -> None:
    psp, digest = emulated
    ark, ask, vek = psp.snp_cert_chain()
    guest_key, public = guest_key_pair()
    nonce = os.urandom(32)
    report = _emulated_report(psp, report_data_for(nonce, public))
    secret = os.urandom(108)
    expect = ReportExpectations(measurement=digest)
    owner_key = X25519PrivateKey.generate()
    static = public_bytes(owner_key)
    chain = dict(ark_raw=ark, ask_raw=ask, trust_emulated=True, owner_key=owner_key)
    wrapped, verdict = release_to_report(report, vek, expect, nonce=nonce, secret=secret, **chain)  # type: ignore[arg-type]
    assert "measurement" in verdict.checked
    assert open_released_key(WrappedKey.unpack(wrapped.pack()), guest_key, nonce, report, static) == secret
    with pytest.raises(VerifyError) as err:  # a replayed report: made for another nonce
        release_to_report(report, vek, expect, nonce=os.urandom(32), secret=secret, **chain)  # type: ignore[arg-type]
    assert err.value.field == "report_data"
    with pytest.raises(VerifyError, match="measurement"):
        release_to_report(
            report,
            vek,
            ReportExpectations(measurement=bytes(48)),
            nonce=nonce,
            secret=secret,
            **chain,  # type: ignore[arg-type]
        )
    with pytest.raises(VerifyError, match="only against an expected measurement"):
        release_to_report(report, vek, ReportExpectations(), nonce=nonce, secret=secret, **chain)  # type: ignore[arg-type]
    with pytest.raises(VerifyError, match="does not open"):
        open_released_key(wrapped, guest_key_pair()[0], nonce, report, static)
    for offset in (0x08, 0x1A0, SIGNED_LEN - 1):  # the AAD is the whole signed report
        other = bytearray(report)
        other[offset] ^= 1
        with pytest.raises(VerifyError, match="does not open"):
            open_released_key(wrapped, guest_key, nonce, bytes(other), static)
    low_order = WrappedKey(bytes(32), wrapped.iv, wrapped.ciphertext)
    with pytest.raises(VerifyError, match="low-order"):
        open_released_key(low_order, guest_key, nonce, report, static)
    # A host can wrap to G with an ephemeral key of its own, but not with the owner's static key.
    forged = release_to_report(report, vek, expect, nonce=nonce, secret=b"host's key",
                               **{**chain, "owner_key": X25519PrivateKey.generate()})[0]  # type: ignore[arg-type]
    with pytest.raises(VerifyError, match="does not open"):
        open_released_key(forged, guest_key, nonce, report, static)
