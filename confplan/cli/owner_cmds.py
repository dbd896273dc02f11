"""``confplan owner``: the guest owner's key broker as an offline tool (files in, files out).

An owner runs these on their own machine; nothing here talks to the host. The files exchanged with the
host use the encodings QEMU's sev-guest object and sev-inject-launch-secret take (base64). The owner's
offline attestation checks (measure, verify-chain, verify-report) are in ``owner_attest_cmds``.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Annotated

import pydantic
import typer

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


def read_file(path: Path, what: str) -> bytes:
    """The bytes of ``path`` (``what`` names it in the error)."""
    try:
        return path.read_bytes()
    except OSError as err:
        raise ConfplanError(f"cannot read {what} {path}: {err.strerror}", hint="check the path") from None


def read_blob(path: Path, length: int, what: str) -> bytes:
    """A file holding exactly ``length`` bytes, raw, hex or base64 (QEMU's QMP gives base64)."""
    raw = read_file(path, what)
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


def parse_int(text: str) -> int:
    """A decimal or 0x hex integer from an option."""
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
            allowed_policies=[parse_int(p) for p in allow_policy],
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

    raw = read_file(path, "ARK certificate")
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
        blob = read_file(path, "blob")
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
        return parse_int(text)
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
        chain = PlatformChain.unpack(read_file(platform_chain, "platform chain"))
    except CertError as err:
        hint = "export the chain from the platform again"
        raise ConfplanError(f"{platform_chain}: {err}", hint=hint) from None
    bundle = broker.new_session(chain, parse_int(policy))
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
        read_file(session_state, "session state"),
        read_blob(measurement, launch_crypto.MEASURE_LEN, "launch measurement"),
        launch_crypto.PlatformVersion(major, minor, build),
        {CONFPLAN_TRANSPORT_KEY_GUID: read_blob(transport_key, 32, "transport key")},
        where=session_state,
    )
    header = _write_b64(out, "secret_header.b64", packet.header())
    secret = _write_b64(out, "secret.b64", packet.ciphertext)
    typer.echo(f"measurement matches; give the host {header} and {secret}")


def register(app: typer.Typer) -> None:
    """Add ``confplan owner ...`` to the root app."""
    app.add_typer(owner_app, name="owner")
