"""The source's dirty log goes on when a migration begins, after its helper has read guest RAM once
(mailbox WARM, v8): KVM write-protects what is mapped but keeps it mapped, so the helper reads RAM under
the log with almost no page faults. A helper that first reads RAM under the log faults about once per page
(KVM maps 4 KiB at a time while it logs; on kvm_pvm's shadow MMU each fault is a VM exit). Counted by KVM's
own statistics (``pf_fixed`` of the helper vCPUs), not by time; and the log still sees every write."""

from __future__ import annotations

import array
import dataclasses
import os
from collections.abc import Iterator

import pytest
from launcher import Launcher, move_sealed

from confplan.migration.helper import helper_mailboxes, open_mailboxes
from confplan.migration.mailbox_layout import MhStatus, Op
from confplan.migration.mailbox_set import MailboxSet
from confplan.vmm import Machine, MachineConfig, abi

pytestmark = pytest.mark.kvm


@pytest.fixture
def source() -> Iterator[tuple[Machine, MailboxSet]]:
    with Machine(MachineConfig(memory=64 * abi.MIB, workload_kind="quiet", aux_vcpus=2)) as m:
        m.start()
        m.wait_workload(abi.EV_WL_FILLED, timeout=20)
        m.wait_helpers_ready()
        mailboxes = helper_mailboxes(m)
        assert mailboxes is not None
        yield m, mailboxes


def helper_faults(m: Machine) -> int:
    total = 0
    for helper in m.helpers:
        with helper.runner.vcpu.stats() as stats:
            total += stats.read("pf_fixed")["pf_fixed"]
    return total


def faults_reading_ram(m: Machine, mailboxes: MailboxSet) -> int:
    before = helper_faults(m)
    assert mailboxes.warm(0, m.layout.npages) > m.layout.npages // 2
    return helper_faults(m) - before


def test_the_log_is_off_until_a_migration_turns_it_on(source: tuple[Machine, MailboxSet]) -> None:
    m, _ = source
    assert not m.dirty_log.started
    with pytest.raises(RuntimeError, match="dirty log is off"):
        m.dirty_log.fetch()


def test_a_helper_that_read_ram_before_the_log_reads_it_under_the_log_without_faults(
    source: tuple[Machine, MailboxSet],
) -> None:
    m, mailboxes = source
    faults_reading_ram(m, mailboxes)  # WARM, as a migration's start does
    m.dirty_log.clear()  # the log on
    assert faults_reading_ram(m, mailboxes) < m.layout.npages // 64
    # the pages the workload wrote before (mapped writable then) are write-protected: every write is seen
    first = m.layout.wl_data_gpa // abi.PAGE
    m.workload.write_pages([0, 7, 300])
    assert m.dirty_log.fetch().pages(first, m.layout.npages) == [first, first + 7, first + 300]


def test_a_helper_that_reads_ram_first_under_the_log_faults_about_once_a_page(
    source: tuple[Machine, MailboxSet],
) -> None:
    m, mailboxes = source
    m.dirty_log.clear()
    assert faults_reading_ram(m, mailboxes) > m.layout.npages // 8


def test_a_huge_warm_reads_a_page_per_2_mib_and_maps_them_all(source: tuple[Machine, MailboxSet]) -> None:
    """(v9) Where the host holds guest RAM on huge pages, WARM reads one page per 2 MiB page of the helper's
    view (the low 2 MiB, mapped 4 KiB at a time, page by page) and the helper then reads all of RAM under
    the log with as few faults as after a WARM of every page."""
    m, mailboxes = source
    if not m.ram.on_huge_pages():
        pytest.skip("the host holds this guest's RAM on 4 KiB pages (or cannot say): WARM reads every page")
    before = helper_faults(m)
    read = mailboxes.warm(0, m.layout.npages, huge=True)
    assert 0 < read <= 512 + m.layout.npages // 512
    assert helper_faults(m) - before > (m.layout.npages - 512) // 512 // 2  # it did map 2 MiB pages
    m.dirty_log.clear()  # the log on
    assert faults_reading_ram(m, mailboxes) < m.layout.npages // 64


def test_warm_refuses_flags_it_does_not_know(source: tuple[Machine, MailboxSet]) -> None:
    _, mailboxes = source
    mb = mailboxes.mailboxes[0]
    assert mb.wait(Op.WARM, mb.post(Op.WARM, count=4, arg0=0, arg1=16)) == MhStatus.COUNT


def _move_all(src: Machine, dst: Machine) -> int:
    """Every guest page moved from the source to the target (``move_sealed``); the target helpers' page
    faults meanwhile."""
    smb, dmb = open_mailboxes(src), open_mailboxes(dst)
    smb.init()
    dmb.init()
    mask = src.layout.guest_page_mask()
    gpas = array.array("Q", (i * abi.PAGE for i in range(src.layout.npages) if mask >> i & 1))
    before = helper_faults(dst)
    move_sealed(smb, dmb, gpas, 1, src.ram.top)
    return helper_faults(dst) - before


@pytest.mark.parametrize("write", [False, True])
def test_a_target_that_warmed_for_writing_loads_without_faults(launcher: Launcher, write: bool) -> None:
    """(v9) A read WARM maps a target's view read-only, so its LOADs still fault once per 2 MiB page; a WARM
    with WRITE (a locked OR of zero: the bytes stay) maps it for writing, and they do not."""
    key, mig = bytes(range(32)), os.urandom(16)
    cfg = MachineConfig(memory=64 * abi.MIB, workload_kind="quiet", aux_vcpus=2, batch_pages=256,
                        measured_launch=True)  # fmt: skip
    src = launcher.boot(cfg, key, mig)
    dst = launcher.boot(dataclasses.replace(cfg, mh_only=True), key, mig)
    src.wait_workload(abi.EV_WL_FILLED)
    src.pause_all_vcpus_except_aux()
    gpa = dst.layout.wl_data_gpa + 5 * abi.PAGE
    dst.ram.write(gpa, b"kept")
    mailboxes = open_mailboxes(dst)
    assert mailboxes.warm(0, dst.layout.npages, huge=dst.ram.on_huge_pages(), write=write) > 0
    assert dst.ram.read(gpa, 4) == b"kept"
    faults = _move_all(src, dst)
    assert (faults < 8) if write else (faults > (dst.layout.npages - 512) // 512 // 2)


def test_only_a_target_warms_for_writing(source: tuple[Machine, MailboxSet]) -> None:
    _, mailboxes = source
    mb = mailboxes.mailboxes[0]
    assert mb.wait(Op.WARM, mb.post_warm(0, 16, write=True)) == MhStatus.SIDE
