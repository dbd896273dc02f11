"""What both ends of one migration agree on, and the VMM-owned blobs the stream carries.

``vcpu_blob``/``vcpu_from_blob``: a guest vCPU's state (format 1: ``vmm.state.state_blob``'s JSON of the
registers by name, the KVM structs' bytes in hex, the TSC and the source's wall clock at the pause, for the
target's clock re-sync). For SEV-ES/SNP the same bytes are what the source MH seals (SEAL_STATE) and the
target MH opens into a VMSA slot, which ``vmm.vmsa_slot`` loads.
``ENC_BITMAP_DEVICE``: the page-encryption bitmap travels as a DEVICE_STATE frame of that name (its raw
64-bit words), so the target knows which pages are shared before the guest runs there.
``KVM_CLOCK_DEVICE``: the VM's kvm-clock as read in the pause (``vmm.clock.clock_blob``: JSON of the clock
in ns and the source's wall clock of the reading), a DEVICE_STATE frame of that name; the target sets it
moved on by the pause.
"""

from __future__ import annotations

from dataclasses import dataclass

from confplan.errors import ConfplanError
from confplan.vmm.state import VcpuState, state_blob, state_from_blob, tsc_after_pause

VCPU_FORMAT = 1
VCPU_SEALED_FORMAT = 2  # the blob is the source helper's SEAL_STATE record (SEV-ES/SNP: no host reads it)
ENC_BITMAP_DEVICE = "enc-bitmap"
ENC_BITMAP_FORMAT = 1
KVM_CLOCK_DEVICE = "kvm-clock"
KVM_CLOCK_FORMAT = 1


@dataclass(frozen=True)
class SavedVcpu:
    """A vCPU's state as it left the source, with the source's wall clock at the pause."""

    state: VcpuState
    paused_wall: float


def vcpu_blob(state: VcpuState, paused_wall: float) -> bytes:
    return state_blob(state, paused_wall)


def vcpu_from_blob(vcpu: int, format_version: int, blob: bytes) -> SavedVcpu:
    """Decode a VCPU_STATE blob; a ConfplanError names what is wrong with it."""
    if format_version != VCPU_FORMAT:
        raise ConfplanError(
            f"VCPU_STATE of vCPU {vcpu} has format {format_version}; this VMM reads format {VCPU_FORMAT}",
            hint="run the same confplan version on the source and the target",
        )
    try:
        state, paused_wall = state_from_blob(blob)
    except ValueError as err:
        raise ConfplanError(f"VCPU_STATE of vCPU {vcpu} does not decode: {err}") from None
    if state.vcpu_id != vcpu:
        raise ConfplanError(f"VCPU_STATE frame for vCPU {vcpu} holds the state of vCPU {state.vcpu_id}")
    return SavedVcpu(state, paused_wall)


def resynced_tsc(saved: SavedVcpu, now_wall: float, tsc_khz: int) -> int:
    """The TSC to restore so guest time moves on by the wall time the pause took (the seed's kvm-clock
    re-sync): the guest sees the downtime pass instead of time standing still."""
    return tsc_after_pause(saved.state.tsc, saved.paused_wall, now_wall, tsc_khz)
