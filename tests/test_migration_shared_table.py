"""verify's shared-page table (``SharedTable``): a CRC per shared page filled while the guest runs, dropped
for the pages written since, folded in the pause. It must give what a fresh table gives, equal memory must
give equal digests, and a changed shared page must change the digest.

Two real (unstarted) machines: their guest RAM and encryption bitmaps are set directly, as the guest and
the stream would have left them."""

from __future__ import annotations

import array
import os
from collections.abc import Iterator

import pytest

from confplan.migration.verify import SharedTable
from confplan.vmm import Machine, MachineConfig, abi

pytestmark = pytest.mark.kvm
MEMORY = 16 * abi.MIB
SHARED_PAGES = 64


@pytest.fixture
def pair() -> Iterator[tuple[Machine, Machine]]:
    content = os.urandom(MEMORY)
    made: list[Machine] = []
    try:
        for _ in range(2):
            m = Machine(MachineConfig(memory=MEMORY, vcpus=1))
            made.append(m)
            m.ram.write(0, content)
            bitmap = m.enc_bitmap.bitmap  # 1 = private: all private but SHARED_PAGES pages of the workload
            bitmap.fill()
            bitmap.set_range(_first_page(m) + 10, SHARED_PAGES, False)
        yield made[0], made[1]
    finally:
        for m in made:
            m.close()


def _first_page(m: Machine) -> int:
    return int(m.layout.mh_end) // abi.PAGE


def _gpa(m: Machine, nth_shared: int) -> int:
    return (_first_page(m) + 10 + nth_shared) * abi.PAGE


def _filled(m: Machine) -> SharedTable:
    table = SharedTable(m)
    assert table.fill() == SHARED_PAGES
    return table


def test_equal_memory_equal_digests_and_the_fold_needs_no_page(pair: tuple[Machine, Machine]) -> None:
    src, dst = pair
    here, there = _filled(src), _filled(dst)
    digest = here.digest()
    assert digest == there.digest() and digest["pages"] == SHARED_PAGES
    assert here.computed == 0  # nothing written since the fill: folded from the table alone


def test_a_changed_shared_page_changes_the_digest(pair: tuple[Machine, Machine]) -> None:
    src, dst = pair
    here, there = _filled(src), _filled(dst)
    gpa = _gpa(dst, 5)
    dst.ram.write(gpa + 100, bytes([dst.ram.read(gpa + 100, 1)[0] ^ 1]))  # one bit
    there.forget(array.array("Q", [gpa]))
    assert there.digest() != here.digest()
    assert there.computed == 1  # only the forgotten page was CRC'd again
    # written back equal (and forgotten again): equal again
    dst.ram.write(gpa, src.ram.read(gpa, abi.PAGE))
    there.forget(array.array("Q", [gpa]))
    assert there.digest() == here.digest()


def test_the_incremental_table_equals_a_fresh_one(pair: tuple[Machine, Machine]) -> None:
    src, _ = pair
    table = _filled(src)
    written = array.array("Q", [_gpa(src, i) for i in (0, 7, 63)] + [_gpa(src, 100)])  # one private page
    for gpa in written:
        src.ram.write(gpa, os.urandom(abi.PAGE))
    table.forget(written)
    assert table.digest() == SharedTable(src).digest()  # a table never filled computes every page
    assert table.computed == 3


def test_a_page_that_turned_shared_is_computed_in_the_pause(pair: tuple[Machine, Machine]) -> None:
    src, dst = pair
    here, there = _filled(src), _filled(dst)
    for m in pair:
        m.enc_bitmap.bitmap.set_range(_first_page(m) + 200, 1, False)
    assert here.digest() == there.digest()
    assert here.digest()["pages"] == SHARED_PAGES + 1 and here.computed == 0  # kept from the first digest
    src.ram.write((_first_page(src) + 200) * abi.PAGE, os.urandom(abi.PAGE))
    src.enc_bitmap.bitmap.set_range(_first_page(src) + 200, 1, True)
    here.forget(array.array("Q", [(_first_page(src) + 200) * abi.PAGE]))
    assert here.digest() != there.digest()  # the shared sets differ (GPAs are in the digest)


def test_only_forgotten_pages_are_looked_at_again(pair: tuple[Machine, Machine]) -> None:
    """The contract: the caller's change list covers every write after the fill (the dirty log, the
    stream's writes); a write it does not name is not seen until the next fill."""
    src, _ = pair
    table = _filled(src)
    before = table.digest()
    src.ram.write(_gpa(src, 3), os.urandom(abi.PAGE))
    assert table.digest() == before
    table.fill()
    assert table.digest() != before
