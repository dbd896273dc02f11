"""The only ctypes/ioctl layer of confplan: KVM constants and structs, and ``Kvm``, ``Vm``, ``Vcpu``."""

from confplan.kvm._ioctl import KvmError
from confplan.kvm.fds import (
    DEFAULT_KVM_PATH,
    KVM_DEVICE_ENV,
    Kvm,
    Vcpu,
    Vm,
    kvm_device_path,
    open_kvm_fd,
    probe_kvm,
)
from confplan.kvm.stats import StatsFd

__all__ = [
    "DEFAULT_KVM_PATH", "KVM_DEVICE_ENV", "Kvm", "KvmError", "StatsFd", "Vcpu", "Vm", "kvm_device_path",
    "open_kvm_fd", "probe_kvm",
]  # fmt: skip
