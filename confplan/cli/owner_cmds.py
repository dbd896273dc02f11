"""``confplan owner``: the guest owner's key broker as an offline tool (files in, files out).

An owner runs these on their own machine; nothing here talks to the host. The files exchanged with the
host use the encodings QEMU's sev-guest object and sev-inject-launch-secret take (base64).
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Annotated

import pydantic
import typer

from confplan.cli.formats import TextOrJson as Output
from confplan.errors import ConfplanError
from confplan.sev import launch_crypto
from confplan.sev.broker import KeyBroker, OwnerPolicy, parse_api
from confplan.sev.certs import CERT_LEN, CertError, PlatformChain, SevCert
from confplan.sev.secret_table import CONFPLAN_TRANSPORT_KEY_GUID
from confplan.sev.signing import VerifyError
from confplan.sev.statefile import write_private

owner_app = typer.Typer(
    help=(
        "The guest owner's key broker, offline: set up keys and a policy, make a launch session for a "
        "platform, and release the migration transport key to a launch whose measurement matches.\n\n"
        "Typical flow: 'owner init' once; per launch 'owner session' (give the host godh.b64 and "
        "session.b64), then 'owner release' with the host's measurement (give the host secret_header.b64 "
        "and secret.b64)."
    ),
    no_args_is_help=True,
    rich_markup_mode=None,
)

OwnerDir = Annotated[Path, typer.Option("--owner-dir", help="The owner directory (owner.key, policy.json).")]


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise ConfplanError(f"cannot read {what} {path}: {err.strerror}", hint="check the path") from None


def _read_blob(path: Path, length: int, what: str) -> bytes:
    """A file holding exactly ``length`` bytes, raw, hex or base64 (QEMU's QMP gives base64)."""
    raw = _read(path, what)
    if len(raw) == length:
        return raw
    text = raw.strip()
    for decode in (bytes.fromhex, base64.b64decode):
        try:
            value = decode(text.decode("ascii"))
        except (ValueError, UnicodeDecodeError, binascii.Error):
            continue
        if len(value) == length:
            return value
    raise ConfplanError(
        f"{path}: expected {what} of {length} bytes (raw, hex or base64), found {len(raw)} other bytes",
        hint=f"pass the file holding the {what}",
    )


def _write_b64(out: Path, name: str, data: bytes) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(base64.b64encode(data).decode() + "\n")
    return path


def _parse_int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise ConfplanError(f"{text!r} is not an integer (decimal or 0x hex)") from None


def _parse_api_option(text: str, option: str) -> tuple[int, int]:
    try:
        return parse_api(text)
    except ValueError as err:
        raise ConfplanError(f"{option}: {err}", hint="write it like 1.40") from None


@owner_app.command("init")
def init_cmd(
    owner_dir: OwnerDir,
    allow_digest: Annotated[
        list[str],
        typer.Option("--allow-digest", help="An allowed SEV launch digest (64 hex digits); repeatable."),
    ],
    allow_policy: Annotated[
        list[str], typer.Option("--allow-policy", help="An allowed guest policy word (e.g. 0x1); repeatable.")
    ],
    min_api: Annotated[str, typer.Option("--min-api", help="Lowest firmware API, MAJOR.MINOR.")] = "0.0",
    min_build: Annotated[int, typer.Option("--min-build", help="Lowest firmware build at --min-api.")] = 0,
    trust_ark: Annotated[
        list[Path] | None,
        typer.Option(
            "--trust-ark",
            help="Pin this ARK (AMD_CERT, SEV cert or X.509, as received); repeatable. Without it AMD's "
            "built-in ARKs are trusted, and nothing else.",
        ),
    ] = None,
    trust_emulated_platform: Annotated[
        bool,
        typer.Option(
            "--trust-emulated-platform",
            help="DANGER: also trust a platform whose ARK is not AMD's (confplan's EMULATED secure "
            "processor). Its host holds the keys and can fake any measurement.",
        ),
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing owner key.")] = False,
) -> None:
    """Create the owner key and policy.json in --owner-dir (once, before any launch)."""
    _parse_api_option(min_api, "--min-api")
    pins = []
    for path in trust_ark or []:
        fingerprint, emulated = _ark_fingerprint(path)
        pins.append(fingerprint)
        if emulated and not trust_emulated_platform:
            trust_emulated_platform = True
            typer.echo(f"note: {path} is not an AMD ARK; pinning it trusts that emulated platform", err=True)
    try:
        policy = OwnerPolicy(
            allowed_digests=allow_digest,
            allowed_policies=[_parse_int(p) for p in allow_policy],
            min_api=min_api,
            min_build=min_build,
            trusted_ark_sha256=pins,
            trust_emulated_platform=trust_emulated_platform,
        )
    except pydantic.ValidationError as err:
        msg = str(err.errors()[0]["msg"]).removeprefix("Value error, ")
        raise ConfplanError(msg, hint="check the --allow-digest values") from None
    KeyBroker.init(owner_dir, policy, force=force)
    typer.echo(f"wrote {owner_dir / 'owner.key'} (keep it private) and {owner_dir / 'policy.json'}")
    if trust_emulated_platform:
        warn_emulated()
    elif not pins:
        typer.echo("note: no --trust-ark: AMD's built-in ARKs (Naples .. Turin) are trusted", err=True)


def warn_emulated() -> None:
    """The loud warning every command that trusts the emulated platform prints."""
    typer.echo(
        "WARNING: trusting the EMULATED secure processor: its keys are on the host, so a measurement or "
        "report it signs proves nothing against that host (never use this for a real guest)",
        err=True,
    )


def _ark_fingerprint(path: Path) -> tuple[str, bool]:
    """SHA-256 of an ARK file as received, and whether it is not AMD's (an emulated platform's)."""
    from confplan.sev import anchors
    from confplan.sev.amd_cert import AmdCert

    raw = _read(path, "ARK certificate")
    try:
        if len(raw) == CERT_LEN:
            return SevCert.unpack(raw, "ARK").fingerprint(), True
        if raw.lstrip().startswith(b"-----BEGIN") or raw[:1] == b"\x30":
            cert = anchors.load_x509(raw, str(path))
            fingerprint = anchors.der_fingerprint(cert)
            return fingerprint, anchors.snp_ark_product(fingerprint) is None
        fingerprint = AmdCert.parse(raw, "ARK").fingerprint()
        return fingerprint, anchors.sev_ark_product(fingerprint) is None
    except CertError as err:
        raise ConfplanError(f"{path}: not an ARK certificate: {err}", hint=err.hint) from None
    except VerifyError as err:
        raise ConfplanError(f"{path}: not an ARK certificate: {err.message}", hint=err.hint) from None


@owner_app.command("digest")
def digest_cmd(
    blobs: Annotated[list[Path], typer.Argument(help="The blobs the VMM measures, in order.")],
) -> None:
    """Print the SEV launch digest of BLOBS (firmware, boot parameters, CPU tables) for --allow-digest."""
    data = []
    for path in blobs:
        blob = _read(path, "blob")
        data.append(blob + b"\x00" * (-len(blob) % 16))  # the VMM pads each blob to 16 bytes
    typer.echo(launch_crypto.sev_launch_digest(data).hex())


@owner_app.command("blobs")
def blobs_cmd(
    plan_path: Annotated[Path, typer.Argument(metavar="PLAN", help="The migration plan of the guest.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for the blobs, NN-NAME-GPA.bin in order.")],
    tsc_khz: Annotated[int, typer.Option("--tsc-khz", help="The host's TSC rate (its VMM reports it).")],
    features: Annotated[
        str, typer.Option("--features", help="The host's CPU features: names (aes-ni,pclmulqdq) or a mask.")
    ],
    intel: Annotated[bool, typer.Option("--intel", help="The host is Intel (default: AMD).")] = False,
    target: Annotated[bool, typer.Option("--target", help="The target's (MH-only) launch.")] = False,
) -> None:
    """Write the blobs confplan's VMM measures for PLAN's guest on such a host (firmware, boot page, CPU
    tables) and print their launch digest: the value for 'owner init --allow-digest', computed here from
    confplan's own firmware, without asking the host."""
    from confplan.plan import load_plan
    from confplan.stages.machines import machine_config
    from confplan.vmm.bootparams import HostCpu
    from confplan.vmm.firmware import Firmware
    from confplan.vmm.launch_blobs import launch_blobs

    host = HostCpu(tsc_khz=tsc_khz, features=_parse_features(features), vendor_amd=not intel)
    config = machine_config(load_plan(plan_path), measured=True, mh_only=target)
    blobs = launch_blobs(config, Firmware.load(), host)
    out.mkdir(parents=True, exist_ok=True)
    for i, blob in enumerate(blobs):
        (out / f"{i:02d}-{blob.name}-{blob.gpa:#x}.bin").write_bytes(blob.data)
    typer.echo(launch_crypto.sev_launch_digest([b.data for b in blobs]).hex())
    typer.echo(f"wrote {len(blobs)} blobs to {out} ('owner digest {out}/*.bin' gives the same)", err=True)


def _parse_features(text: str) -> int:
    from confplan.vmm import abi

    if text.strip().lower().startswith("0x") or text.strip().isdigit():
        return _parse_int(text)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in abi.FEATURE_BITS]
    if unknown:
        known = ", ".join(abi.FEATURE_BITS)
        raise ConfplanError(f"--features: unknown feature {unknown[0]!r}", hint=f"use names from: {known}")
    return sum(abi.FEATURE_BITS[name] for name in set(names))


@owner_app.command("session")
def session_cmd(
    owner_dir: OwnerDir,
    platform_chain: Annotated[
        Path, typer.Option("--platform-chain", help="The platform's PDH,PEK,OCA,CEK,ASK,ARK certificates.")
    ],
    policy: Annotated[str, typer.Option("--policy", help="The guest policy word for this launch.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for godh.b64, session.b64, session.state.")],
) -> None:
    """Make the GODH certificate and session blob for one launch on one platform."""
    broker = KeyBroker.open(owner_dir)
    try:
        chain = PlatformChain.unpack(_read(platform_chain, "platform chain"))
    except CertError as err:
        hint = "export the chain from the platform again"
        raise ConfplanError(f"{platform_chain}: {err}", hint=hint) from None
    bundle = broker.new_session(chain, _parse_int(policy))
    _write_b64(out, "godh.b64", bundle.godh_cert)
    _write_b64(out, "session.b64", bundle.session_blob)
    write_private(out / "session.state", bundle.state)
    typer.echo(f"launch {bundle.launch_id}: give the host {out / 'godh.b64'} and {out / 'session.b64'}")


@owner_app.command("release")
def release_cmd(
    owner_dir: OwnerDir,
    session_state: Annotated[
        Path, typer.Option("--session-state", help="session.state from 'owner session'.")
    ],
    measurement: Annotated[
        Path, typer.Option("--measurement", help="LAUNCH_MEASURE output, 48 bytes (raw, hex or base64).")
    ],
    api: Annotated[str, typer.Option("--api", help="The platform's firmware API, MAJOR.MINOR.")],
    build: Annotated[int, typer.Option("--build", help="The platform's firmware build.")],
    transport_key: Annotated[
        Path, typer.Option("--transport-key", help="The migration transport key, 32 bytes (raw or hex).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Directory for secret_header.b64 and secret.b64.")],
) -> None:
    """Check a launch measurement against the policy; if it matches, wrap the transport key for it."""
    broker = KeyBroker.open(owner_dir)
    major, minor = _parse_api_option(api, "--api")
    packet = broker.release(
        _read(session_state, "session state"),
        _read_blob(measurement, launch_crypto.MEASURE_LEN, "launch measurement"),
        launch_crypto.PlatformVersion(major, minor, build),
        {CONFPLAN_TRANSPORT_KEY_GUID: _read_blob(transport_key, 32, "transport key")},
        where=session_state,
    )
    header = _write_b64(out, "secret_header.b64", packet.header())
    secret = _write_b64(out, "secret.b64", packet.ciphertext)
    typer.echo(f"measurement matches; give the host {header} and {secret}")


def register(app: typer.Typer) -> None:
    """Add ``confplan owner ...`` to the root app."""
    app.add_typer(owner_app, name="owner")


# -- attestation an owner runs offline: launch digests, chains and reports (docs/attestation.md) --


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
        return _parse_int(vcpu_sig)
    if vcpu_type is not None:
        if vcpu_type not in CPU_SIGS:
            raise ConfplanError(
                f"--vcpu-type: unknown type {vcpu_type!r}", hint=f"one of {', '.join(CPU_SIGS)}"
            )
        return CPU_SIGS[vcpu_type]
    return None


@owner_app.command("measure")
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

    image = Ovmf.parse(_read(ovmf, "OVMF image"), where=str(ovmf))
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
        "kernel": _read(kernel, "kernel") if kernel else None,
        "initrd": _read(initrd, "initrd") if initrd else None,
    }
    if ovmf_hash is not None and sev_mode is not measure.SevMode.SNP:
        raise ConfplanError("--ovmf-hash only works with --mode snp")
    try:
        if sev_mode is measure.SevMode.SNP:
            digest = measure.snp_launch_digest(
                image, vcpus=vcpus or 1, vcpu_sig=sig or 0, sev_features=_parse_int(guest_features),
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

    return _read_blob(path, REPORT_LEN, "SNP attestation report")


def _ca_files(
    ark: Path | None, ask: Path | None, cert_chain: Path | None
) -> tuple[bytes | None, bytes | None]:
    from confplan.sev.snp_chain import split_pem_chain

    if cert_chain is not None:
        certs = split_pem_chain(_read(cert_chain, "certificate chain"))
        if len(certs) != 2:
            raise ConfplanError(
                f"{cert_chain}: {len(certs)} PEM certificates, expected 2 (ASK, ARK)",
                hint="pass AMD KDS's cert_chain",
            )
        return certs[1], certs[0]
    return (_read(ark, "ARK") if ark else None), (_read(ask, "ASK") if ask else None)


@owner_app.command("verify-chain")
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
            chain = PlatformChain.unpack(_read(platform_chain, "platform chain"))
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
                _read(vek, "VEK"), ark_raw, ask_raw, pins=pins, trust_emulated=trust_emulated_platform
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


@owner_app.command("verify-report")
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
        policy=_parse_int(policy) if policy is not None else None,
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
            raw, _read(vek, "VEK"), ark_raw, ask_raw, expect,
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
