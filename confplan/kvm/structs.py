"""KVM constants and struct layouts (linux/kvm.h, x86), as ctypes types.

Sizes and offsets are pinned by tests/test_kvm_structs.py, and every ioctl number is computed from the
struct it carries (``_iow(0x46, KvmUserspaceMemoryRegion)``), never pasted as hex.
"""

from __future__ import annotations

import ctypes
from typing import ClassVar

KVMIO = 0xAE
KVM_API_VERSION = 12

# ioctl encoding (asm-generic/ioctl.h)
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, struct: type[ctypes.Structure]) -> int:
    return _ioc(_IOC_READ, nr, ctypes.sizeof(struct))


def _iow(nr: int, struct: type[ctypes.Structure]) -> int:
    return _ioc(_IOC_WRITE, nr, ctypes.sizeof(struct))


def _iowr(nr: int, struct: type[ctypes.Structure]) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, ctypes.sizeof(struct))


u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64


class KvmUserspaceMemoryRegion(ctypes.Structure):
    _fields_: ClassVar = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


class KvmRegs(ctypes.Structure):
    _fields_: ClassVar = [
        (name, u64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags",
        )
    ]  # fmt: skip


class KvmSegment(ctypes.Structure):
    _fields_: ClassVar = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class KvmDtable(ctypes.Structure):
    _fields_: ClassVar = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS = 256


class KvmSregs(ctypes.Structure):
    _fields_: ClassVar = [
        ("cs", KvmSegment),
        ("ds", KvmSegment),
        ("es", KvmSegment),
        ("fs", KvmSegment),
        ("gs", KvmSegment),
        ("ss", KvmSegment),
        ("tr", KvmSegment),
        ("ldt", KvmSegment),
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        ("cr0", u64),
        ("cr2", u64),
        ("cr3", u64),
        ("cr4", u64),
        ("cr8", u64),
        ("efer", u64),
        ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class KvmFpu(ctypes.Structure):
    _fields_: ClassVar = [
        ("fpr", (u8 * 16) * 8),
        ("fcw", u16),
        ("fsw", u16),
        ("ftwx", u8),
        ("pad1", u8),
        ("last_opcode", u16),
        ("last_ip", u64),
        ("last_dp", u64),
        ("xmm", (u8 * 16) * 16),
        ("mxcsr", u32),
        ("pad2", u32),
    ]


class KvmXcr(ctypes.Structure):
    _fields_: ClassVar = [("xcr", u32), ("reserved", u32), ("value", u64)]


KVM_MAX_XCRS = 16


class KvmXsave(ctypes.Structure):
    """``struct kvm_xsave``: the legacy 4 KiB XSAVE area (KVM_GET_XSAVE2 may fill a larger buffer, of the
    size KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) gives; its ioctl number still encodes this struct's size)."""

    _fields_: ClassVar = [("region", u32 * 1024)]


class KvmXcrs(ctypes.Structure):
    _fields_: ClassVar = [
        ("nr_xcrs", u32),
        ("flags", u32),
        ("xcrs", KvmXcr * KVM_MAX_XCRS),
        ("padding", u64 * 16),
    ]


class KvmCpuidEntry2(ctypes.Structure):
    _fields_: ClassVar = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


class KvmCpuid2Header(ctypes.Structure):
    """``struct kvm_cpuid2`` without its flexible array (the ioctl number uses this size)."""

    _fields_: ClassVar = [("nent", u32), ("padding", u32)]


KVM_MAX_CPUID_ENTRIES = 256


class KvmCpuid2(ctypes.Structure):
    _fields_: ClassVar = [
        ("nent", u32),
        ("padding", u32),
        ("entries", KvmCpuidEntry2 * KVM_MAX_CPUID_ENTRIES),
    ]


class KvmMsrEntry(ctypes.Structure):
    _fields_: ClassVar = [("index", u32), ("reserved", u32), ("data", u64)]


class KvmMsrsHeader(ctypes.Structure):
    _fields_: ClassVar = [("nmsrs", u32), ("pad", u32)]


class KvmMsrs1(ctypes.Structure):
    """``struct kvm_msrs`` with room for one entry."""

    _fields_: ClassVar = [("nmsrs", u32), ("pad", u32), ("entries", KvmMsrEntry * 1)]


class KvmLapicState(ctypes.Structure):
    """``struct kvm_lapic_state``: the in-kernel LAPIC's 1 KiB register page (timer state included)."""

    _fields_: ClassVar = [("regs", ctypes.c_uint8 * 1024)]


class KvmClockData(ctypes.Structure):
    """``struct kvm_clock_data``: the VM's kvm-clock (ns), and with flags the host's realtime and TSC."""

    _fields_: ClassVar = [
        ("clock", u64),
        ("flags", u32),
        ("pad0", u32),
        ("realtime", u64),
        ("host_tsc", u64),
        ("pad", u32 * 4),
    ]


class KvmVcpuEvents(ctypes.Structure):
    """``struct kvm_vcpu_events``: pending/injected exception, interrupt, NMI, SMI (the parts are kept as
    bytes; only ``flags`` is read here)."""

    _fields_: ClassVar = [
        ("exception", u8 * 8),
        ("interrupt", u8 * 4),
        ("nmi", u8 * 4),
        ("sipi_vector", u32),
        ("flags", u32),
        ("smi", u8 * 4),
        ("triple_fault", u8),
        ("reserved", u8 * 26),
        ("exception_has_payload", u8),
        ("exception_payload", u64),
    ]


class KvmMpState(ctypes.Structure):
    _fields_: ClassVar = [("mp_state", u32)]


class KvmDirtyLog(ctypes.Structure):
    _fields_: ClassVar = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class KvmClearDirtyLog(ctypes.Structure):
    _fields_: ClassVar = [("slot", u32), ("num_pages", u32), ("first_page", u64), ("dirty_bitmap", u64)]


class KvmEnableCap(ctypes.Structure):
    _fields_: ClassVar = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


# ---- struct kvm_run (the part this VMM reads) ----
class KvmRunIo(ctypes.Structure):
    _fields_: ClassVar = [
        ("direction", u8),
        ("size", u8),
        ("port", u16),
        ("count", u32),
        ("data_offset", u64),
    ]


class KvmRunMmio(ctypes.Structure):
    _fields_: ClassVar = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class KvmRunHypercall(ctypes.Structure):
    _fields_: ClassVar = [("nr", u64), ("args", u64 * 6), ("ret", u64), ("flags", u64)]


class KvmRunInternal(ctypes.Structure):
    _fields_: ClassVar = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class KvmRunFailEntry(ctypes.Structure):
    _fields_: ClassVar = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class KvmRunSystemEvent(ctypes.Structure):
    _fields_: ClassVar = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class KvmRunExit(ctypes.Union):
    _fields_: ClassVar = [
        ("io", KvmRunIo),
        ("mmio", KvmRunMmio),
        ("hypercall", KvmRunHypercall),
        ("internal", KvmRunInternal),
        ("fail_entry", KvmRunFailEntry),
        ("system_event", KvmRunSystemEvent),
        ("padding", ctypes.c_char * 256),
    ]


class KvmRun(ctypes.Structure):
    _fields_: ClassVar = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("exit", KvmRunExit),
    ]


# ---- binary stats (KVM_GET_STATS_FD) ----
class KvmStatsHeader(ctypes.Structure):
    _fields_: ClassVar = [
        ("flags", u32),
        ("name_size", u32),
        ("num_desc", u32),
        ("id_offset", u32),
        ("desc_offset", u32),
        ("data_offset", u32),
    ]


class KvmStatsDescHead(ctypes.Structure):
    """``struct kvm_stats_desc`` without its trailing name[name_size]."""

    _fields_: ClassVar = [
        ("flags", u32),
        ("exponent", ctypes.c_int16),
        ("size", u16),
        ("offset", u32),
        ("bucket_size", u32),
    ]


# ---- ioctl numbers ----
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, KvmCpuid2Header)
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, KvmDirtyLog)
KVM_CLEAR_DIRTY_LOG = _iowr(0xC0, KvmClearDirtyLog)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, KvmUserspaceMemoryRegion)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_SET_CLOCK = _iow(0x7B, KvmClockData)
KVM_GET_CLOCK = _ior(0x7C, KvmClockData)
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, KvmRegs)
KVM_SET_REGS = _iow(0x82, KvmRegs)
KVM_GET_SREGS = _ior(0x83, KvmSregs)
KVM_SET_SREGS = _iow(0x84, KvmSregs)
KVM_GET_MSRS = _iowr(0x88, KvmMsrsHeader)
KVM_SET_MSRS = _iow(0x89, KvmMsrsHeader)
KVM_GET_FPU = _ior(0x8C, KvmFpu)
KVM_GET_LAPIC = _ior(0x8E, KvmLapicState)
KVM_SET_LAPIC = _iow(0x8F, KvmLapicState)
KVM_SET_FPU = _iow(0x8D, KvmFpu)
KVM_SET_CPUID2 = _iow(0x90, KvmCpuid2Header)
KVM_GET_MP_STATE = _ior(0x98, KvmMpState)
KVM_SET_MP_STATE = _iow(0x99, KvmMpState)
KVM_GET_VCPU_EVENTS = _ior(0x9F, KvmVcpuEvents)
KVM_SET_VCPU_EVENTS = _iow(0xA0, KvmVcpuEvents)
KVM_ENABLE_CAP = _iow(0xA3, KvmEnableCap)
KVM_GET_TSC_KHZ = _io(0xA3)
KVM_GET_XSAVE = _ior(0xA4, KvmXsave)
KVM_SET_XSAVE = _iow(0xA5, KvmXsave)
KVM_GET_XCRS = _ior(0xA6, KvmXcrs)
KVM_SET_XCRS = _iow(0xA7, KvmXcrs)
KVM_GET_STATS_FD = _io(0xCE)
KVM_GET_XSAVE2 = _ior(0xCF, KvmXsave)

# ---- capabilities (KVM_CHECK_EXTENSION) ----
KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0  # its flags (KVM_ENABLE_CAP args[0])
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1
KVM_CAP_DIRTY_LOG_RING = 192
KVM_CAP_VM_COPY_ENC_CONTEXT_FROM = 197
KVM_CAP_EXIT_HYPERCALL = 201
KVM_CAP_BINARY_STATS_FD = 203
KVM_CAP_XSAVE2 = 208

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MP_STATE_RUNNABLE = 0
# kvm_vcpu_events.flags: which optional parts KVM_SET_VCPU_EVENTS takes from the struct
KVM_VCPUEVENT_VALID_NMI_PENDING, KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x1, 0x2
MSR_IA32_APICBASE = 0x1B
MSR_IA32_TSC_DEADLINE = 0x6E0
MSR_KVM_SYSTEM_TIME_NEW = 0x4B564D01
KVM_HC_MAP_GPA_RANGE = 12
MSR_IA32_TSC = 0x10

# ---- exit reasons ----
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT = 0, 1

EXIT_REASON_NAMES = {
    value: name.removeprefix("KVM_EXIT_")
    for name, value in dict(globals()).items()
    if name.startswith("KVM_EXIT_") and name not in ("KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT")
}
