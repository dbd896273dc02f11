"""Verify an SEV-SNP attestation report the way an owner must: ``snpguest verify`` and what it leaves out.

In order, each refusal a ``VerifyError`` whose ``field`` names the report field (or chain part) and why:
1. the chain ARK -> ASK -> VCEK/VLEK (``snp_chain``), rooted in a built-in AMD ARK or an explicitly
   trusted emulated one; the report's signing_key must be the kind of key the chain ends in;
2. the signature over the report bytes as received (``snp_report``);
3. the TCB the report says its key was derived for (reported_tcb) equal to the VEK's extensions, and a
   VCEK's hardware id equal to chip_id (what ``snpguest verify attestation`` checks);
4. the owner's expectations (``ReportExpectations``): VMPL, policy word and the debug/migration bits,
   measurement, host_data, report_data, ID/author key digests, family/image id, guest SVN and TCB minimums.
"""

from __future__ import annotations

import datetime
import hmac
from dataclasses import dataclass, field

from confplan.sev.anchors import RootVerdict
from confplan.sev.policy import SnpPolicyFlag
from confplan.sev.signing import VerifyError
from confplan.sev.snp_chain import SnpChainVerdict, verify_snp_chain
from confplan.sev.snp_report import AttestationReport, TcbVersion


@dataclass(frozen=True)
class ReportExpectations:
    """What the owner accepts. ``None`` leaves a field unchecked (the measurement should never be None
    where a secret depends on the answer). ``min_tcb`` maps boot_loader/tee/snp/microcode/fmc to minimums."""

    measurement: bytes | None = None
    policy: int | None = None
    vmpl: int | None = 0
    allow_debug: bool = False
    allow_migrate_ma: bool = False
    host_data: bytes | None = None
    report_data: bytes | None = None
    id_key_digest: bytes | None = None
    author_key_digest: bytes | None = None
    family_id: bytes | None = None
    image_id: bytes | None = None
    min_guest_svn: int = 0
    min_tcb: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ReportVerdict:
    """A report that passed every check, with what it was checked against."""

    report: AttestationReport
    root: RootVerdict
    chain: SnpChainVerdict
    checked: tuple[str, ...]

    def summary(self) -> dict[str, object]:
        return {
            "verified": True,
            "root": self.root.describe(),
            "emulated_platform": self.root.emulated,
            "signing_key": self.chain.vek.kind,
            "checked": list(self.checked),
            "report": self.report.summary(),
        }


def _refuse(field_name: str, message: str, hint: str | None = None) -> VerifyError:
    return VerifyError(f"report {field_name}: {message}", field=field_name, hint=hint)


def check_tcb_against_vek(report: AttestationReport, chain: SnpChainVerdict) -> list[str]:
    """reported_tcb must be the TCB the VEK was issued for; a VCEK's hwID must be the chip_id."""
    reported = dict(report.reported_tcb.items())
    for name, cert_value in chain.vek.tcb.items():
        if name not in reported:
            continue
        if reported[name] != cert_value:
            raise _refuse(
                f"reported_tcb.{name}",
                f"{reported[name]}, but the {chain.vek.kind} was issued for {name} {cert_value}",
                hint="fetch the VCEK for this report's reported_tcb from AMD KDS",
            )
    checked = [f"reported_tcb = {chain.vek.kind} TCB ({report.reported_tcb})"]
    if chain.vek.kind == "VCEK" and chain.vek.hwid is not None:
        hwid = chain.vek.hwid
        if report.chip_id[: len(hwid)] != hwid or any(report.chip_id[len(hwid) :]):
            masked = " (MASK_CHIP_ID is set: the report hides it)" if report.mask_chip_key else ""
            raise _refuse("chip_id", f"{report.chip_id.hex()} is not the VCEK's hwID {hwid.hex()}{masked}")
        checked.append("chip_id = VCEK hwID")
    return checked


def _bytes_equal(name: str, got: bytes, want: bytes | None, checked: list[str]) -> None:
    if want is None:
        return
    if len(want) != len(got) or not hmac.compare_digest(got, want):
        raise _refuse(name, f"{got.hex()}, expected {want.hex()}")
    checked.append(name)


def check_expectations(report: AttestationReport, want: ReportExpectations) -> list[str]:
    """Step 4 of the module docstring; returns the names of what was checked."""
    checked: list[str] = []
    if want.vmpl is not None:
        if report.vmpl != want.vmpl:
            raise _refuse(
                "vmpl",
                f"{report.vmpl}, expected {want.vmpl}",
                hint="only a VMPL-0 report speaks for the guest",
            )
        checked.append(f"vmpl = {want.vmpl}")
    if want.policy is not None and report.policy != want.policy:
        raise _refuse("policy", f"{report.policy:#x}, expected {want.policy:#x}")
    if report.policy & SnpPolicyFlag.DEBUG and not want.allow_debug:
        raise _refuse("policy", f"{report.policy:#x} allows DEBUG (bit 19): the host can read the guest")
    if report.policy & SnpPolicyFlag.MIGRATE_MA and not want.allow_migrate_ma:
        raise _refuse("policy", f"{report.policy:#x} allows a migration agent (MIGRATE_MA, bit 18)")
    checked.append("policy")
    _bytes_equal("measurement", report.measurement, want.measurement, checked)
    _bytes_equal("host_data", report.host_data, want.host_data, checked)
    _bytes_equal("report_data", report.report_data, want.report_data, checked)
    _bytes_equal("id_key_digest", report.id_key_digest, want.id_key_digest, checked)
    _bytes_equal("author_key_digest", report.author_key_digest, want.author_key_digest, checked)
    _bytes_equal("family_id", report.family_id, want.family_id, checked)
    _bytes_equal("image_id", report.image_id, want.image_id, checked)
    if report.guest_svn < want.min_guest_svn:
        raise _refuse("guest_svn", f"{report.guest_svn}, below the minimum {want.min_guest_svn}")
    checked.extend(_check_min_tcb(report.reported_tcb, want.min_tcb))
    return checked


def _check_min_tcb(tcb: TcbVersion, minimums: dict[str, int]) -> list[str]:
    have = dict(tcb.items())
    for name, minimum in minimums.items():
        if name not in have:
            if minimum:
                raise _refuse(f"reported_tcb.{name}", f"this product line has no {name} field")
            continue
        if have[name] < minimum:
            raise _refuse(
                f"reported_tcb.{name}",
                f"{have[name]}, below the minimum {minimum}",
                hint="the platform's firmware or microcode is older than the owner accepts; update it",
            )
    return [f"reported_tcb >= {minimums}"] if minimums else []


def verify_snp_report(
    report_raw: bytes,
    vek_raw: bytes,
    ark_raw: bytes | None = None,
    ask_raw: bytes | None = None,
    expect: ReportExpectations | None = None,
    *,
    pins: list[str] | None = None,
    trust_emulated: bool = False,
    at: datetime.datetime | None = None,
) -> ReportVerdict:
    """Every check of the module docstring; returns the verdict or raises ``VerifyError``."""
    chain = verify_snp_chain(vek_raw, ark_raw, ask_raw, pins=pins, trust_emulated=trust_emulated, at=at)
    product = chain.vek.product if chain.vek.product in ("milan", "genoa", "turin") else None
    report = AttestationReport.parse(report_raw, product)
    if report.signing_key != chain.vek.kind:
        raise _refuse(
            "key_info.signing_key", f"{report.signing_key}, but the chain ends in a {chain.vek.kind}"
        )
    report.verify_signature(chain.vek_key, chain.vek.kind)
    checked = ["chain", "signature", *check_tcb_against_vek(report, chain)]
    checked += check_expectations(report, expect or ReportExpectations())
    return ReportVerdict(report, chain.root, chain, tuple(checked))
