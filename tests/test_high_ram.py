"""Guest RAM above 4 GiB (guest ABI v8): the map around the hole under 4 GiB, as the VMM lays it out, maps it,
tells the guest (e820) and guards it. The migration of such a guest is in test_migration_engine.py."""

from __future__ import annotations

import array
import ctypes
from collections.abc import Iterator

import pytest

from confplan.core import HostMemory, frame_shared_pages, unframe_shared_pages
from confplan.core.status import CoreStatus, PageCoreError
from confplan.core.wire import HEADER_SIZE, FrameType, finish_frame, shared_frame_capacity
from confplan.errors import ConfplanError
from confplan.guest.layout import GuestLayout, ram_ranges, ram_top
from confplan.vmm import MachineConfig, abi
from confplan.vmm.bootparams import e820_map
from confplan.vmm.memory import GuestRam
from confplan.vmm.tables import pd_count

GIB = 1 << 30
HOLE = (abi.RAM_HOLE_START, abi.RAM_HOLE_END)


def test_ram_up_to_the_hole_is_one_range_and_more_goes_on_from_4gib() -> None:
    assert ram_ranges(GIB) == ((0, GIB),)
    assert ram_ranges(abi.RAM_HOLE_START) == ((0, abi.RAM_HOLE_START),)
    assert ram_ranges(8 * GIB) == ((0, abi.RAM_HOLE_START), (abi.RAM_HOLE_END, 8 * GIB + 512 * abi.MIB))
    assert ram_top(8 * GIB) == 8 * GIB + (abi.RAM_HOLE_END - abi.RAM_HOLE_START)
    assert abi.MAX_RAM == abi.MAX_RAM_TOP - (abi.RAM_HOLE_END - abi.RAM_HOLE_START)


def test_an_8gib_layout_puts_data_pages_on_both_sides_of_the_hole() -> None:
    lay = GuestLayout.for_config(MachineConfig(memory=8 * GIB, vcpus=4, aux_vcpus=2))
    assert lay.npages == ram_top(8 * GIB) // abi.PAGE
    # the helper's per-page tables cover every page frame up to the top, hole included
    assert lay.mh_mac_gpa - lay.mh_gen_gpa >= lay.npages * abi.MH_GEN_ENTRY
    assert lay.mh_vmsa_gpa - lay.mh_mac_gpa >= lay.npages * abi.MH_MAC_ENTRY
    low, total = lay.wl_data_low_pages, lay.wl_data_pages
    assert 0 < low < total and total - low == (8 * GIB - abi.RAM_HOLE_START) // abi.PAGE
    assert lay.data_page_gpa(low - 1) + abi.PAGE <= abi.RAM_HOLE_START  # the last page below the hole
    assert lay.data_page_gpa(low) == abi.RAM_HOLE_END
    assert lay.data_page_gpa(total - 1) == lay.ram_top - abi.PAGE
    assert lay.wl_ledger_gpa + total * 8 <= lay.wl_data_gpa  # every ledger entry lives below the hole
    mask = lay.guest_page_mask()
    hole = range(abi.RAM_HOLE_START // abi.PAGE, abi.RAM_HOLE_END // abi.PAGE)
    assert not any(mask >> page & 1 for page in (hole.start, hole.start + 1, hole.stop - 1))
    assert mask >> (abi.RAM_HOLE_END // abi.PAGE) & 1 and mask >> (lay.npages - 1) & 1
    owned = sum((end - start) // abi.PAGE for start, end in lay.mh_owned())
    assert mask.bit_count() == 8 * GIB // abi.PAGE - owned  # all RAM but the helper's; nothing of the hole


def test_the_boot_page_gives_the_guest_an_e820_map_and_the_tables_reach_the_top() -> None:
    small = GuestLayout.for_config(MachineConfig(memory=GIB, vcpus=1, aux_vcpus=1))
    assert e820_map(small) == [(0, GIB, abi.E820_RAM)]
    big = GuestLayout.for_config(MachineConfig(memory=8 * GIB, vcpus=1, aux_vcpus=1))
    assert e820_map(big) == [
        (0, abi.RAM_HOLE_START, abi.E820_RAM),
        (abi.RAM_HOLE_START, abi.RAM_HOLE_END - abi.RAM_HOLE_START, abi.E820_RESERVED),
        (abi.RAM_HOLE_END, big.ram_top - abi.RAM_HOLE_END, abi.E820_RAM),
    ]
    assert pd_count(small) == 4 and pd_count(big) == 9  # a PD per GiB up to 8.5 GiB
    assert 3 + -(-abi.MAX_RAM_TOP // GIB) <= abi.PT_SET_SIZE // abi.PAGE  # the largest guest's PDs fit a set


def test_validate_takes_8gib_and_refuses_more_than_the_tables_map() -> None:
    from confplan.plan import load_plan_text
    from confplan.plan.diagnostics import PlanError

    plan = load_plan_text("guest: {memory: 8GiB, vcpus: 4}\nhelper: {mode: aux-vcpu, aux_vcpus: 2}\n")
    assert plan.guest.memory == 8 * GIB
    with pytest.raises(PlanError) as refused:
        load_plan_text("guest: {memory: 64GiB}\n")
    assert any("65024MiB" in d.message for d in refused.value.diagnostics)


@pytest.fixture
def high_ram() -> Iterator[GuestRam]:
    ram = GuestRam(abi.RAM_HOLE_START + 2 * abi.MIB)  # 2 MiB above 4 GiB; sparse: little is ever allocated
    yield ram
    ram.close()


def test_guest_ram_maps_both_ranges_and_no_ram_in_the_hole(high_ram: GuestRam) -> None:
    assert high_ram.top == abi.RAM_HOLE_END + 2 * abi.MIB
    assert [(m.slot, m.gpa, m.size) for m in high_ram.memslots()] == [
        (0, 0, abi.RAM_HOLE_START), (1, abi.RAM_HOLE_END, 2 * abi.MIB)
    ]  # fmt: skip
    high_ram.write(abi.RAM_HOLE_END, b"above 4 GiB")
    assert high_ram.read(abi.RAM_HOLE_END, 11) == b"above 4 GiB"
    for gpa, length in ((abi.RAM_HOLE_START, 1), (abi.RAM_HOLE_START - 8, 16), (abi.RAM_HOLE_END - 1, 2)):
        with pytest.raises(ConfplanError, match="outside guest RAM"):
            high_ram.read(gpa, length)
    with open("/proc/self/maps", encoding="ascii") as maps:
        start = high_ram.address + abi.RAM_HOLE_START
        line = next(line for line in maps if int(line.split("-")[0], 16) == start)
    assert line.split()[1].startswith("---")  # PROT_NONE: a stray access faults, it reads nothing


def _frame(ram: HostMemory, gpas: list[int]) -> bytearray:
    out = bytearray(shared_frame_capacity(len(gpas)))
    info = frame_shared_pages(ram, array.array("Q", gpas), out, seq=1, ram_size=ram.size)
    return out[: info.frame_len]


def test_the_core_refuses_a_gpa_in_the_hole_on_either_side(high_ram: GuestRam) -> None:
    ram = HostMemory(high_ram.address, high_ram.top)
    with pytest.raises(PageCoreError) as source:
        _frame(ram, [abi.RAM_HOLE_END, abi.RAM_HOLE_START])
    assert source.value.code is CoreStatus.GPA_RANGE and source.value.index == 1
    high_ram.write(abi.RAM_HOLE_END + abi.PAGE, b"\x5a" * abi.PAGE)
    frame = _frame(ram, [abi.RAM_HOLE_END + abi.PAGE, abi.RAM_HOLE_END])
    target = GuestRam(high_ram.size)
    try:
        dst = HostMemory(target.address, target.top)
        unframe_shared_pages(bytes(frame), dst)
        assert target.read(abi.RAM_HOLE_END + abi.PAGE, abi.PAGE) == b"\x5a" * abi.PAGE
        # a forged frame naming a page in the hole (well sealed): refused before anything is written
        target.write(abi.RAM_HOLE_END + abi.PAGE, bytes(abi.PAGE))
        forged = bytearray(frame)
        forged[HEADER_SIZE + 8 : HEADER_SIZE + 16] = (abi.RAM_HOLE_START + abi.PAGE).to_bytes(8, "little")
        finish_frame(forged, FrameType.SHARED_PAGES, 1, len(forged) - HEADER_SIZE)
        with pytest.raises(PageCoreError) as refused:
            unframe_shared_pages(bytes(forged), dst)
        assert refused.value.code is CoreStatus.GPA_RANGE
        assert target.read(abi.RAM_HOLE_END + abi.PAGE, abi.PAGE) == bytes(abi.PAGE)
    finally:
        target.close()


def test_the_hole_constants_of_the_core_are_the_guest_abis() -> None:
    from pathlib import Path

    header = (Path(__file__).parent.parent / "confplan" / "core" / "pagecore.h").read_text()
    assert f"#define CP_RAM_HOLE_START {abi.RAM_HOLE_START:#X}ULL".replace("0X", "0x") in header
    assert f"#define CP_RAM_HOLE_END {abi.RAM_HOLE_END:#x}ULL" in header
    assert ctypes.sizeof(abi.E820Entry) == 24


def test_a_conversion_report_naming_the_hole_is_refused() -> None:
    from confplan.vmm.enc_bitmap import EncBitmap, EncStatusError

    enc = EncBitmap(ram_top(5 * GIB) // abi.PAGE)
    enc.map_gpa_range(abi.RAM_HOLE_END, 2, 0)  # the first pages above 4 GiB: fine
    assert not enc.is_private(abi.RAM_HOLE_END // abi.PAGE)
    below, top = abi.RAM_HOLE_START, abi.RAM_HOLE_END
    for gpa, npages in ((below, 1), (below - abi.PAGE, 2), (top - abi.PAGE, 1)):
        with pytest.raises(EncStatusError, match="outside guest RAM"):
            enc.map_gpa_range(gpa, npages, 0)
