"""Put a fresh vCPU straight into 64-bit CPL3 at a firmware entry (kvm-here.md "A vCPU setup that runs
CPL3 natively"): CS.DPL = 3 from the first instruction is what makes the guest run natively here."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from confplan.kvm import Vcpu
from confplan.kvm import structs as s
from confplan.vmm import abi, tables

CR0 = 0x80050033  # PE MP ET NE WP AM PG
CR4 = 0x40620  # PAE OSFXSR OSXMMEXCPT OSXSAVE
EFER = 0xD01  # SCE LME LMA NXE
RFLAGS = 0x202  # IF set: the guest takes its timer interrupts
RFLAGS_MASKED = 0x2  # the helper's vCPUs: no interrupt may disturb the mailbox protocol

# (leaf, subleaf, register, bit) -> boot-params feature name
_FEATURES = {
    (1, 0, "ecx", 9): "ssse3",
    (1, 0, "ecx", 19): "sse4.1",
    (1, 0, "ecx", 25): "aes-ni",
    (1, 0, "ecx", 1): "pclmulqdq",
    (1, 0, "ecx", 28): "avx",
    (1, 0, "ecx", 30): "rdrand",
    (7, 0, "ebx", 5): "avx2",
    (7, 0, "ecx", 9): "vaes",
    (7, 0, "ecx", 10): "vpclmulqdq",
    (7, 0, "ebx", 16): "avx512f",
    (7, 0, "ebx", 30): "avx512bw",
    (7, 0, "ebx", 31): "avx512vl",
}


# User-mode-only extensions: no state beyond the XMM registers, nothing for a hypervisor to virtualise, so
# CPL3 code runs them whenever the CPU has them (kvm_pvm runs CPL3 natively: kvm-here.md). /proc/cpuinfo
# flag -> boot-params feature name.
_USER_FLAGS = {
    "ssse3": "ssse3", "sse4_1": "sse4.1", "aes": "aes-ni", "pclmulqdq": "pclmulqdq",
    "rdrand": "rdrand",  # no state at all; the SNP key release's entropy (docs/key-release.md)
}  # fmt: skip
# These also need YMM state enabled in XCR0, which the VMM does itself (XCR0 = 7) when the host has AVX.
_YMM_FLAGS = {"avx": "avx", "avx2": "avx2", "vaes": "vaes", "vpclmulqdq": "vpclmulqdq"}
# These need the AVX-512 states in XCR0 too (opmask, ZMM_Hi256, Hi16_ZMM), which the VMM enables only where
# KVM's supported CPUID leaf 0xD says it can hold them (KVM_SET_XCRS refuses bits the guest CPUID lacks).
_ZMM_FLAGS = {"avx512f": "avx512f", "avx512bw": "avx512bw", "avx512vl": "avx512vl"}
_ZMM_NAMES = frozenset(_ZMM_FLAGS.values())
XCR0_YMM = 0x7  # x87 | SSE | AVX
XCR0_ZMM = 0xE0  # opmask | ZMM_Hi256 | Hi16_ZMM


@dataclass(frozen=True)
class CpuInfo:
    """The CPU features the guest can really execute, for the boot parameters (CPL3 code cannot trust
    CPUID), and where they came from: ``kvm_features`` from KVM_GET_SUPPORTED_CPUID, ``host_features``
    from the host CPU's own flags (user-mode-only extensions)."""

    features: int
    vendor_amd: bool
    kvm_features: int = 0
    host_features: int = 0

    @property
    def has_avx(self) -> bool:
        return bool(self.features & abi.FEATURE_BITS["avx"])

    @property
    def has_zmm(self) -> bool:
        """The AVX-512 group is passed on (so the VMM must enable its XCR0 states)."""
        return bool(self.features & abi.FEATURE_BITS["avx512f"])

    @property
    def xcr0(self) -> int:
        """The XCR0 the VMM sets: the states of every vector extension passed to the guest."""
        if not self.has_avx:
            return 0x3
        return XCR0_YMM | (XCR0_ZMM if self.has_zmm else 0)

    def names(self) -> list[str]:
        return [name for name, bit in abi.FEATURE_BITS.items() if self.features & bit]


def host_cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The first CPU's flags from /proc/cpuinfo (empty when the file has none: e.g. not x86 Linux)."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def host_features(flags: frozenset[str], *, zmm_state: bool = False) -> int:
    """Boot-params feature bits the host CPU offers to CPL3 code. The YMM group only with AVX and XSAVE
    (the VMM then sets XCR0 = 7, so VAES/AVX2 code cannot #UD on missing YMM state); the AVX-512 group
    only on top of that, all three of F/BW/VL, and only with ``zmm_state`` (KVM can hold the ZMM states;
    the VMM then adds them to XCR0)."""
    bits = 0
    for flag, name in _USER_FLAGS.items():
        if flag in flags:
            bits |= abi.FEATURE_BITS[name]
    if {"avx", "xsave"} <= flags:
        for flag, name in _YMM_FLAGS.items():
            if flag in flags:
                bits |= abi.FEATURE_BITS[name]
        if zmm_state and set(_ZMM_FLAGS) <= flags:
            for name in _ZMM_FLAGS.values():
                bits |= abi.FEATURE_BITS[name]
    return bits


# Bits dropped to hold the helper's AES-GCM at or below an implementation (cp_gcm_pick_impl's needs).
_ABOVE = {
    "vaes512": (),
    "vaes": ("avx512f", "avx512bw", "avx512vl"),
    "aes-ni": ("avx512f", "avx512bw", "avx512vl", "vaes", "vpclmulqdq"),
    "portable": ("avx512f", "avx512bw", "avx512vl", "vaes", "vpclmulqdq", "aes-ni", "pclmulqdq"),
}


def cap_for_crypto(features: int, impl: str) -> int:
    """``features`` without the bits the helper needs for anything faster than ``impl`` ("auto": all
    kept). Only the boot parameters' word is capped: the vCPU's CPUID and XCR0 stay the CPU's, as they
    would on a CPU that has AVX2 but not VAES (AMD Zen 2)."""
    return features & ~sum(abi.FEATURE_BITS[name] for name in _ABOVE.get(impl, ()))


def kvm_xcr0_supported(cpuid: s.KvmCpuid2) -> int:
    """The XSAVE state components KVM can hold for a guest (supported CPUID leaf 0xD.0 EDX:EAX)."""
    entry = _leaf(cpuid, 0xD, 0)
    return 0 if entry is None else entry.edx << 32 | entry.eax


def _leaf(cpuid: s.KvmCpuid2, function: int, index: int = 0) -> s.KvmCpuidEntry2 | None:
    for i in range(cpuid.nent):
        e: s.KvmCpuidEntry2 = cpuid.entries[i]
        if e.function == function and e.index == index:
            return e
    return None


def cpu_info(cpuid: s.KvmCpuid2, flags: frozenset[str] | None = None) -> CpuInfo:
    """KVM's supported CPUID, plus the user-mode-only extensions of the host CPU (``flags``, default
    /proc/cpuinfo): KVM_GET_SUPPORTED_CPUID on kvm_pvm reports none of AES-NI/SSSE3/AVX although CPL3 code
    runs them natively; on a VMX/SVM host the supported CPUID lists them anyway."""
    zmm_state = kvm_xcr0_supported(cpuid) & XCR0_ZMM == XCR0_ZMM
    kvm = 0
    for (leaf, sub, reg, bit), name in _FEATURES.items():
        entry = _leaf(cpuid, leaf, sub)
        if entry is not None and getattr(entry, reg) >> bit & 1:
            kvm |= abi.FEATURE_BITS[name]
    if not (zmm_state and kvm & abi.FEATURE_BITS["avx"]):  # the group needs its XCR0 states (and AVX's)
        kvm &= ~sum(abi.FEATURE_BITS[n] for n in _ZMM_NAMES)
    host = host_features(host_cpu_flags() if flags is None else flags, zmm_state=zmm_state)
    vendor = _leaf(cpuid, 0)
    amd = vendor is not None and (vendor.ebx, vendor.edx, vendor.ecx) == (0x68747541, 0x69746E65, 0x444D4163)
    return CpuInfo(features=kvm | host, vendor_amd=amd, kvm_features=kvm, host_features=host)


def _cpuid_for(cpuid: s.KvmCpuid2, vcpu_id: int) -> s.KvmCpuid2:
    own = s.KvmCpuid2.from_buffer_copy(cpuid)
    leaf1 = _leaf(own, 1)
    if leaf1 is not None:  # initial APIC id
        leaf1.ebx = (leaf1.ebx & 0x00FFFFFF) | (vcpu_id << 24)
    return own


def _segment(selector: int, *, code: bool) -> s.KvmSegment:
    return s.KvmSegment(
        base=0, limit=0xFFFFFFFF, selector=selector, type=11 if code else 3, present=1,
        dpl=selector & 3, db=0 if code else 1, s=1, l=1 if code else 0, g=1,
    )  # fmt: skip


def configure(
    vcpu: Vcpu,
    cpuid: s.KvmCpuid2,
    info: CpuInfo,
    *,
    entry: int,
    stack_top: int,
    cr3: int,
    arg: int,
    nr_vcpus: int,
    interrupts: bool = True,
    irqchip: bool = False,
) -> None:
    """CPUID, then segments/control registers, then registers, FPU and XCR0 (SET_XCRS needs the CPUID
    that advertises XSAVE, so CPUID goes first). ``interrupts`` off: RFLAGS.IF clear (helper vCPUs).
    ``irqchip``: the VM has the in-kernel LAPIC, which holds every vCPU but the boot CPU in wait-for-SIPI;
    these start directly at their entry, so each is made RUNNABLE."""
    vcpu.set_cpuid2(_cpuid_for(cpuid, vcpu.id))
    sregs = vcpu.get_sregs()
    sregs.cs = _segment(tables.USER_CS, code=True)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, _segment(tables.USER_DS, code=False))
    sregs.tr = s.KvmSegment(
        base=abi.TSS_GPA + vcpu.id * abi.TSS_STRIDE, limit=tables.TSS_LIMIT,
        selector=tables.tss_selector(vcpu.id), type=11, present=1, s=0,
    )  # fmt: skip
    sregs.ldt = s.KvmSegment(selector=0, type=2, present=1, unusable=1)
    sregs.gdt.base, sregs.gdt.limit = abi.GDT_GPA, tables.gdt_limit(nr_vcpus)
    sregs.idt.base, sregs.idt.limit = abi.IDT_GPA, 256 * 16 - 1
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = CR0, cr3, CR4, EFER
    vcpu.set_sregs(sregs)
    flags = RFLAGS if interrupts else RFLAGS_MASKED
    regs = s.KvmRegs(rip=entry, rsp=stack_top - 8, rdi=arg, rflags=flags)  # -8: SysV entry alignment
    vcpu.set_regs(regs)
    if irqchip:
        vcpu.set_mp_state(s.KVM_MP_STATE_RUNNABLE)
    fpu = s.KvmFpu(fcw=0x37F, mxcsr=0x1F80)
    vcpu.set_fpu(fpu)
    xcrs = s.KvmXcrs(nr_xcrs=1)
    xcrs.xcrs[0].xcr, xcrs.xcrs[0].value = 0, info.xcr0  # x87|SSE(|AVX(|opmask|ZMM_Hi256|Hi16_ZMM))
    vcpu.set_xcrs(xcrs)


def struct_bytes(obj: ctypes.Structure) -> bytes:
    return bytes(memoryview(obj).cast("B"))
