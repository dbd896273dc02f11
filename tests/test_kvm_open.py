"""Opening /dev/kvm: a clear message where it is missing; the real device where it works."""

from __future__ import annotations

from pathlib import Path

import pytest

from confplan.errors import EnvironmentProblem
from confplan.kvm import Kvm, KvmError
from confplan.kvm import structs as s


def test_missing_device_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(EnvironmentProblem) as err:
        Kvm(str(tmp_path / "kvm"))
    text = err.value.render()
    assert "does not exist" in text and "CONFIG_KVM" in text
    assert err.value.exit_code == 3


def test_unopenable_device_is_reported(tmp_path: Path) -> None:
    (tmp_path / "kvm").write_text("")
    with pytest.raises((EnvironmentProblem, KvmError)):
        Kvm(str(tmp_path / "kvm"))  # a plain file: the API-version ioctl fails


@pytest.mark.kvm
def test_kvm_vm_vcpu_lifecycle() -> None:
    with Kvm() as kvm:
        assert kvm.check_extension(s.KVM_CAP_USER_MEMORY) > 0
        assert kvm.supported_cpuid().nent > 0
        with kvm.create_vm() as vm:
            vcpu = vm.create_vcpu(0)
            try:
                assert vcpu.tsc_khz() > 0
                assert vcpu.get_regs().rip == 0xFFF0  # reset vector
                with vcpu.stats() as stats:
                    assert "exits" in stats.names and stats.read("exits")["exits"] == 0
            finally:
                vcpu.close()
            with pytest.raises(KvmError, match="KVM_CREATE_VCPU"):
                vm.create_vcpu(-1)
