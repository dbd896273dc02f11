"""The built-in KVM VMM: ``Machine`` (a running guest) and ``MachineConfig``."""

from confplan.vmm.config import MachineConfig
from confplan.vmm.machine import Machine

__all__ = ["Machine", "MachineConfig"]
