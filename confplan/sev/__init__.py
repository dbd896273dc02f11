"""SEV / SEV-SNP attestation: an EMULATED secure processor and the guest owner's key broker.

- ``policy``: guest policy bits (SEV u32, SNP u64).
- ``psp``: ``EmulatedSecureProcessor`` (platform keys, launch state machine, NODBG, SNP reports).
- ``broker``: ``KeyBroker``, the owner's side: sessions, measurement checks, secret release.
- ``launch_crypto``, ``certs``, ``snp``, ``secret_table``: the real formats both sides speak.
- ``memory``: the ``GuestMemory`` protocol the VMM's machine satisfies.
See docs/attestation.md for what is real and what is emulated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from confplan.sev.memory import BytearrayGuestMemory, GuestMemory
from confplan.sev.psp import EmulatedSecureProcessor, GuestState, SecureProcessorError
from confplan.sev.secret_table import CONFPLAN_TRANSPORT_KEY_GUID, find_transport_key, parse_secret_table

if TYPE_CHECKING:
    from confplan.sev.broker import AttestationRefused, KeyBroker, OwnerPolicy

_BROKER_NAMES = ("AttestationRefused", "KeyBroker", "OwnerPolicy")


def __getattr__(name: str) -> Any:
    """The owner's broker (pydantic models) loads on first use: a VMM process never needs it, and each
    MiB a VMM keeps beyond guest RAM counts (issue 5's budget)."""
    if name in _BROKER_NAMES:
        from confplan.sev import broker

        return getattr(broker, name)
    raise AttributeError(f"module 'confplan.sev' has no attribute {name!r}")


__all__ = [
    "CONFPLAN_TRANSPORT_KEY_GUID",
    "AttestationRefused",
    "BytearrayGuestMemory",
    "EmulatedSecureProcessor",
    "GuestMemory",
    "GuestState",
    "KeyBroker",
    "OwnerPolicy",
    "SecureProcessorError",
    "find_transport_key",
    "parse_secret_table",
]
