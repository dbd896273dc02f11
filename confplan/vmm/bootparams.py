"""The boot-parameters page (``struct cp_boot_params`` at 0x4000) as bytes, from a config alone.

A pure function, so the exact page the VMM writes (and, in a measured launch, measures) can be computed
without booting: an orchestrator or the guest owner predicts the launch digest from the same bytes. The
only host facts in it are in ``HostCpu``, which the caller passes in (``HostCpu.probe`` asks KVM).
"""

from __future__ import annotations

from dataclasses import dataclass

from confplan.kvm import Kvm
from confplan.vmm import abi, cpu_setup
from confplan.vmm.config import MachineConfig
from confplan.vmm.layout import GuestLayout


@dataclass(frozen=True)
class HostCpu:
    """What the boot parameters take from the host: CPL3 code can neither read MSRs nor trust CPUID."""

    tsc_khz: int
    features: int  # abi.FEATURE_BITS learnt from KVM_GET_SUPPORTED_CPUID
    vendor_amd: bool

    @classmethod
    def probe(cls, kvm_path: str | None = None) -> HostCpu:
        """Ask this host's KVM (a throwaway VM and vCPU, for KVM_GET_TSC_KHZ)."""
        with Kvm(kvm_path) as kvm, kvm.create_vm() as vm:
            info = cpu_setup.cpu_info(kvm.supported_cpuid())
            vcpu = vm.create_vcpu(0)
            try:
                return cls(tsc_khz=vcpu.tsc_khz(), features=info.features, vendor_amd=info.vendor_amd)
            finally:
                vcpu.close()


# KVM's in-kernel LAPIC counts at 1 GHz (APIC_BUS_CYCLE_NS = 1 unless KVM_CAP_X86_APIC_BUS_CYCLES_NS changes
# it); the guest's timer divides by 1, so the initial count is nanoseconds per tick.
LAPIC_BUS_HZ = 1_000_000_000


def timer_count(timer_hz: int) -> int:
    """The LAPIC timer's initial count for ``timer_hz`` ticks a second (0: no timer)."""
    return LAPIC_BUS_HZ // timer_hz if timer_hz else 0


def boot_params(config: MachineConfig, layout: GuestLayout, host: HostCpu) -> abi.BootParams:
    bp = abi.BootParams()
    bp.magic, bp.version = abi.BP_MAGIC, abi.ABI_VERSION
    bp.flags = (
        (abi.BP_FLAG_MH_ONLY if config.mh_only else 0)
        | (abi.BP_FLAG_ENC_HYPERCALL if config.enc_channel == "hypercall" else 0)
        | (abi.BP_FLAG_VENDOR_AMD if host.vendor_amd else 0)
        | (abi.BP_FLAG_SNP if config.snp else 0)
    )
    bp.ram_bytes, bp.tsc_khz = config.memory, host.tsc_khz
    # config.crypto_impl caps the helper's AES-GCM here, in the page itself, so a predicted launch digest
    # (expected_launch_digest) sees the same word the guest gets.
    bp.cpu_features = cpu_setup.cap_for_crypto(host.features, config.crypto_impl)
    bp.owner_key[:] = bytes.fromhex(config.owner_key) if config.snp else bytes(32)
    # The guest's own vCPUs only: helper vCPUs (aux or mirror VM) stay invisible to it. Nothing here
    # says which helper mode runs: the MH reads the same fields either way.
    bp.nr_vcpus = config.vcpus
    for i in range(config.vcpus):
        bp.cpu_table[i] = i
    bp.mmio_console, bp.mmio_doorbell, bp.mmio_encstatus = (
        abi.MMIO_CONSOLE,
        abi.MMIO_DOORBELL,
        abi.MMIO_ENCSTATUS,
    )
    bp.mmio_fault, bp.mmio_mailbox = abi.MMIO_FAULT, abi.MMIO_MAILBOX
    bp.mh_base, bp.mh_size, bp.secret_gpa = abi.MH_BASE, layout.mh_end - abi.MH_BASE, abi.SECRET_GPA
    bp.mailbox_gpa, bp.mailbox_stride = abi.MAILBOX_GPA, layout.mailbox_stride
    bp.mh_vcpus, bp.batch_pages = layout.mh_vcpus, config.batch_pages
    bp.mh_shared_gpa, bp.mh_ctx_gpa = layout.mh_shared_gpa, layout.mh_ctx_gpa
    bp.mh_ctx_stride = abi.MH_CTX_STRIDE
    bp.mh_gen_gpa, bp.mh_gen_entries = layout.mh_gen_gpa, layout.mh_gen_entries
    bp.mh_mac_gpa, bp.mh_mac_entries = layout.mh_mac_gpa, layout.npages
    bp.mh_vmsa_gpa, bp.mh_vmsa_slots = layout.mh_vmsa_gpa, config.vcpus
    bp.wl_base, bp.wl_size = layout.wl_base, layout.ram_top - layout.wl_base
    bp.wl_ctl_gpa, bp.wl_stack_gpa = layout.wl_ctl_gpa, layout.wl_stack_gpa
    bp.wl_stack_size = layout.wl_stack_top(0) - layout.wl_stack_gpa
    bp.wl_ledger_gpa, bp.wl_data_gpa, bp.wl_data_pages = (
        layout.wl_ledger_gpa,
        layout.wl_data_gpa,
        layout.wl_data_pages,
    )
    bp.wl_kind, bp.wl_shared_ppm = config.wl_kind, round(config.shared_fraction * 1_000_000)
    bp.wl_rate_bps = 0 if config.dirty_rate is None else max(1, int(config.dirty_rate))
    bp.wl_seed = config.seed & ((1 << 64) - 1)
    bp.wl_conv_rate = round(config.conversion_rate)
    bp.wl_pvclock_gpa = layout.wl_pvclock_gpa
    bp.timer_count = timer_count(config.timer_hz)
    bp.ram_top, bp.wl_data_low_pages = layout.ram_top, layout.wl_data_low_pages
    _write_e820(bp, layout)
    return bp


def e820_map(layout: GuestLayout) -> list[tuple[int, int, int]]:
    """The guest-physical map as (addr, size, type), by address: RAM, and the hole under 4 GiB reserved
    (the MMIO window, the xAPIC page) when RAM goes on above it; what a BIOS's e820 tells an OS."""
    ranges = layout.ram_ranges()
    entries = [(start, end - start, abi.E820_RAM) for start, end in ranges]
    if len(ranges) > 1:
        entries.insert(1, (abi.RAM_HOLE_START, abi.RAM_HOLE_END - abi.RAM_HOLE_START, abi.E820_RESERVED))
    return entries


def _write_e820(bp: abi.BootParams, layout: GuestLayout) -> None:
    entries = e820_map(layout)
    bp.e820_count = len(entries)
    for i, (addr, size, kind) in enumerate(entries):
        bp.e820[i].addr, bp.e820[i].size, bp.e820[i].type = addr, size, kind


def boot_params_page(config: MachineConfig, layout: GuestLayout, host: HostCpu) -> bytes:
    """The whole 4 KiB page at ``abi.BOOT_PARAMS_GPA``, zero after the struct."""
    raw = bytes(memoryview(boot_params(config, layout, host)).cast("B"))
    assert len(raw) <= abi.PAGE
    return raw.ljust(abi.PAGE, b"\x00")
