"""SEV / SEV-SNP attestation: an EMULATED secure processor and the guest owner's key broker.

- ``policy``: guest policy bits (SEV u32, SNP u64).
- ``psp``: ``EmulatedSecureProcessor`` (platform keys, launch state machine, NODBG, SNP reports).
- ``broker``: ``KeyBroker``, the owner's side: sessions, measurement checks, secret release.
- ``launch_crypto``, ``certs``, ``snp``, ``secret_table``: the real formats both sides speak.
- ``memory``: the ``GuestMemory`` protocol the VMM's machine satisfies.
See docs/attestation.md for what is real and what is emulated.
"""

from __future__ import annotations

from confplan.sev.broker import AttestationRefused, KeyBroker, OwnerPolicy
from confplan.sev.memory import BytearrayGuestMemory, GuestMemory
from confplan.sev.psp import EmulatedSecureProcessor, GuestState, SecureProcessorError
from confplan.sev.secret_table import CONFPLAN_TRANSPORT_KEY_GUID, find_transport_key, parse_secret_table

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
