"""SEV / SEV-SNP attestation: an EMULATED secure processor and the guest owner's key broker.

- ``policy``: guest policy bits (SEV u32, SNP u64).
- ``psp``: ``EmulatedSecureProcessor`` (platform keys, launch state machine, NODBG, SNP reports).
- ``broker``: ``KeyBroker``, the owner's side: sessions, measurement checks, secret release.
- ``launch_crypto``, ``certs``, ``snp``, ``secret_table``: the real formats both sides speak.
- ``memory``: the ``GuestMemory`` protocol the VMM's machine satisfies.
The guest owner's offline toolkit (docs/attestation.md, each next to its sevctl/snpguest/sev-snp-measure
equivalent), loaded on first use like the broker:
- ``measure``: ``snp_launch_digest``, ``seves_launch_digest``, ``sev_launch_digest``, ``snp_ovmf_hash``,
  ``launch_measure``; ``vmsa``: ``build_vmsa``, ``VmmType``, ``cpu_sig``, ``CPU_SIGS``; ``ovmf``: ``Ovmf``.
- ``certs``/``amd_cert``/``anchors``: ``PlatformChain`` (SEV chains, AMD_CERT ARK/ASK), the built-in AMD
  anchors and ``check_root``; ``snp_chain.verify_snp_chain`` (ARK -> ASK -> VCEK/VLEK).
- ``snp_verify.verify_snp_report`` with ``ReportExpectations``; ``snp_report.AttestationReport``.
- ``id_block``: ``IdBlock``, ``make_id_auth``, ``verify_id_auth``, ``key_digest``.
- ``snp_release``: ``release_to_report`` (the broker's SNP key release), ``report_data_for``.
Every refusal is a ``VerifyError`` (a ``ConfplanError``) whose ``field`` names what failed.
See docs/attestation.md for what is real and what is emulated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from confplan.sev.memory import BytearrayGuestMemory, GuestMemory
from confplan.sev.psp import EmulatedSecureProcessor, GuestState, SecureProcessorError
from confplan.sev.secret_table import CONFPLAN_TRANSPORT_KEY_GUID, find_transport_key, parse_secret_table

if TYPE_CHECKING:
    from confplan.sev.amd_cert import AmdCert
    from confplan.sev.anchors import check_root
    from confplan.sev.broker import AttestationRefused, KeyBroker, OwnerPolicy
    from confplan.sev.certs import PlatformChain, SevCert
    from confplan.sev.id_block import IdBlock, make_id_auth, verify_id_auth
    from confplan.sev.measure import (
        SevMode,
        launch_measure,
        sev_launch_digest,
        seves_launch_digest,
        snp_launch_digest,
        snp_ovmf_hash,
    )
    from confplan.sev.ovmf import Ovmf
    from confplan.sev.signing import SigAlgo, VerifyError
    from confplan.sev.snp_chain import verify_snp_chain
    from confplan.sev.snp_release import WrappedKey, release_to_report, report_data_for
    from confplan.sev.snp_report import AttestationReport
    from confplan.sev.snp_verify import ReportExpectations, ReportVerdict, verify_snp_report
    from confplan.sev.vmsa import CPU_SIGS, VmmType, build_vmsa, cpu_sig, vmsa_pages

_LAZY = {
    "AttestationRefused": "broker", "KeyBroker": "broker", "OwnerPolicy": "broker",
    "snp_launch_digest": "measure", "seves_launch_digest": "measure", "sev_launch_digest": "measure",
    "snp_ovmf_hash": "measure", "launch_measure": "measure", "SevMode": "measure",
    "build_vmsa": "vmsa", "vmsa_pages": "vmsa", "VmmType": "vmsa", "cpu_sig": "vmsa", "CPU_SIGS": "vmsa",
    "Ovmf": "ovmf", "PlatformChain": "certs", "SevCert": "certs", "AmdCert": "amd_cert",
    "check_root": "anchors", "verify_snp_chain": "snp_chain", "AttestationReport": "snp_report",
    "verify_snp_report": "snp_verify", "ReportExpectations": "snp_verify", "ReportVerdict": "snp_verify",
    "IdBlock": "id_block", "make_id_auth": "id_block", "verify_id_auth": "id_block",
    "release_to_report": "snp_release", "report_data_for": "snp_release", "WrappedKey": "snp_release",
    "VerifyError": "signing", "SigAlgo": "signing",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    """The owner's side (pydantic models, X.509) loads on first use: a VMM process never needs it, and
    each MiB a VMM keeps beyond guest RAM counts (issue 5's budget)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"confplan.sev.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'confplan.sev' has no attribute {name!r}")


__all__ = [
    "CONFPLAN_TRANSPORT_KEY_GUID",
    "CPU_SIGS",
    "AmdCert",
    "AttestationRefused",
    "AttestationReport",
    "BytearrayGuestMemory",
    "EmulatedSecureProcessor",
    "GuestMemory",
    "GuestState",
    "IdBlock",
    "KeyBroker",
    "Ovmf",
    "OwnerPolicy",
    "PlatformChain",
    "ReportExpectations",
    "ReportVerdict",
    "SecureProcessorError",
    "SevCert",
    "SevMode",
    "SigAlgo",
    "VerifyError",
    "VmmType",
    "WrappedKey",
    "build_vmsa",
    "check_root",
    "cpu_sig",
    "find_transport_key",
    "launch_measure",
    "make_id_auth",
    "parse_secret_table",
    "release_to_report",
    "report_data_for",
    "sev_launch_digest",
    "seves_launch_digest",
    "snp_launch_digest",
    "snp_ovmf_hash",
    "verify_id_auth",
    "verify_snp_chain",
    "verify_snp_report",
    "vmsa_pages",
]
