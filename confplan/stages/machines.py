"""The plan's guest as the VMM's ``MachineConfig``: the one mapping from plan to machine.

The VMM never imports the plan (a VMM process loads no pydantic); the orchestrator's stages, ``confplan
launch`` and ``confplan owner blobs`` all build the machine a plan describes through ``machine_config``, so
the launch digest an owner allows is computed from the very config the VMM boots.
"""

from __future__ import annotations

from confplan.plan import Plan
from confplan.vmm.config import MachineConfig


def machine_config(
    plan: Plan, *, measured: bool = False, mh_only: bool = False, owner_key: bytes = b""
) -> MachineConfig:
    """The machine of ``plan``'s guest; ``mh_only`` for a migration target (helper only, guest paused);
    ``owner_key``: the owner's static X25519 public key an SEV-SNP guest is launched with."""
    guest, helper = plan.guest, plan.helper
    mirror = helper.mode == "mirror-vm"
    return MachineConfig(
        memory=int(guest.memory),
        vcpus=guest.vcpus,
        aux_vcpus=0 if mirror else helper.aux_vcpus,
        mirror_vcpus=helper.mh_vcpus if mirror else 1,
        helper_mode=helper.mode,
        batch_pages=helper.batch_for(int(guest.memory)),
        workload_kind=guest.workload.kind,
        dirty_rate=guest.workload.dirty_rate,
        shared_fraction=guest.workload.shared_fraction,
        conversion_rate=guest.workload.conversion_rate,
        seed=guest.workload.seed,
        timer_hz=guest.timer_hz,
        measured_launch=measured,
        snp=measured and plan.sev.generation == "sev-snp",
        owner_key=owner_key.hex() if measured and plan.sev.generation == "sev-snp" else "",
        mh_only=mh_only,
        # A target: its RAM is allocated before the stream starts, and it keeps no dirty log (nothing
        # reads it; on kvm_pvm logging roughly doubles the helper's cost of writing fresh pages).
        prefault=mh_only,
        dirty_logging=not mh_only,
    )
