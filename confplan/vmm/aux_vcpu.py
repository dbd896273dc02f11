"""Helper vCPUs: the vCPUs that run the migration helper (MH), whatever the helper mode.

- aux-vcpu: extra vCPUs of the guest's own VM (the seed's "auxcpus"), which the workload is never told
  about (its CPU table in the boot parameters leaves them out, as the seed leaves them out of ACPI).
- mirror-vm: the vCPUs of a second KVM VM mapping the same RAM (``mirror_vm.MirrorVm``).
Either way each starts at ``mh_entry`` with the helper's page tables and owns one mailbox; the migration
code sees only ``HelperVcpu`` (``Machine.helpers``) and never needs to know the mode.
"""

from __future__ import annotations

import time
from typing import Literal

from confplan.vmm import abi
from confplan.vmm.layout import GuestLayout
from confplan.vmm.memory import GuestRam
from confplan.vmm.vcpu_thread import VcpuRunner

HelperHost = Literal["aux-vcpu", "mirror-vm"]


class HelperVcpu:
    """One MH vCPU and its mailbox control page (header fields in ``abi.MailboxHeader``). ``index`` is
    the MH index (mailbox number), ``runner.index`` the KVM vCPU id."""

    def __init__(
        self,
        runner: VcpuRunner,
        ram: GuestRam,
        layout: GuestLayout,
        mh_index: int,
        mode: HelperHost = "aux-vcpu",
    ) -> None:
        self.runner = runner
        self.mh_index = mh_index
        self.mode: HelperHost = mode
        self.control_gpa = layout.mailbox_gpa(mh_index)
        self.data_gpa = self.control_gpa + abi.PAGE
        self.header = ram.struct_at(abi.MailboxHeader, self.control_gpa)

    @property
    def index(self) -> int:
        return self.mh_index

    @property
    def ready(self) -> bool:
        return bool(self.header.magic == abi.MB_MAGIC and self.header.state != 0)

    def kick(self) -> None:
        """Wake the helper from its idle doorbell (it then looks at its mailbox)."""
        self.runner.kick()

    def ping(self, timeout: float = 5.0) -> bool:
        """Bump ``ping``, kick the helper out of its idle doorbell, wait for it to echo ``pong``."""
        want = self.header.ping + 1
        self.header.ping = want
        self.kick()
        start = time.monotonic()
        while self.header.pong != want:
            waited = time.monotonic() - start
            if waited > timeout:
                return False
            time.sleep(0 if waited < 0.002 else 0.0005)  # an exit takes ~50 us: yield, then back off
        return True


AuxVcpu = HelperVcpu  # the name the aux-vCPU-only code used
