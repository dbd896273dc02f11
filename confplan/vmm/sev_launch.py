"""The measured SEV launch of a ``Machine``, on the EMULATED secure processor of ``confplan.sev``.

Before any vCPU runs: LAUNCH_START (policy, the owner's GODH cert and session blob), LAUNCH_UPDATE_DATA over
``launch_blobs`` in their fixed order (1. the firmware image at ``abi.FW_BASE``, zero-padded to 16 bytes;
2. the whole 4 KiB boot-parameters page at ``abi.BOOT_PARAMS_GPA``; 3. the CPU tables the VMM writes for
the firmware: GDT, TSSs, IDT and both sets of page tables, whole pages, one blob per run of pages, in GPA
order), LAUNCH_MEASURE. The tables are measured because they decide what each ring may map: a host that
mapped the secret page into the workload's page tables would change the digest. The caller hands the
measurement to the owner's broker and passes its LAUNCH_SECRET packet back; the secure processor decrypts
it into the secret page (``abi.SECRET_GPA``), then LAUNCH_FINISH, and only then may ``Machine.start`` run.

``expected_launch_digest`` computes the digest from a config without booting, from the same bytes, so an
orchestrator or the owner can predict what to allow (a migration target differs by its mh_only flag).
The VMM never reads the secret page: ``Machine.read``/``view`` refuse it; only the MH maps it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from confplan.errors import ConfplanError
from confplan.sev import launch_crypto
from confplan.sev.launch_crypto import PlatformVersion
from confplan.sev.psp import ALIGN, EmulatedSecureProcessor, GuestState, SevGuest
from confplan.vmm import abi, tables
from confplan.vmm.bootparams import HostCpu, boot_params_page
from confplan.vmm.config import MachineConfig
from confplan.vmm.firmware import Firmware
from confplan.vmm.layout import GuestLayout

if TYPE_CHECKING:
    from confplan.sev.broker import KeyBroker
    from confplan.vmm.machine import Machine


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


def expected_launch_digest(config: MachineConfig, firmware: Firmware, host: HostCpu) -> bytes:
    """The SHA-256 launch digest the secure processor will hold for this config (no KVM needed)."""
    return launch_crypto.sev_launch_digest([b.data for b in launch_blobs(config, firmware, host)])


class MeasuredLaunch:
    """Drives one machine's launch through LAUNCH_START .. LAUNCH_FINISH, in order (the emulated PSP
    refuses anything out of order by itself)."""

    def __init__(self, machine: Machine, psp: EmulatedSecureProcessor) -> None:
        if not machine.config.measured_launch:
            raise ConfplanError(
                "this machine was built for an unmeasured boot: its firmware is already in guest RAM",
                hint="build it with MachineConfig(measured_launch=True)",
            )
        self.machine = machine
        self.psp = psp
        self.guest: SevGuest = psp.new_guest(machine)
        machine.attach_launch(self)

    @property
    def platform_version(self) -> PlatformVersion:
        return self.psp.version

    @property
    def finished(self) -> bool:
        return self.guest.state is GuestState.RUNNING

    def measure(self, policy: int, godh_cert: bytes, session_blob: bytes) -> bytes:
        """LAUNCH_START, LAUNCH_UPDATE_DATA per blob, LAUNCH_MEASURE: the 48-byte measurement."""
        self.guest.launch_start(policy, godh_cert, session_blob)
        for blob in self.machine.launch_blobs():
            self.guest.launch_update_data(blob.gpa, blob.data)
        return self.guest.launch_measure()

    def inject_secret(self, header: bytes, ciphertext: bytes) -> None:
        """LAUNCH_SECRET into the secret page: the PSP checks the MAC before it writes a byte."""
        if len(ciphertext) > abi.PAGE:
            raise ConfplanError(
                f"the launch secret is {len(ciphertext)} bytes, the secret page holds {abi.PAGE}",
                hint="release fewer or smaller secrets to this guest",
            )
        self.guest.launch_secret(header, ciphertext, abi.SECRET_GPA)

    def finish(self) -> None:
        """LAUNCH_FINISH: from here on the machine's vCPUs may start."""
        self.guest.launch_finish()

    def debug_read(self, gpa: int, n: int) -> bytes:
        """DBG_DECRYPT through the PSP: refused when the guest policy has NODBG."""
        return self.guest.debug_read(gpa, n)


@dataclass(frozen=True)
class LaunchRecord:
    """What a completed measured launch leaves for the caller to show or record."""

    policy: int
    measurement: bytes
    digest: str  # the allowed digest the broker matched (hex)
    version: PlatformVersion


def launch_with_broker(
    machine: Machine, psp: EmulatedSecureProcessor, broker: KeyBroker, policy: int, transport_key: bytes,
    *, migration_id: bytes | None = None,
) -> LaunchRecord:  # fmt: skip
    """The whole flow with the owner's broker in this process (the CLI's launch, tests): session,
    measure, release of the transport key (and the owner's migration id, if given) (raises
    ``AttestationRefused`` on a mismatch), secret, finish. The helper's INIT reads them from the secret
    page; a source and its target each get their own launch and release of the same key."""
    bundle = broker.new_session(psp.platform_chain(), policy)
    launch = MeasuredLaunch(machine, psp)
    measurement = launch.measure(policy, bundle.godh_cert, bundle.session_blob)
    _, digest = broker.verify_measurement(bundle.state, measurement, psp.version)
    packet = broker.release_transport_key(bundle.state, measurement, psp.version, transport_key, migration_id)
    launch.inject_secret(packet.header(), packet.ciphertext)
    launch.finish()
    return LaunchRecord(policy, measurement, digest, psp.version)
