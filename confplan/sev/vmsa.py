"""The VMSA page builder: the initial register state of an SEV-ES/SNP vCPU, as the launch measures it.

A VMSA is the 4 KiB SEV-ES save area (AMD APM vol. 2, table B-4; Linux ``struct sev_es_save_area``). A
measured guest starts with the reset state its VMM and KVM give it, so the owner rebuilds it here: the BSP
at 0xFFFFFFF0, the APs at the OVMF SEV-ES reset block's address. What differs by VMM (sev-snp-measure
``vmsa.py``, virtee/sev ``measurement/vmsa.rs``):

| VMM | CS/SS/TR attributes | RDX | MXCSR, FCW | G_PAT |
|---|---|---|---|---|
| QEMU | 0x9b/0x93/0x8b | vCPU signature | 0x1f80, 0x37f | 0x7040600070406 |
| EC2 | 0x9a (BSP) or 0x9b/0x92/0x83 | 0x600 (0 before 2026: ``EC2_RDX0``) | 0, 0 | 0x7040600070406 |
| GCE | 0x9b/0x93/0x8b | 0x600 | 0, 0 | 0x70106 |

Hosts older than Linux 6.10 left MXCSR and FCW zero and SEV_FEATURES 0 (what ``sevctl vmsa build``
writes): ``fpu_reset=False``.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator

PAGE = 4096
BSP_EIP = 0xFFFF_FFF0
SEGMENTS = ("es", "cs", "ss", "ds", "fs", "gs", "gdtr", "ldtr", "idtr", "tr")
OFFSETS = {  # u64 fields of the save area used at reset
    "efer": 0xD0, "cr4": 0x148, "cr0": 0x158, "dr7": 0x160, "dr6": 0x168, "rflags": 0x170, "rip": 0x178,
    "g_pat": 0x268, "rdx": 0x310, "sev_features": 0x3B0, "xcr0": 0x3E8,
}  # fmt: skip
MXCSR_OFF, FCW_OFF = 0x408, 0x410


class VmmType(enum.Enum):
    """The VMM whose reset state the VMSAs follow (sev-snp-measure ``--vmm-type``)."""

    QEMU = "QEMU"
    EC2 = "ec2"
    GCE = "gce"
    EC2_RDX0 = "ec2-rdx0"  # EC2 as measured before 2026 (RDX 0; virtee/sev's EC2 still is)

    @classmethod
    def parse(cls, text: str) -> VmmType:
        for member in cls:
            if text.lower() in (member.value.lower(), member.name.lower()):
                return member
        raise ValueError(f"unknown VMM type {text!r} (known: {', '.join(m.value for m in cls)})")


def cpu_sig(family: int, model: int, stepping: int) -> int:
    """CPUID Fn0000_0001 EAX for family/model/stepping (AMD CPUID spec #25481)."""
    family_low, family_high = (0xF, (family - 0xF) & 0xFF) if family > 0xF else (family, 0)
    return (
        (family_high << 20)
        | ((model >> 4) & 0xF) << 16
        | family_low << 8
        | (model & 0xF) << 4
        | stepping & 0xF
    )


CPU_SIGS: dict[str, int] = {  # QEMU's builtin_x86_defs names (sev-snp-measure vcpu_types.py)
    **{name: cpu_sig(23, 1, 2) for name in ("EPYC", "EPYC-v1", "EPYC-v2", "EPYC-IBPB", "EPYC-v3", "EPYC-v4")},
    **{name: cpu_sig(23, 49, 0) for name in ("EPYC-Rome", "EPYC-Rome-v1", "EPYC-Rome-v2", "EPYC-Rome-v3")},
    **{name: cpu_sig(25, 1, 1) for name in ("EPYC-Milan", "EPYC-Milan-v1", "EPYC-Milan-v2")},
    **{name: cpu_sig(25, 17, 0) for name in ("EPYC-Genoa", "EPYC-Genoa-v1")},
    "EPYC-Turin": cpu_sig(26, 0, 0),
}


def _segment(selector: int, attrib: int, limit: int, base: int) -> bytes:
    return struct.pack("<HHIQ", selector, attrib, limit, base)


def build_vmsa(
    eip: int, sev_features: int, vcpu_sig: int, vmm_type: VmmType = VmmType.QEMU, *, fpu_reset: bool = True
) -> bytes:
    """One VMSA page for a vCPU starting at ``eip`` (CS base = eip & 0xffff0000, RIP = eip & 0xffff)."""
    cs_flags, ss_flags, tr_flags, rdx, mxcsr, fcw = 0x9B, 0x93, 0x8B, vcpu_sig, 0x1F80, 0x37F
    g_pat = 0x7040600070406
    if vmm_type in (VmmType.EC2, VmmType.EC2_RDX0):
        cs_flags = 0x9A if eip == BSP_EIP else 0x9B
        ss_flags, tr_flags, mxcsr, fcw = 0x92, 0x83, 0, 0
        rdx = 0x600 if vmm_type == VmmType.EC2 else 0
    elif vmm_type == VmmType.GCE:
        rdx, mxcsr, fcw, g_pat = 0x600, 0, 0, 0x70106
    if not fpu_reset:
        mxcsr = fcw = 0
    segs = {
        "es": (0, 0x93), "cs": (0xF000, cs_flags), "ss": (0, ss_flags), "ds": (0, 0x93), "fs": (0, 0x93),
        "gs": (0, 0x93), "gdtr": (0, 0), "ldtr": (0, 0x82), "idtr": (0, 0), "tr": (0, tr_flags),
    }  # fmt: skip
    page = bytearray(PAGE)
    for i, name in enumerate(SEGMENTS):
        selector, attrib = segs[name]
        base = eip & 0xFFFF0000 if name == "cs" else 0
        page[16 * i : 16 * i + 16] = _segment(selector, attrib, 0xFFFF, base)
    values = {
        "efer": 0x1000, "cr4": 0x40, "cr0": 0x10, "dr7": 0x400, "dr6": 0xFFFF0FF0, "rflags": 0x2,
        "rip": eip & 0xFFFF, "g_pat": g_pat, "rdx": rdx, "sev_features": sev_features, "xcr0": 0x1,
    }  # fmt: skip
    for name, value in values.items():
        struct.pack_into("<Q", page, OFFSETS[name], value)
    struct.pack_into("<I", page, MXCSR_OFF, mxcsr)
    struct.pack_into("<H", page, FCW_OFF, fcw)
    return bytes(page)


def vmsa_pages(
    vcpus: int, ap_eip: int, sev_features: int, vcpu_sig: int, vmm_type: VmmType = VmmType.QEMU,
    *, fpu_reset: bool = True,
) -> Iterator[bytes]:  # fmt: skip
    """The VMSAs of ``vcpus`` vCPUs in launch order: the BSP's, then the APs' (at ``ap_eip``)."""
    bsp = build_vmsa(BSP_EIP, sev_features, vcpu_sig, vmm_type, fpu_reset=fpu_reset)
    ap = build_vmsa(ap_eip, sev_features, vcpu_sig, vmm_type, fpu_reset=fpu_reset) if vcpus > 1 else b""
    for i in range(vcpus):
        yield bsp if i == 0 else ap
