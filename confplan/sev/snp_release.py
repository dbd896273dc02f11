"""Key release the SNP way: a report whose REPORT_DATA binds an ephemeral key, and the transport key
wrapped to that key only after the report passes every check.

The guest's migration helper makes an ephemeral P-384 key pair and asks its secure processor for a report
with ``REPORT_DATA = report_data_for(nonce, public_key)`` = SHA-512("confplan-snp-key-release/v1" ||
nonce[32] || public key, SEC1 uncompressed). The owner's broker (``release_to_report``) verifies the
report (``snp_verify``: chain, signature, TCB, VMPL, policy, the expected measurement) with that
REPORT_DATA expected, so the key is the one the measured guest made for this nonce. It then wraps the
transport key: ECDH with a fresh owner key, HKDF-SHA384 over the shared secret (salt: the nonce; info:
label || MEASUREMENT || REPORT_ID), AES-256-GCM with the report's signed bytes [0, 0x2A0) as associated
data. Only the holder of the guest's private key, i.e. that guest, opens it (``open_released_key``).

Wire form of ``WrappedKey`` (``pack``): magic "CPSNPKR1", owner public key[97], nonce[12], ciphertext+tag.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass, replace

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from confplan.sev.signing import VerifyError
from confplan.sev.snp_report import SIGNED_LEN
from confplan.sev.snp_verify import ReportExpectations, ReportVerdict, verify_snp_report

LABEL = b"confplan-snp-key-release/v1"
MAGIC = b"CPSNPKR1"
NONCE_LEN = 32
POINT_LEN = 97  # SEC1 uncompressed P-384
_IV_LEN = 12


def _point(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def _load_point(raw: bytes, what: str) -> ec.EllipticCurvePublicKey:
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP384R1(), raw)
    except ValueError:
        raise VerifyError(
            f"{what} is not a P-384 point (SEC1, {POINT_LEN} bytes)", field="public_key"
        ) from None


def report_data_for(nonce: bytes, public_key: bytes) -> bytes:
    """The 64 bytes of REPORT_DATA that bind ``public_key`` (SEC1) to the owner's ``nonce``."""
    if len(nonce) != NONCE_LEN:
        raise ValueError(f"the release nonce is {NONCE_LEN} bytes, got {len(nonce)}")
    return hashlib.sha512(LABEL + nonce + public_key).digest()


@dataclass(frozen=True)
class WrappedKey:
    owner_public_key: bytes
    iv: bytes
    ciphertext: bytes

    def pack(self) -> bytes:
        return MAGIC + self.owner_public_key + self.iv + self.ciphertext

    @classmethod
    def unpack(cls, raw: bytes) -> WrappedKey:
        head = len(MAGIC) + POINT_LEN + _IV_LEN
        if raw[: len(MAGIC)] != MAGIC or len(raw) < head + 16:
            raise VerifyError("not a confplan SNP wrapped key (magic CPSNPKR1)", field="magic")
        return cls(raw[8 : 8 + POINT_LEN], raw[8 + POINT_LEN : head], raw[head:])


def _kek(secret: bytes, nonce: bytes, measurement: bytes, report_id: bytes) -> bytes:
    info = LABEL + measurement + report_id
    return HKDF(hashes.SHA384(), 32, salt=nonce, info=info).derive(secret)


def release_to_report(
    report_raw: bytes,
    vek_raw: bytes,
    expect: ReportExpectations,
    *,
    guest_public_key: bytes,
    nonce: bytes,
    transport_key: bytes,
    ark_raw: bytes | None = None,
    ask_raw: bytes | None = None,
    pins: list[str] | None = None,
    trust_emulated: bool = False,
    at: datetime.datetime | None = None,
) -> tuple[WrappedKey, ReportVerdict]:
    """Verify the report (its REPORT_DATA must bind ``guest_public_key`` to ``nonce``) and wrap
    ``transport_key`` to that key. Raises ``VerifyError`` naming the field; nothing is wrapped then."""
    if expect.measurement is None:
        raise VerifyError(
            "the broker releases a key only against an expected measurement", field="measurement"
        )
    guest = _load_point(guest_public_key, "the guest's public key")
    want = replace(expect, report_data=report_data_for(nonce, guest_public_key))
    verdict = verify_snp_report(
        report_raw, vek_raw, ark_raw, ask_raw, want, pins=pins, trust_emulated=trust_emulated, at=at
    )
    owner = ec.generate_private_key(ec.SECP384R1())
    report = verdict.report
    kek = _kek(owner.exchange(ec.ECDH(), guest), nonce, report.measurement, report.report_id)
    iv = os.urandom(_IV_LEN)
    ciphertext = AESGCM(kek).encrypt(iv, transport_key, report.raw[:SIGNED_LEN])
    return WrappedKey(_point(owner.public_key()), iv, ciphertext), verdict


def open_released_key(
    wrapped: WrappedKey, guest_key: ec.EllipticCurvePrivateKey, nonce: bytes, report_raw: bytes
) -> bytes:
    """The guest's side: unwrap with its ephemeral private key and its own report."""
    owner = _load_point(wrapped.owner_public_key, "the owner's public key")
    measurement, report_id = report_raw[0x90:0xC0], report_raw[0x140:0x160]
    kek = _kek(guest_key.exchange(ec.ECDH(), owner), nonce, measurement, report_id)
    try:
        return AESGCM(kek).decrypt(wrapped.iv, wrapped.ciphertext, report_raw[:SIGNED_LEN])
    except InvalidTag:
        raise VerifyError(
            "the wrapped key does not open for this guest key and report", field="tag"
        ) from None


def guest_key_pair() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """An ephemeral key pair for a release, and its public half as SEC1 (what REPORT_DATA binds)."""
    key = ec.generate_private_key(ec.SECP384R1())
    return key, _point(key.public_key())
