"""``confplan owner measure | verify-chain | verify-report``: the attestation an owner runs offline.

Launch digests of a guest (like sev-snp-measure), a platform's certificate chain to AMD's root and SNP
attestation reports (like snpguest), checked on the owner's own machine (docs/attestation.md). The
commands join the ``confplan owner`` group (``owner_cmds.owner_app``); nothing here talks to the host.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from confplan.cli.formats import TextOrJson as Output
from confplan.cli.owner_cmds import owner_app, parse_int, read_blob, read_file, warn_emulated
from confplan.errors import ConfplanError
from confplan.sev.certs import PlatformChain
from confplan.sev.signing import VerifyError

attest_app = typer.Typer()  # no name: ``owner_app.add_typer`` adds its commands to ``confplan owner`` itself

OutputOpt = Annotated[Output, typer.Option("--output", "-o", help="text (a summary) or json.")]
TrustEmulated = Annotated[
    bool,
    typer.Option(
        "--trust-emulated-platform",
        help="DANGER: also accept a chain whose ARK is not AMD's (confplan's EMULATED secure processor).",
    ),
]
ArkPins = Annotated[
    list[str] | None, typer.Option("--ark-sha256", help="Accept only an ARK with this SHA-256; repeatable.")
]


def _emit(output: Output, document: dict[str, object], lines: list[str]) -> None:
    if output is Output.JSON:
        typer.echo(json.dumps(document, indent=2))
    else:
        for line in lines:
            typer.echo(line)


def _refused(output: Output, err: VerifyError, what: str) -> typer.Exit:
    """A refusal: JSON on stdout when asked for, the message and hint on stderr, exit 2."""
    if output is Output.JSON:
        doc = {"verified": False, "what": what, "field": err.field, "error": err.message, "hint": err.hint}
        typer.echo(json.dumps(doc, indent=2))
    typer.echo(err.render().replace("error:", f"error: {what} refused:", 1), err=True)
    return typer.Exit(2)


def _hex_option(text: str | None, length: int, option: str) -> bytes | None:
    if text is None:
        return None
    try:
        value = bytes.fromhex(text.removeprefix("0x"))
    except ValueError:
        raise ConfplanError(
            f"{option}: {text!r} is not hex", hint=f"give {length} bytes as {2 * length} hex digits"
        ) from None
    if len(value) != length:
        raise ConfplanError(
            f"{option}: {len(value)} bytes, expected {length}", hint=f"give {2 * length} hex digits"
        )
    return value


def _vcpu_sig(
    vcpu_type: str | None, vcpu_sig: str | None, family: int | None, model: int, stepping: int
) -> int | None:
    from confplan.sev.vmsa import CPU_SIGS, cpu_sig

    if family is not None:
        return cpu_sig(family, model, stepping)
    if vcpu_sig is not None:
        return parse_int(vcpu_sig)
    if vcpu_type is not None:
        if vcpu_type not in CPU_SIGS:
            raise ConfplanError(
                f"--vcpu-type: unknown type {vcpu_type!r}", hint=f"one of {', '.join(CPU_SIGS)}"
            )
        return CPU_SIGS[vcpu_type]
    return None


@attest_app.command("measure")
def measure_cmd(
    mode: Annotated[str, typer.Option("--mode", help="snp, seves, sev, or snp:ovmf-hash.")],
    ovmf: Annotated[Path, typer.Option("--ovmf", help="The OVMF image the guest boots.")],
    kernel: Annotated[Path | None, typer.Option("--kernel", help="Kernel for measured direct boot.")] = None,
    initrd: Annotated[Path | None, typer.Option("--initrd", help="Initrd (with --kernel).")] = None,
    append: Annotated[
        str | None, typer.Option("--append", help="Kernel command line (with --kernel).")
    ] = None,
    vcpus: Annotated[int | None, typer.Option("--vcpus", help="Number of vCPUs (seves, snp).", min=1)] = None,
    vcpu_type: Annotated[
        str | None, typer.Option("--vcpu-type", help="QEMU CPU model, e.g. EPYC-v4.")
    ] = None,
    vcpu_sig: Annotated[str | None, typer.Option("--vcpu-sig", help="CPUID signature instead.")] = None,
    vcpu_family: Annotated[int | None, typer.Option("--vcpu-family", help="CPU family instead.")] = None,
    vcpu_model: Annotated[int, typer.Option("--vcpu-model", help="With --vcpu-family.")] = 0,
    vcpu_stepping: Annotated[int, typer.Option("--vcpu-stepping", help="With --vcpu-family.")] = 0,
    vmm_type: Annotated[str, typer.Option("--vmm-type", help="QEMU, ec2, gce or ec2-rdx0.")] = "QEMU",
    guest_features: Annotated[
        str, typer.Option("--guest-features", help="SNP SEV_FEATURES of the VMSAs.")
    ] = "0x1",
    ovmf_hash: Annotated[
        str | None, typer.Option("--ovmf-hash", "--snp-ovmf-hash", help="SNP: start from this OVMF hash.")
    ] = None,
    output: OutputOpt = Output.TEXT,
) -> None:
    """The launch digest of a guest (like sev-snp-measure; sevctl for SEV/SEV-ES): what an owner expects
    in a report's MEASUREMENT (SNP) or allows with 'owner init --allow-digest' (SEV, SEV-ES)."""
    from confplan.sev import measure
    from confplan.sev.ovmf import Ovmf, OvmfError
    from confplan.sev.vmsa import VmmType

    image = Ovmf.parse(read_file(ovmf, "OVMF image"), where=str(ovmf))
    if mode == "snp:ovmf-hash":
        digest = measure.snp_ovmf_hash(image)
        _emit(output, {"mode": mode, "ovmf_hash": digest.hex()}, [digest.hex()])
        return
    try:
        sev_mode, vmm = measure.SevMode.parse(mode), VmmType.parse(vmm_type)
    except ValueError as err:
        raise ConfplanError(str(err), hint="see --help") from None
    sig = _vcpu_sig(vcpu_type, vcpu_sig, vcpu_family, vcpu_model, vcpu_stepping)
    if sev_mode is not measure.SevMode.SEV:
        if vcpus is None:
            raise ConfplanError(f"--mode {mode} needs --vcpus", hint="the VMSA of every vCPU is measured")
        if sig is None:
            if vmm is VmmType.QEMU:
                raise ConfplanError(
                    f"--mode {mode} needs --vcpu-type, --vcpu-sig or --vcpu-family",
                    hint="e.g. --vcpu-type EPYC-v4",
                )
            sig = 0
    files = {
        "kernel": read_file(kernel, "kernel") if kernel else None,
        "initrd": read_file(initrd, "initrd") if initrd else None,
    }
    if ovmf_hash is not None and sev_mode is not measure.SevMode.SNP:
        raise ConfplanError("--ovmf-hash only works with --mode snp")
    try:
        if sev_mode is measure.SevMode.SNP:
            digest = measure.snp_launch_digest(
                image, vcpus=vcpus or 1, vcpu_sig=sig or 0, sev_features=parse_int(guest_features),
                kernel=files["kernel"], initrd=files["initrd"], append=append, vmm_type=vmm,
                ovmf_hash=_hex_option(ovmf_hash, 48, "--ovmf-hash"),
            )  # fmt: skip
        elif sev_mode is measure.SevMode.SEV_ES:
            digest = measure.seves_launch_digest(
                image, vcpus=vcpus or 1, vcpu_sig=sig or 0, kernel=files["kernel"], initrd=files["initrd"],
                append=append, vmm_type=vmm,
            )  # fmt: skip
        else:
            digest = measure.sev_launch_digest(
                image, kernel=files["kernel"], initrd=files["initrd"], append=append
            )
    except OvmfError as err:
        raise ConfplanError(f"{ovmf}: {err.message}", hint=err.hint) from None
    doc: dict[str, object] = {
        "mode": sev_mode.value, "measurement": digest.hex(), "ovmf": str(ovmf), "vcpus": vcpus,
        "vcpu_sig": sig, "vmm_type": vmm.value, "kernel": str(kernel) if kernel else None,
    }  # fmt: skip
    what = {
        "snp": "SNP launch digest (report MEASUREMENT)",
        "seves": "SEV-ES launch digest",
        "sev": "SEV launch digest",
    }
    lines = [digest.hex(), f"{what[sev_mode.value]} of {ovmf} ({len(image.data)} bytes)"]
    if sev_mode is not measure.SevMode.SEV:
        lines.append(f"  {vcpus} vCPU(s), signature {sig:#x}, VMM {vmm.value}")
    if kernel:
        lines.append(f"  kernel {kernel}, initrd {initrd or '-'}, cmdline {append or ''!r}")
    _emit(output, doc, lines)


def _read_report(path: Path) -> bytes:
    from confplan.sev.snp_report import REPORT_LEN

    return read_blob(path, REPORT_LEN, "SNP attestation report")


def _ca_files(
    ark: Path | None, ask: Path | None, cert_chain: Path | None
) -> tuple[bytes | None, bytes | None]:
    from confplan.sev.snp_chain import split_pem_chain

    if cert_chain is not None:
        certs = split_pem_chain(read_file(cert_chain, "certificate chain"))
        if len(certs) != 2:
            raise ConfplanError(
                f"{cert_chain}: {len(certs)} PEM certificates, expected 2 (ASK, ARK)",
                hint="pass AMD KDS's cert_chain",
            )
        return certs[1], certs[0]
    return (read_file(ark, "ARK") if ark else None), (read_file(ask, "ASK") if ask else None)


@attest_app.command("verify-chain")
def verify_chain_cmd(
    platform_chain: Annotated[
        Path | None,
        typer.Option("--platform-chain", help="SEV: PDH,PEK,OCA,CEK,ASK,ARK (sevctl export --full)."),
    ] = None,
    vek: Annotated[
        Path | None, typer.Option("--vek", "--vcek", help="SNP: the VCEK or VLEK (PEM or DER).")
    ] = None,
    ark: Annotated[Path | None, typer.Option("--ark", help="SNP: the ARK (default: AMD's built-in).")] = None,
    ask: Annotated[
        Path | None, typer.Option("--ask", help="SNP: the ASK or ASVK (default: AMD's built-in).")
    ] = None,
    cert_chain: Annotated[
        Path | None, typer.Option("--cert-chain", help="SNP: AMD KDS cert_chain (ASK+ARK PEM).")
    ] = None,
    ark_sha256: ArkPins = None,
    trust_emulated_platform: TrustEmulated = False,
    output: OutputOpt = Output.TEXT,
) -> None:
    """Verify a platform's certificate chain to AMD's root (like 'sevctl verify' and 'snpguest verify
    certs'); exit 2 naming the broken link or the untrusted root."""
    from confplan.sev import anchors
    from confplan.sev.snp_chain import verify_snp_chain

    if (platform_chain is None) == (vek is None):
        raise ConfplanError(
            "give --platform-chain (SEV) or --vek (SNP)", hint="see 'confplan owner verify-chain --help'"
        )
    if trust_emulated_platform:
        warn_emulated()
    pins = [p.lower() for p in ark_sha256 or []]
    try:
        if platform_chain is not None:
            chain = PlatformChain.unpack(read_file(platform_chain, "platform chain"))
            chain.verify()
            fp = chain.ark.fingerprint()
            root = anchors.check_root(
                fp,
                None if chain.emulated else anchors.sev_ark_product(fp),
                pins=pins,
                trust_emulated=trust_emulated_platform,
            )
            links = "ARK -> ASK -> CEK -> PEK <- OCA, PEK -> PDH"
        else:
            assert vek is not None
            ark_raw, ask_raw = _ca_files(ark, ask, cert_chain)
            verdict = verify_snp_chain(
                read_file(vek, "VEK"), ark_raw, ask_raw, pins=pins, trust_emulated=trust_emulated_platform
            )
            root, links = verdict.root, f"ARK -> ASK -> {verdict.vek.kind} (TCB {verdict.vek.tcb})"
    except VerifyError as err:
        raise _refused(output, err, "certificate chain") from None
    doc = {
        "verified": True,
        "root": root.describe(),
        "emulated_platform": root.emulated,
        "ark_sha256": root.fingerprint,
        "links": links,
    }
    _emit(output, doc, [f"chain verified: {links}", f"  root: {root.describe()}"])


@attest_app.command("verify-report")
def verify_report_cmd(
    report: Annotated[
        Path, typer.Argument(help="The SNP attestation report (0x4A0 bytes: raw, hex or base64).")
    ],
    vek: Annotated[Path, typer.Option("--vek", "--vcek", help="The VCEK or VLEK (PEM or DER).")],
    ark: Annotated[Path | None, typer.Option("--ark", help="The ARK (default: AMD's built-in).")] = None,
    ask: Annotated[Path | None, typer.Option("--ask", help="The ASK (default: AMD's built-in).")] = None,
    cert_chain: Annotated[
        Path | None, typer.Option("--cert-chain", help="AMD KDS cert_chain (ASK+ARK PEM).")
    ] = None,
    expect_measurement: Annotated[
        str | None,
        typer.Option("--expect-measurement", help="The launch digest (96 hex digits, 'owner measure')."),
    ] = None,
    policy: Annotated[
        str | None, typer.Option("--policy", help="The exact guest policy word expected.")
    ] = None,
    vmpl: Annotated[int, typer.Option("--vmpl", help="The VMPL the report must come from.")] = 0,
    min_tcb: Annotated[
        list[str] | None,
        typer.Option(
            "--min-tcb", help="NAME=N minimum, NAME in boot_loader, tee, snp, microcode, fmc; repeatable."
        ),
    ] = None,
    host_data: Annotated[
        str | None, typer.Option("--host-data", help="Expected HOST_DATA (64 hex digits).")
    ] = None,
    report_data: Annotated[
        str | None, typer.Option("--report-data", help="Expected REPORT_DATA (128 hex digits).")
    ] = None,
    id_key_digest: Annotated[
        str | None, typer.Option("--id-key-digest", help="Expected ID key digest (96 hex).")
    ] = None,
    author_key_digest: Annotated[
        str | None, typer.Option("--author-key-digest", help="Expected author key digest.")
    ] = None,
    allow_debug: Annotated[
        bool, typer.Option("--allow-debug", help="Accept a policy that allows debugging.")
    ] = False,
    ark_sha256: ArkPins = None,
    trust_emulated_platform: TrustEmulated = False,
    output: OutputOpt = Output.TEXT,
) -> None:
    """Verify an SNP attestation report like 'snpguest verify' (chain, signature, TCB against the VCEK,
    chip id) and against what the owner expects; exit 2 naming the field that does not match."""
    from confplan.sev.snp_verify import ReportExpectations, verify_snp_report

    if trust_emulated_platform:
        warn_emulated()
    expect = ReportExpectations(
        measurement=_hex_option(expect_measurement, 48, "--expect-measurement"),
        policy=parse_int(policy) if policy is not None else None,
        vmpl=vmpl, allow_debug=allow_debug,
        host_data=_hex_option(host_data, 32, "--host-data"),
        report_data=_hex_option(report_data, 64, "--report-data"),
        id_key_digest=_hex_option(id_key_digest, 48, "--id-key-digest"),
        author_key_digest=_hex_option(author_key_digest, 48, "--author-key-digest"),
        min_tcb=_parse_min_tcb(min_tcb or []),
    )  # fmt: skip
    ark_raw, ask_raw = _ca_files(ark, ask, cert_chain)
    raw = _read_report(report)
    try:
        verdict = verify_snp_report(
            raw, read_file(vek, "VEK"), ark_raw, ask_raw, expect,
            pins=[p.lower() for p in ark_sha256 or []], trust_emulated=trust_emulated_platform,
        )  # fmt: skip
    except VerifyError as err:
        raise _refused(output, err, f"report {report}") from None
    r = verdict.report
    lines = [
        f"report verified: {report}",
        f"  root: {verdict.root.describe()}; signed by the {verdict.chain.vek.kind}",
        f"  measurement {r.measurement.hex()}",
        f"  policy {r.policy:#x}, vmpl {r.vmpl}, reported TCB {r.reported_tcb}",
        f"  checked: {', '.join(verdict.checked)}",
    ]
    if expect.measurement is None:
        lines.append("  note: no --expect-measurement: the guest's code was not checked")
    _emit(output, verdict.summary(), lines)


def _parse_min_tcb(items: list[str]) -> dict[str, int]:
    from confplan.sev.snp_report import TCB_FIELDS

    out = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in TCB_FIELDS or not value.isdigit():
            raise ConfplanError(
                f"--min-tcb {item!r}: expected NAME=N", hint=f"NAME in {', '.join(TCB_FIELDS)}"
            )
        out[name] = int(value)
    return out


def register(app: typer.Typer) -> None:
    """Add these commands to ``confplan owner`` (``owner_cmds.register`` put that group on ``app``)."""
    owner_app.add_typer(attest_app)
