"""vCPU state as plain Python objects, with a save/restore contract (Firecracker's ``Persist``), so the
migration can send it: general registers, segment/control registers, FPU/SSE, XCR0, the XSAVE area
(the upper YMM halves and every other state component XCR0 enables), the TSC, and with the in-kernel
irqchip the LAPIC (its timer included), the MP state, pending events and the MSRs of interrupts and time
(APIC base, kvm-clock's MSR_KVM_SYSTEM_TIME_NEW, the TSC deadline).

``state_blob`` / ``state_from_blob`` are its one byte form (JSON), used by the stream's VCPU_STATE frames
(``migration.session``) and by the VMSA slots an SEV-ES target loads from (``vmm.vmsa_slot``)."""

from __future__ import annotations

import base64
import ctypes
import json
from dataclasses import dataclass
from typing import TypeVar

from confplan.kvm import Vcpu
from confplan.kvm import structs as s

_T = TypeVar("_T", bound=ctypes.Structure)
REG_NAMES: tuple[str, ...] = tuple(field[0] for field in s.KvmRegs._fields_)
# Saved with the LAPIC (in-kernel irqchip). Restored in this order, around the LAPIC: see restore().
IRQ_MSRS: tuple[int, ...] = (s.MSR_IA32_APICBASE, s.MSR_KVM_SYSTEM_TIME_NEW, s.MSR_IA32_TSC_DEADLINE)
# KVM_SET_VCPU_EVENTS takes the pending NMI and SIPI vector only when asked to (QEMU asks the same).
_EVENT_FLAGS = s.KVM_VCPUEVENT_VALID_NMI_PENDING | s.KVM_VCPUEVENT_VALID_SIPI_VECTOR


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
    xsave: bytes = b""  # the XSAVE area without its trailing zero bytes; b"": not saved (older sources)
    # With the in-kernel irqchip (else empty: a source without one, or an older one):
    lapic: bytes = b""  # KVM_GET_LAPIC's register page without its trailing zero bytes
    events: bytes = b""  # struct kvm_vcpu_events
    mp_state: int | None = None
    msrs: tuple[tuple[int, int], ...] = ()  # (index, value) of IRQ_MSRS

    @classmethod
    def save(cls, vcpu: Vcpu, *, irqchip: bool = False) -> VcpuState:
        """Read the state of a vCPU that is not running (paused or never started); ``irqchip``: the VM has
        the in-kernel LAPIC, whose state goes too."""
        regs = vcpu.get_regs()
        return cls(
            vcpu_id=vcpu.id,
            regs={name: int(getattr(regs, name)) for name in REG_NAMES},
            sregs=_blob(vcpu.get_sregs()),
            fpu=_blob(vcpu.get_fpu()),
            xcrs=_blob(vcpu.get_xcrs()),
            tsc=vcpu.get_msr(s.MSR_IA32_TSC),
            xsave=vcpu.get_xsave().rstrip(b"\0"),
            lapic=vcpu.get_lapic().rstrip(b"\0") if irqchip else b"",
            events=_blob(vcpu.get_vcpu_events()) if irqchip else b"",
            mp_state=vcpu.get_mp_state() if irqchip else None,
            msrs=tuple((i, vcpu.get_msr(i)) for i in IRQ_MSRS) if irqchip else (),
        )

    def restore(self, vcpu: Vcpu) -> None:
        """Write this state into a vCPU that is not running. Order: SREGS before REGS (CR0/EFER decide
        how the registers are read), XCRS after FPU, then XSAVE (its header names components XCR0 must
        already enable; it carries the FPU/SSE state too, so it wins over SET_FPU); then the interrupt
        state: APIC base before SET_LAPIC (it decides xAPIC or x2APIC, how the registers read), MP state,
        pending events, kvm-clock's MSR; the TSC after those so little time passes after it, and the TSC
        deadline last (it is a TSC value, armed only in the LAPIC timer's deadline mode)."""
        vcpu.set_sregs(_unblob(s.KvmSregs, self.sregs, "sregs"))
        vcpu.set_regs(s.KvmRegs(**self.regs))
        vcpu.set_fpu(_unblob(s.KvmFpu, self.fpu, "fpu"))
        vcpu.set_xcrs(_unblob(s.KvmXcrs, self.xcrs, "xcrs"))
        if self.xsave:
            vcpu.set_xsave(self.xsave)
        msrs = dict(self.msrs)
        if s.MSR_IA32_APICBASE in msrs:
            vcpu.set_msr(s.MSR_IA32_APICBASE, msrs[s.MSR_IA32_APICBASE])
        if self.lapic:
            vcpu.set_lapic(self.lapic)
        if self.mp_state is not None:
            vcpu.set_mp_state(self.mp_state)
        if self.events:
            events = _unblob(s.KvmVcpuEvents, self.events, "events")
            events.flags |= _EVENT_FLAGS
            vcpu.set_vcpu_events(events)
        if s.MSR_KVM_SYSTEM_TIME_NEW in msrs:
            vcpu.set_msr(s.MSR_KVM_SYSTEM_TIME_NEW, msrs[s.MSR_KVM_SYSTEM_TIME_NEW])
        vcpu.set_msr(s.MSR_IA32_TSC, self.tsc)
        if msrs.get(s.MSR_IA32_TSC_DEADLINE):
            vcpu.set_msr(s.MSR_IA32_TSC_DEADLINE, msrs[s.MSR_IA32_TSC_DEADLINE])


def state_blob(state: VcpuState, paused_wall: float) -> bytes:
    """The state as JSON: registers by name, the KVM structs' bytes in hex, the TSC, and the wall clock
    at the pause (for the target's clock re-sync)."""
    doc = {
        "vcpu_id": state.vcpu_id, "regs": state.regs, "sregs": state.sregs.hex(), "fpu": state.fpu.hex(),
        "xcrs": state.xcrs.hex(), "tsc": state.tsc, "paused_wall": paused_wall,
        "xsave": base64.b64encode(state.xsave).decode(),  # base64: it must fit a VMSA slot with the rest
    }  # fmt: skip
    if state.lapic or state.events or state.mp_state is not None or state.msrs:  # added keys: format 1 stands
        doc |= {"lapic": base64.b64encode(state.lapic).decode(), "events": state.events.hex(),
                "mp_state": state.mp_state, "msrs": {f"{i:#x}": v for i, v in state.msrs}}  # fmt: skip
    return json.dumps(doc, sort_keys=True).encode()


def state_from_blob(blob: bytes) -> tuple[VcpuState, float]:
    """The state and the pause's wall clock from ``state_blob``'s bytes. Raises ValueError (also for a
    missing or mistyped field) when they do not decode."""
    try:
        doc = json.loads(blob)
        state = VcpuState(
            vcpu_id=int(doc["vcpu_id"]), regs={str(k): int(v) for k, v in doc["regs"].items()},
            sregs=bytes.fromhex(doc["sregs"]), fpu=bytes.fromhex(doc["fpu"]), xcrs=bytes.fromhex(doc["xcrs"]),
            tsc=int(doc["tsc"]), xsave=base64.b64decode(doc.get("xsave", ""), validate=True),
            lapic=base64.b64decode(doc.get("lapic", ""), validate=True),
            events=bytes.fromhex(doc.get("events", "")),
            mp_state=None if doc.get("mp_state") is None else int(doc["mp_state"]),
            msrs=tuple((int(k, 16), int(v)) for k, v in doc.get("msrs", {}).items()),
        )  # fmt: skip
        return state, float(doc["paused_wall"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(str(err)) from None


def tsc_after_pause(tsc: int, paused_wall: float, now_wall: float, tsc_khz: int) -> int:
    """The TSC to restore so guest time moves on by the wall time the pause took (the seed's kvm-clock
    re-sync): the guest sees the downtime pass instead of time standing still."""
    gap = max(0.0, now_wall - paused_wall)
    return tsc + int(gap * tsc_khz * 1000)
