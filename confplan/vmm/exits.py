"""vCPU exits as typed values (kvm-ioctls' ``VcpuExit``), decoded from ``struct kvm_run``, and the errors
a guest can cause. The run loop hands each exit to the device that registered its address range."""

from __future__ import annotations

from dataclasses import dataclass

from confplan.errors import ConfplanError
from confplan.kvm import structs as s


@dataclass(frozen=True, slots=True)
class MmioWrite:
    addr: int
    size: int
    value: int


@dataclass(frozen=True, slots=True)
class MmioRead:
    addr: int
    size: int


@dataclass(frozen=True, slots=True)
class IoOut:
    port: int
    size: int
    value: int


@dataclass(frozen=True, slots=True)
class IoIn:
    port: int
    size: int


@dataclass(frozen=True, slots=True)
class Hypercall:
    nr: int
    args: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Hlt:
    pass


@dataclass(frozen=True, slots=True)
class Shutdown:
    """A triple fault (or the guest asked to reset)."""


@dataclass(frozen=True, slots=True)
class InternalError:
    suberror: int
    data: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class FailEntry:
    reason: int
    cpu: int


@dataclass(frozen=True, slots=True)
class Unsupported:
    reason: int


VcpuExit = (
    MmioWrite | MmioRead | IoOut | IoIn | Hypercall | Hlt | Shutdown | InternalError | FailEntry | Unsupported
)


def decode(run: s.KvmRun) -> VcpuExit:
    reason = run.exit_reason
    if reason == s.KVM_EXIT_MMIO:
        m = run.exit.mmio
        if m.is_write:
            return MmioWrite(m.phys_addr, m.len, int.from_bytes(bytes(m.data)[: m.len], "little"))
        return MmioRead(m.phys_addr, m.len)
    if reason == s.KVM_EXIT_IO:
        io = run.exit.io
        raw = (s.u8 * io.size).from_address(_run_address(run) + io.data_offset)
        if io.direction == s.KVM_EXIT_IO_OUT:
            return IoOut(io.port, io.size, int.from_bytes(bytes(raw), "little"))
        return IoIn(io.port, io.size)
    if reason == s.KVM_EXIT_HYPERCALL:
        return Hypercall(run.exit.hypercall.nr, tuple(run.exit.hypercall.args))
    if reason == s.KVM_EXIT_HLT:
        return Hlt()
    if reason == s.KVM_EXIT_SHUTDOWN:
        return Shutdown()
    if reason == s.KVM_EXIT_INTERNAL_ERROR:
        internal = run.exit.internal
        return InternalError(internal.suberror, tuple(internal.data[: min(internal.ndata, 16)]))
    if reason == s.KVM_EXIT_FAIL_ENTRY:
        return FailEntry(run.exit.fail_entry.hardware_entry_failure_reason, run.exit.fail_entry.cpu)
    return Unsupported(reason)


def _run_address(run: s.KvmRun) -> int:
    import ctypes

    return ctypes.addressof(run)


class GuestError(ConfplanError):
    """The guest stopped in a way the VMM cannot continue from (fault, triple fault, stuck vCPU)."""

    def __init__(self, message: str, *, vcpu: int, rip: int | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.vcpu = vcpu
        self.rip = rip


class GuestFault(GuestError):
    """A CPU exception reached the firmware's CPL0 handler, which reported it and stopped."""

    def __init__(self, *, vcpu: int, vector: int, error: int, rip: int, cs: int, rsp: int, cr2: int) -> None:
        name = EXCEPTION_NAMES.get(vector, f"vector {vector}")
        where = f" accessing {cr2:#x}" if vector == 14 else ""
        super().__init__(
            f"vCPU {vcpu}: guest {name} (error code {error:#x}) at RIP {rip:#x} CPL {cs & 3}{where}",
            vcpu=vcpu,
            rip=rip,
            hint="the guest firmware stopped this vCPU; look up the RIP in confplan-fw.sym",
        )
        self.vector, self.error, self.cs, self.rsp, self.cr2 = vector, error, cs, rsp, cr2


EXCEPTION_NAMES = {
    0: "#DE divide error",
    1: "#DB debug",
    3: "#BP breakpoint",
    4: "#OF overflow",
    5: "#BR bound range",
    6: "#UD invalid opcode",
    7: "#NM device not available",
    8: "#DF double fault",
    10: "#TS invalid TSS",
    11: "#NP segment not present",
    12: "#SS stack fault",
    13: "#GP general protection",
    14: "#PF page fault",
    16: "#MF x87 error",
    17: "#AC alignment check",
    18: "#MC machine check",
    19: "#XM SIMD exception",
}
