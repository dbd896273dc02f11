"""SEV launch cryptography and formats: published known-answer vectors, round trips, layouts."""

from __future__ import annotations

import hashlib
import hmac
import struct
import uuid

import pytest

from confplan.sev import certs, launch_crypto, snp
from confplan.sev.launch_crypto import PlatformVersion, SessionBlob, TransportKeys
from confplan.sev.secret_table import (
    CONFPLAN_TRANSPORT_KEY_GUID,
    SecretTableError,
    build_secret_table,
    find_transport_key,
    parse_secret_table,
)


def test_session_blob_matches_virtee_vector() -> None:
    # virtee/sev src/session tests: Z = 16 zero bytes, zero NONCE, IV, TEK, TIK and policy 0.
    blob = launch_crypto.wrap_session(bytes(16), TransportKeys(bytes(16), bytes(16)), 0, bytes(16), bytes(16))
    assert blob.wrap_tk.hex() == "2137bc7f9bb8bd7c3e55a576a15d3454b3856b8ba27afadf46dcfee9f02c02c4"
    assert blob.wrap_mac.hex() == "3176c0752738bd9d5e86689534020f528c088f16238826b000b327dee6aeed7d"
    assert blob.policy_mac.hex() == "aa7855e13839dd767cd5da7c1ff5036540c9264b7a803029315e55375287b4af"


def test_measurement_matches_known_answer() -> None:
    # docs sev-formats.md / virtee verify(): API 0.18 (0x12), build 0x0f, policy 0, digest of nothing.
    measure = launch_crypto.measure_mac(
        bytes.fromhex("66320db73158a35a255d051758e95ed4"),
        PlatformVersion(0x00, 0x12, 0x0F),
        0,
        hashlib.sha256(b"").digest(),
        bytes.fromhex("4fbe0bedbad6c86ae8f68971d103e554"),
    )
    assert measure.hex() == "6faab2daae389bcd3405a05d6cafe33c0414f7bedd0bae19ba5f38b7fd1664ea"


def test_kdf_is_sp800_108_counter_mode() -> None:
    key, label, ctx = b"k" * 48, b"sev-kek", b"ctx"
    msg = struct.pack("<I", 1) + label + b"\x00" + ctx + struct.pack("<I", 128)
    assert launch_crypto.kdf(key, label, ctx) == hmac.digest(key, msg, "sha256")[:16]
    long = launch_crypto.kdf(key, label, ctx, 40)  # two blocks, both bound to L = 320 bits
    assert len(long) == 40 and long[:16] != launch_crypto.kdf(key, label, ctx)
    assert launch_crypto.kdf(key, b"sev-kik", ctx) != launch_crypto.kdf(key, label, ctx)


def test_session_wrap_round_trip_and_tamper() -> None:
    keys = TransportKeys(bytes(range(16)), bytes(range(16, 32)))
    z = bytes(range(48))
    blob = launch_crypto.wrap_session(z, keys, 0x1, b"n" * 16, b"i" * 16)
    assert SessionBlob.unpack(blob.pack()) == blob
    assert launch_crypto.unwrap_session(z, blob, 0x1) == keys
    with pytest.raises(launch_crypto.SessionRejected) as err:
        launch_crypto.unwrap_session(z, blob, 0x0)
    assert err.value.field == "POLICY_MAC"
    bad = bytearray(blob.pack())
    bad[0x10] ^= 1  # one bit of WRAP_TK
    with pytest.raises(launch_crypto.SessionRejected) as err:
        launch_crypto.unwrap_session(z, SessionBlob.unpack(bytes(bad)), 0x1)
    assert err.value.field == "WRAP_MAC"
    with pytest.raises(launch_crypto.SessionRejected):
        launch_crypto.unwrap_session(bytes(48), blob, 0x1)  # another platform's PDH secret


def test_secret_packet_layout_and_round_trip() -> None:
    keys = TransportKeys(b"t" * 16, b"i" * 16)
    packet = launch_crypto.seal_secret(keys, b"m" * 32, b"secret table" * 4, b"v" * 16)
    header = packet.header()
    assert len(header) == 52 and header[:4] == bytes(4) and header[4:20] == b"v" * 16
    again = launch_crypto.SecretPacket.from_parts(header, packet.ciphertext)
    assert again == packet
    assert launch_crypto.aes128_ctr(keys.tek, again.iv, again.ciphertext) == b"secret table" * 4


def test_sev_cert_layout() -> None:
    key = certs.new_key()
    cert = certs.issue(key.public_key(), certs.Usage.PEK, [(key, certs.Usage.OCA)], (1, 55))
    raw = cert.pack()
    assert len(raw) == 0x824
    assert struct.unpack_from("<IBBxxII", raw) == (1, 1, 55, 0x1002, 2)
    assert struct.unpack_from("<I", raw, 0x10)[0] == 2  # curve P-384
    assert int.from_bytes(raw[0x14 : 0x14 + 72], "little") == key.public_key().public_numbers().x
    assert struct.unpack_from("<II", raw, 0x414) == (0x1001, 2)
    parsed = certs.SevCert.unpack(raw)
    assert parsed.signed_by(certs.Usage.OCA, key.public_key())
    flipped = bytearray(raw)
    flipped[5] ^= 1  # api_minor: inside the signed body
    assert not certs.SevCert.unpack(bytes(flipped)).signed_by(certs.Usage.OCA, key.public_key())


def test_secret_table_round_trip_and_layout() -> None:
    key = bytes(range(32))
    other = uuid.UUID("00000000-0000-0000-0000-000000000001")
    table = build_secret_table({CONFPLAN_TRANSPORT_KEY_GUID: key, other: b"x"})
    assert len(table) % 16 == 0
    assert uuid.UUID(bytes_le=table[:16]) == uuid.UUID("1e74f542-71dd-4d66-963e-ef4287ff173b")
    assert struct.unpack_from("<I", table, 16)[0] == 20 + (20 + 32) + (20 + 1)
    assert uuid.UUID(bytes_le=table[20:36]) == CONFPLAN_TRANSPORT_KEY_GUID
    assert parse_secret_table(table) == {CONFPLAN_TRANSPORT_KEY_GUID: key, other: b"x"}
    assert find_transport_key(table + bytes(4096 - len(table))) == key


@pytest.mark.parametrize(
    "damage",
    [
        lambda t: bytes(len(t)),  # no header GUID
        lambda t: t[:16] + struct.pack("<I", 10_000) + t[20:],  # total length past the area
        lambda t: t[:36] + struct.pack("<I", 3) + t[40:],  # entry shorter than its own header
    ],
)
def test_secret_table_damage_is_refused(damage: object) -> None:
    table = build_secret_table({CONFPLAN_TRANSPORT_KEY_GUID: bytes(32)})
    with pytest.raises(SecretTableError):
        parse_secret_table(damage(table))  # type: ignore[operator]


def test_missing_transport_key_entry_is_named() -> None:
    with pytest.raises(SecretTableError, match=str(CONFPLAN_TRANSPORT_KEY_GUID)):
        find_transport_key(build_secret_table({}))


def test_snp_page_info_chain() -> None:
    page = bytes(range(256)) * 16
    ld = snp.SnpLaunchDigest()
    ld.update_page(0x1000, snp.PageType.NORMAL, page)
    ld.update_page(0x2000, snp.PageType.SECRETS)
    # PAGE_INFO spelled out byte by byte from the SNP ABI table, independent of the implementation.
    tail1 = b"\x70\x00\x01\x00" + bytes(4) + (0x1000).to_bytes(8, "little")
    info1 = bytes(48) + hashlib.sha384(page).digest() + tail1
    step1 = hashlib.sha384(info1).digest()
    info2 = step1 + bytes(48) + b"\x70\x00\x05\x00" + bytes(4) + (0x2000).to_bytes(8, "little")
    assert len(info1) == len(info2) == 0x70
    assert ld.digest == hashlib.sha384(info2).digest()
