"""SEV-SNP: the launch digest (SHA-384 PAGE_INFO chain) and the attestation report (SNP ABI, 0x4A0 bytes).

PAGE_INFO (0x70 B): current digest[48] | contents[48] | LE16 0x70 | page_type | is_imi | vmpl3/2/1 perms |
reserved | LE64 gpa. NORMAL and VMSA pages contribute SHA-384 of the page; ZERO, UNMEASURED, SECRETS and
CPUID pages contribute 48 zero bytes. The report is signed with ECDSA P-384/SHA-384 over bytes [0, 0x2A0);
r and s are stored little-endian in 72-byte fields at 0x2A0.
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

PAGE_SIZE = 4096
LD_LEN = 48
PAGE_INFO_LEN = 0x70
VMSA_GPA = 0xFFFFFFFFF000
REPORT_LEN = 0x4A0
SIGNED_LEN = 0x2A0
SIG_ALGO_ECDSA_P384_SHA384 = 1
REPORT_VERSION = 2
# What the emulated processor puts in CHIP_ID, so no report can pass for one from real silicon.
EMULATED_CHIP_ID = b"CONFPLAN EMULATED SECURE PROCESSOR - NOT AMD HARDWARE".ljust(64, b"\x00")


class PageType(enum.IntEnum):
    NORMAL = 1
    VMSA = 2
    ZERO = 3
    UNMEASURED = 4
    SECRETS = 5
    CPUID = 6


class SnpLaunchDigest:
    """The running SNP launch digest; feed pages in the order SNP_LAUNCH_UPDATE sees them."""

    def __init__(self) -> None:
        self.digest = bytes(LD_LEN)

    def update_page(self, gpa: int, page_type: PageType, page: bytes = b"") -> None:
        if page_type in (PageType.NORMAL, PageType.VMSA):
            if len(page) != PAGE_SIZE:
                raise ValueError(f"a measured page is {PAGE_SIZE} bytes, got {len(page)}")
            contents = hashlib.sha384(page).digest()
        else:
            contents = bytes(LD_LEN)
        if page_type == PageType.VMSA:
            gpa = VMSA_GPA
        info = self.digest + contents + struct.pack("<HBB4xQ", PAGE_INFO_LEN, page_type, 0, gpa)
        self.digest = hashlib.sha384(info).digest()

    def update_region(self, gpa: int, data: bytes, page_type: PageType = PageType.NORMAL) -> None:
        """Measure ``data`` (zero-padded to whole pages, at least one) as consecutive pages from ``gpa``."""
        if gpa % PAGE_SIZE:
            raise ValueError(f"SNP pages are measured page by page; GPA {gpa:#x} is not page-aligned")
        # An empty region is one page: SECRETS, CPUID and ZERO pages carry no data from the host.
        padded = (data + bytes(-len(data) % PAGE_SIZE)) or bytes(PAGE_SIZE)
        for off in range(0, len(padded), PAGE_SIZE):
            self.update_page(gpa + off, page_type, padded[off : off + PAGE_SIZE])


@dataclass(frozen=True)
class SnpReport:
    """The fields of an attestation report this project fills or checks."""

    policy: int
    measurement: bytes
    report_data: bytes
    host_data: bytes
    chip_id: bytes
    vmpl: int = 0
    guest_svn: int = 0
    current_tcb: int = 0
    reported_tcb: int = 0
    report_id: bytes = bytes(32)

    def body(self) -> bytes:
        raw = bytearray(SIGNED_LEN)
        struct.pack_into("<IIQ", raw, 0, REPORT_VERSION, self.guest_svn, self.policy)
        struct.pack_into("<II", raw, 0x30, self.vmpl, SIG_ALGO_ECDSA_P384_SHA384)
        struct.pack_into("<Q", raw, 0x38, self.current_tcb)
        raw[0x50:0x90] = self.report_data.ljust(64, b"\x00")
        raw[0x90:0xC0] = self.measurement
        raw[0xC0:0xE0] = self.host_data.ljust(32, b"\x00")
        raw[0x140:0x160] = self.report_id
        struct.pack_into("<Q", raw, 0x180, self.reported_tcb)
        raw[0x1A0:0x1E0] = self.chip_id
        return bytes(raw)

    @classmethod
    def parse(cls, raw: bytes) -> SnpReport:
        if len(raw) != REPORT_LEN:
            raise ValueError(f"an SNP report is {REPORT_LEN:#x} bytes, got {len(raw):#x}")
        _, svn, policy = struct.unpack_from("<IIQ", raw, 0)
        vmpl, _ = struct.unpack_from("<II", raw, 0x30)
        return cls(
            policy=policy,
            measurement=raw[0x90:0xC0],
            report_data=raw[0x50:0x90],
            host_data=raw[0xC0:0xE0],
            chip_id=raw[0x1A0:0x1E0],
            vmpl=vmpl,
            guest_svn=svn,
            current_tcb=struct.unpack_from("<Q", raw, 0x38)[0],
            reported_tcb=struct.unpack_from("<Q", raw, 0x180)[0],
        )


def sign_report(report: SnpReport, vcek: ec.EllipticCurvePrivateKey) -> bytes:
    """The 0x4A0-byte signed report."""
    body = report.body()
    r, s = decode_dss_signature(vcek.sign(body, ec.ECDSA(hashes.SHA384())))
    sig = (r.to_bytes(72, "little") + s.to_bytes(72, "little")).ljust(REPORT_LEN - SIGNED_LEN, b"\x00")
    return body + sig


def verify_report(raw: bytes, vcek: ec.EllipticCurvePublicKey) -> SnpReport:
    """Check the VCEK signature over [0, 0x2A0) and parse; raises ``ValueError`` if it does not verify."""
    if len(raw) != REPORT_LEN:
        raise ValueError(f"an SNP report is {REPORT_LEN:#x} bytes, got {len(raw):#x}")
    (algo,) = struct.unpack_from("<I", raw, 0x34)
    if algo != SIG_ALGO_ECDSA_P384_SHA384:
        raise ValueError(f"unsupported report signature algorithm {algo}")
    r = int.from_bytes(raw[SIGNED_LEN : SIGNED_LEN + 72], "little")
    s = int.from_bytes(raw[SIGNED_LEN + 72 : SIGNED_LEN + 144], "little")
    try:
        vcek.verify(encode_dss_signature(r, s), raw[:SIGNED_LEN], ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise ValueError("the SNP report signature does not verify with this VCEK") from None
    return SnpReport.parse(raw)
