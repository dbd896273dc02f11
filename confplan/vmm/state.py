"""vCPU state as plain Python objects, with a save/restore contract (Firecracker's ``Persist``), so the
migration can send it: general registers, segment/control registers, FPU/SSE, XCR0, the XSAVE area
(the upper YMM halves and every other state component XCR0 enables) and the TSC.

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
            xsave=vcpu.get_xsave().rstrip(b"\0"),
        )

    def restore(self, vcpu: Vcpu) -> None:
        """Write this state into a vCPU that is not running. Order: SREGS before REGS (CR0/EFER decide
        how the registers are read), XCRS after FPU, then XSAVE (its header names components XCR0 must
        already enable; it carries the FPU/SSE state too, so it wins over SET_FPU), the TSC last so little
        time passes after it."""
        vcpu.set_sregs(_unblob(s.KvmSregs, self.sregs, "sregs"))
        vcpu.set_regs(s.KvmRegs(**self.regs))
        vcpu.set_fpu(_unblob(s.KvmFpu, self.fpu, "fpu"))
        vcpu.set_xcrs(_unblob(s.KvmXcrs, self.xcrs, "xcrs"))
        if self.xsave:
            vcpu.set_xsave(self.xsave)
        vcpu.set_msr(s.MSR_IA32_TSC, self.tsc)


def state_blob(state: VcpuState, paused_wall: float) -> bytes:
    """The state as JSON: registers by name, the KVM structs' bytes in hex, the TSC, and the wall clock
    at the pause (for the target's clock re-sync)."""
    doc = {
        "vcpu_id": state.vcpu_id, "regs": state.regs, "sregs": state.sregs.hex(), "fpu": state.fpu.hex(),
        "xcrs": state.xcrs.hex(), "tsc": state.tsc, "paused_wall": paused_wall,
        "xsave": base64.b64encode(state.xsave).decode(),  # base64: it must fit a VMSA slot with the rest
    }  # fmt: skip
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
        )  # fmt: skip
        return state, float(doc["paused_wall"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(str(err)) from None


def tsc_after_pause(tsc: int, paused_wall: float, now_wall: float, tsc_khz: int) -> int:
    """The TSC to restore so guest time moves on by the wall time the pause took (the seed's kvm-clock
    re-sync): the guest sees the downtime pass instead of time standing still."""
    gap = max(0.0, now_wall - paused_wall)
    return tsc + int(gap * tsc_khz * 1000)
