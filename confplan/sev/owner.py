"""The guest owner's side of one measured launch: the one place that runs the broker against a launch.

A launch is reached through a ``LaunchPeer``: a machine in this process (``vmm.sev_launch``) or a VMM
process over RPC (the stages). Either way the owner's steps are the same and in this order: a session for
the platform's chain and the guest policy, LAUNCH_MEASURE, the measurement checked against the allowed
digests, the secrets released as one LAUNCH_SECRET packet (refused with ``AttestationRefused`` otherwise:
nothing is injected), and LAUNCH_FINISH. ``owner_policy_for`` is the policy an orchestrator that plays the
owner for its own guest allows: exactly the digest it predicted from the plan and confplan's firmware.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from confplan.sev.certs import PlatformChain
from confplan.sev.launch_crypto import PlatformVersion
from confplan.sev.policy import sev_api_version

if TYPE_CHECKING:
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
