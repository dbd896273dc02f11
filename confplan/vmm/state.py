"""vCPU state as plain Python objects, with a save/restore contract (Firecracker's ``Persist``), so the
migration can send it: general registers, segment/control registers, FPU/SSE, XCR0 and the TSC."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import TypeVar

from confplan.kvm import Vcpu
from confplan.kvm import structs as s

_T = TypeVar("_T", bound=ctypes.Structure)
REG_NAMES: tuple[str, ...] = tuple(field[0] for field in s.KvmRegs._fields_)


def _blob(obj: ctypes.Structure) -> bytes:
    return bytes(memoryview(obj).cast("B"))


def _unblob(cls: type[_T], data: bytes, what: str) -> _T:
    if len(data) != ctypes.sizeof(cls):
        raise ValueError(f"vCPU state {what}: {len(data)} bytes, expected {ctypes.sizeof(cls)}")
    return cls.from_buffer_copy(data)


@dataclass(frozen=True)
class VcpuState:
    """One vCPU. ``regs`` by name; the other parts as the raw KVM structs' bytes (fixed sizes)."""

    vcpu_id: int
    regs: dict[str, int]
    sregs: bytes
    fpu: bytes
    xcrs: bytes
    tsc: int

    @classmethod
    def save(cls, vcpu: Vcpu) -> VcpuState:
        """Read the state of a vCPU that is not running (paused or never started)."""
        regs = vcpu.get_regs()
        return cls(
            vcpu_id=vcpu.id,
            regs={name: int(getattr(regs, name)) for name in REG_NAMES},
            sregs=_blob(vcpu.get_sregs()),
            fpu=_blob(vcpu.get_fpu()),
            xcrs=_blob(vcpu.get_xcrs()),
            tsc=vcpu.get_msr(s.MSR_IA32_TSC),
        )

    def restore(self, vcpu: Vcpu) -> None:
        """Write this state into a vCPU that is not running. Order: SREGS before REGS (CR0/EFER decide
        how the registers are read), XCRS after FPU, the TSC last so little time passes after it."""
        vcpu.set_sregs(_unblob(s.KvmSregs, self.sregs, "sregs"))
        vcpu.set_regs(s.KvmRegs(**self.regs))
        vcpu.set_fpu(_unblob(s.KvmFpu, self.fpu, "fpu"))
        vcpu.set_xcrs(_unblob(s.KvmXcrs, self.xcrs, "xcrs"))
        vcpu.set_msr(s.MSR_IA32_TSC, self.tsc)
