"""KVM struct layouts and ioctl numbers, pinned to linux/kvm.h (no /dev/kvm needed)."""

from __future__ import annotations

import ctypes

import pytest

from confplan.kvm import structs as s


@pytest.mark.parametrize(
    ("struct", "size"),
    [
        (s.KvmRegs, 144),
        (s.KvmSegment, 24),
        (s.KvmDtable, 16),
        (s.KvmSregs, 312),
        (s.KvmFpu, 416),
        (s.KvmXcrs, 392),
        (s.KvmCpuidEntry2, 40),
        (s.KvmUserspaceMemoryRegion, 32),
        (s.KvmDirtyLog, 16),
        (s.KvmClearDirtyLog, 24),
        (s.KvmEnableCap, 104),
        (s.KvmMsrEntry, 16),
        (s.KvmStatsHeader, 24),
        (s.KvmStatsDescHead, 16),
        (s.KvmLapicState, 1024),
        (s.KvmClockData, 48),
        (s.KvmVcpuEvents, 64),
        (s.KvmMpState, 4),
    ],
)
def test_struct_sizes(struct: type[ctypes.Structure], size: int) -> None:
    assert ctypes.sizeof(struct) == size


def test_field_offsets() -> None:
    assert s.KvmRegs.rip.offset == 128 and s.KvmRegs.rflags.offset == 136
    assert s.KvmSregs.gdt.offset == 192 and s.KvmSregs.cr0.offset == 224 and s.KvmSregs.efer.offset == 264
    assert s.KvmFpu.xmm.offset == 152 and s.KvmFpu.mxcsr.offset == 416 - 8
    assert s.KvmRun.exit_reason.offset == 8 and s.KvmRun.exit.offset == 32
    assert s.KvmRunMmio.len.offset == 16 and s.KvmRunMmio.is_write.offset == 20
    assert s.KvmRunHypercall.ret.offset == 56
    assert s.KvmRunIo.data_offset.offset == 8
    assert s.KvmVcpuEvents.flags.offset == 20 and s.KvmVcpuEvents.exception_payload.offset == 56
    assert s.KvmClockData.realtime.offset == 16 and s.KvmClockData.host_tsc.offset == 24


@pytest.mark.parametrize(
    ("number", "value"),
    [
        (s.KVM_GET_API_VERSION, 0xAE00),
        (s.KVM_CREATE_VM, 0xAE01),
        (s.KVM_RUN, 0xAE80),
        (s.KVM_GET_REGS, 0x8090AE81),
        (s.KVM_SET_REGS, 0x4090AE82),
        (s.KVM_GET_SREGS, 0x8138AE83),
        (s.KVM_SET_USER_MEMORY_REGION, 0x4020AE46),
        (s.KVM_GET_DIRTY_LOG, 0x4010AE42),
        (s.KVM_GET_SUPPORTED_CPUID, 0xC008AE05),
        (s.KVM_SET_CPUID2, 0x4008AE90),
        (s.KVM_GET_FPU, 0x81A0AE8C),
        (s.KVM_GET_XCRS, 0x8188AEA6),
        (s.KVM_ENABLE_CAP, 0x4068AEA3),
        (s.KVM_GET_MSRS, 0xC008AE88),
        (s.KVM_CREATE_IRQCHIP, 0xAE60),
        (s.KVM_GET_LAPIC, 0x8400AE8E),
        (s.KVM_SET_LAPIC, 0x4400AE8F),
        (s.KVM_GET_CLOCK, 0x8030AE7C),
        (s.KVM_SET_CLOCK, 0x4030AE7B),
        (s.KVM_GET_VCPU_EVENTS, 0x8040AE9F),
        (s.KVM_SET_VCPU_EVENTS, 0x4040AEA0),
        (s.KVM_GET_MP_STATE, 0x8004AE98),
        (s.KVM_SET_MP_STATE, 0x4004AE99),
    ],
)
def test_ioctl_numbers(number: int, value: int) -> None:
    assert number == value
