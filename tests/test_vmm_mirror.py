"""Helper mode mirror-vm: a second KVM VM on the same RAM runs the migration helper. Small guests
(32 MiB); the KVM tests take about a second together."""

from __future__ import annotations

import errno
import time

import pytest
from waiting import until

from confplan.errors import ConfplanError
from confplan.vmm import Machine, MachineConfig, abi
from confplan.vmm.exits import GuestFault

MEM = 32 * abi.MIB


def mirror_config(**kw: object) -> MachineConfig:
    base: dict[str, object] = {"memory": MEM, "helper_mode": "mirror-vm", "mirror_vcpus": 2}
    base.update(kw)
    return MachineConfig(**base)  # type: ignore[arg-type]


def test_mirror_config_limits() -> None:
    with pytest.raises(ConfplanError, match="17 mirror VM vCPUs"):
        mirror_config(mirror_vcpus=17)
    with pytest.raises(ConfplanError, match="aux_vcpus=1 with helper mode mirror-vm") as err:
        mirror_config(aux_vcpus=1)
    assert err.value.hint == "aux vCPUs exist only in helper mode aux-vcpu"
    assert mirror_config().mh_vcpus == 2 and mirror_config().aux_vcpus == 0


@pytest.mark.kvm
def test_mirror_vm_runs_the_helper_and_the_guest_sees_no_extra_vcpus() -> None:
    with Machine(mirror_config(vcpus=2, workload_kind="quiet")) as m:
        assert m.mirror is not None and m.mirror.vm.fd != m.vm.fd
        m.start()
        m.wait_helpers_ready()
        m.wait_workload(abi.EV_WL_FILLED, timeout=20)
        # The primary VM holds only the guest's vCPUs; the helpers are the mirror VM's, on the aux slots.
        assert [r.index for r in m.vcpus] == [0, 1] and m.aux == []
        helpers = [(h.index, h.mode, h.runner.index) for h in m.helpers]
        assert helpers == [(0, "mirror-vm", 2), (1, "mirror-vm", 3)]
        assert [h.runner.vcpu for h in m.helpers] == m.mirror.vcpus
        assert all(h.ready and h.header.mh_index == h.index for h in m.helpers)
        assert m.console.wait_for("mh: helper vCPU 1 ready", timeout=1) is not None
        bp = m.ram.struct_at(abi.BootParams, abi.BOOT_PARAMS_GPA)
        assert bp.nr_vcpus == 2 and list(bp.cpu_table[:3]) == [0, 1, 0] and bp.mh_vcpus == 2
        assert m.console.wait_for("on 2 vCPUs", timeout=1) is not None
        written = [m.workload.status(i).pages_written for i in range(4)]
        assert written == [len(m.layout.partition(0)), len(m.layout.partition(1)), 0, 0]
        # pong is written by the mirror VM's vCPU and read here through the primary's RAM mapping
        assert all(h.ping() for h in m.helpers)
        # No SEV context to share on this host: KVM refuses the copy, and the machine records why.
        err = m.mirror.enc_context_error
        assert err is not None and err.errno == errno.EINVAL and "not an SEV VM" in m.mirror.enc_context
    assert m.mirror.vm.fd == -1 and all(v.fd == -1 for v in m.mirror.vcpus)  # close() covered it


@pytest.mark.kvm
def test_pausing_the_guest_leaves_the_mirror_vm_running() -> None:
    with Machine(mirror_config(mirror_vcpus=1, workload_kind="dirty-writer")) as m:  # unpaced writer
        m.start()
        m.wait_workload(abi.EV_WL_FILLED, timeout=20)
        m.wait_helpers_ready()
        m.pause_all_vcpus_except_aux()
        before = m.workload.progress().pages_written
        m.dirty_log.clear()
        beats = m.helpers[0].header.heartbeat
        assert m.helpers[0].ping() and m.helpers[0].ping(), "the mirror VM serves while the guest is paused"
        assert m.helpers[0].header.heartbeat > beats
        time.sleep(0.05)
        assert m.workload.progress().pages_written == before
        assert m.dirty_log.fetch().pages(m.layout.wl_base // abi.PAGE, m.layout.npages) == []
        m.resume_all_vcpus_except_aux()
        assert until(lambda: m.workload.progress().pages_written > before)
        assert m.workload.check().ok


@pytest.mark.kvm
def test_a_fault_on_the_mirror_vm_stops_the_machine() -> None:
    with Machine(mirror_config(mirror_vcpus=1, workload_kind="quiet")) as m:
        m.write(m.firmware.sym("mh_entry"), b"\x0f\x0b")  # ud2: the helper faults at its first instruction
        m.start()
        deadline = time.monotonic() + 10
        while m.error is None and time.monotonic() < deadline:
            time.sleep(0.02)
        err = m.error
        assert isinstance(err, GuestFault), err
        # reported by the mirror VM's own CPL0 handler (its IDT, TSS and CPL0 stack slot work)
        assert err.vcpu == 1 and err.vector == 6 and err.rip == m.firmware.sym("mh_entry")
        with pytest.raises(GuestFault):
            m.wait_helpers_ready(timeout=1)
