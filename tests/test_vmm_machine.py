"""Boot real guests on KVM: console, aux vCPUs, dirty log, encryption bitmap, pause, faults, watchdog,
self-check and vCPU state. Small guests (32 MiB) keep the whole file to a few seconds."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator

import pytest
from waiting import until

from confplan.kvm import structs as s
from confplan.vmm import Machine, MachineConfig, abi
from confplan.vmm.exits import GuestError, GuestFault
from confplan.vmm.state import state_blob, state_from_blob
from confplan.vmm.vcpu_thread import RunState
from confplan.vmm.workload import page_csum, page_fill

pytestmark = pytest.mark.kvm
MEM = 32 * abi.MIB


@pytest.fixture
def quiet() -> Iterator[Machine]:
    """A filled guest whose workload only serves commands: its memory changes only when asked."""
    with Machine(MachineConfig(memory=MEM, workload_kind="quiet", aux_vcpus=1, shared_fraction=0.25)) as m:
        m.start()
        m.wait_workload(abi.EV_WL_FILLED, timeout=20)
        m.wait_helpers_ready()
        yield m


def wait_error(m: Machine, timeout: float = 10.0) -> BaseException:
    assert until(lambda: m.error is not None, timeout), "the guest should have stopped with an error"
    return m.error


def test_boot_and_console() -> None:
    lines: list[str] = []
    with Machine(MachineConfig(memory=MEM, workload_kind="quiet"), echo=lines.append) as m:
        m.start()
        assert m.console.wait_for("workload: kind 2 on 1 vCPUs", timeout=10) is not None
        m.wait_workload(abi.EV_WL_FILLED, timeout=20)
        assert m.workload.progress().states == ["running"]
        assert lines and lines[0].startswith("[vcpu0] workload:")


def test_aux_vcpus_are_invisible_to_the_workload() -> None:
    with Machine(MachineConfig(memory=64 * abi.MIB, vcpus=2, aux_vcpus=2, workload_kind="quiet")) as m:
        m.start()
        m.wait_workload(abi.EV_WL_FILLED, timeout=20)
        m.wait_helpers_ready()
        bp = m.ram.struct_at(abi.BootParams, abi.BOOT_PARAMS_GPA)
        assert bp.nr_vcpus == 2 and list(bp.cpu_table[:3]) == [0, 1, 0]
        assert m.console.wait_for("on 2 vCPUs", timeout=1) is not None
        # the workload split its pages between its own two vCPUs only
        written = [m.workload.status(i).pages_written for i in range(4)]
        assert written[:2] == [len(m.layout.partition(0)), len(m.layout.partition(1))]
        assert written[2:] == [0, 0]
        assert [a.header.mh_index for a in m.aux] == [0, 1] and all(a.ready for a in m.aux)
        assert m.console.wait_for("mh: helper vCPU 1 ready", timeout=1) is not None


def test_more_vcpus_than_the_old_32_boot_and_each_keeps_its_pages() -> None:
    """(v8) 40 guest vCPUs and 2 helper vCPUs: past the old limit of 32, each with its TSS and CPL0 stack
    in the new low map, each workload vCPU filling its own partition, within KVM's own limit."""
    with Machine(MachineConfig(memory=64 * abi.MIB, vcpus=40, aux_vcpus=2, workload_kind="quiet")) as m:
        assert m.kvm.max_vcpus() >= 42
        m.start()
        m.wait_workload(abi.EV_WL_FILLED, timeout=60)
        m.wait_helpers_ready(60)
        written = [m.workload.status(i).pages_written for i in range(40)]
        assert written == [len(m.layout.partition(i)) for i in range(40)] and all(written)
        assert m.workload.check().ok


def test_dirty_log_reports_exactly_the_written_pages(quiet: Machine) -> None:
    lay = quiet.layout
    pages = [0, 1, 17, 500, lay.wl_data_pages - 1]
    quiet.dirty_log.clear()
    quiet.workload.write_pages(pages)
    dirty = quiet.dirty_log.fetch()
    first_data = lay.wl_data_gpa // abi.PAGE
    assert dirty.pages(first_data, lay.npages) == [first_data + p for p in pages]
    # Everything else written is bookkeeping: page-table A/D bits, the control page, stack, ledger,
    # the CPL0 stacks (timer interrupt frames), the pvclock page (kvm-clock).
    ledger = {(lay.wl_ledger_gpa + 8 * p) // abi.PAGE for p in pages}
    kstacks = (abi.KSTACK_GPA + abi.KSTACK_SIZE * abi.MAX_VCPUS) // abi.PAGE
    allowed = set(range(abi.PT_WL_GPA // abi.PAGE, kstacks)) | ledger
    allowed |= set(range(lay.wl_ctl_gpa // abi.PAGE, lay.wl_ledger_gpa // abi.PAGE))
    assert set(dirty.pages(0, first_data)) <= allowed
    assert ledger <= set(dirty.pages(0, first_data))


def test_the_helpers_area_stays_writable_and_unreported(quiet: Machine) -> None:
    """Manual dirty-log protection (where KVM offers it): pages the helper writes on every SAVE are never
    write-protected again, and never reported; the guest's pages still are, round after round."""
    if not quiet.dirty_log.manual:
        pytest.skip("KVM offers no manual dirty-log protection here: every fetch re-protects every page")
    lay = quiet.layout
    first_data = lay.wl_data_gpa // abi.PAGE
    helper = range(abi.MH_BASE // abi.PAGE, lay.mh_end // abi.PAGE)
    for pages in ([3, 9], [3], [40]):
        quiet.dirty_log.clear()
        quiet.workload.write_pages(pages)
        dirty = quiet.dirty_log.fetch()
        assert dirty.pages(first_data, lay.npages) == [first_data + p for p in pages]
        assert not set(dirty.pages(helper.start, helper.stop))


def test_encryption_bitmap_follows_the_guest_reports(quiet: Machine) -> None:
    lay = quiet.layout
    shared = lay.wl_data_pages * 250_000 // 1_000_000
    first = lay.wl_data_gpa // abi.PAGE
    enc = quiet.enc_bitmap
    # the fill's one report, and the pvclock page (KVM writes it: shared, as Linux's hv_clock)
    assert enc.shared_pages() == shared + 1 and enc.stats.reports == 2
    assert not enc.is_private(lay.wl_pvclock_gpa // abi.PAGE)
    assert not enc.is_private(first) and not enc.is_private(first + shared - 1)
    assert enc.is_private(first + shared) and enc.is_private(first - 1) and enc.is_private(lay.npages - 1)


def test_self_check_finds_a_corrupted_page(quiet: Machine) -> None:
    lay = quiet.layout
    result = quiet.workload.check()
    assert result.ok and result.checked_pages == lay.wl_data_pages
    page = 1234
    content = quiet.ram.read(lay.data_page_gpa(page), abi.PAGE)
    ledger = quiet.ram.struct_at(abi.LedgerEntry, lay.wl_ledger_gpa + 8 * page)
    assert (ledger.seq & ~abi.LEDGER_SHARED, ledger.csum) == (1, page_csum(content))
    # the ledger's kind bit is the guest's own record of what it reported (here: shared, in the first 25%)
    assert ledger.seq & abi.LEDGER_SHARED
    assert not quiet.enc_bitmap.is_private(lay.data_page_gpa(page) // abi.PAGE)
    assert content == page_fill(quiet.config.seed, page, 1)  # the firmware's generator, bit for bit
    quiet.ram.write(lay.data_page_gpa(page) + 100, b"\xff")
    result = quiet.workload.check()
    assert not result.ok and result.first_bad_page == page and result.checked_pages == page


def test_pause_all_vcpus_except_aux() -> None:
    cfg = MachineConfig(memory=MEM, aux_vcpus=1, workload_kind="dirty-writer")  # unpaced
    with Machine(cfg) as m:
        m.start()
        m.wait_workload(abi.EV_WL_FILLED, timeout=20)
        m.wait_helpers_ready()
        m.pause_all_vcpus_except_aux()
        before = m.workload.progress().pages_written
        m.dirty_log.clear()
        assert m.aux[0].ping(), "the aux vCPU keeps serving while the guest is paused"
        time.sleep(0.1)
        dirty = m.dirty_log.fetch()
        assert m.workload.progress().pages_written == before
        assert dirty.pages(m.layout.wl_base // abi.PAGE, m.layout.npages) == []
        helper = dirty.pages(m.layout.mailbox_gpa(0) // abi.PAGE, m.layout.mh_end // abi.PAGE)
        assert bool(helper) is not m.dirty_log.manual  # the pong, unless the helper's area is kept writable
        m.resume_all_vcpus_except_aux()
        assert until(lambda: m.workload.progress().pages_written > before)
        assert m.workload.check().ok


def test_vcpu_state_round_trip(quiet: Machine) -> None:
    quiet.pause_all_vcpus_except_aux()
    saved = quiet.save_vcpu_states()
    quiet.restore_vcpu_states(saved)
    again = quiet.save_vcpu_states()
    assert again[0].regs == saved[0].regs and again[0].sregs == saved[0].sregs
    assert again[0].fpu == saved[0].fpu and again[0].xcrs == saved[0].xcrs
    assert again[0].xsave == saved[0].xsave and saved[0].xsave[:2] == saved[0].fpu[128:130]  # FCW
    assert saved[0].tsc <= again[0].tsc
    # the interrupt and time state: the LAPIC (its timer programmed), MP state, events, the MSRs
    lvt_timer = (0x20000 | abi.TIMER_VECTOR).to_bytes(4, "little")
    assert saved[0].lapic[0x320:0x324] == again[0].lapic[0x320:0x324] == lvt_timer
    assert again[0].mp_state == saved[0].mp_state == s.KVM_MP_STATE_RUNNABLE and again[0].events
    msrs = dict(again[0].msrs)
    assert msrs == dict(saved[0].msrs)
    assert msrs[abi.MSR_KVM_SYSTEM_TIME_NEW] == quiet.layout.wl_pvclock_gpa | 1
    blob = state_blob(saved[0], time.time())
    assert len(blob) <= abi.VMSA_DATA_BYTES  # an SEV-ES target opens it into a VMSA slot
    assert state_from_blob(blob)[0] == saved[0]
    quiet.resume_all_vcpus_except_aux()
    assert quiet.workload.check().ok


# In the XSAVE area (standard format), the YMM_Hi128 component: the upper halves of ymm0..15.
YMM_HI = slice(576, 576 + 256)
YMM15_HI = slice(576 + 15 * 16, 576 + 16 * 16)
# Where the standard format ends once XCR0 also holds opmask (1088), ZMM_Hi256 (1152), Hi16_ZMM (1664, 1024
# bytes) and PKRU (2688, 8 bytes): the largest area a guest with AVX-512 state enabled can have.
AVX512_XSAVE_END = 2696


def test_state_blob_fits_a_vmsa_slot_with_a_full_avx512_xsave_area(quiet: Machine) -> None:
    """XCR0 grows with AVX-512 on CPUs that have it (cpu_setup.CpuInfo.xcr0): the XSAVE area then runs to
    2696 bytes, and even with none of it zero (a guest using every ZMM and opmask register) the state must
    still fit the VMSA slot the target's helper opens it into. The area's size comes from KVM
    (KVM_CAP_XSAVE2), never from this number: it only sizes the worst case."""
    quiet.pause_all_vcpus_except_aux()
    saved = quiet.save_vcpu_states()[0]
    quiet.resume_all_vcpus_except_aux()
    full = dataclasses.replace(saved, xsave=bytes(range(1, 256)) * (AVX512_XSAVE_END // 255 + 1))
    blob = state_blob(dataclasses.replace(full, xsave=full.xsave[:AVX512_XSAVE_END]), time.time())
    assert len(blob) <= abi.VMSA_DATA_BYTES
    assert state_from_blob(blob)[0].xsave == full.xsave[:AVX512_XSAVE_END]


def test_kept_vector_state_round_trips_through_xsave_and_its_loss_is_seen(quiet: Machine) -> None:
    if not quiet.host.features & abi.FEATURE_BITS["avx"]:
        pytest.skip("this CPU has no AVX: the workload keeps no vector state")
    assert quiet.workload.check().vector == "intact"
    quiet.pause_all_vcpus_except_aux()
    saved = quiet.save_vcpu_states()[0]
    assert any(saved.xsave[YMM15_HI]), "ymm15's upper half holds the workload's pattern"
    quiet.restore_vcpu_states([saved])  # the XSAVE area carries it: still intact after a round trip
    quiet.resume_all_vcpus_except_aux()
    assert quiet.workload.check().vector == "intact"
    # What a migration without XSAVE did: only the FPU/SSE part survives, the upper YMM halves are zero.
    quiet.pause_all_vcpus_except_aux()
    saved = quiet.save_vcpu_states()[0]
    area = bytearray(saved.xsave.ljust(YMM_HI.stop, b"\0"))
    area[YMM_HI] = bytes(256)
    quiet.restore_vcpu_states([dataclasses.replace(saved, xsave=bytes(area))])
    quiet.resume_all_vcpus_except_aux()
    result = quiet.workload.check()
    assert result.vector == "lost" and not result.ok and result.first_bad_page is None


def test_workload_touching_the_helper_area_faults_cleanly() -> None:
    with Machine(MachineConfig(memory=MEM, workload_kind="probe-mh")) as m:
        m.start()
        err = wait_error(m)
    assert isinstance(err, GuestFault)
    assert err.vector == 14 and err.cr2 == abi.SECRET_GPA and err.cs & 3 == 3
    assert "#PF page fault" in err.message and "RIP 0x" in err.message


def test_watchdog_stops_a_spinning_guest() -> None:
    with Machine(MachineConfig(memory=MEM, workload_kind="spin", watchdog_s=0.5)) as m:
        m.start()
        err = wait_error(m)
        assert isinstance(err, GuestError) and "watchdog" in err.message
        with pytest.raises(GuestError):
            m.check()


def test_mh_only_boot_keeps_the_guest_vcpus_paused() -> None:
    cfg = MachineConfig(memory=MEM, aux_vcpus=1, workload_kind="dirty-writer", mh_only=True)
    with Machine(cfg) as m:
        m.start()
        m.wait_helpers_ready()
        assert m.console.wait_for("(mh_only)", timeout=5) is not None
        assert m.events.count(0, abi.EV_WL_STARTED) == 0 and m.workload.progress().pages_written == 0


def test_a_paced_dirty_writer_sleeps_between_bursts_and_keeps_its_rate() -> None:
    """64 MiB/s is 61 us a page: paced page by page that spun on the TSC (no exit at all); in bursts the
    vCPU parks on SLEEP_NS between them, so it exits, and it never writes ahead of its schedule."""
    rate = 64 * abi.MIB
    with Machine(MachineConfig(memory=MEM, workload_kind="dirty-writer", dirty_rate=rate)) as m:
        m.start()
        m.wait_workload(abi.EV_WL_FILLED, timeout=20)
        runner = m.vcpus[0]
        exits, written, started = runner.exits, m.workload.progress().pages_written, time.monotonic()
        time.sleep(0.5)
        exits, written = runner.exits - exits, m.workload.progress().pages_written - written
        elapsed = time.monotonic() - started
        assert exits >= 10  # parks in bursts of ~4 ms (125 in 0.5 s); a spinning writer makes none
        assert 0 < written <= (elapsed * rate / abi.PAGE) * 1.2 + 64  # never ahead of the schedule
        assert m.workload.progress().states == ["running"]


def test_the_lapic_timer_ticks_and_kvm_clock_runs_in_the_guest() -> None:
    """Each workload vCPU programs its LAPIC timer (100 Hz; a CPL0 handler counts the ticks and EOIs) and
    kvm-clock at CPL0, then reads kvm-clock natively once a loop. The helper's vCPUs have interrupts
    masked and no timer."""
    cfg = MachineConfig(memory=MEM, vcpus=2, aux_vcpus=1, dirty_rate=4 * abi.MIB)
    with Machine(cfg) as m:
        aux = m.aux[0].runner.vcpu
        assert not aux.get_regs().rflags & 0x200  # IF clear from the start
        m.start()
        m.wait_workload(abi.EV_WL_FILLED, timeout=20)
        first = m.workload.clock()
        ticks = [int(m.workload.status(i).ticks) for i in range(2)]
        deadline = time.monotonic() + 10
        def ticked() -> bool:
            return all(m.workload.status(i).ticks >= t + 3 for i, t in enumerate(ticks))

        while time.monotonic() < deadline and not ticked():
            time.sleep(0.05)
        later = m.workload.clock()
        assert ticked(), "every vCPU's timer ticks"
        assert later.reads > first.reads and later.monotonic
        # the guest's reading is kvm-clock: never ahead of the VM's clock read after it
        seen = max(int(m.workload.status(i).clock_ns) for i in range(2))
        assert 0 < seen <= m.save_clock().clock_ns
        lvt = int.from_bytes(aux.get_lapic()[0x320:0x324], "little")
        assert lvt & 0x10000  # the helper's LAPIC timer stays masked (its reset state)
        assert m.workload.check().ok


def test_the_guest_measures_its_pause_and_sees_a_clock_set_back() -> None:
    """Pause, then set kvm-clock moved on by the pause: the guest's largest gap is the pause, its clock
    monotonic. Set it back instead: the guest sees time go backwards (the check can fail)."""
    with Machine(MachineConfig(memory=MEM, aux_vcpus=1, dirty_rate=4 * abi.MIB)) as m:
        m.start()
        m.wait_workload(abi.EV_WL_FILLED, timeout=20)
        assert m.workload.wait_clock_read()  # a reading before the pause, for the gap to start from
        m.pause_all_vcpus_except_aux()
        clock = m.save_clock()
        time.sleep(0.2)
        m.restore_clock(clock, time.time())
        m.workload.reset_gap()
        m.resume_all_vcpus_except_aux()
        assert m.workload.wait_clock_read()
        seen = m.workload.clock()
        assert seen.monotonic and seen.max_gap_seconds is not None and 0 < seen.max_gap_seconds < 60
        m.pause_all_vcpus_except_aux()
        m.restore_clock(m.save_clock(), time.time(), offset_ns=-2_000_000_000)
        m.resume_all_vcpus_except_aux()
        assert m.workload.wait_clock_read()
        assert not m.workload.clock().monotonic


def test_a_parked_helper_wakes_on_a_raw_write_to_its_eventfd() -> None:
    """What the core's data loops do (no GIL, no Python): write 1 to the vCPU thread's eventfd. A helper
    parked at its doorbell runs again (its heartbeat moves) and parks again. It parks in its C loop
    (core/helper_run.c): the vCPU thread's Python loop sees none of those exits."""
    with Machine(MachineConfig(memory=MEM, workload_kind="quiet", aux_vcpus=1)) as m:
        m.start()
        m.wait_helpers_ready()
        runner = m.helpers[0].runner
        assert until(lambda: runner.parked)
        beats, exits = m.helpers[0].header.heartbeat, runner.exits
        os.eventfd_write(runner.waker.fd, 1)
        assert until(lambda: m.helpers[0].header.heartbeat > beats)
        assert until(lambda: runner.parked and runner.exits > exits)
        assert runner.state is RunState.RUNNING  # the Python loop is still inside the C loop's call
        m.pause([runner])  # a park in C is cut short by pause, as one in Python is
        assert runner.state is RunState.PAUSED and not runner.parked
        m.resume([runner])
        assert until(lambda: runner.parked)
