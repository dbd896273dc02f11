"""The only ctypes/ioctl layer of confplan: KVM constants and structs, and ``Kvm``, ``Vm``, ``Vcpu``."""

from confplan.kvm._ioctl import KvmError
from confplan.kvm.fds import DEFAULT_KVM_PATH, Kvm, Vcpu, Vm, open_kvm_fd
from confplan.kvm.stats import StatsFd

__all__ = ["DEFAULT_KVM_PATH", "Kvm", "KvmError", "StatsFd", "Vcpu", "Vm", "open_kvm_fd"]
