"""The SEV-SNP attestation report (SNP ABI ``ATTESTATION_REPORT``, 0x4A0 bytes), every field decoded.

Offsets (little-endian): version u32 @0 (2, 3 or 5), guest_svn @4, policy u64 @8, family_id[16] @0x10,
image_id[16] @0x20, vmpl u32 @0x30, signature_algo u32 @0x34 (1 = ECDSA P-384 with SHA-384), current_tcb
@0x38, platform_info u64 @0x40, key_info u32 @0x48 (bit 0 author_key_en, bit 1 mask_chip_key, bits 4:2
signing_key: 0 VCEK, 1 VLEK, 7 none), report_data[64] @0x50, measurement[48] @0x90, host_data[32] @0xC0,
id_key_digest[48] @0xE0, author_key_digest[48] @0x110, report_id[32] @0x140, report_id_ma[32] @0x160,
reported_tcb @0x180, cpuid family/model/stepping u8 @0x188.. (version 3+), chip_id[64] @0x1A0,
committed_tcb @0x1E0, current build/minor/major @0x1E8, committed @0x1EC, launch_tcb @0x1F0, launch and
current mitigation vectors u64 @0x1F8/@0x200 (version 5), signature @0x2A0: r[72], s[72] little-endian,
then zeros to 0x4A0. The signature covers [0, 0x2A0) exactly as received.

A TCB version is 8 bytes whose layout depends on the product line (virtee/sev ``TcbVersion``): Milan and
Genoa: boot_loader @0, tee @1, snp @6, microcode @7; Turin and later: fmc @0, boot_loader @1, tee @2,
snp @3, microcode @7.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from confplan.sev.signing import ECDSA_COMPONENT_LEN, VerifyError, verify_ecdsa_le

REPORT_LEN = 0x4A0
SIGNED_LEN = 0x2A0
SIG_ALGO_ECDSA_P384_SHA384 = 1
VERSIONS = (2, 3, 5)
SIGNING_KEYS = {0: "VCEK", 1: "VLEK", 7: "none"}
TURIN_LIKE = ("turin", "venice")
TCB_FIELDS = ("boot_loader", "tee", "snp", "microcode", "fmc")


@dataclass(frozen=True)
class TcbVersion:
    """The security patch levels of one TCB version; ``fmc`` exists from Turin on."""

    boot_loader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None = None

    @classmethod
    def decode(cls, raw: bytes, product: str) -> TcbVersion:
        if product in TURIN_LIKE:
            return cls(boot_loader=raw[1], tee=raw[2], snp=raw[3], microcode=raw[7], fmc=raw[0])
        return cls(boot_loader=raw[0], tee=raw[1], snp=raw[6], microcode=raw[7])

    def items(self) -> list[tuple[str, int]]:
        return [(name, v) for name in TCB_FIELDS if (v := getattr(self, name)) is not None]

    def __str__(self) -> str:
        return " ".join(f"{name}={value}" for name, value in self.items())


def product_from_cpuid(family: int, model: int) -> str | None:
    """The product line a version 3+ report's CPUID family/model names (virtee/sev ``identify_cpu``)."""
    if family == 0x19:
        if model <= 0x0F:
            return "milan"
        if 0x10 <= model <= 0x1F or 0xA0 <= model <= 0xAF:
            return "genoa"
    if family == 0x1A:
        if model <= 0x11:
            return "turin"
        return "venice"
    return None


@dataclass(frozen=True)
class AttestationReport:
    """One report exactly as received (``raw``); TCB fields are decoded for ``product``."""

    raw: bytes
    product: str

    @classmethod
    def parse(cls, raw: bytes, product: str | None = None) -> AttestationReport:
        """Check length, version and signature algorithm. ``product`` (milan, genoa, turin) picks the TCB
        layout; without it version 3+ reports name it by CPUID and version 2 is read as Milan/Genoa."""
        if len(raw) != REPORT_LEN:
            raise VerifyError(f"an SNP report is {REPORT_LEN:#x} bytes, got {len(raw):#x}", field="length")
        version, algo = struct.unpack_from("<I", raw)[0], struct.unpack_from("<I", raw, 0x34)[0]
        if version not in VERSIONS:
            raise VerifyError(f"report version = {version}, expected one of {VERSIONS}", field="version")
        if algo != SIG_ALGO_ECDSA_P384_SHA384:
            raise VerifyError(
                f"report signature_algo = {algo:#x}, expected 1 (ECDSA P-384 with SHA-384)",
                field="signature_algo",
            )
        if product is None and version >= 3:
            product = product_from_cpuid(raw[0x188], raw[0x189])
        return cls(bytes(raw), product or "milan")

    def _u32(self, off: int) -> int:
        return int(struct.unpack_from("<I", self.raw, off)[0])

    def _u64(self, off: int) -> int:
        return int(struct.unpack_from("<Q", self.raw, off)[0])

    def _tcb(self, off: int) -> TcbVersion:
        return TcbVersion.decode(self.raw[off : off + 8], self.product)

    @property
    def version(self) -> int:
        return self._u32(0x0)

    @property
    def guest_svn(self) -> int:
        return self._u32(0x4)

    @property
    def policy(self) -> int:
        return self._u64(0x8)

    @property
    def family_id(self) -> bytes:
        return self.raw[0x10:0x20]

    @property
    def image_id(self) -> bytes:
        return self.raw[0x20:0x30]

    @property
    def vmpl(self) -> int:
        return self._u32(0x30)

    @property
    def signature_algo(self) -> int:
        return self._u32(0x34)

    @property
    def current_tcb(self) -> TcbVersion:
        return self._tcb(0x38)

    @property
    def platform_info(self) -> int:
        return self._u64(0x40)

    @property
    def key_info(self) -> int:
        return self._u32(0x48)

    @property
    def report_data(self) -> bytes:
        return self.raw[0x50:0x90]

    @property
    def measurement(self) -> bytes:
        return self.raw[0x90:0xC0]

    @property
    def host_data(self) -> bytes:
        return self.raw[0xC0:0xE0]

    @property
    def id_key_digest(self) -> bytes:
        return self.raw[0xE0:0x110]

    @property
    def author_key_digest(self) -> bytes:
        return self.raw[0x110:0x140]

    @property
    def report_id(self) -> bytes:
        return self.raw[0x140:0x160]

    @property
    def report_id_ma(self) -> bytes:
        return self.raw[0x160:0x180]

    @property
    def reported_tcb(self) -> TcbVersion:
        return self._tcb(0x180)

    @property
    def chip_id(self) -> bytes:
        return self.raw[0x1A0:0x1E0]

    @property
    def committed_tcb(self) -> TcbVersion:
        return self._tcb(0x1E0)

    @property
    def launch_tcb(self) -> TcbVersion:
        return self._tcb(0x1F0)

    @property
    def signing_key(self) -> str:
        """Which key signed the report: VCEK, VLEK or none (key_info bits 4:2)."""
        code = (self.key_info >> 2) & 0x7
        return SIGNING_KEYS.get(code, f"reserved ({code})")

    @property
    def author_key_en(self) -> bool:
        return bool(self.key_info & 1)

    @property
    def mask_chip_key(self) -> bool:
        return bool(self.key_info & 2)

    @property
    def current_version(self) -> tuple[int, int, int]:
        """Firmware (major, minor, build) running now."""
        return self.raw[0x1EA], self.raw[0x1E9], self.raw[0x1E8]

    def verify_signature(self, key: ec.EllipticCurvePublicKey, signer: str = "VCEK") -> None:
        """ECDSA P-384/SHA-384 over [0, 0x2A0) as received; ``VerifyError`` (field ``signature``)."""
        sig = self.raw[SIGNED_LEN:]
        if any(sig[2 * ECDSA_COMPONENT_LEN :]):
            raise VerifyError(
                "report signature: bytes after r and s (0x330..0x4A0) must be zero", field="signature"
            )
        r, s = sig[:ECDSA_COMPONENT_LEN], sig[ECDSA_COMPONENT_LEN : 2 * ECDSA_COMPONENT_LEN]
        if not verify_ecdsa_le(key, r, s, self.raw[:SIGNED_LEN], hashes.SHA384()):
            raise VerifyError(
                f"report signature does not verify with the {signer}'s key (the report was altered, or "
                f"another chip or TCB signed it)",
                field="signature",
            )

    def summary(self) -> dict[str, object]:
        """The fields an owner looks at, JSON-ready (bytes as hex)."""
        return {
            "version": self.version,
            "product": self.product,
            "guest_svn": self.guest_svn,
            "policy": f"{self.policy:#x}",
            "vmpl": self.vmpl,
            "signing_key": self.signing_key,
            "measurement": self.measurement.hex(),
            "report_data": self.report_data.hex(),
            "host_data": self.host_data.hex(),
            "id_key_digest": self.id_key_digest.hex(),
            "author_key_digest": self.author_key_digest.hex(),
            "family_id": self.family_id.hex(),
            "image_id": self.image_id.hex(),
            "chip_id": self.chip_id.hex(),
            "current_tcb": dict(self.current_tcb.items()),
            "reported_tcb": dict(self.reported_tcb.items()),
            "committed_tcb": dict(self.committed_tcb.items()),
            "launch_tcb": dict(self.launch_tcb.items()),
            "firmware": "{}.{} build {}".format(*self.current_version),
        }
