"""The source's dirty log re-armed just before pages are read (manual dirty-log protection; core/rearm.c):
a re-arm clears the log of exactly the pages listed, so a write before it is sent with the round and only
a write after it is logged; where KVM starts the log with every bit set, turning it on write-protects
nothing, so the guest's writes to pages not yet sent cost no fault. Checked against real KVM, by the pages
it reports and by its own fault counts (``pf_fixed`` of the guest's vCPUs), never by time."""

from __future__ import annotations

import array
import errno
from collections.abc import Iterable, Iterator

import pytest

from confplan.core.rearm import RearmError
from confplan.vmm import Machine, MachineConfig, abi

pytestmark = pytest.mark.kvm


@pytest.fixture
def quiet() -> Iterator[Machine]:
    with Machine(MachineConfig(memory=256 * abi.MIB, workload_kind="quiet", aux_vcpus=1)) as m:
        if not m.dirty_log.manual:
            pytest.skip("KVM offers no manual dirty-log protection here: fetches re-arm, readers never do")
        m.start()
        m.wait_workload(abi.EV_WL_FILLED, timeout=30)
        yield m


def gpas(m: Machine, pages: Iterable[int]) -> array.array[int]:
    return array.array("Q", (m.layout.data_page_gpa(p) for p in pages))


def written(m: Machine) -> list[int]:
    """Data pages the log reports (left as they are: only a re-arm clears them)."""
    first = m.layout.wl_data_gpa // abi.PAGE
    log = m.dirty_log.fetch(rearm=False)
    return [p - first for p in log.pages(first, first + m.layout.wl_data_pages)]


def workload_faults(m: Machine) -> int:
    total = 0
    for runner in m.runners:
        if not runner.aux:
            with runner.vcpu.stats() as stats:
                total += stats.read("pf_fixed")["pf_fixed"]
    return total


def test_a_rearm_clears_exactly_the_pages_it_lists(quiet: Machine) -> None:
    m = quiet
    far = 40_000  # more than one re-arm window (32768 pages) from page 3: a second KVM call
    assert far + 1 < m.layout.wl_data_pages
    m.dirty_log.start()
    rearm = m.dirty_log.rearm()
    assert rearm is not None
    rearm.rearm(gpas(m, range(m.layout.wl_data_pages)))
    assert written(m) == []
    m.workload.write_pages([3, 4, 70, far, far + 1])
    assert written(m) == [3, 4, 70, far, far + 1]
    assert written(m) == [3, 4, 70, far, far + 1]  # a fetch without re-arm leaves the log as it was
    calls, pages = rearm.calls, rearm.pages
    rearm.rearm(gpas(m, [3, 70, far]))  # 4 shares page 3's 64-page word, far + 1 far's
    assert rearm.calls == calls + 2 and rearm.pages == pages + 3
    assert written(m) == [4, far + 1]
    m.workload.write_pages([3])  # re-armed: its next write is logged again
    assert written(m) == [3, 4, far + 1]


def test_turning_the_log_on_protects_nothing_until_a_rearm(quiet: Machine) -> None:
    m = quiet
    if not m.dirty_log.initially_set:
        pytest.skip("KVM offers no KVM_DIRTY_LOG_INITIALLY_SET here: the log goes on write-protected")
    pages = range(0, 1024)
    m.workload.write_pages(pages)  # mapped writable before the log goes on
    m.dirty_log.start()
    before = workload_faults(m)
    m.workload.write_pages(pages)
    assert workload_faults(m) - before < len(pages) // 16
    rearm = m.dirty_log.rearm()
    assert rearm is not None
    rearm.rearm(gpas(m, pages))
    before = workload_faults(m)
    m.workload.write_pages(pages)
    assert workload_faults(m) - before >= len(pages) // 2  # each first write after the re-arm faults
    assert written(m)[: len(pages)] == list(pages)


def test_a_gpa_in_no_memslot_is_refused_before_any_call(quiet: Machine) -> None:
    rearm = quiet.dirty_log.rearm()
    assert rearm is not None
    with pytest.raises(RearmError) as refused:
        rearm.rearm(array.array("Q", [quiet.layout.data_page_gpa(0), quiet.ram.top]))
    assert refused.value.errno == errno.EINVAL and refused.value.gpa == quiet.ram.top
    assert rearm.calls == 0
