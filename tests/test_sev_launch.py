"""The emulated secure processor and the key broker together, the way the VMM and the owner use them."""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest

from confplan.errors import ConfplanError
from confplan.sev import certs, launch_crypto, snp
from confplan.sev.broker import AttestationRefused, KeyBroker, LaunchBundle, OwnerPolicy
from confplan.sev.certs import PlatformChain, Usage
from confplan.sev.launch_crypto import PlatformVersion
from confplan.sev.memory import BytearrayGuestMemory
from confplan.sev.policy import encode_sev_policy, encode_snp_policy
from confplan.sev.psp import (
    KEY_FILE_NAME,
    EmulatedSecureProcessor,
    GuestState,
    SecureProcessorError,
    SevGuest,
    SevStatus,
)
from confplan.sev.secret_table import find_transport_key

FW_GPA, BOOT_GPA, SECRET_GPA = 0x10000, 0x7000, 0x8000
RAM = 0x40000
FIRMWARE = hashlib.shake_256(b"confplan test firmware").digest(0x8000)
BOOT_PARAMS = b"boot parameters v1".ljust(4096, b"\x00")
POLICY = encode_sev_policy(nodbg=True, noks=True, api_major=1, api_minor=40)
TRANSPORT_KEY = bytes(range(32))


def good_digest() -> str:
    return launch_crypto.sev_launch_digest([FIRMWARE, BOOT_PARAMS]).hex()


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> KeyBroker:
    policy = OwnerPolicy(
        allowed_digests=[good_digest()],
        allowed_policies=[POLICY],
        min_api="1.40",
        trust_emulated_platform=True,
    )
    return KeyBroker.init(tmp_path_factory.mktemp("owner"), policy)


@dataclass
class Launch:
    guest: SevGuest
    memory: BytearrayGuestMemory
    bundle: LaunchBundle
    measurement: bytes


def launch(psp: EmulatedSecureProcessor, broker: KeyBroker, firmware: bytes = FIRMWARE) -> Launch:
    """What the VMM does up to LAUNCH_MEASURE, with a fresh owner session."""
    bundle = broker.new_session(psp.platform_chain(), POLICY)
    memory = BytearrayGuestMemory(RAM)
    guest = psp.new_guest(memory)
    guest.launch_start(POLICY, bundle.godh_cert, bundle.session_blob)
    guest.launch_update_data(FW_GPA, firmware)
    guest.launch_update_data(BOOT_GPA, BOOT_PARAMS)
    return Launch(guest, memory, bundle, guest.launch_measure())


def release(broker: KeyBroker, run: Launch, psp: EmulatedSecureProcessor) -> launch_crypto.SecretPacket:
    return broker.release_transport_key(run.bundle.state, run.measurement, psp.version, TRANSPORT_KEY)


def secret_page(run: Launch) -> bytes:
    return run.memory.read(SECRET_GPA, 4096)


def test_full_launch_releases_the_key_into_the_secret_page(
    psp: EmulatedSecureProcessor, broker: KeyBroker
) -> None:
    run = launch(psp, broker)
    assert run.memory.read(FW_GPA, len(FIRMWARE)) == FIRMWARE
    packet = release(broker, run, psp)
    run.guest.launch_secret(packet.header(), packet.ciphertext, SECRET_GPA)
    run.guest.launch_finish()
    assert run.guest.state is GuestState.RUNNING
    assert find_transport_key(secret_page(run)) == TRANSPORT_KEY


def test_source_and_target_each_get_their_own_packet(psp: EmulatedSecureProcessor, broker: KeyBroker) -> None:
    source, target = launch(psp, broker), launch(psp, broker)
    to_source, to_target = release(broker, source, psp), release(broker, target, psp)
    # The source's packet is bound to the source's TIK and MEASURE: the target refuses it (a replay).
    with pytest.raises(SecureProcessorError) as err:
        target.guest.launch_secret(to_source.header(), to_source.ciphertext, SECRET_GPA)
    assert err.value.status is SevStatus.BAD_MEASUREMENT
    assert secret_page(target) == bytes(4096)
    target.guest.launch_secret(to_target.header(), to_target.ciphertext, SECRET_GPA)
    assert find_transport_key(secret_page(target)) == TRANSPORT_KEY


def test_known_answer_through_the_processor(tmp_path: Path) -> None:
    # The KAT again, end to end: TIK from a real session blob, nothing measured, MNONCE from the vector.
    mnonce = bytes.fromhex("4fbe0bedbad6c86ae8f68971d103e554")
    kat_psp = EmulatedSecureProcessor.open(
        tmp_path, version=PlatformVersion(0, 0x12, 0x0F), rng=lambda n: mnonce
    )
    godh_key = certs.new_key()
    z = certs.ecdh_secret(godh_key, kat_psp.platform_chain().pdh.pubkey)
    keys = launch_crypto.TransportKeys(bytes(16), bytes.fromhex("66320db73158a35a255d051758e95ed4"))
    blob = launch_crypto.wrap_session(z, keys, 0, os.urandom(16), os.urandom(16))
    guest = kat_psp.new_guest(BytearrayGuestMemory(4096))
    guest.launch_start(0, certs.issue(godh_key.public_key(), Usage.PDH, []).pack(), blob.pack())
    out = guest.launch_measure()
    assert out.hex() == "6faab2daae389bcd3405a05d6cafe33c0414f7bedd0bae19ba5f38b7fd1664ea" + mnonce.hex()


def test_tampered_session_blob_is_refused(psp: EmulatedSecureProcessor, broker: KeyBroker) -> None:
    bundle = broker.new_session(psp.platform_chain(), POLICY)
    memory = BytearrayGuestMemory(RAM)
    guest = psp.new_guest(memory)
    bad = bytearray(bundle.session_blob)
    bad[0x20] ^= 0x80
    with pytest.raises(SecureProcessorError, match="WRAP_MAC") as err:
        guest.launch_start(POLICY, bundle.godh_cert, bytes(bad))
    assert err.value.status is SevStatus.BAD_MEASUREMENT
    assert guest.state is GuestState.UNINIT
    with pytest.raises(SecureProcessorError, match="POLICY_MAC"):  # the VMM swaps in a weaker policy
        guest.launch_start(POLICY & ~1, bundle.godh_cert, bundle.session_blob)
    with pytest.raises(SecureProcessorError, match="UNINIT"):
        guest.launch_update_data(FW_GPA, FIRMWARE)
    assert memory.ram == bytes(RAM)


def test_commands_out_of_order_are_refused(psp: EmulatedSecureProcessor, broker: KeyBroker) -> None:
    guest = psp.new_guest(BytearrayGuestMemory(RAM))
    with pytest.raises(SecureProcessorError, match="needs LUPDATE"):
        guest.launch_measure()
    run = launch(psp, broker)
    g = run.guest
    with pytest.raises(SecureProcessorError, match="in state LSECRET"):
        g.launch_update_data(FW_GPA, FIRMWARE)
    with pytest.raises(SecureProcessorError, match="in state LSECRET"):
        g.launch_measure()
    packet = release(broker, run, psp)
    g.launch_finish()
    with pytest.raises(SecureProcessorError, match="in state RUNNING") as err:
        g.launch_secret(packet.header(), packet.ciphertext, SECRET_GPA)
    assert err.value.status is SevStatus.INVALID_GUEST_STATE
    assert secret_page(run) == bytes(4096)


def test_altered_secret_packet_writes_nothing(psp: EmulatedSecureProcessor, broker: KeyBroker) -> None:
    run = launch(psp, broker)
    packet = release(broker, run, psp)
    body = bytearray(packet.ciphertext)
    body[30] ^= 1
    header = bytearray(packet.header())
    header[10] ^= 1  # the IV
    for hdr, ct in ((packet.header(), bytes(body)), (bytes(header), packet.ciphertext)):
        with pytest.raises(SecureProcessorError, match="MAC does not verify"):
            run.guest.launch_secret(hdr, ct, SECRET_GPA)
    assert secret_page(run) == bytes(4096)


def test_changed_firmware_byte_gets_no_secret(psp: EmulatedSecureProcessor, broker: KeyBroker) -> None:
    firmware = bytearray(FIRMWARE)
    firmware[0x1234] ^= 1
    run = launch(psp, broker, bytes(firmware))
    with pytest.raises(AttestationRefused, match="matches none of the 1 allowed_digests") as err:
        release(broker, run, psp)
    assert "policy.json" in err.value.message
    assert secret_page(run) == bytes(4096)


def test_policy_not_allowed_is_refused(psp: EmulatedSecureProcessor, broker: KeyBroker) -> None:
    with pytest.raises(AttestationRefused, match=r"guest policy 0x28030001 is not in allowed_policies"):
        broker.new_session(psp.platform_chain(), encode_sev_policy(nodbg=True, api_major=3, api_minor=40))
    weak = encode_sev_policy(nodbg=True, noks=True, api_major=1, api_minor=0)
    allowing = OwnerPolicy(
        allowed_digests=[good_digest()], allowed_policies=[weak], min_api="1.40", trust_emulated_platform=True
    )
    with pytest.raises(AttestationRefused, match=r"below min_api 1\.40"):
        broker.with_policy(allowing).new_session(psp.platform_chain(), weak)


def test_platform_below_min_api_gets_no_secret(psp: EmulatedSecureProcessor, broker: KeyBroker) -> None:
    run = launch(psp, broker)
    old = PlatformVersion(1, 30, 0)
    with pytest.raises(AttestationRefused, match=r"firmware 1\.30 build 0 is below the minimum 1\.40"):
        broker.release_transport_key(run.bundle.state, run.measurement, old, TRANSPORT_KEY)


def test_api_minimum_is_enforced_at_launch_start(tmp_path: Path, broker: KeyBroker) -> None:
    old_psp = EmulatedSecureProcessor.open(tmp_path, version=PlatformVersion(0, 24, 1))
    bundle = broker.new_session(old_psp.platform_chain(), POLICY)
    guest = old_psp.new_guest(BytearrayGuestMemory(RAM))
    with pytest.raises(
        SecureProcessorError, match=r"needs firmware API >= 1.40, this platform runs 0.24"
    ) as err:
        guest.launch_start(POLICY, bundle.godh_cert, bundle.session_blob)
    assert err.value.status is SevStatus.POLICY_FAILURE


def test_nodbg_refuses_debug_reads(psp: EmulatedSecureProcessor, broker: KeyBroker) -> None:
    run = launch(psp, broker)
    with pytest.raises(SecureProcessorError, match="forbids debugging"):
        run.guest.debug_read(FW_GPA, 16)
    debuggable = encode_sev_policy(noks=True, api_major=1, api_minor=40)
    owner = broker.with_policy(broker.policy.model_copy(update={"allowed_policies": [debuggable]}))
    bundle = owner.new_session(psp.platform_chain(), debuggable)
    guest = psp.new_guest(BytearrayGuestMemory(RAM))
    guest.launch_start(debuggable, bundle.godh_cert, bundle.session_blob)
    guest.launch_update_data(FW_GPA, FIRMWARE)
    assert guest.debug_read(FW_GPA, 16) == FIRMWARE[:16]


def test_unaligned_update_is_refused(psp: EmulatedSecureProcessor, broker: KeyBroker) -> None:
    bundle = broker.new_session(psp.platform_chain(), POLICY)
    guest = psp.new_guest(BytearrayGuestMemory(RAM))
    guest.launch_start(POLICY, bundle.godh_cert, bundle.session_blob)
    with pytest.raises(SecureProcessorError, match="not a non-zero multiple of 16"):
        guest.launch_update_data(FW_GPA, b"odd")
    with pytest.raises(SecureProcessorError, match="not 16-byte aligned"):
        guest.launch_update_data(FW_GPA + 1, bytes(16))


def test_platform_chain_verifies_and_a_broken_one_is_refused(
    psp: EmulatedSecureProcessor, broker: KeyBroker
) -> None:
    chain = psp.platform_chain()
    assert PlatformChain.unpack(chain.pack()).verify().public_numbers() == chain.pdh.pubkey.public_numbers()
    raw = bytearray(chain.pack())
    raw[0x824 * 1 + 4] ^= 1  # PEK api_major: its CEK and OCA signatures no longer cover it
    with pytest.raises(AttestationRefused, match="PEK is not signed by the CEK"):
        broker.new_session(PlatformChain.unpack(bytes(raw)), POLICY)
    pinned = broker.policy.model_copy(update={"trusted_ark_sha256": ["00" * 32]})
    with pytest.raises(AttestationRefused, match="not in trusted_ark_sha256"):
        broker.with_policy(pinned).new_session(chain, POLICY)


def test_key_file_is_private_and_reloads(psp: EmulatedSecureProcessor) -> None:
    assert stat.S_IMODE(psp.key_file.stat().st_mode) == 0o600
    assert psp.key_file.name == KEY_FILE_NAME
    again = EmulatedSecureProcessor.open(psp.key_file.parent)
    assert again.platform_chain().pack() == psp.platform_chain().pack()
    assert again.version == psp.version


@pytest.mark.parametrize(
    ("offset", "match"), [(0, "bad magic"), (8, "format version"), (-1, "checksum mismatch")]
)
def test_damaged_key_file_is_refused(
    psp: EmulatedSecureProcessor, tmp_path: Path, offset: int, match: str
) -> None:
    raw = bytearray(psp.key_file.read_bytes())
    raw[offset] ^= 0xFF
    (tmp_path / KEY_FILE_NAME).write_bytes(bytes(raw))
    with pytest.raises(ConfplanError, match=match):
        EmulatedSecureProcessor.open(tmp_path)


def test_snp_report_verifies_and_fails_after_one_flipped_byte(psp: EmulatedSecureProcessor) -> None:
    memory = BytearrayGuestMemory(RAM)
    guest = psp.new_snp_guest(memory)
    policy = encode_snp_policy(smt=True, api_major=1, api_minor=40)
    guest.launch_start(policy, host_data=hashlib.sha256(b"init-data").digest())
    guest.launch_update(FW_GPA, FIRMWARE)
    guest.launch_update(SECRET_GPA, b"", snp.PageType.SECRETS)
    with pytest.raises(SecureProcessorError, match="needs RUNNING"):
        guest.attestation_report(b"")
    guest.launch_finish()
    report_data = hashlib.sha512(b"nonce|tee-pubkey").digest()
    raw = guest.attestation_report(report_data)
    assert len(raw) == 0x4A0
    expected = snp.SnpLaunchDigest()
    expected.update_region(FW_GPA, FIRMWARE)
    expected.update_page(SECRET_GPA, snp.PageType.SECRETS)
    report = snp.verify_report(raw, psp.vcek_public_key())
    assert report.measurement == expected.digest == raw[0x90:0xC0]
    assert report.report_data == report_data == raw[0x50:0x90]
    assert report.policy == policy and report.host_data == hashlib.sha256(b"init-data").digest()
    assert b"EMULATED" in report.chip_id
    for where in (0x90, 0x2A0):  # one byte of the measurement, one of the signature
        flipped = bytearray(raw)
        flipped[where] ^= 1
        with pytest.raises(ValueError, match="does not verify"):
            snp.verify_report(bytes(flipped), psp.vcek_public_key())
    with pytest.raises(SecureProcessorError, match="forbids debugging"):
        guest.debug_read(FW_GPA, 16)
