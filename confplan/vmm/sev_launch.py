"""The measured SEV launch of a ``Machine``, on the EMULATED secure processor of ``confplan.sev``.

Before any vCPU runs: LAUNCH_START (policy, the owner's GODH cert and session blob), LAUNCH_UPDATE_DATA over
the machine's ``launch_blobs`` in their fixed order (``vmm.launch_blobs``), LAUNCH_MEASURE. The caller hands
the measurement to the owner's broker and passes its LAUNCH_SECRET packet back; the secure processor
decrypts it into the secret page (``abi.SECRET_GPA``), then LAUNCH_FINISH, and only then may
``Machine.start`` run. ``MeasuredLaunch`` is a ``sev.owner.LaunchPeer``, so the owner's side is the same
code whether the broker runs here or in the orchestrator.
The VMM never reads the secret page: ``Machine.read``/``view`` refuse it; only the MH maps it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Generic, TypeVar

from confplan.errors import ConfplanError
from confplan.sev.certs import PlatformChain
from confplan.sev.launch_crypto import PlatformVersion
from confplan.sev.owner import LaunchRecord, attest_and_release
from confplan.sev.psp import EmulatedSecureProcessor, GuestState, SevGuest, SnpGuest
from confplan.sev.snp import PageType
from confplan.vmm import abi

if TYPE_CHECKING:
    from confplan.sev.broker import KeyBroker
    from confplan.vmm.machine import Machine

__all__ = ["LaunchRecord", "MeasuredLaunch", "SnpLaunch", "launch_with_broker"]


Guest = TypeVar("Guest", SevGuest, SnpGuest)


class _Launch(Generic[Guest]):
    """What both launches give the machine (``machine.AttachedLaunch``): one launch per machine, attached
    before it starts; its state; debug reads through the secure processor."""

    def __init__(self, machine: Machine, psp: EmulatedSecureProcessor, guest: Guest) -> None:
        self.machine, self.psp = machine, psp
        self.guest: Guest = guest
        machine.attach_launch(self)

    @property
    def finished(self) -> bool:
        return self.guest.state is GuestState.RUNNING

    @property
    def state(self) -> str:
        """The guest's launch state (UNINIT, LUPDATE, LSECRET, RUNNING), for messages."""
        return self.guest.state.value

    def debug_read(self, gpa: int, n: int) -> bytes:
        """DBG_DECRYPT through the PSP: refused unless the guest policy allows debugging."""
        return self.guest.debug_read(gpa, n)


class MeasuredLaunch(_Launch[SevGuest]):
    """Drives one machine's launch through LAUNCH_START .. LAUNCH_FINISH, in order (the emulated PSP
    refuses anything out of order by itself)."""

    def __init__(self, machine: Machine, psp: EmulatedSecureProcessor) -> None:
        if not machine.config.measured_launch or machine.config.snp:
            raise ConfplanError(
                "this machine was not built for a measured SEV launch (an unmeasured boot has its firmware "
                "in guest RAM already; an SNP guest launches with SnpLaunch)",
                hint="build it with MachineConfig(measured_launch=True)",
            )
        super().__init__(machine, psp, psp.new_guest(machine))

    @property
    def platform_version(self) -> PlatformVersion:
        return self.psp.version

    def measure(self, policy: int, godh_cert: bytes, session_blob: bytes) -> bytes:
        """LAUNCH_START, LAUNCH_UPDATE_DATA per blob, LAUNCH_MEASURE: the 48-byte measurement."""
        self.guest.launch_start(policy, godh_cert, session_blob)
        for blob in self.machine.launch_blobs():
            self.guest.launch_update_data(blob.gpa, blob.data)
        return self.guest.launch_measure()

    def inject_secret(self, header: bytes, ciphertext: bytes) -> None:
        """LAUNCH_SECRET into the secret page (the PSP checks the MAC before it writes a byte), then
        LAUNCH_FINISH."""
        if len(ciphertext) > abi.PAGE:
            raise ConfplanError(
                f"the launch secret is {len(ciphertext)} bytes, the secret page holds {abi.PAGE}",
                hint="release fewer or smaller secrets to this guest",
            )
        self.guest.launch_secret(header, ciphertext, abi.SECRET_GPA)
        self.finish()

    def platform(self) -> tuple[PlatformChain, PlatformVersion]:
        """The emulated platform's chain and version (``sev.owner.LaunchPeer``)."""
        return self.psp.platform_chain(), self.psp.version

    def finish(self) -> None:
        """LAUNCH_FINISH: from here on the machine's vCPUs may start."""
        self.guest.launch_finish()


def launch_with_broker(
    machine: Machine, psp: EmulatedSecureProcessor, broker: KeyBroker, policy: int, transport_key: bytes,
    *, migration_id: bytes | None = None,
) -> LaunchRecord:  # fmt: skip
    """The whole flow with the owner's broker in this process (the CLI's launch, tests): the owner's side
    (``sev.owner.attest_and_release``) against this machine's launch, releasing the transport key (and the
    owner's migration id, if given; ``AttestationRefused`` on a mismatch). The helper's INIT reads them from
    the secret page; a source and its target each get their own launch and release of the same key."""
    from confplan.sev.broker import confplan_secrets

    launch = MeasuredLaunch(machine, psp)
    return attest_and_release(launch, broker, policy, confplan_secrets(transport_key, migration_id))


class SnpLaunch(_Launch[SnpGuest]):
    """One machine's SEV-SNP launch (docs/key-release.md): SNP_LAUNCH_START, SNP_LAUNCH_UPDATE of the
    measured blobs (NORMAL) and of the SECRETS page at ``abi.SECRET_GPA`` (the PSP writes the VMPCKs
    there), SNP_LAUNCH_FINISH. No secret goes in at launch: the running helper asks for a report and the
    owner releases the key against it; the VMM only relays the helper's sealed messages (``guest_request``).
    """

    def __init__(self, machine: Machine, psp: EmulatedSecureProcessor) -> None:
        if not (machine.config.measured_launch and machine.config.snp):
            raise ConfplanError(
                "this machine was not built for an SEV-SNP launch",
                hint="build it with MachineConfig(measured_launch=True, snp=True)",
            )
        super().__init__(machine, psp, psp.new_snp_guest(machine))

    def launch(self, policy: int) -> bytes:
        """The whole launch; the 48-byte launch digest (what every report will carry as MEASUREMENT)."""
        self.guest.launch_start(policy)
        for blob in self.machine.launch_blobs():
            self.guest.launch_update(blob.gpa, blob.data, PageType.NORMAL)
        self.guest.launch_update(abi.SECRET_GPA, b"", PageType.SECRETS)
        self.guest.launch_finish()
        return self.guest.launch_digest

    def guest_request(self, message: bytes) -> bytes:
        """SNP_GUEST_REQUEST: the helper's sealed request in, the PSP's sealed answer out."""
        return self.guest.guest_request(message)

    def cert_chain(self) -> tuple[bytes, bytes, bytes]:
        """ARK, ASK and VCEK (PEM): what a host fetches from AMD KDS for its chip (here: emulated)."""
        return self.psp.snp_cert_chain()
