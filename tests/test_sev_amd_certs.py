"""SEV certificates checked over the bytes received, AMD_CERT (ARK, ASK), the built-in anchors and the
trust rule, against real Naples/Rome/Milan/Genoa/Turin material (tests/data/README.md)."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest

from confplan.sev import anchors, certs
from confplan.sev.amd_cert import AmdCert
from confplan.sev.certs import CertError, PlatformChain, SevCert, Usage
from confplan.sev.signing import SigAlgo, VerifyError

DATA = Path(__file__).parent / "data" / "amd"


def platform_certs(product: str) -> bytes:
    return b"".join((DATA / f"{product}_{c}.cert").read_bytes() for c in ("pdh", "pek", "oca", "cek"))


def real_chain(product: str) -> bytes:
    ca = anchors.sev_ca(product)
    return platform_certs(product) + ca.ask.raw + ca.ark.raw


@pytest.mark.parametrize("product", anchors.SEV_PRODUCTS)
def test_builtin_ark_and_ask_verify_and_are_pinned(product: str) -> None:
    ca = anchors.sev_ca(product)
    ca.verify()
    assert anchors.sev_ark_product(ca.ark.fingerprint()) == product
    assert ca.ark.fingerprint() == hashlib.sha256(ca.ark.raw).hexdigest() == anchors.SEV_PINS[product][0]
    assert ca.ark.modulus_bits == (2048 if product == "naples" else 4096)


@pytest.mark.parametrize("product", ["naples", "rome"])
def test_real_platform_chains_verify(product: str) -> None:
    chain = PlatformChain.unpack(real_chain(product))
    assert not chain.emulated and chain.pack() == real_chain(product)
    assert chain.verify().curve.name == "secp384r1"
    want = SigAlgo.RSA_SHA256 if product == "naples" else SigAlgo.RSA_SHA384
    assert chain.cek.sig1.algo == want and chain.cek.sig1.usage == Usage.ASK


def test_a_cek_is_refused_under_another_products_ask() -> None:
    # virtee/sev test_for_verify_false_positive (enarx#520): a Naples CEK does not verify under Rome's ASK.
    cek = SevCert.unpack((DATA / "naples_cek.cert").read_bytes())
    rome_ask = anchors.sev_ca("rome").ask
    with pytest.raises(CertError, match=r"sig1_algo = 0x1 \(RSA_SHA256\), the signer signs with RSA_SHA384"):
        cek.verify_signed_by(Usage.ASK, rome_ask.key, rome_ask.sig_algo)
    with pytest.raises(VerifyError, match="certifying_id"):
        rome_ask.verify_signed_by(anchors.sev_ca("naples").ark)


@pytest.mark.parametrize("flip", [6, 7, 0x10 + 4 + 144, 0x300])  # reserved 6-7, pubkey reserved area
def test_reserved_bytes_are_signed(flip: int) -> None:
    raw = bytearray((DATA / "rome_pek.cert").read_bytes())
    chain = PlatformChain.unpack(real_chain("rome"))
    raw[flip] ^= 1
    pek = SevCert.unpack(bytes(raw))
    assert not pek.signed_by(Usage.CEK, chain.cek.pubkey, chain.cek.sig_algo)
    assert pek.fingerprint() != chain.pek.fingerprint()


@pytest.mark.parametrize(
    ("algo", "message"), [(0x1, "does not fit"), (0x101, "does not fit"), (0x7777, "0x7777 is not")]
)
def test_a_slot_naming_another_algorithm_is_refused(algo: int, message: str) -> None:
    raw = bytearray((DATA / "rome_pek.cert").read_bytes())
    chain = PlatformChain.unpack(real_chain("rome"))
    slot = 0x414 if struct.unpack_from("<I", raw, 0x414)[0] == Usage.CEK else 0x414 + 520
    struct.pack_into("<I", raw, slot + 4, algo)
    pek = SevCert.unpack(bytes(raw))
    with pytest.raises(VerifyError, match=message) as err:
        pek.verify_signed_by(Usage.CEK, chain.cek.pubkey, chain.cek.sig_algo)
    assert "algo" in err.value.field or "algo" in err.value.message


def test_an_ecdsa_sha384_slot_verifies() -> None:
    """A genuine ECDSA-SHA384 (0x102) signature is accepted with that algorithm, refused under another."""
    from cryptography.hazmat.primitives import hashes

    from confplan.sev.signing import sign_ecdsa_le

    key = certs.new_key()
    body = struct.pack("<IBBxxII", 1, 0, 0, Usage.OCA, SigAlgo.ECDSA_SHA384) + certs.encode_pubkey(
        key.public_key()
    )
    r, s = sign_ecdsa_le(key, body, hashes.SHA384())
    slot = certs.Signature(Usage.OCA, SigAlgo.ECDSA_SHA384, (r + s).ljust(512, b"\x00"))
    cert = SevCert.unpack(body + slot.pack() + certs.EMPTY_SIG.pack())
    cert.verify_signed_by(Usage.OCA, key.public_key(), cert.sig_algo)
    assert not cert.signed_by(Usage.OCA, key.public_key(), SigAlgo.ECDSA_SHA256)


def test_every_flipped_byte_of_a_real_chain_is_refused() -> None:
    good = real_chain("rome")
    offsets = sorted({*range(0, 0x60), *range(0x414, 0x424), *range(0x61C, 0x62C), *range(0, 2084, 5)})
    starts = [i * 2084 for i in range(4)] + [4 * 2084, 4 * 2084 + 1600]
    positions = [s + o for s in starts[:4] for o in offsets]
    positions += [s + o for s in starts[4:] for o in range(0, 1600, 3)]
    for pos in positions:
        raw = bytearray(good)
        raw[pos] ^= 0x01
        with pytest.raises(VerifyError):
            PlatformChain.unpack(bytes(raw)).verify()


def test_every_flipped_byte_of_an_amd_ask_is_refused() -> None:
    ca = anchors.sev_ca("milan")
    for pos in range(len(ca.ask.raw)):
        raw = bytearray(ca.ask.raw)
        raw[pos] ^= 0x80
        with pytest.raises(VerifyError):
            AmdCert.parse(bytes(raw), "ASK").verify_signed_by(ca.ark)


def test_amd_cert_fields_are_named() -> None:
    ask = anchors.sev_ca("rome").ask.raw
    with pytest.raises(VerifyError, match="key_usage = 0x14") as err:
        AmdCert.parse(ask[:0x24] + struct.pack("<I", 0x14) + ask[0x28:])
    assert err.value.field == "key_usage"
    with pytest.raises(VerifyError, match=r"carries no signature|AMDSEV#17|header says"):
        AmdCert.parse((DATA / "naples_ark_unsigned.cert").read_bytes(), "ARK")
    with pytest.raises(VerifyError, match="certifying_id"):
        anchors.sev_ca("rome").ask.verify_signed_by(anchors.sev_ca("milan").ark)


def test_trust_rule_default_is_amd_only(tmp_path: Path) -> None:
    from confplan.sev.psp import EmulatedSecureProcessor

    emulated = EmulatedSecureProcessor.open(tmp_path).platform_chain()
    assert emulated.emulated
    fp = emulated.ark.fingerprint()
    with pytest.raises(VerifyError, match="not one of AMD's built-in ARKs") as err:
        anchors.check_root(fp, None, pins=[], trust_emulated=False)
    assert err.value.field == "ark" and "trust_emulated_platform" in (err.value.hint or "")
    assert anchors.check_root(fp, None, pins=[], trust_emulated=True).emulated
    with pytest.raises(VerifyError, match="not in trusted_ark_sha256"):
        anchors.check_root(fp, None, pins=["00" * 32], trust_emulated=True)
    rome = anchors.sev_ca("rome").ark.fingerprint()
    assert anchors.check_root(rome, "rome", pins=[], trust_emulated=False).product == "rome"
    with pytest.raises(VerifyError, match="not in trusted_ark_sha256"):
        anchors.check_root(rome, "rome", pins=[anchors.SEV_PINS["milan"][0]], trust_emulated=False)


def test_broker_default_refuses_the_emulated_chain_and_accepts_amd(tmp_path: Path) -> None:
    from confplan.sev.broker import AttestationRefused, KeyBroker, OwnerPolicy
    from confplan.sev.psp import EmulatedSecureProcessor

    policy = OwnerPolicy(allowed_digests=["00" * 32], allowed_policies=[0], min_api="0.0")
    broker = KeyBroker.init(tmp_path / "owner", policy)
    with pytest.raises(AttestationRefused, match="not one of AMD's built-in ARKs"):
        broker.new_session(EmulatedSecureProcessor.open(tmp_path / "psp").platform_chain(), 0)
    bundle = broker.new_session(PlatformChain.unpack(real_chain("naples")), 0)
    assert len(bundle.session_blob) == 128
