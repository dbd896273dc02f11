"""AMD's own signing-key certificates (SEV API appendix B.1, ``AMD_CERT``): the ARK and the ASK.

Layout (little-endian): version u32 = 1 @0, key_id[16] @4, certifying_id[16] @0x14, key_usage u32 @0x24
(ARK 0x0, ASK 0x13), reserved[16] @0x28, pub_exp_size u32 @0x38 and modulus_size u32 @0x3C (bits, 2048 or
4096), then pub_exp, modulus and the signature, each ``size / 8`` bytes. The signature is RSASSA-PSS by
the certifying key over every byte before it: SHA-256 for a 2048-bit signer (Naples), SHA-384 for a
4096-bit one (Rome and later), as AMDESE/sev-tool's ``amd_cert_validate_sig`` checks it. The ARK certifies
itself (certifying_id = key_id). Parsed certificates keep the bytes they came from: every check and the
fingerprint use those bytes, never a re-encoding.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa

from confplan.sev.signing import SigAlgo, VerifyError, rsa_public_key, verify_rsa_pss

HEADER_LEN = 0x40
CERT_VERSION = 1
KEY_SIZES = (2048, 4096)


class AmdUsage(enum.IntEnum):
    ARK = 0x0
    ASK = 0x13


@dataclass(frozen=True)
class AmdCert:
    """One ``AMD_CERT`` exactly as received (``raw``), with its fields decoded."""

    raw: bytes
    key_id: bytes
    certifying_id: bytes
    usage: AmdUsage
    pub_exp_bits: int
    modulus_bits: int
    key: rsa.RSAPublicKey

    @classmethod
    def parse(cls, raw: bytes, what: str = "AMD certificate") -> AmdCert:
        """Decode and check the fixed fields; ``VerifyError`` names the field that is wrong."""
        if len(raw) < HEADER_LEN:
            raise VerifyError(f"{what}: {len(raw)} bytes, shorter than the {HEADER_LEN}-byte header")
        version, usage = struct.unpack_from("<I", raw)[0], struct.unpack_from("<I", raw, 0x24)[0]
        exp_bits, mod_bits = struct.unpack_from("<II", raw, 0x38)
        if version != CERT_VERSION:
            raise VerifyError(f"{what}: version = {version}, expected {CERT_VERSION}", field="version")
        if usage not in AmdUsage.__members__.values():
            raise VerifyError(
                f"{what}: key_usage = {usage:#x}, expected ARK 0x0 or ASK 0x13", field="key_usage"
            )
        for field, bits in (("pub_exp_size", exp_bits), ("modulus_size", mod_bits)):
            if bits not in KEY_SIZES:
                raise VerifyError(f"{what}: {field} = {bits} bits, expected 2048 or 4096", field=field)
        want = HEADER_LEN + exp_bits // 8 + 2 * (mod_bits // 8)
        if len(raw) != want:
            hint = None
            if len(raw) == want - mod_bits // 8:
                hint = "this certificate carries no signature (AMD's published Naples ARK lacks it, "
                hint += "AMDESE/AMDSEV#17); use the built-in Naples ARK"
            raise VerifyError(
                f"{what}: {len(raw)} bytes, its header says {want} (header, exponent, modulus, signature)",
                field="length",
                hint=hint,
            )
        exp = raw[HEADER_LEN : HEADER_LEN + exp_bits // 8]
        mod = raw[HEADER_LEN + exp_bits // 8 : HEADER_LEN + exp_bits // 8 + mod_bits // 8]
        key = rsa_public_key(mod, exp, what)
        if key.key_size != mod_bits:
            raise VerifyError(
                f"{what}: the modulus is {key.key_size} bits, modulus_size says {mod_bits}",
                field="modulus_size",
            )
        return cls(raw, raw[4:0x14], raw[0x14:0x24], AmdUsage(usage), exp_bits, mod_bits, key)

    @property
    def signed_bytes(self) -> bytes:
        """Header, exponent and modulus: what the certifying key signed."""
        return self.raw[: len(self.raw) - self.modulus_bits // 8]

    @property
    def signature(self) -> bytes:
        return self.raw[len(self.raw) - self.modulus_bits // 8 :]

    @property
    def hash(self) -> hashes.HashAlgorithm:
        """The hash this key signs with (SHA-256 for 2048-bit keys, SHA-384 for 4096-bit ones)."""
        return hashes.SHA256() if self.modulus_bits == 2048 else hashes.SHA384()

    @property
    def sig_algo(self) -> SigAlgo:
        """The SEV algorithm code for signatures by this key (what a CEK's slot must name)."""
        return SigAlgo.RSA_SHA256 if self.modulus_bits == 2048 else SigAlgo.RSA_SHA384

    def fingerprint(self) -> str:
        """SHA-256 of the certificate bytes as received (how anchors and owners pin an ARK)."""
        return hashlib.sha256(self.raw).hexdigest()

    def verify_signed_by(self, signer: AmdCert, what: str = "") -> None:
        """Check usage, certifying_id and the RSA-PSS signature by ``signer``; raise ``VerifyError``."""
        what = what or self.usage.name
        expect = AmdUsage.ARK if signer is self else AmdUsage.ASK
        if self.usage != expect:
            raise VerifyError(
                f"{what}: key_usage = {self.usage:#x}, expected {expect.name} {int(expect):#x}",
                field="key_usage",
            )
        if self.certifying_id != signer.key_id:
            raise VerifyError(
                f"{what}: certifying_id {self.certifying_id.hex()} is not the key_id "
                f"{signer.key_id.hex()} of its signer {signer.usage.name}",
                field="certifying_id",
            )
        if not verify_rsa_pss(signer.key, self.signature, self.signed_bytes, signer.hash):
            raise VerifyError(
                f"{what}: the RSA-PSS/{signer.hash.name.upper()} signature does not verify with the "
                f"{signer.usage.name} key {signer.key_id.hex()}",
                field="signature",
            )


@dataclass(frozen=True)
class AmdCaChain:
    """AMD's ARK and ASK for one product line (sevctl's ``ca::Chain``: ASK then ARK on disk)."""

    ask: AmdCert
    ark: AmdCert

    @classmethod
    def parse(cls, raw: bytes) -> AmdCaChain:
        """ASK then ARK back to back (the order of ``sevctl export --full`` and AMD's ``ask_ark_*.cert``)."""
        ask = AmdCert.parse(raw[: cert_len(raw)], "ASK")
        ark = AmdCert.parse(raw[len(ask.raw) :], "ARK")
        return cls(ask, ark)

    def verify(self) -> None:
        self.ark.verify_signed_by(self.ark, "ARK")
        self.ask.verify_signed_by(self.ark, "ASK")


def cert_len(raw: bytes) -> int:
    """The length an ``AMD_CERT`` at the start of ``raw`` declares (to split files of several)."""
    if len(raw) < HEADER_LEN:
        raise VerifyError(f"an AMD certificate needs a {HEADER_LEN}-byte header, got {len(raw)} bytes")
    exp_bits, mod_bits = struct.unpack_from("<II", raw, 0x38)
    if exp_bits not in KEY_SIZES or mod_bits not in KEY_SIZES:
        raise VerifyError(
            f"AMD certificate header: pub_exp_size {exp_bits} / modulus_size {mod_bits} bits, "
            "expected 2048 or 4096",
            field="modulus_size",
        )
    return int(HEADER_LEN + exp_bits // 8 + 2 * (mod_bits // 8))
