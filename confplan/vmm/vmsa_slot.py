"""EMULATED HARDWARE: loading an SEV-ES/SNP guest's vCPU from its VMSA slot into KVM.

On SEV-ES and SEV-SNP the CPU itself loads a vCPU's register state from its encrypted VMSA page at VMRUN;
the host can neither read nor change it. There is no such CPU here (the secure platform is emulated,
docs/attestation.md), so this module stands in for it: the target's migration helper opens the sealed
state into VMSA slot ``i`` in its own memory (OPEN_STATE, docs/mailbox.md), and ``load_vcpus`` reads the
slot through the one accessor made for it (``Machine.hardware_vmsa_view``; the VMM's ``read``/``view``
refuse the slots), refuses a slot the helper has not VERIFIED against the manifest, and sets the registers
with KVM ioctls. The host supplies only the TSC moved on by the pause, as on real hardware it sets the
TSC offset. Being emulation, it cannot stop this VMM process from reading the slot's bytes (as it can
read all of guest RAM here); what it keeps is the contract: register state reaches the vCPU only from a
slot the helper verified, never from the host's stream.
"""

from __future__ import annotations

import ctypes
import dataclasses
from dataclasses import dataclass

from confplan.errors import ConfplanError
from confplan.vmm import abi
from confplan.vmm.machine import Machine
from confplan.vmm.state import VcpuState, state_from_blob, tsc_after_pause

STATE_NAMES = {
    abi.VMSA_EMPTY: "empty", abi.VMSA_SEALED: "sealed", abi.VMSA_OPENED: "opened (not verified)",
    abi.VMSA_VERIFIED: "verified",
}  # fmt: skip


class VmsaSlotError(ConfplanError):
    """A vCPU cannot be loaded from its VMSA slot: the slot is empty, unverified, or does not decode."""


@dataclass(frozen=True)
class SlotHeader:
    """What a VMSA slot says about itself (no register state): for checks and reports."""

    vcpu: int
    state: int
    length: int
    tag: bytes
    migration_id: bytes

    @property
    def state_name(self) -> str:
        return STATE_NAMES.get(self.state, f"unknown state {self.state}")


def _slot(machine: Machine, vcpu: int) -> abi.VmsaSlot:
    return abi.VmsaSlot.from_buffer(machine.hardware_vmsa_view(vcpu))


def slot_header(machine: Machine, vcpu: int) -> SlotHeader:
    """The header of VMSA slot ``vcpu`` (state, length, the sealed record's tag); an unwritten slot reads as
    empty."""
    slot = _slot(machine, vcpu)
    if slot.magic != abi.VMSA_MAGIC:
        return SlotHeader(vcpu, abi.VMSA_EMPTY, 0, bytes(16), bytes(16))
    return SlotHeader(
        int(slot.vcpu), int(slot.state), int(slot.length), bytes(slot.tag), bytes(slot.migration_id)
    )


def _verified_state(machine: Machine, vcpu: int) -> tuple[VcpuState, float]:
    """vCPU ``vcpu``'s state from its slot, refused unless the helper verified it."""
    head = slot_header(machine, vcpu)
    if head.state != abi.VMSA_VERIFIED:
        raise VmsaSlotError(
            f"vCPU {vcpu}'s VMSA slot is {head.state_name}: the migration helper has not verified it against "
            "the source's manifest, so the (emulated) CPU will not load it",
            hint="open every vCPU's sealed state (OPEN_STATE), then check the manifest (CHECK_MANIFEST); "
            "the source keeps running meanwhile",
        )
    if head.vcpu != vcpu or not 0 < head.length <= abi.VMSA_DATA_BYTES:
        raise VmsaSlotError(f"vCPU {vcpu}'s VMSA slot is malformed (vCPU {head.vcpu}, {head.length} bytes)")
    slot = _slot(machine, vcpu)
    blob = ctypes.string_at(ctypes.addressof(slot.data), head.length)
    try:
        state, paused_wall = state_from_blob(blob)
    except ValueError as err:
        raise VmsaSlotError(f"vCPU {vcpu}'s VMSA slot does not decode: {err}") from None
    if state.vcpu_id != vcpu:
        raise VmsaSlotError(f"vCPU {vcpu}'s VMSA slot holds the state of vCPU {state.vcpu_id}")
    return state, paused_wall


def load_vcpus(machine: Machine, *, now_wall: float) -> float:
    """Load every guest vCPU (paused) from its verified VMSA slot, the TSC moved on by the pause; returns
    the longest clock gap (seconds) the guest sees. Nothing is loaded unless every slot is verified."""
    loaded = [_verified_state(machine, r.index) for r in machine.vcpus]
    khz = machine.host.tsc_khz
    states = [
        dataclasses.replace(st, tsc=tsc_after_pause(st.tsc, wall, now_wall, khz)) for st, wall in loaded
    ]
    machine.restore_vcpu_states(states)
    return max((max(0.0, now_wall - wall) for _, wall in loaded), default=0.0)
