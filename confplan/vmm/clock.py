"""The VM's kvm-clock as a saved part of a migration (the VM-level twin of ``state.VcpuState``).

Every vCPU's pvclock page is derived by KVM from one VM clock (KVM_GET/SET_CLOCK) and that vCPU's TSC. The
source reads the clock in the pause with the host wall clock of the reading; the target sets it moved on by
the wall time since (``clock_after_pause``), the kvm-clock equivalent of ``state.tsc_after_pause``: the
guest sees the pause pass as time, never time going back, as the seed's kvm-clock re-sync does.
``clock_blob`` / ``clock_from_blob`` are its byte form, the stream's DEVICE_STATE ``kvm-clock`` (format 1)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from confplan.kvm import Vm


@dataclass(frozen=True)
class VmClock:
    clock_ns: int  # KVM_GET_CLOCK's kvm-clock
    wall: float  # the host's wall clock (time.time()) when it was read

    @classmethod
    def save(cls, vm: Vm) -> VmClock:
        return cls(clock_ns=int(vm.get_clock().clock), wall=time.time())

    def restore(self, vm: Vm, now_wall: float, *, offset_ns: int = 0) -> int:
        """Set the VM's clock moved on by the wall time since it was read (``offset_ns`` added: only a test
        moves it elsewhere); returns the value set."""
        value = max(0, clock_after_pause(self.clock_ns, self.wall, now_wall) + offset_ns)
        vm.set_clock(value)
        return value


def clock_after_pause(clock_ns: int, read_wall: float, now_wall: float) -> int:
    """The kvm-clock to set so guest time moves on by the wall time since the source read it."""
    return clock_ns + int(max(0.0, now_wall - read_wall) * 1e9)


def clock_blob(clock: VmClock) -> bytes:
    return json.dumps({"clock_ns": clock.clock_ns, "wall": clock.wall}, sort_keys=True).encode()


def clock_from_blob(blob: bytes) -> VmClock:
    """Raises ValueError (also for a missing or mistyped field) when the bytes do not decode."""
    try:
        doc = json.loads(blob)
        return VmClock(clock_ns=int(doc["clock_ns"]), wall=float(doc["wall"]))
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(str(err)) from None
