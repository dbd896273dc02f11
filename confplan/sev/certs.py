"""SEV platform certificates (AMD SEV API, appendix C: 0x824-byte ``SEV_CERT``) over P-384.

Layout (little-endian): version u32 = 1 @0, api_major u8 @4, api_minor u8 @5, reserved[2],
pub_key_usage u32 @8, pub_key_algo u32 @0xC, pubkey[1028] @0x10 (curve u32 = 2 for P-384, qx[72], qy[72]
little-endian zero-extended, reserved), then two signature slots @0x414 and @0x61C, each usage u32,
algo u32 and 512 bytes (r[72], s[72] little-endian). A signature covers bytes [0, 0x414).

The chain of a platform: ARK (self-signed) -> ASK -> CEK -> PEK, OCA (self-signed) -> PEK, PEK -> PDH.
On real hardware the ARK and ASK come from AMD in the RSA ``AMD_CERT`` format; the emulated secure processor
issues them in the SEV format over P-384 (see docs/attestation.md).
"""

from __future__ import annotations

import enum
import hashlib
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

CERT_LEN = 0x824
SIGNED_LEN = 0x414
PUBKEY_LEN = 1028
SIG_SLOT_LEN = 8 + 512
COMPONENT_LEN = 72  # every P-384 scalar is stored little-endian in a 72-byte field
P384_BYTES = 48
CURVE_P384 = 2
CERT_VERSION = 1


class Usage(enum.IntEnum):
    """``pub_key_usage``: which key a certificate holds."""

    ARK = 0x0
    ASK = 0x13
    INVALID = 0x1000
    OCA = 0x1001
    PEK = 0x1002
    PDH = 0x1003
    CEK = 0x1004


class Algo(enum.IntEnum):
    """``pub_key_algo`` and signature algorithms used here."""

    INVALID = 0
    ECDSA_SHA256 = 2
    ECDH_SHA256 = 3


class CertError(ValueError):
    """A certificate or chain that does not parse or verify."""


def _le(value: int) -> bytes:
    return value.to_bytes(COMPONENT_LEN, "little")


def _from_le(raw: bytes) -> int:
    return int.from_bytes(raw, "little")


def encode_pubkey(key: ec.EllipticCurvePublicKey) -> bytes:
    nums = key.public_numbers()
    body = struct.pack("<I", CURVE_P384) + _le(nums.x) + _le(nums.y)
    return body.ljust(PUBKEY_LEN, b"\x00")


def decode_pubkey(raw: bytes) -> ec.EllipticCurvePublicKey:
    (curve,) = struct.unpack_from("<I", raw)
    if curve != CURVE_P384:
        raise CertError(f"unsupported curve id {curve} (only P-384 = {CURVE_P384})")
    x = _from_le(raw[4 : 4 + COMPONENT_LEN])
    y = _from_le(raw[4 + COMPONENT_LEN : 4 + 2 * COMPONENT_LEN])
    try:
        return ec.EllipticCurvePublicNumbers(x, y, ec.SECP384R1()).public_key()
    except ValueError as err:
        raise CertError(f"public key is not a point on P-384: {err}") from err


@dataclass(frozen=True)
class Signature:
    usage: int
    algo: int
    r: int
    s: int

    def pack(self) -> bytes:
        body = _le(self.r) + _le(self.s)
        return struct.pack("<II", self.usage, self.algo) + body.ljust(512, b"\x00")

    @classmethod
    def unpack(cls, raw: bytes) -> Signature:
        usage, algo = struct.unpack_from("<II", raw)
        r = _from_le(raw[8 : 8 + COMPONENT_LEN])
        s = _from_le(raw[8 + COMPONENT_LEN : 8 + 2 * COMPONENT_LEN])
        return cls(usage, algo, r, s)

    @property
    def empty(self) -> bool:
        return self.algo == Algo.INVALID


EMPTY_SIG = Signature(Usage.INVALID, Algo.INVALID, 0, 0)


@dataclass(frozen=True)
class SevCert:
    """One parsed ``SEV_CERT``."""

    api_major: int
    api_minor: int
    usage: int
    algo: int
    pubkey: ec.EllipticCurvePublicKey
    sig1: Signature = EMPTY_SIG
    sig2: Signature = EMPTY_SIG

    def body(self) -> bytes:
        head = struct.pack("<IBBxxII", CERT_VERSION, self.api_major, self.api_minor, self.usage, self.algo)
        return head + encode_pubkey(self.pubkey)

    def pack(self) -> bytes:
        return self.body() + self.sig1.pack() + self.sig2.pack()

    @classmethod
    def unpack(cls, raw: bytes) -> SevCert:
        if len(raw) != CERT_LEN:
            raise CertError(f"an SEV certificate is {CERT_LEN:#x} bytes, got {len(raw):#x}")
        version, major, minor, usage, algo = struct.unpack_from("<IBBxxII", raw)
        if version != CERT_VERSION:
            raise CertError(f"unsupported SEV certificate version {version}")
        return cls(
            api_major=major,
            api_minor=minor,
            usage=usage,
            algo=algo,
            pubkey=decode_pubkey(raw[0x10:SIGNED_LEN]),
            sig1=Signature.unpack(raw[SIGNED_LEN : SIGNED_LEN + SIG_SLOT_LEN]),
            sig2=Signature.unpack(raw[SIGNED_LEN + SIG_SLOT_LEN :]),
        )

    def signed_by(self, signer_usage: int, signer: ec.EllipticCurvePublicKey) -> bool:
        """True if one of the two slots holds a valid signature by ``signer`` with that usage."""
        body = self.body()
        for sig in (self.sig1, self.sig2):
            if sig.empty or sig.usage != signer_usage:
                continue
            try:
                signer.verify(encode_dss_signature(sig.r, sig.s), body, ec.ECDSA(hashes.SHA256()))
                return True
            except InvalidSignature:
                continue
        return False

    def fingerprint(self) -> str:
        """SHA-256 of the packed certificate (how an owner pins an ARK)."""
        return hashlib.sha256(self.pack()).hexdigest()


def sign_body(body: bytes, signer: ec.EllipticCurvePrivateKey, signer_usage: int) -> Signature:
    r, s = decode_dss_signature(signer.sign(body, ec.ECDSA(hashes.SHA256())))
    return Signature(signer_usage, Algo.ECDSA_SHA256, r, s)


def issue(
    pubkey: ec.EllipticCurvePublicKey,
    usage: Usage,
    signers: list[tuple[ec.EllipticCurvePrivateKey, Usage]],
    api: tuple[int, int] = (0, 0),
) -> SevCert:
    """Make a certificate for ``pubkey`` signed by up to two keys (self-signed: pass its own key)."""
    algo = Algo.ECDH_SHA256 if usage == Usage.PDH else Algo.ECDSA_SHA256
    unsigned = SevCert(api[0], api[1], int(usage), int(algo), pubkey)
    sigs = [sign_body(unsigned.body(), key, key_usage) for key, key_usage in signers]
    sig1 = sigs[0] if sigs else EMPTY_SIG
    sig2 = sigs[1] if len(sigs) > 1 else EMPTY_SIG
    return SevCert(api[0], api[1], int(usage), int(algo), pubkey, sig1, sig2)


CHAIN_ORDER = (Usage.PDH, Usage.PEK, Usage.OCA, Usage.CEK, Usage.ASK, Usage.ARK)


@dataclass(frozen=True)
class PlatformChain:
    """The certificates a platform hands the owner: PDH, PEK, OCA, CEK, ASK, ARK."""

    pdh: SevCert
    pek: SevCert
    oca: SevCert
    cek: SevCert
    ask: SevCert
    ark: SevCert

    def pack(self) -> bytes:
        """The chain file: the six certificates back to back, in ``CHAIN_ORDER``."""
        return b"".join(c.pack() for c in (self.pdh, self.pek, self.oca, self.cek, self.ask, self.ark))

    @classmethod
    def unpack(cls, raw: bytes) -> PlatformChain:
        if len(raw) != CERT_LEN * len(CHAIN_ORDER):
            raise CertError(
                f"a platform chain is {len(CHAIN_ORDER)} certificates of {CERT_LEN:#x} bytes "
                f"({CERT_LEN * len(CHAIN_ORDER)} bytes), got {len(raw)} bytes"
            )
        certs = [SevCert.unpack(raw[i * CERT_LEN : (i + 1) * CERT_LEN]) for i in range(len(CHAIN_ORDER))]
        for cert, want in zip(certs, CHAIN_ORDER, strict=True):
            if cert.usage != want:
                raise CertError(f"certificate {want.name} has usage {cert.usage:#x}, expected {int(want):#x}")
        return cls(*certs)

    def verify(self) -> ec.EllipticCurvePublicKey:
        """Check every link; return the PDH public key. Raises ``CertError`` naming the broken link."""
        links = (
            (self.ark, Usage.ARK, self.ark, "ARK is not self-signed"),
            (self.ask, Usage.ARK, self.ark, "ASK is not signed by the ARK"),
            (self.cek, Usage.ASK, self.ask, "CEK is not signed by the ASK"),
            (self.oca, Usage.OCA, self.oca, "OCA is not self-signed"),
            (self.pek, Usage.CEK, self.cek, "PEK is not signed by the CEK"),
            (self.pek, Usage.OCA, self.oca, "PEK is not signed by the OCA"),
            (self.pdh, Usage.PEK, self.pek, "PDH is not signed by the PEK"),
        )
        for cert, signer_usage, signer, problem in links:
            if not cert.signed_by(signer_usage, signer.pubkey):
                raise CertError(problem)
        return self.pdh.pubkey


def ecdh_secret(private: ec.EllipticCurvePrivateKey, peer: ec.EllipticCurvePublicKey) -> bytes:
    """Z: the x-coordinate of the shared point, 48 bytes big-endian."""
    return private.exchange(ec.ECDH(), peer)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())
