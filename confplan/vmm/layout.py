"""Where everything sits in guest RAM for one ``MachineConfig`` (docs/memory-map.md draws it)."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from confplan.errors import ConfplanError
from confplan.vmm import abi
from confplan.vmm.abi import HUGE, PAGE, round_up
from confplan.vmm.config import MachineConfig

WL_STACK_SIZE = 0x4000
LEDGER_ENTRY = ctypes.sizeof(abi.LedgerEntry)


@dataclass(frozen=True)
class GuestLayout:
    ram_bytes: int
    mh_vcpus: int
    mailbox_stride: int
    mh_shared_gpa: int  # struct cp_mh_shared (one page), the contexts, the generation and MAC tables
    mh_ctx_gpa: int
    mh_gen_gpa: int
    mh_mac_gpa: int  # one keyed MAC (16 bytes) per guest page, after the generation table
    mh_vmsa_gpa: int  # one VMSA slot per guest vCPU (SEV-ES/SNP register state), after the MAC table
    mh_end: int  # the MH area is [abi.MH_BASE, mh_end), 2 MiB aligned
    wl_vcpus: int
    wl_ctl_gpa: int
    wl_pvclock_gpa: int  # one page: a pvclock struct (kvm-clock) per workload vCPU, written by KVM
    wl_stack_gpa: int
    wl_ledger_gpa: int
    wl_data_gpa: int
    wl_data_pages: int

    @property
    def wl_base(self) -> int:
        return self.mh_end

    @property
    def npages(self) -> int:
        return self.ram_bytes // PAGE

    @property
    def mh_gen_entries(self) -> int:
        """One anti-replay generation (u32) per guest page."""
        return self.npages

    def mailbox_gpa(self, mh_index: int) -> int:
        return abi.MAILBOX_GPA + mh_index * self.mailbox_stride

    @property
    def vmsa_bytes(self) -> int:
        """The VMSA slots together: one per guest vCPU."""
        return self.wl_vcpus * abi.VMSA_SLOT_SIZE

    def vmsa_slot_gpa(self, vcpu: int) -> int:
        return self.mh_vmsa_gpa + vcpu * abi.VMSA_SLOT_SIZE

    def mh_ctx_of(self, mh_index: int) -> int:
        return self.mh_ctx_gpa + mh_index * abi.MH_CTX_STRIDE

    def mh_stack_top(self, mh_index: int) -> int:
        return abi.MH_STACKS_GPA + (mh_index + 1) * abi.MH_STACK_SIZE

    def wl_stack_top(self, wl_index: int) -> int:
        return self.wl_stack_gpa + (wl_index + 1) * WL_STACK_SIZE

    def data_page_gpa(self, page: int) -> int:
        return self.wl_data_gpa + page * PAGE

    def partition(self, wl_index: int) -> range:
        """The data pages workload vCPU ``wl_index`` owns (same split as workload.c)."""
        n, nr = self.wl_data_pages, self.wl_vcpus
        return range(wl_index * n // nr, (wl_index + 1) * n // nr)

    @classmethod
    def for_config(cls, config: MachineConfig) -> GuestLayout:
        stride = PAGE + round_up(config.batch_pages * (PAGE + abi.MAILBOX_SLOT_TAG), PAGE)
        # The MH's private state follows the mailboxes: shared block, contexts, generation and MAC tables,
        # the VMSA slots.
        shared = abi.MAILBOX_GPA + config.mh_vcpus * stride
        ctxs = shared + PAGE
        gen = ctxs + config.mh_vcpus * abi.MH_CTX_STRIDE
        mac = gen + round_up(config.memory // PAGE * abi.MH_GEN_ENTRY, PAGE)
        vmsa = mac + round_up(config.memory // PAGE * abi.MH_MAC_ENTRY, PAGE)
        mh_end = round_up(vmsa + config.vcpus * abi.VMSA_SLOT_SIZE, HUGE)
        ctl = mh_end
        pvclock = ctl + round_up(ctypes.sizeof(abi.WlControl), PAGE)
        stacks = pvclock + PAGE
        ledger = stacks + config.vcpus * WL_STACK_SIZE
        room = config.memory - ledger - PAGE  # a page of slack for rounding the ledger
        data_pages = max(room // (PAGE + LEDGER_ENTRY), 0)
        data = ledger + round_up(data_pages * LEDGER_ENTRY, PAGE)
        if data_pages < 16 * config.vcpus:
            need = (data + 16 * config.vcpus * PAGE) // abi.MIB + 2
            raise ConfplanError(
                f"guest memory {config.memory // abi.MIB} MiB leaves {data_pages} workload pages for "
                f"{config.vcpus} vCPUs after the helper area ({mh_end // abi.MIB} MiB)",
                hint=f"give the guest at least {need} MiB, or fewer aux vCPUs / smaller batch_pages",
            )
        return cls(
            ram_bytes=config.memory,
            mh_vcpus=config.mh_vcpus,
            mailbox_stride=stride,
            mh_shared_gpa=shared,
            mh_ctx_gpa=ctxs,
            mh_gen_gpa=gen,
            mh_mac_gpa=mac,
            mh_vmsa_gpa=vmsa,
            mh_end=mh_end,
            wl_vcpus=config.vcpus,
            wl_ctl_gpa=ctl,
            wl_pvclock_gpa=pvclock,
            wl_stack_gpa=stacks,
            wl_ledger_gpa=ledger,
            wl_data_gpa=data,
            wl_data_pages=data_pages,
        )
