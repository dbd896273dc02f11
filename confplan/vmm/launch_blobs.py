"""The measured blobs of a confplan guest's launch, computed from its config alone (no KVM, no Machine).

``launch_blobs`` lists, in their fixed measured order: 1. the firmware image at ``abi.FW_BASE``, zero-padded
to 16 bytes; 2. the whole 4 KiB boot-parameters page at ``abi.BOOT_PARAMS_GPA``; 3. the CPU tables the VMM
writes for the firmware (GDT, TSSs, IDT and both sets of page tables), whole pages, one blob per run of pages,
in GPA order. The tables are measured because they decide what each ring may map: a host that mapped the
secret page into the workload's page tables would change the digest. An unmeasured boot writes the same bytes.
``expected_launch_digest`` is what an orchestrator or the owner predicts for a config (a migration target
differs by its mh_only flag); an SNP launch measures the same blobs as whole pages, then its SECRETS page.
"""

from __future__ import annotations

from dataclasses import dataclass

from confplan.sev import launch_crypto, snp
from confplan.sev.psp import ALIGN
from confplan.vmm import abi, tables
from confplan.vmm.bootparams import HostCpu, boot_params_page
from confplan.vmm.config import MachineConfig
from confplan.vmm.firmware import Firmware
from confplan.vmm.layout import GuestLayout


@dataclass(frozen=True)
class LaunchBlob:
    """One LAUNCH_UPDATE_DATA: ``data`` is exactly what lands at ``gpa`` and what is measured."""

    name: str
    gpa: int
    data: bytes


def pad16(data: bytes) -> bytes:
    return data + b"\x00" * (-len(data) % ALIGN)


class _PageSink:
    """Collects the table writers' stores as whole zero-filled pages (``tables.GuestWrites``)."""

    def __init__(self) -> None:
        self.pages: dict[int, bytearray] = {}

    def write(self, gpa: int, data: bytes) -> None:
        done = 0
        while done < len(data):
            at = gpa + done
            page = self.pages.setdefault(at // abi.PAGE, bytearray(abi.PAGE))
            n = min(len(data) - done, abi.PAGE - at % abi.PAGE)
            page[at % abi.PAGE : at % abi.PAGE + n] = data[done : done + n]
            done += n


def cpu_table_blobs(config: MachineConfig, layout: GuestLayout, firmware: Firmware) -> list[LaunchBlob]:
    """The CPU tables for this config as whole pages, one blob per run of consecutive pages."""
    sink = _PageSink()
    slots = config.vcpus + config.mh_vcpus  # the guest's vCPUs, then one per helper vCPU
    tables.write_gdt_and_tss(sink, slots)
    tables.write_idt(sink, firmware)
    tables.write_page_tables(sink, layout, firmware, slots)
    blobs: list[LaunchBlob] = []
    for number in sorted(sink.pages):
        data = bytes(sink.pages[number])
        last = blobs[-1] if blobs else None
        if last is not None and last.gpa + len(last.data) == number * abi.PAGE:
            blobs[-1] = LaunchBlob(last.name, last.gpa, last.data + data)
        else:
            blobs.append(LaunchBlob("cpu-tables", number * abi.PAGE, data))
    return blobs


def launch_blobs(config: MachineConfig, firmware: Firmware, host: HostCpu) -> list[LaunchBlob]:
    """The measured blobs in their measured order (also what an unmeasured boot writes, byte for byte)."""
    layout = GuestLayout.for_config(config)
    return [
        LaunchBlob("firmware", abi.FW_BASE, pad16(firmware.image)),
        LaunchBlob("boot-params", abi.BOOT_PARAMS_GPA, boot_params_page(config, layout, host)),
        *cpu_table_blobs(config, layout, firmware),
    ]


def snp_launch_digest(blobs: list[LaunchBlob]) -> bytes:
    """The SEV-SNP launch digest of ``blobs`` (page type NORMAL, whole pages) then the SECRETS page at
    ``abi.SECRET_GPA``: the order ``sev_launch.SnpLaunch`` feeds SNP_LAUNCH_UPDATE."""
    digest = snp.SnpLaunchDigest()
    for blob in blobs:
        digest.update_region(blob.gpa, blob.data, snp.PageType.NORMAL)
    digest.update_region(abi.SECRET_GPA, b"", snp.PageType.SECRETS)
    return digest.digest


def expected_launch_digest(config: MachineConfig, firmware: Firmware, host: HostCpu) -> bytes:
    """The launch digest the secure processor will hold for this config (no KVM needed): SHA-256 over
    the blobs for SEV/SEV-ES, the SHA-384 page chain for SEV-SNP (``config.snp``)."""
    blobs = launch_blobs(config, firmware, host)
    if config.snp:
        return snp_launch_digest(blobs)
    return launch_crypto.sev_launch_digest([b.data for b in blobs])
