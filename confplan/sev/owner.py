"""The guest owner's side of one measured launch: the one place that runs the broker against a launch.

A launch is reached through a ``LaunchPeer``: a machine in this process (``vmm.sev_launch``) or a VMM
process over RPC (the stages). Either way the owner's steps are the same and in this order: a session for
the platform's chain and the guest policy, LAUNCH_MEASURE, the measurement checked against the allowed
digests, the secrets released as one LAUNCH_SECRET packet (refused with ``AttestationRefused`` otherwise:
nothing is injected), and LAUNCH_FINISH. ``owner_policy_for`` is the policy an orchestrator that plays the
owner for its own guest allows: exactly the digest it predicted from the plan and confplan's firmware.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from confplan.sev.certs import PlatformChain
from confplan.sev.launch_crypto import PlatformVersion
from confplan.sev.policy import sev_api_version

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from confplan.sev.broker import KeyBroker, OwnerPolicy


class LaunchPeer(Protocol):
    """A launch in progress as the owner sees it: the host's platform, LAUNCH_MEASURE, LAUNCH_SECRET."""

    def platform(self) -> tuple[PlatformChain, PlatformVersion]:
        """The platform's certificate chain (PDH .. ARK) and firmware version."""
        ...

    def measure(self, policy: int, godh_cert: bytes, session_blob: bytes) -> bytes:
        """LAUNCH_START with the owner's session, LAUNCH_UPDATE_DATA, LAUNCH_MEASURE: the 48-byte answer."""
        ...

    def inject_secret(self, header: bytes, ciphertext: bytes) -> None:
        """LAUNCH_SECRET with the owner's packet, then LAUNCH_FINISH."""
        ...


@dataclass(frozen=True)
class LaunchRecord:
    """What a completed measured launch leaves for the caller to show or record."""

    policy: int
    measurement: bytes
    digest: str  # the allowed digest the broker matched (hex)
    version: PlatformVersion


def owner_policy_for(expected_digest: str, policy: int, *, trust_emulated_platform: bool) -> OwnerPolicy:
    """Allow exactly ``expected_digest`` under guest ``policy`` (and the API the policy asks for).

    ``trust_emulated_platform`` must be said by the caller: confplan's own local flows play the owner for
    the EMULATED secure processor they run, whose ARK is not AMD's; an owner's policy never trusts it
    unless told to."""
    from confplan.sev.broker import OwnerPolicy

    major, minor = sev_api_version(policy)
    api = f"{major}.{minor}"
    return OwnerPolicy(
        allowed_digests=[expected_digest],
        allowed_policies=[policy],
        min_api=api,
        trust_emulated_platform=trust_emulated_platform,
    )


def attest_and_release(
    peer: LaunchPeer, broker: KeyBroker, policy: int, secrets: dict[uuid.UUID, bytes]
) -> LaunchRecord:
    """Run the launch on ``peer`` and release ``secrets`` to it only if its measurement is allowed."""
    chain, version = peer.platform()
    bundle = broker.new_session(chain, policy)
    measurement = peer.measure(policy, bundle.godh_cert, bundle.session_blob)
    _, digest = broker.verify_measurement(bundle.state, measurement, version)
    packet = broker.release(bundle.state, measurement, version, secrets)
    peer.inject_secret(packet.header(), packet.ciphertext)
    return LaunchRecord(policy, measurement, digest, version)


class SnpPeer(Protocol):
    """An SEV-SNP launch as the owner sees it (docs/key-release.md): the launch, the platform's chain, a
    report made by the running helper for the owner's nonce, and the wrapped secrets handed back."""

    def snp_launch(self, policy: int) -> bytes:
        """SNP_LAUNCH_START .. SNP_LAUNCH_FINISH: the launch digest (the host's word; the report is proof)."""
        ...

    def snp_chain(self) -> tuple[bytes, bytes, bytes]:
        """ARK, ASK and VCEK as the host fetched them (checked against the owner's trusted ARK)."""
        ...

    def key_request(self, nonce: bytes) -> bytes:
        """The helper's report for ``nonce`` (REPORT_DATA = nonce || its ephemeral public key)."""
        ...

    def key_release(self, wrapped: bytes) -> None:
        """The wrapped secrets to the helper, which opens them with its ephemeral key."""
        ...


def release_to_snp_guest(
    peer: SnpPeer, expected_digest: bytes, policy: int, secrets: dict[uuid.UUID, bytes], *,
    owner_key: X25519PrivateKey, trust_emulated_platform: bool, pins: list[str] | None = None,
) -> dict[str, object]:  # fmt: skip
    """Ask the running guest's helper for a report bound to a fresh nonce, verify it (chain to a trusted
    ARK, signature, VMPL 0, exactly ``policy``, the measurement ``expected_digest``) and only then wrap
    ``secrets`` to the helper's key with ``owner_key`` (the static key whose public half the guest was
    launched with, so its helper knows the wrap is the owner's). ``AttestationRefused`` names the failing
    field; nothing is released then. Returns what was checked (``ReportVerdict.summary``: the root, the
    checks, the report's fields), for the run's record."""
    from confplan.sev.broker import AttestationRefused
    from confplan.sev.policy import SnpPolicyFlag
    from confplan.sev.secret_table import build_secret_table
    from confplan.sev.signing import VerifyError
    from confplan.sev.snp_release import NONCE_LEN, release_to_report
    from confplan.sev.snp_verify import ReportExpectations

    nonce = os.urandom(NONCE_LEN)
    report = peer.key_request(nonce)
    ark, ask, vcek = peer.snp_chain()
    flags = SnpPolicyFlag(policy & (SnpPolicyFlag.DEBUG | SnpPolicyFlag.MIGRATE_MA))
    expect = ReportExpectations(  # exactly the plan's policy: what it allows is the owner's own choice
        measurement=expected_digest, policy=policy, allow_debug=SnpPolicyFlag.DEBUG in flags,
        allow_migrate_ma=SnpPolicyFlag.MIGRATE_MA in flags,
    )  # fmt: skip
    try:
        wrapped, verdict = release_to_report(
            report, vcek, expect, nonce=nonce, secret=build_secret_table(secrets), owner_key=owner_key,
            ark_raw=ark, ask_raw=ask, pins=pins, trust_emulated=trust_emulated_platform,
        )  # fmt: skip
    except VerifyError as err:
        raise AttestationRefused(
            f"the SNP report does not pass, so no key is released: {err.message}",
            hint=err.hint or "the guest is not the measured confplan helper the owner expects",
        ) from None
    peer.key_release(wrapped.pack())
    return verdict.summary()
