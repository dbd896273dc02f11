"""Launch digests of real guests (OVMF, optionally a kernel/initrd/command line, vCPUs), as the secure
processor computes them and as sev-snp-measure and sevctl predict them.

- SEV: SHA-256 over the OVMF image, then the SEV hashes table if a kernel is given.
- SEV-ES: the same, then one VMSA page per vCPU.
- SNP: the SHA-384 PAGE_INFO chain (``snp.SnpLaunchDigest``) over the OVMF pages (or starting from a given
  OVMF hash), then OVMF's SEV metadata sections in order (zero, unmeasured, secrets, CPUID and kernel
  hashes pages; EC2 measures CPUID pages last, GCE leaves SEC memory unmeasured), then the VMSAs.
``launch_measure`` turns a SEV/SEV-ES digest into the LAUNCH_MEASURE answer a platform gives for a TIK
(``sevctl measurement build``).
"""

from __future__ import annotations

import enum
import hashlib

from confplan.sev import launch_crypto
from confplan.sev.launch_crypto import PlatformVersion
from confplan.sev.ovmf import Ovmf, OvmfError, SectionType
from confplan.sev.sev_hashes import PAGE, SevHashes
from confplan.sev.snp import PageType, SnpLaunchDigest
from confplan.sev.vmsa import VmmType, vmsa_pages

DEFAULT_SEV_FEATURES = 0x1  # SNP active (what Linux 6.8+ hosts set; sev-snp-measure's default)


class SevMode(enum.Enum):
    SEV = "sev"
    SEV_ES = "seves"
    SNP = "snp"

    @classmethod
    def parse(cls, text: str) -> SevMode:
        names = {
            "sev": cls.SEV,
            "seves": cls.SEV_ES,
            "sev-es": cls.SEV_ES,
            "snp": cls.SNP,
            "sev-snp": cls.SNP,
        }
        if text.lower() not in names:
            raise ValueError(f"unknown mode {text!r} (sev, seves, snp)")
        return names[text.lower()]


def _ovmf(ovmf: bytes | Ovmf) -> Ovmf:
    return ovmf if isinstance(ovmf, Ovmf) else Ovmf.parse(ovmf)


def _hashes(kernel: bytes | None, initrd: bytes | None, append: str | None) -> SevHashes | None:
    if kernel is None:
        if initrd is not None or append is not None:
            raise OvmfError(
                "an initrd or a command line is only measured with a kernel", hint="pass --kernel"
            )
        return None
    return SevHashes.of(kernel, initrd, append)


def snp_ovmf_hash(ovmf: bytes | Ovmf) -> bytes:
    """The SNP digest after the OVMF pages only (sev-snp-measure ``--mode snp:ovmf-hash``)."""
    image = _ovmf(ovmf)
    gctx = SnpLaunchDigest()
    gctx.update_region(image.gpa, image.data)
    return gctx.digest


def snp_launch_digest(
    ovmf: bytes | Ovmf,
    *,
    vcpus: int,
    vcpu_sig: int,
    sev_features: int = DEFAULT_SEV_FEATURES,
    kernel: bytes | None = None,
    initrd: bytes | None = None,
    append: str | None = None,
    vmm_type: VmmType = VmmType.QEMU,
    ovmf_hash: bytes | None = None,
) -> bytes:
    """The 48-byte SNP launch digest (MEASUREMENT of the report) of such a guest."""
    image = _ovmf(ovmf)
    gctx = SnpLaunchDigest()
    if ovmf_hash is not None:
        if len(ovmf_hash) != 48:
            raise ValueError(f"an SNP OVMF hash is 48 bytes, got {len(ovmf_hash)}")
        gctx.digest = ovmf_hash
    else:
        gctx.update_region(image.gpa, image.data)
    hashes = _hashes(kernel, initrd, append)
    if hashes is not None and not image.has_section(SectionType.SNP_KERNEL_HASHES):
        raise OvmfError(
            "Kernel specified but OVMF metadata doesn't include SNP_KERNEL_HASHES section",
            hint="use an OVMF built from OvmfPkg/AmdSev (AmdSevX64.dsc), which measures direct boot",
        )
    ec2 = vmm_type in (VmmType.EC2, VmmType.EC2_RDX0)
    for section in image.sections:
        _snp_section(gctx, image, section.gpa, section.size, section.kind, hashes, vmm_type)
    if ec2:  # EC2 adds the CPUID pages after every other section
        for section in image.sections:
            if section.kind == SectionType.CPUID:
                gctx.update_page(section.gpa, PageType.CPUID)
    ap_eip = image.sev_es_reset_eip() if vcpus > 1 else 0
    for page in vmsa_pages(vcpus, ap_eip, sev_features, vcpu_sig, vmm_type):
        gctx.update_page(0, PageType.VMSA, page)
    return gctx.digest


def _snp_section(
    gctx: SnpLaunchDigest, image: Ovmf, gpa: int, size: int, kind: SectionType, hashes: SevHashes | None,
    vmm_type: VmmType,
) -> None:  # fmt: skip
    if kind == SectionType.SNP_SEC_MEM:
        page_type = PageType.UNMEASURED if vmm_type == VmmType.GCE else PageType.ZERO
        _pages(gctx, gpa, size, page_type)
    elif kind == SectionType.SNP_SECRETS:
        gctx.update_page(gpa, PageType.SECRETS)
    elif kind == SectionType.CPUID:
        if vmm_type not in (VmmType.EC2, VmmType.EC2_RDX0):
            gctx.update_page(gpa, PageType.CPUID)
    elif kind == SectionType.SNP_KERNEL_HASHES:
        if hashes is None:
            _pages(gctx, gpa, size, PageType.ZERO)
        else:
            page = hashes.page(image.sev_hashes_table_gpa() & (PAGE - 1))
            if size != PAGE:
                raise OvmfError(f"the SNP_KERNEL_HASHES section is {size} bytes, expected one page")
            gctx.update_page(gpa, PageType.NORMAL, page)
    else:  # SVSM_CAA
        _pages(gctx, gpa, size, PageType.ZERO)


def _pages(gctx: SnpLaunchDigest, gpa: int, size: int, page_type: PageType) -> None:
    if size % PAGE:
        raise OvmfError(f"an OVMF metadata section at {gpa:#x} is {size} bytes, not whole pages")
    for off in range(0, size, PAGE):
        gctx.update_page(gpa + off, page_type)


def _sev_hash(image: Ovmf, hashes: SevHashes | None) -> hashlib._Hash:
    digest = hashlib.sha256(image.data)
    if hashes is not None:
        if not image.supports_kernel_hashes:
            raise OvmfError(
                "Kernel specified but OVMF doesn't support kernel/initrd/cmdline measurement",
                hint="use an OVMF built from OvmfPkg/AmdSev (AmdSevX64.dsc)",
            )
        digest.update(hashes.table())
    return digest


def sev_launch_digest(
    ovmf: bytes | Ovmf, *, kernel: bytes | None = None, initrd: bytes | None = None, append: str | None = None
) -> bytes:
    """The 32-byte SEV launch digest (what LAUNCH_MEASURE's HMAC covers)."""
    return _sev_hash(_ovmf(ovmf), _hashes(kernel, initrd, append)).digest()


def seves_launch_digest(
    ovmf: bytes | Ovmf,
    *,
    vcpus: int,
    vcpu_sig: int,
    kernel: bytes | None = None,
    initrd: bytes | None = None,
    append: str | None = None,
    vmm_type: VmmType = VmmType.QEMU,
    fpu_reset: bool = True,
) -> bytes:
    """The 32-byte SEV-ES launch digest: OVMF, kernel hashes, then one VMSA per vCPU (SEV_FEATURES 0)."""
    image = _ovmf(ovmf)
    digest = _sev_hash(image, _hashes(kernel, initrd, append))
    ap_eip = image.sev_es_reset_eip()
    for page in vmsa_pages(vcpus, ap_eip, 0, vcpu_sig, vmm_type, fpu_reset=fpu_reset):
        digest.update(page)
    return digest.digest()


def launch_measure(digest: bytes, tik: bytes, policy: int, version: PlatformVersion, mnonce: bytes) -> bytes:
    """LAUNCH_MEASURE's 48-byte answer (MEASURE || MNONCE) for a SEV/SEV-ES digest and the session TIK."""
    return launch_crypto.measure_mac(tik, version, policy, digest, mnonce) + mnonce
