"""``MachineConfig``: everything the VMM needs to boot a guest, independent of the plan models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from confplan.errors import ConfplanError
from confplan.vmm import abi

HelperMode = Literal["aux-vcpu", "mirror-vm", "none"]
EncChannel = Literal["mmio", "hypercall"]
# The fastest AES-GCM implementation the helper may pick (cpu_setup.cap_for_crypto); "auto": the CPU's best.
CryptoImpl = Literal["auto", "vaes512", "vaes", "aes-ni", "portable"]
CRYPTO_IMPLS: tuple[str, ...] = get_args(CryptoImpl)


@dataclass(frozen=True)
class MachineConfig:
    """One guest. ``dirty_rate`` is bytes/s, None = unlimited; ``shared_fraction`` of the workload's
    pages is reported shared; ``conversion_rate``: pages per second the workload converts between private
    and shared while it runs (0: none after its fill); ``mh_only`` boots only the helper vCPUs (a target);
    ``prefault`` allocates all guest RAM at creation; ``dirty_logging`` off: no dirty log (cannot send).
    ``mirror_vcpus``: the mirror VM's vCPUs in helper mode mirror-vm. ``measured_launch``: the firmware and
    boot parameters are placed by the secure processor's LAUNCH_UPDATE_DATA (``sev_launch``), and no vCPU
    starts before LAUNCH_FINISH; with ``snp`` that launch is SEV-SNP's (``sev_launch.SnpLaunch``: a SECRETS
    page, the key released later against a report, docs/key-release.md) and ``owner_key`` (hex) is the
    owner's static X25519 public key, measured in the boot parameters: the helper opens only what its holder
    wrapped. ``timer_hz``: the LAPIC timer each workload vCPU programs (0: none;
    kvm-clock runs either way). ``crypto_impl``: a ceiling on the helper's AES-GCM implementation (the
    feature word in the boot parameters loses the bits above it), so a bench or test can run the AES-NI
    path the way a CPU without VAES would; "auto" passes everything the CPU has."""

    memory: int = 64 * abi.MIB
    vcpus: int = 1
    aux_vcpus: int = 0
    workload_kind: str = "dirty-writer"
    dirty_rate: float | None = None
    shared_fraction: float = 0.0
    conversion_rate: float = 0.0
    seed: int = 1
    helper_mode: HelperMode = "aux-vcpu"
    batch_pages: int = 64
    mirror_vcpus: int = 1
    mh_only: bool = False
    prefault: bool = False
    enc_channel: EncChannel = "mmio"
    measured_launch: bool = False
    snp: bool = False
    owner_key: str = ""
    dirty_logging: bool = True
    timer_hz: int = 100
    crypto_impl: CryptoImpl = "auto"
    watchdog_s: float | None = 10.0
    console_echo: bool = False
    console_log: str | None = None

    def __post_init__(self) -> None:
        self._check()

    @property
    def wl_kind(self) -> int:
        return abi.WORKLOAD_KINDS[self.workload_kind]

    @property
    def mh_vcpus(self) -> int:
        """Helper vCPUs that get a mailbox: the aux vCPUs, or the mirror VM's vCPUs."""
        if self.helper_mode == "aux-vcpu":
            return self.aux_vcpus
        return self.mirror_vcpus if self.helper_mode == "mirror-vm" else 0

    def _check(self) -> None:
        where = "machine config"
        if self.snp and not (self.measured_launch and len(bytes.fromhex(self.owner_key)) == 32):
            raise ConfplanError(
                f"{where}: an SNP guest without a measured launch or the owner's 32-byte key",
                hint="build it with measured_launch=True and owner_key (the owner's X25519 public key, hex)",
            )
        if self.workload_kind not in abi.WORKLOAD_KINDS:
            kinds = ", ".join(abi.WORKLOAD_KINDS)
            raise ConfplanError(
                f"{where}: unknown workload kind {self.workload_kind!r}", hint=f"use one of {kinds}"
            )
        helpers = "mirror VM vCPUs" if self.helper_mode == "mirror-vm" else "aux vCPUs"
        if not self.vcpus >= 1 or self.vcpus + self.mh_vcpus > abi.MAX_VCPUS:
            raise ConfplanError(
                f"{where}: {self.vcpus} vCPUs + {self.mh_vcpus} {helpers}",
                hint=f"use at least 1 vCPU and at most {abi.MAX_VCPUS} vCPUs in total (helpers included)",
            )
        if self.mh_vcpus > abi.MAX_MH_VCPUS:
            raise ConfplanError(f"{where}: {self.mh_vcpus} {helpers}", hint=f"use at most {abi.MAX_MH_VCPUS}")
        if self.helper_mode == "mirror-vm" and self.mirror_vcpus < 1:
            raise ConfplanError(
                f"{where}: mirror_vcpus={self.mirror_vcpus} in helper mode mirror-vm",
                hint="give the mirror VM at least one vCPU",
            )
        if self.helper_mode != "aux-vcpu" and self.aux_vcpus:
            raise ConfplanError(
                f"{where}: aux_vcpus={self.aux_vcpus} with helper mode {self.helper_mode}",
                hint="aux vCPUs exist only in helper mode aux-vcpu",
            )
        if self.memory % abi.HUGE or self.memory > abi.MAX_RAM:
            size = f"{self.memory / abi.MIB:g} MiB" if self.memory >= abi.MIB else f"{self.memory} bytes"
            raise ConfplanError(
                f"{where}: memory {size} is not a multiple of 2 MiB of at most the "
                f"{abi.MAX_RAM // abi.MIB} MiB this VMM supports",
                hint=f"use a multiple of 2 MiB, at most {abi.MAX_RAM // abi.MIB} MiB",
            )
        if not 0.0 <= self.shared_fraction <= 1.0:
            raise ConfplanError(
                f"{where}: shared_fraction {self.shared_fraction}", hint="use a value in [0, 1]"
            )
        if self.dirty_rate is not None and self.dirty_rate <= 0:
            raise ConfplanError(
                f"{where}: dirty_rate {self.dirty_rate}", hint="use a positive rate or unlimited"
            )
        if not 0.0 <= self.conversion_rate <= 1e6:
            raise ConfplanError(
                f"{where}: conversion_rate {self.conversion_rate}", hint="use 0 to 1000000 pages per second"
            )
        if not 0 <= self.timer_hz <= 1000:
            raise ConfplanError(f"{where}: timer_hz {self.timer_hz}", hint="use 0 (no timer) to 1000")
        if self.crypto_impl not in CRYPTO_IMPLS:
            impls = ", ".join(CRYPTO_IMPLS)
            raise ConfplanError(f"{where}: crypto_impl {self.crypto_impl!r}", hint=f"use one of {impls}")
        if not 1 <= self.batch_pages <= 4096:
            raise ConfplanError(f"{where}: batch_pages {self.batch_pages}", hint="use 1..4096")
