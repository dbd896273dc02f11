"""What both ends of one migration agree on, and the VMM-owned blobs the stream carries.

``vcpu_blob``/``vcpu_from_blob``: a guest vCPU's state (format 1: JSON of the registers by name, the KVM
structs' bytes in hex, the TSC and the source's wall clock at the pause, for the target's clock re-sync).
``ENC_BITMAP_DEVICE``: the page-encryption bitmap travels as a DEVICE_STATE frame of that name (its raw
64-bit words), so the target knows which pages are shared before the guest runs there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from confplan.errors import ConfplanError
from confplan.vmm.state import VcpuState

VCPU_FORMAT = 1
ENC_BITMAP_DEVICE = "enc-bitmap"
ENC_BITMAP_FORMAT = 1


@dataclass(frozen=True)
class SavedVcpu:
    """A vCPU's state as it left the source, with the source's wall clock at the pause."""

    state: VcpuState
    paused_wall: float


def vcpu_blob(state: VcpuState, paused_wall: float) -> bytes:
    doc = {
        "vcpu_id": state.vcpu_id, "regs": state.regs, "sregs": state.sregs.hex(), "fpu": state.fpu.hex(),
        "xcrs": state.xcrs.hex(), "tsc": state.tsc, "paused_wall": paused_wall,
    }  # fmt: skip
    return json.dumps(doc, sort_keys=True).encode()


def vcpu_from_blob(vcpu: int, format_version: int, blob: bytes) -> SavedVcpu:
    """Decode a VCPU_STATE blob; a ConfplanError names what is wrong with it."""
    if format_version != VCPU_FORMAT:
        raise ConfplanError(
            f"VCPU_STATE of vCPU {vcpu} has format {format_version}; this VMM reads format {VCPU_FORMAT}",
            hint="run the same confplan version on the source and the target",
        )
    try:
        doc = json.loads(blob)
        state = VcpuState(
            vcpu_id=int(doc["vcpu_id"]), regs={str(k): int(v) for k, v in doc["regs"].items()},
            sregs=bytes.fromhex(doc["sregs"]), fpu=bytes.fromhex(doc["fpu"]), xcrs=bytes.fromhex(doc["xcrs"]),
            tsc=int(doc["tsc"]),
        )  # fmt: skip
        saved = SavedVcpu(state, float(doc["paused_wall"]))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConfplanError(f"VCPU_STATE of vCPU {vcpu} does not decode: {err}") from None
    if state.vcpu_id != vcpu:
        raise ConfplanError(f"VCPU_STATE frame for vCPU {vcpu} holds the state of vCPU {state.vcpu_id}")
    return saved


def resynced_tsc(saved: SavedVcpu, now_wall: float, tsc_khz: int) -> int:
    """The TSC to restore so guest time moves on by the wall time the pause took (the seed's kvm-clock
    re-sync): the guest sees the downtime pass instead of time standing still."""
    gap = max(0.0, now_wall - saved.paused_wall)
    return saved.state.tsc + int(gap * tsc_khz * 1000)
