"""The CPU tables the firmware's CPL0 part relies on, written by the VMM into guest RAM (as Firecracker
does for direct boot): GDT, one TSS per vCPU, the IDT (gates to the firmware's ``isr_stubs``) and two sets
of identity page tables: the helper's maps all RAM (the guest's low pages user-writable, since they
migrate through it), the workload's leaves out the MH area and the secret page (design.md "Isolation
inside the guest")."""

from __future__ import annotations

import struct
from typing import Protocol

from confplan.vmm import abi
from confplan.vmm.abi import HUGE, PAGE
from confplan.vmm.firmware import Firmware
from confplan.vmm.layout import GuestLayout


class GuestWrites(Protocol):
    """Where the tables are written: guest RAM, or the launch's page sink (``sev_launch``)."""

    def write(self, gpa: int, data: bytes) -> None: ...

# GDT selectors (kvm-here.md): kernel code64 0x10, user data 0x2b, user code64 0x33, TSSs from 0x38.
KERNEL_CS, USER_DS, USER_CS, FIRST_TSS = 0x10, 0x2B, 0x33, 0x38
GDT_ENTRIES = (
    0,
    0x00CF9A000000FFFF,  # 0x08 kernel code32
    0x00AF9B000000FFFF,  # 0x10 kernel code64
    0x00CF93000000FFFF,  # 0x18 kernel data
    0x00CFFB000000FFFF,  # 0x20 user code32 (SYSRET layout)
    0x00CFF3000000FFFF,  # 0x28 user data
    0x00AFFB000000FFFF,  # 0x30 user code64
)
TSS_LIMIT = 0x67
ISR_STUB_STRIDE = 16

# page-table entry bits
P, RW, US, PWT, PCD, PS = 0x1, 0x2, 0x4, 0x8, 0x10, 0x80
GIB = 1 << 30


def pd_count(layout: GuestLayout) -> int:
    """PDs in a set: one per GiB up to the top of RAM, and at least the four below 4 GiB, where the MMIO
    window and the xAPIC page are (v8)."""
    return max(4, -(-layout.ram_top // GIB))


def pt_pages(layout: GuestLayout) -> int:
    """Pages of one set that are used: PML4, PDPT, the PT of the low 2 MiB, the PDs."""
    return 3 + pd_count(layout)


def tss_selector(vcpu_index: int) -> int:
    return FIRST_TSS + 16 * vcpu_index


def gdt_limit(nr_vcpus: int) -> int:
    return 8 * len(GDT_ENTRIES) + 16 * nr_vcpus - 1


def _tss_descriptor(base: int) -> bytes:
    low = (
        (TSS_LIMIT & 0xFFFF)
        | (base & 0xFFFFFF) << 16
        | 0x89 << 40  # present, DPL 0, 64-bit TSS (available)
        | ((TSS_LIMIT >> 16) & 0xF) << 48
        | ((base >> 24) & 0xFF) << 56
    )
    return struct.pack("<QQ", low, base >> 32)


def write_gdt_and_tss(ram: GuestWrites, nr_vcpus: int) -> None:
    gdt = b"".join(struct.pack("<Q", e) for e in GDT_ENTRIES)
    for i in range(nr_vcpus):
        tss = abi.TSS_GPA + i * abi.TSS_STRIDE
        gdt += _tss_descriptor(tss)
        rsp0 = abi.KSTACK_GPA + (i + 1) * abi.KSTACK_SIZE
        # 64-bit TSS: RSP0 at +4, I/O map base at +102 pointing past the limit (no I/O bitmap).
        ram.write(tss, bytes(TSS_LIMIT + 1))
        ram.write(tss + 4, struct.pack("<Q", rsp0))
        ram.write(tss + 102, struct.pack("<H", TSS_LIMIT + 1))
    ram.write(abi.GDT_GPA, gdt)


def write_idt(ram: GuestWrites, fw: Firmware) -> None:
    stubs = fw.sym("isr_stubs")
    entries = []
    for vector in range(256):
        handler = stubs + ISR_STUB_STRIDE * vector
        # interrupt gates, DPL 0; the service gate is DPL 3 so CPL3 code may `int` it
        attrs = 0xEE if vector == abi.SVC_VECTOR else 0x8E
        entries.append(
            struct.pack(
                "<HHBBHII", handler & 0xFFFF, KERNEL_CS, 0, attrs, (handler >> 16) & 0xFFFF, handler >> 32, 0
            )
        )
    ram.write(abi.IDT_GPA, b"".join(entries))


def _low_page_flags(fw: Firmware, nr_vcpus: int) -> dict[int, int]:
    """4 KiB mappings of the first 2 MiB: who may touch each page (absent = not mapped)."""
    flags: dict[int, int] = {}

    def span(start: int, end: int, bits: int) -> None:
        for gpa in range(start & ~(PAGE - 1), end, PAGE):
            flags[gpa] = bits

    span(abi.GDT_GPA, abi.IDT_GPA + PAGE, P | RW)  # CPU tables: supervisor
    span(abi.TSS_GPA, abi.TSS_GPA + abi.TSS_STRIDE * nr_vcpus, P | RW)
    span(abi.BOOT_PARAMS_GPA, abi.BOOT_PARAMS_GPA + PAGE, P | US)  # boot params: read-only for CPL3
    span(abi.PT_WL_GPA, abi.PT_MH_GPA + abi.PT_SET_SIZE, P | RW)
    span(abi.KSTACK_GPA, abi.KSTACK_GPA + abi.KSTACK_SIZE * nr_vcpus, P | RW)
    span(fw.sym("__boot_start"), fw.sym("__boot_end"), P)  # CPL0 code
    span(fw.sym("__utext_start"), fw.sym("__utext_end"), P | US)  # shared CPL3 code: read-only
    span(fw.sym("__udata_start"), fw.sym("__udata_end"), P | RW | US)
    return flags


def _helper_low_flags(layout: GuestLayout, low: dict[int, int]) -> dict[int, int]:
    """The helper's view of the first 2 MiB: every guest page user-writable (SAVE reads and LOAD writes
    them at CPL3: the CPL0 area migrates), its own pages (page 0, its page tables, its CPL0 stacks) as
    for everyone. No SMEP (CR4), so CPL0 code in a user page still runs for a helper vCPU's fault."""
    own = [(start, end) for start, end in layout.mh_owned() if start < HUGE]
    flags = {gpa: P | RW | US for gpa in range(0, HUGE, PAGE) if not any(s <= gpa < e for s, e in own)}
    flags.update({gpa: bits for gpa, bits in low.items() if gpa not in flags})
    return flags


def write_page_tables(ram: GuestWrites, layout: GuestLayout, fw: Firmware, nr_vcpus: int) -> None:
    low = _low_page_flags(fw, nr_vcpus)
    _write_set(ram, abi.PT_MH_GPA, layout, _helper_low_flags(layout, low), helper=True)
    _write_set(ram, abi.PT_WL_GPA, layout, low, helper=False)


def _write_set(ram: GuestWrites, base: int, layout: GuestLayout, low: dict[int, int], helper: bool) -> None:
    """One set: PML4, PDPT, the PT of the low 2 MiB, then a PD per GiB (v8: RAM above 4 GiB is mapped
    where it is, the hole below 4 GiB is not, but for the MMIO window and the xAPIC page)."""
    pml4, pdpt, pt, pd0 = base, base + PAGE, base + 2 * PAGE, base + 3 * PAGE
    npd = pd_count(layout)
    if 3 + npd > abi.PT_SET_SIZE // PAGE:
        raise ValueError(f"{layout.ram_top:#x} bytes of guest-physical space need {npd} PDs: too many")
    ram.write(base, bytes(pt_pages(layout) * PAGE))
    ram.write(pml4, struct.pack("<Q", pdpt | P | RW | US))
    ram.write(pdpt, b"".join(struct.pack("<Q", pd0 + i * PAGE | P | RW | US) for i in range(npd)))
    ram.write(
        pt, b"".join(struct.pack("<Q", gpa | low[gpa] if gpa in low else 0) for gpa in range(0, HUGE, PAGE))
    )
    ram.write(pd0, struct.pack("<Q", pt | P | RW | US))
    for start, end in layout.ram_ranges():
        first = max(start, HUGE)
        if not helper and start < layout.mh_end:  # the workload's tables leave out the MH area
            first = max(first, layout.mh_end)
        entries = b"".join(struct.pack("<Q", gpa | P | RW | US | PS) for gpa in range(first, end, HUGE))
        ram.write(pd0 + (first // HUGE) * 8, entries)
    for gpa in range(abi.MMIO_BASE, abi.MMIO_BASE + abi.MMIO_SIZE, HUGE):
        ram.write(pd0 + (gpa // HUGE) * 8, struct.pack("<Q", gpa | P | RW | US | PS))
    # The xAPIC page (the in-kernel LAPIC): CPL0 only, uncached, in the 2 MiB page that holds it.
    lapic = abi.LAPIC_GPA & ~(HUGE - 1)
    ram.write(pd0 + (lapic // HUGE) * 8, struct.pack("<Q", lapic | P | RW | PWT | PCD | PS))
