"""Key release the SNP way (docs/key-release.md): a report whose REPORT_DATA binds the helper's ephemeral
key to the owner's nonce, and the owner's secrets wrapped to that key only after the report passes every
check.

The guest's migration helper draws an ephemeral X25519 key ``g`` (public ``G``) and asks its secure
processor for a report with ``REPORT_DATA = nonce[32] || G[32]``. The owner's broker (``release_to_report``)
verifies the report (``snp_verify``: chain, signature, TCB, VMPL, policy, the expected measurement) and that
REPORT_DATA starts with the nonce it chose for this release, so ``G`` is the key the measured guest made for
it. It then wraps the secrets: a fresh owner key ``e``, ``ikm = X25519(e, G) || X25519(s, G)`` where ``s``
is the owner's static key, whose public half ``S`` is in the guest's measured boot parameters (either half
all zero is refused), ``kek = HKDF-SHA256(salt = nonce, ikm, info = LABEL || MEASUREMENT || REPORT_ID)``,
AES-256-GCM with the report's signed bytes [0, 0x2A0) as associated data. Only the holder of ``g``, i.e.
that guest, opens it (``open_released_key``; the helper's firmware does the same in
firmware/mh/keyrelease.c), and it opens only what the holder of ``s`` wrapped: a host, which can compute
``X25519(e, G)`` for an ``e`` of its own, cannot make the helper take a key of the host's choosing.

X25519 rather than P-384: the helper implements it in a few hundred lines of constant-time freestanding C.
Wire form of ``WrappedKey`` (``pack``): magic "CPSNPKR2", ``E``[32], IV[12], ciphertext || tag.
"""

from __future__ import annotations

import datetime
import hmac
import os
from dataclasses import dataclass, replace

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from confplan.sev.signing import VerifyError
from confplan.sev.snp_report import SIGNED_LEN
from confplan.sev.snp_verify import ReportExpectations, ReportVerdict, verify_snp_report

LABEL = b"confplan-snp-key-release/v2"
MAGIC = b"CPSNPKR2"
NONCE_LEN = 32
POINT_LEN = 32  # X25519 public key (RFC 7748 u-coordinate)
IV_LEN = 12
TAG_LEN = 16
MAX_SECRET = 1024  # what the helper's shared block holds (docs/key-release.md)
_MEASUREMENT, _REPORT_DATA, _REPORT_ID = slice(0x90, 0xC0), slice(0x50, 0x90), slice(0x140, 0x160)


def _raw(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _load_point(raw: bytes, what: str) -> X25519PublicKey:
    if len(raw) != POINT_LEN:
        raise VerifyError(f"{what} is not an X25519 public key ({POINT_LEN} bytes)", field="public_key")
    return X25519PublicKey.from_public_bytes(raw)


def report_data_for(nonce: bytes, public_key: bytes) -> bytes:
    """The 64 bytes of REPORT_DATA that bind ``public_key`` (X25519, 32 bytes) to the owner's ``nonce``."""
    if len(nonce) != NONCE_LEN or len(public_key) != POINT_LEN:
        raise ValueError(f"REPORT_DATA is nonce[{NONCE_LEN}] || X25519 public key[{POINT_LEN}]")
    return nonce + public_key


@dataclass(frozen=True)
class WrappedKey:
    owner_public_key: bytes
    iv: bytes
    ciphertext: bytes

    def pack(self) -> bytes:
        return MAGIC + self.owner_public_key + self.iv + self.ciphertext

    @classmethod
    def unpack(cls, raw: bytes) -> WrappedKey:
        head = len(MAGIC) + POINT_LEN + IV_LEN
        if raw[: len(MAGIC)] != MAGIC or not head + TAG_LEN <= len(raw) <= head + MAX_SECRET + TAG_LEN:
            raise VerifyError("not a confplan SNP wrapped key (magic CPSNPKR2, length)", field="magic")
        return cls(raw[8 : 8 + POINT_LEN], raw[8 + POINT_LEN : head], raw[head:])


def _shared(private: X25519PrivateKey, peer: X25519PublicKey) -> bytes:
    try:
        secret = private.exchange(peer)
    except ValueError:  # OpenSSL refuses an all-zero result (a low-order point)
        secret = bytes(32)
    if not any(secret):
        raise VerifyError("the X25519 exchange gave zero: a low-order public key", field="public_key")
    return secret


def _kek(secret: bytes, nonce: bytes, report_raw: bytes) -> bytes:
    info = LABEL + report_raw[_MEASUREMENT] + report_raw[_REPORT_ID]
    return HKDF(hashes.SHA256(), 32, salt=nonce, info=info).derive(secret)


def release_to_report(
    report_raw: bytes,
    vek_raw: bytes,
    expect: ReportExpectations,
    *,
    nonce: bytes,
    secret: bytes,
    owner_key: X25519PrivateKey,
    ark_raw: bytes | None = None,
    ask_raw: bytes | None = None,
    pins: list[str] | None = None,
    trust_emulated: bool = False,
    at: datetime.datetime | None = None,
) -> tuple[WrappedKey, ReportVerdict]:
    """Verify the report (its REPORT_DATA must be ``nonce`` then the guest's key) and wrap ``secret``
    (an efi_secret table) to that key, authenticated by ``owner_key`` (the static key whose public half the
    guest was launched with). Raises ``VerifyError`` naming the field; nothing is wrapped then."""
    if expect.measurement is None:
        raise VerifyError(
            "the broker releases a key only against an expected measurement", field="measurement"
        )
    if len(nonce) != NONCE_LEN or not 0 < len(secret) <= MAX_SECRET:
        raise ValueError(f"a {NONCE_LEN}-byte nonce and 1..{MAX_SECRET} bytes of secret")
    verdict = verify_snp_report(
        report_raw, vek_raw, ark_raw, ask_raw, expect, pins=pins, trust_emulated=trust_emulated, at=at
    )
    if not hmac.compare_digest(verdict.report.raw[_REPORT_DATA][:NONCE_LEN], nonce):
        raise VerifyError(
            "report report_data: not made for this release's nonce (a replayed or foreign report)",
            field="report_data",
        )
    verdict = replace(verdict, checked=(*verdict.checked, "report_data = nonce || the helper's key"))
    return wrap_to_report(verdict.report.raw, nonce, secret, owner_key), verdict


def wrap_to_report(
    report_raw: bytes, nonce: bytes, secret: bytes, owner_key: X25519PrivateKey,
    ephemeral: X25519PrivateKey | None = None,
) -> WrappedKey:  # fmt: skip
    """The wrap alone, to the key in ``report_raw``'s REPORT_DATA: only after the report was verified
    (``release_to_report`` does both; tests play the broker with it)."""
    guest = _load_point(report_raw[_REPORT_DATA][NONCE_LEN:], "the guest's key in REPORT_DATA")
    owner = X25519PrivateKey.generate() if ephemeral is None else ephemeral
    kek = _kek(_shared(owner, guest) + _shared(owner_key, guest), nonce, report_raw)
    iv = os.urandom(IV_LEN)
    ciphertext = AESGCM(kek).encrypt(iv, secret, report_raw[:SIGNED_LEN])
    return WrappedKey(_raw(owner.public_key()), iv, ciphertext)


def open_released_key(
    wrapped: WrappedKey, guest_key: X25519PrivateKey, nonce: bytes, report_raw: bytes, owner_static: bytes
) -> bytes:
    """The guest's side (the helper does this in C): unwrap with its ephemeral key, its own report and the
    owner's static public key it was launched with."""
    owner = _load_point(wrapped.owner_public_key, "the owner's public key")
    static = _load_point(owner_static, "the owner's static key")
    kek = _kek(_shared(guest_key, owner) + _shared(guest_key, static), nonce, report_raw)
    try:
        return AESGCM(kek).decrypt(wrapped.iv, wrapped.ciphertext, report_raw[:SIGNED_LEN])
    except InvalidTag:
        raise VerifyError(
            "the wrapped key does not open for this guest key and report", field="tag"
        ) from None


def public_bytes(key: X25519PrivateKey) -> bytes:
    """The 32-byte public half of an X25519 key (what the guest's boot parameters carry as owner_key)."""
    return _raw(key.public_key())


def guest_key_pair() -> tuple[X25519PrivateKey, bytes]:
    """An ephemeral key pair for a release, and its public half (what REPORT_DATA binds)."""
    key = X25519PrivateKey.generate()
    return key, _raw(key.public_key())
