"""Where everything sits in guest RAM for one guest shape (docs/memory-map.md draws it), and the smallest
guest RAM a shape fits in: the VMM lays a machine out with it, the plan's rules refuse a guest too small.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Protocol

from confplan.errors import ConfplanError
from confplan.guest import abi
from confplan.guest.abi import HUGE, MIB, PAGE, round_up

WL_STACK_SIZE = 0x4000
LEDGER_ENTRY = ctypes.sizeof(abi.LedgerEntry)
MIN_WL_PAGES_PER_VCPU = 16  # the workload needs room to dirty pages on every vCPU


class GuestShape(Protocol):
    """What the layout depends on (a ``vmm.MachineConfig`` is one)."""

    @property
    def memory(self) -> int: ...
    @property
    def vcpus(self) -> int: ...
    @property
    def mh_vcpus(self) -> int: ...
    @property
    def batch_pages(self) -> int: ...


class GuestTooSmall(ConfplanError):
    """The guest's RAM does not hold the helper area and a workload area for every vCPU."""

    def __init__(self, message: str, *, minimum: int) -> None:
        super().__init__(message, hint=f"give the guest at least {minimum // MIB} MiB, or fewer aux vCPUs / "
                         "smaller batch_pages")  # fmt: skip
        self.minimum = minimum


@dataclass(frozen=True)
class _Shape:
    memory: int
    vcpus: int
    mh_vcpus: int
    batch_pages: int


def ram_ranges(memory: int) -> tuple[tuple[int, int], ...]:
    """Guest RAM of ``memory`` bytes as [start, end) GPA ranges: from 0 up to the hole under 4 GiB (the
    MMIO window and the xAPIC page), the rest from 4 GiB, as x86 VMMs split it (docs/memory-map.md)."""
    low = min(memory, abi.RAM_HOLE_START)
    if memory == low:
        return ((0, memory),)
    return ((0, low), (abi.RAM_HOLE_END, abi.RAM_HOLE_END + memory - low))


def ram_top(memory: int) -> int:
    """The end of the highest RAM range: per-page tables and bitmaps are indexed by GPA up to here."""
    return ram_ranges(memory)[-1][1]


def _data_pages(shape: GuestShape) -> tuple[int, int, int, int]:
    """(mh_end, ledger gpa, workload data pages, of which below the hole) of ``shape``: the arithmetic
    of the layout below. Every ledger entry lives below the hole; data pages fill the rest of low RAM
    and all of RAM above 4 GiB."""
    stride = PAGE + round_up(shape.batch_pages * (PAGE + abi.MAILBOX_SLOT_TAG), PAGE)
    vmsa = _mh_private(shape, stride)[4]
    mh_end = round_up(vmsa + shape.vcpus * abi.VMSA_SLOT_SIZE, HUGE)
    pvclock = mh_end + round_up(ctypes.sizeof(abi.WlControl), PAGE)
    stacks = pvclock + PAGE
    ledger = stacks + shape.vcpus * WL_STACK_SIZE
    ranges = ram_ranges(shape.memory)
    high = sum(end - start for start, end in ranges[1:]) // PAGE
    room = ranges[0][1] - ledger - PAGE - high * LEDGER_ENTRY  # a page of slack for rounding the ledger
    if room < 0:
        return mh_end, ledger, 0, 0
    low = room // (PAGE + LEDGER_ENTRY)
    return mh_end, ledger, low + high, low


def _mh_private(shape: GuestShape, stride: int) -> tuple[int, int, int, int, int]:
    """(shared, contexts, generation table, MAC table, VMSA slots): the MH's private state follows the
    mailboxes. Its tables have an entry per page up to the top of RAM, the hole's included (unused)."""
    pages = ram_top(shape.memory) // PAGE
    shared = abi.MAILBOX_GPA + shape.mh_vcpus * stride
    ctxs = shared + PAGE
    gen = ctxs + shape.mh_vcpus * abi.MH_CTX_STRIDE
    mac = gen + round_up(pages * abi.MH_GEN_ENTRY, PAGE)
    vmsa = mac + round_up(pages * abi.MH_MAC_ENTRY, PAGE)
    return shared, ctxs, gen, mac, vmsa


def fits(shape: GuestShape) -> bool:
    """Does ``shape``'s RAM hold the helper area and enough workload pages for every vCPU?"""
    return _data_pages(shape)[2] >= MIN_WL_PAGES_PER_VCPU * shape.vcpus


def minimum_memory(vcpus: int, mh_vcpus: int, batch_pages: int) -> int:
    """The smallest guest RAM (a multiple of 2 MiB) that fits: found by bisection, since the workload's
    room never shrinks as RAM grows (each 2 MiB more adds at most 2 MiB of helper tables)."""
    low, high = 1, abi.MAX_RAM // HUGE  # in 2 MiB units; ``high`` may not fit either
    while low < high:
        middle = (low + high) // 2
        if fits(_Shape(middle * HUGE, vcpus, mh_vcpus, batch_pages)):
            high = middle
        else:
            low = middle + 1
    return low * HUGE


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
    wl_data_low_pages: int  # data pages from wl_data_gpa up to the hole; the others start at 4 GiB

    @property
    def wl_base(self) -> int:
        return self.mh_end

    @property
    def ram_top(self) -> int:
        """The end of the highest RAM range (``ram_bytes`` unless RAM goes above 4 GiB)."""
        return ram_top(self.ram_bytes)

    def ram_ranges(self) -> tuple[tuple[int, int], ...]:
        return ram_ranges(self.ram_bytes)

    @property
    def npages(self) -> int:
        """Page frames up to the top of RAM, the hole's included: every bitmap and table is this long."""
        return self.ram_top // PAGE

    @property
    def mh_gen_entries(self) -> int:
        """One anti-replay generation (u32) per guest page."""
        return self.npages

    def mh_owned(self) -> tuple[tuple[int, int], ...]:
        """The MH's own pages, [start, end) GPA ranges: never guest pages, never migrated (the MH refuses
        them, GPA_MH): page 0 (the null guard, mapped by no table), the helper's page tables, the CPL0
        stacks of the helper vCPUs (their ids follow the workload's) and the MH area. Every other page of
        RAM is the guest's and migrates, the CPL0 area included (docs/memory-map.md, "What migrates")."""
        kstack = abi.KSTACK_GPA + self.wl_vcpus * abi.KSTACK_SIZE
        return (
            (0, PAGE),
            (abi.PT_MH_GPA, abi.KSTACK_GPA),
            (kstack, kstack + self.mh_vcpus * abi.KSTACK_SIZE),
            (abi.MH_BASE, self.mh_end),
        )

    def guest_page_mask(self) -> int:
        """Bit i set = page i is the guest's (migrates): all of RAM but ``mh_owned`` (the hole is no RAM)."""
        mask = 0
        for start, end in self.ram_ranges():
            mask |= ((1 << ((end - start) // PAGE)) - 1) << (start // PAGE)
        for start, end in self.mh_owned():
            mask &= ~(((1 << ((end - start) // PAGE)) - 1) << (start // PAGE))
        return mask

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
        """Data page ``page``'s GPA (same rule as workload.c's ``page_at``): low RAM, then from 4 GiB."""
        if page < self.wl_data_low_pages:
            return self.wl_data_gpa + page * PAGE
        return abi.RAM_HOLE_END + (page - self.wl_data_low_pages) * PAGE

    def partition(self, wl_index: int) -> range:
        """The data pages workload vCPU ``wl_index`` owns (same split as workload.c)."""
        n, nr = self.wl_data_pages, self.wl_vcpus
        return range(wl_index * n // nr, (wl_index + 1) * n // nr)

    @classmethod
    def for_config(cls, config: GuestShape) -> GuestLayout:
        """The layout of ``config``; GuestTooSmall when its RAM cannot hold it."""
        stride = PAGE + round_up(config.batch_pages * (PAGE + abi.MAILBOX_SLOT_TAG), PAGE)
        shared, ctxs, gen, mac, vmsa = _mh_private(config, stride)
        mh_end, ledger, data_pages, low_pages = _data_pages(config)
        if data_pages < MIN_WL_PAGES_PER_VCPU * config.vcpus:
            raise GuestTooSmall(
                f"guest memory {config.memory // MIB} MiB leaves {data_pages} workload pages for "
                f"{config.vcpus} vCPUs after the helper area ({mh_end // MIB} MiB)",
                minimum=minimum_memory(config.vcpus, config.mh_vcpus, config.batch_pages),
            )
        ctl = mh_end
        pvclock = ctl + round_up(ctypes.sizeof(abi.WlControl), PAGE)
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
            wl_stack_gpa=pvclock + PAGE,
            wl_ledger_gpa=ledger,
            wl_data_gpa=ledger + round_up(data_pages * LEDGER_ENTRY, PAGE),
            wl_data_pages=data_pages,
            wl_data_low_pages=low_pages,
        )
