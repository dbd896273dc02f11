"""Auxiliary vCPUs (the seed's "auxcpus"): extra vCPUs of the same VM that start at the migration
helper's entry with the helper's page tables, and that the workload is never told about (its CPU table
in the boot parameters leaves them out, as the seed leaves them out of the ACPI tables)."""

from __future__ import annotations

import time

from confplan.vmm import abi
from confplan.vmm.layout import GuestLayout
from confplan.vmm.memory import GuestRam
from confplan.vmm.vcpu_thread import VcpuRunner


class AuxVcpu:
    """One helper vCPU and its mailbox control page (header fields in ``abi.MailboxHeader``)."""

    def __init__(self, runner: VcpuRunner, ram: GuestRam, layout: GuestLayout, mh_index: int) -> None:
        self.runner = runner
        self.mh_index = mh_index
        self.control_gpa = layout.mailbox_gpa(mh_index)
        self.data_gpa = self.control_gpa + abi.PAGE
        self.header = ram.struct_at(abi.MailboxHeader, self.control_gpa)

    @property
    def ready(self) -> bool:
        return bool(self.header.magic == abi.MB_MAGIC and self.header.state != 0)

    def ping(self, timeout: float = 5.0) -> bool:
        """Bump ``ping``, kick the helper out of its idle doorbell, wait for it to echo ``pong``."""
        want = self.header.ping + 1
        self.header.ping = want
        self.runner.kick()
        start = time.monotonic()
        while self.header.pong != want:
            waited = time.monotonic() - start
            if waited > timeout:
                return False
            time.sleep(0 if waited < 0.002 else 0.0005)  # an exit takes ~50 us: yield, then back off
        return True
