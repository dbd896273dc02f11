"""VMM parts that need no KVM: page bitmaps, the encryption bitmap, layouts, config checks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from confplan.errors import ConfplanError
from confplan.vmm import abi
from confplan.vmm.bitmap import PageBitmap
from confplan.vmm.config import MachineConfig
from confplan.vmm.enc_bitmap import EncBitmap, EncStatusError
from confplan.vmm.layout import GuestLayout


@given(st.integers(1, 700), st.data())
def test_set_range_matches_a_set(npages: int, data: st.DataObject) -> None:
    bm, model = PageBitmap(npages), set[int]()
    for _ in range(data.draw(st.integers(1, 6))):
        first = data.draw(st.integers(0, npages - 1))
        count = data.draw(st.integers(0, npages - first))
        value = data.draw(st.booleans())
        bm.set_range(first, count, value)
        span = set(range(first, first + count))
        model = model | span if value else model - span
    assert bm.pages() == sorted(model)
    assert bm.count() == len(model)


def test_enc_bitmap_private_by_default_and_updates() -> None:
    enc = EncBitmap(1000)
    assert enc.shared_pages() == 0 and enc.is_private(999)
    enc.map_gpa_range(10 * abi.PAGE, 100, 0)
    assert enc.shared_pages() == 100 and not enc.is_private(10) and enc.is_private(110)
    enc.map_gpa_range(50 * abi.PAGE, 10, abi.MAP_GPA_RANGE_ENCRYPTED)
    assert enc.shared_pages() == 90 and enc.is_private(55)
    with pytest.raises(EncStatusError):
        enc.map_gpa_range(999 * abi.PAGE, 2, 0)


def test_layout_keeps_areas_apart() -> None:
    lay = GuestLayout.for_config(MachineConfig(memory=64 * abi.MIB, vcpus=2, aux_vcpus=2, batch_pages=256))
    assert lay.mh_end % abi.HUGE == 0 and lay.mailbox_gpa(1) + lay.mailbox_stride <= lay.mh_end
    assert lay.mailbox_stride == abi.PAGE + 256 * (abi.PAGE + 64)
    assert lay.wl_ctl_gpa == lay.mh_end < lay.wl_stack_gpa < lay.wl_ledger_gpa < lay.wl_data_gpa
    assert lay.data_page_gpa(lay.wl_data_pages) <= 64 * abi.MIB
    assert lay.partition(0).stop == lay.partition(1).start and lay.partition(1).stop == lay.wl_data_pages


def test_too_small_guest_is_refused_with_a_size_hint() -> None:
    with pytest.raises(ConfplanError) as err:
        GuestLayout.for_config(MachineConfig(memory=4 * abi.MIB, aux_vcpus=4, batch_pages=1024))
    assert "workload pages" in err.value.message and "at least" in err.value.render()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"memory": 3 * abi.MIB},
        {"vcpus": 0},
        {"vcpus": 20, "aux_vcpus": 13},
        {"workload_kind": "fork-bomb"},
        {"shared_fraction": 1.5},
        {"helper_mode": "mirror-vm", "aux_vcpus": 1},
    ],
)
def test_bad_configs_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfplanError):
        MachineConfig(**kwargs)  # type: ignore[arg-type]
