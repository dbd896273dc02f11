"""Signature algorithms of AMD's SEV formats, and the one error every verification raises.

The SEV API specification (appendix C.1, ``SEV_SIG_ALGO``) numbers the algorithms a certificate header or a
signature slot may name: 0x1 RSA-SHA256, 0x2 ECDSA-SHA256, 0x3 ECDH-SHA256, 0x101 RSA-SHA384, 0x102
ECDSA-SHA384, 0x103 ECDH-SHA384 (AMDESE/sev-tool ``sevapi.h``, virtee/sev ``algo.rs``). RSA signatures are
RSASSA-PSS with MGF1 over the same hash and a salt as long as the digest; every big number (RSA signature,
ECDSA r and s, public key coordinates) is stored little-endian. ECDH names a key-agreement key, never a
signature, so a slot that claims it is refused.
"""

from __future__ import annotations

import enum

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from confplan.errors import ConfplanError

ECDSA_COMPONENT_LEN = 72  # r and s are each stored little-endian in a 72-byte field (576 bits)


class VerifyError(ConfplanError, ValueError):
    """Something an owner was given does not verify; ``field`` names the part that failed."""

    def __init__(self, message: str, *, field: str = "", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.field = field


class SigAlgo(enum.IntEnum):
    """``SEV_SIG_ALGO``: the algorithm a key or a signature slot is for."""

    INVALID = 0x0
    RSA_SHA256 = 0x1
    ECDSA_SHA256 = 0x2
    ECDH_SHA256 = 0x3
    RSA_SHA384 = 0x101
    ECDSA_SHA384 = 0x102
    ECDH_SHA384 = 0x103

    @property
    def kind(self) -> str:
        """'rsa', 'ecdsa', 'ecdh' or 'invalid'."""
        return self.name.split("_")[0].lower()

    @property
    def hash(self) -> hashes.HashAlgorithm:
        if self == SigAlgo.INVALID:
            raise ValueError("the INVALID algorithm has no hash")
        return hashes.SHA384() if int(self) & 0x100 else hashes.SHA256()


def sig_algo(value: int, field: str) -> SigAlgo:
    """``value`` as a known algorithm, or ``VerifyError`` naming ``field`` and the value."""
    try:
        return SigAlgo(value)
    except ValueError:
        known = ", ".join(f"{a.value:#x} {a.name}" for a in SigAlgo if a != SigAlgo.INVALID)
        raise VerifyError(
            f"{field} = {value:#x} is not a signature algorithm of the SEV API (known: {known})",
            field=field,
        ) from None


def le_int(raw: bytes) -> int:
    return int.from_bytes(raw, "little")


def verify_rsa_pss(
    key: rsa.RSAPublicKey, signature_le: bytes, data: bytes, digest: hashes.HashAlgorithm
) -> bool:
    """RSASSA-PSS (MGF1 with the same hash, salt = digest length) over ``data``; the signature is stored
    little-endian, as long as the modulus."""
    big_endian = signature_le[::-1]
    try:
        key.verify(big_endian, data, padding.PSS(padding.MGF1(digest), digest.digest_size), digest)
    except InvalidSignature:
        return False
    return True


def verify_ecdsa_le(
    key: ec.EllipticCurvePublicKey, r_le: bytes, s_le: bytes, data: bytes, digest: hashes.HashAlgorithm
) -> bool:
    """ECDSA over ``data`` with r and s stored little-endian (SEV certificates, SNP reports, ID blocks)."""
    r, s = le_int(r_le), le_int(s_le)
    if not r or not s:
        return False
    try:
        key.verify(encode_dss_signature(r, s), data, ec.ECDSA(digest))
    except (InvalidSignature, ValueError):
        return False
    return True


def sign_ecdsa_le(
    key: ec.EllipticCurvePrivateKey, data: bytes, digest: hashes.HashAlgorithm
) -> tuple[bytes, bytes]:
    """(r, s), each little-endian in a 72-byte field."""
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(digest)))
    return r.to_bytes(ECDSA_COMPONENT_LEN, "little"), s.to_bytes(ECDSA_COMPONENT_LEN, "little")


def rsa_public_key(modulus_le: bytes, exponent_le: bytes, where: str) -> rsa.RSAPublicKey:
    """An RSA public key from little-endian modulus and exponent fields."""
    try:
        return rsa.RSAPublicNumbers(le_int(exponent_le), le_int(modulus_le)).public_key()
    except ValueError as err:
        raise VerifyError(f"{where}: not an RSA public key: {err}", field="modulus") from None
