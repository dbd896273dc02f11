"""The mirror VM: helper mode mirror-vm (Paolo Bonzini's alternative in the seed's thread).

A second KVM VM in the same process, on its own VM fd, whose one memslot maps the primary's guest RAM
(the same host mapping, so both VMs see the same bytes). Its vCPUs run only the migration helper: they
start at ``mh_entry`` with the helper's page tables, on the CPU-table slots (GDT TSS descriptor, TSS,
CPL0 stack) that aux vCPUs would use (the primary has none in this mode), so their KVM vCPU ids are the
primary's ``vcpus .. vcpus + n - 1``. No KVM_CREATE_IRQCHIP: nothing can interrupt them, and they idle
through the same MMIO IDLE doorbell as aux vCPUs (docs/vmm.md says why not HLT).

On real SEV the mirror would share the primary's encryption context (same ASID, so it can read private
pages) via KVM_CAP_VM_COPY_ENC_CONTEXT_FROM. ``MirrorVm`` asks for it and records KVM's answer: the
primary here is a plain VM, so KVM refuses (EINVAL) and nothing needs sharing, as RAM is plaintext.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from confplan.kvm import Kvm, KvmError, Vcpu, Vm
from confplan.vmm.memory import GuestRam

MIRROR_TSS_ADDR = 0xFFFBD000  # as the primary's: three pages KVM may use on VMX hosts


class MirrorVm:
    """The mirror VM and its vCPUs (created and configured, not running: the Machine runs them)."""

    def __init__(
        self,
        kvm: Kvm,
        primary: Vm,
        ram: GuestRam,
        *,
        first_id: int,
        count: int,
        configure: Callable[[Vcpu, int], None],
    ) -> None:
        self.vcpus: list[Vcpu] = []
        self.vm = kvm.create_vm()
        try:
            # Before any vCPU exists: KVM only lets a VM without vCPUs become a mirror.
            self.enc_context_error = self._copy_enc_context(primary)
            self.vm.set_tss_addr(MIRROR_TSS_ADDR)
            # No dirty logging: the MH writes only its own area (never migrated as a guest page) and,
            # on a target, pages it places before the guest runs.
            ram.map_into(self.vm)
            for i in range(count):
                vcpu = self.vm.create_vcpu(first_id + i)
                self.vcpus.append(vcpu)
                configure(vcpu, i)
        except BaseException:
            self.close()
            raise

    def _copy_enc_context(self, primary: Vm) -> KvmError | None:
        """KVM_CAP_VM_COPY_ENC_CONTEXT_FROM: shares the SEV context on SEV hosts; None when it worked."""
        try:
            self.vm.copy_enc_context_from(primary)
        except KvmError as err:
            return err
        return None

    @property
    def enc_context(self) -> str:
        """What KVM said about sharing the primary's encryption context, for status lines and docs."""
        if self.enc_context_error is None:
            return "shares the primary's encryption context"
        why = os.strerror(self.enc_context_error.errno or 0)
        return f"encryption context not shared (KVM: {why}; the primary is not an SEV VM)"

    def close(self) -> None:
        """vCPU fds first, then the VM fd (the Machine has joined the vCPU threads before)."""
        for vcpu in self.vcpus:
            vcpu.close()
        self.vm.close()
