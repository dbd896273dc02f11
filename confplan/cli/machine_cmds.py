"""Machine commands: ``confplan launch PLAN`` boots the plan's guest on the built-in VMM, through a
measured SEV launch on the EMULATED secure processor by default, and shows what it is doing until Ctrl-C
(or ``--duration``), then shuts it down cleanly."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from confplan.vmm import Machine, abi

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey


def _status_line(m: Machine, dirty_pages: int, seconds: float) -> str:
    progress = m.workload.progress()
    rate = dirty_pages * abi.PAGE / max(seconds, 1e-9) / abi.MIB
    ready = sum(h.ready for h in m.helpers)
    where = "mirror VM" if m.mirror is not None else "aux"
    exits = sum(r.exits for r in m.runners)
    return (
        f"vCPUs {','.join(progress.states)} | {where} ready {ready}/{len(m.helpers)} | "
        f"dirty {rate:8.1f} MiB/s | shared {m.enc_bitmap.shared_pages()} pages | "
        f"written {progress.pages_written} | exits {exits}"
    )


def _measured_launch(m: Machine, policy: int, psp_dir: Path) -> None:
    """The owner's side runs in this process with throw-away keys whose policy allows exactly the digest
    predicted from the plan: it shows the flow and the refusals, it proves nothing against this host."""
    from confplan.sev import EmulatedSecureProcessor, KeyBroker
    from confplan.sev.broker import TRANSPORT_KEY_LEN
    from confplan.sev.owner import owner_policy_for
    from confplan.vmm.launch_blobs import expected_launch_digest
    from confplan.vmm.sev_launch import launch_with_broker

    psp = EmulatedSecureProcessor.open(psp_dir)
    digest = expected_launch_digest(m.config, m.firmware, m.host).hex()
    with tempfile.TemporaryDirectory(prefix="confplan-owner-") as owner_dir:
        broker = KeyBroker.init(
            Path(owner_dir), owner_policy_for(digest, policy, trust_emulated_platform=True)
        )
        record = launch_with_broker(m, psp, broker, policy, os.urandom(TRANSPORT_KEY_LEN))
    typer.echo(
        f"measured launch on the EMULATED secure processor (keys in {psp.key_file}; not AMD hardware): "
        f"policy {policy:#x}, firmware {record.version}"
    )
    typer.echo(f"  launch digest {record.digest} (predicted from the plan; the owner allowed it)")
    typer.echo(f"  measurement {record.measurement.hex()}")
    typer.echo(
        f"  the owner's broker (temporary emulated owner keys) released a transport key into the secret "
        f"page at {abi.SECRET_GPA:#x}; LAUNCH_FINISH done"
    )


def _snp_launch_and_start(m: Machine, policy: int, psp_dir: Path, owner_key: X25519PrivateKey) -> None:
    """SEV-SNP: launch, start, then release a throw-away transport key to the helper against its report
    (docs/key-release.md), the owner's side in this process as for SEV."""
    from confplan.migration.side import MigrationSide
    from confplan.sev.broker import TRANSPORT_KEY_LEN, confplan_secrets
    from confplan.sev.owner import release_to_snp_guest
    from confplan.vmm.launch_blobs import expected_launch_digest

    side = MigrationSide(m, psp_dir=psp_dir, log=lambda line: None)
    expected = expected_launch_digest(m.config, m.firmware, m.host)
    side.snp_launch(policy)
    m.start()
    m.wait_helpers_ready()
    secrets = confplan_secrets(os.urandom(TRANSPORT_KEY_LEN))
    release_to_snp_guest(side, expected, policy, secrets, owner_key=owner_key, trust_emulated_platform=True)
    typer.echo(f"SEV-SNP launch on the EMULATED secure processor (not AMD hardware): policy {policy:#x}")
    typer.echo(f"  launch digest {expected.hex()} (predicted from the plan; the report carried it)")
    typer.echo("  the owner's broker checked the helper's report and released a throw-away key to it")


def launch(
    plan_path: Annotated[Path, typer.Argument(metavar="PLAN", help="The plan whose guest to boot.")],
    duration: Annotated[
        float | None, typer.Option(help="Stop after this many seconds (default: run until Ctrl-C).")
    ] = None,
    interval: Annotated[float, typer.Option(help="Seconds between status lines.")] = 1.0,
    console: Annotated[bool, typer.Option(help="Show the guest's console lines.")] = True,
    measured: Annotated[
        bool,
        typer.Option(
            "--measured/--unmeasured",
            help="Measured launch (SEV, SEV-ES or SEV-SNP, as the plan says) with the plan's sev.policy on "
            "the EMULATED secure processor.",
        ),
    ] = True,
    psp_dir: Annotated[
        Path | None,
        typer.Option(help="Folder for the emulated secure processor's keys (default: checkpoint.dir)."),
    ] = None,
) -> None:
    """Boot the plan's guest and show live what it does (vCPUs, helper vCPUs, dirty rate, shared pages)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from confplan.plan import load_plan
    from confplan.sev.snp_release import public_bytes
    from confplan.stages.machines import machine_config

    plan = load_plan(plan_path)
    policy = int(plan.sev.policy_int) if measured else None
    owner_key = X25519PrivateKey.generate()  # throw-away: an SEV-SNP guest is launched with its public half
    config = machine_config(plan, measured=measured, owner_key=public_bytes(owner_key))
    echo = (lambda line: typer.echo(f"  {line}")) if console else None
    with Machine(config, echo=echo) as m:
        typer.echo(f"firmware {m.firmware.path} sha256 {m.firmware.sha256}")
        helpers = (
            f"mirror VM with {config.mirror_vcpus} vCPUs"
            if config.helper_mode == "mirror-vm"
            else f"{config.aux_vcpus} aux"
        )
        typer.echo(
            f"guest: {config.memory // abi.MIB} MiB, {config.vcpus} vCPUs + {helpers}, "
            f"workload {config.workload_kind}; Ctrl-C stops it"
        )
        if m.mirror is not None:
            typer.echo(f"mirror VM: {m.mirror.enc_context}")
        if policy is not None and config.snp:
            _snp_launch_and_start(m, policy, psp_dir or plan.checkpoint.dir, owner_key)
        else:
            if policy is not None:
                _measured_launch(m, policy, psp_dir or plan.checkpoint.dir)
            m.start()
        _watch(m, duration, interval)
    typer.echo("guest shut down")


def _watch(m: Machine, duration: float | None, interval: float) -> None:
    start = last = time.monotonic()
    m.dirty_log.clear()
    try:
        while duration is None or time.monotonic() - start < duration:
            time.sleep(interval)
            m.check()
            now = time.monotonic()
            dirty = m.dirty_log.fetch().count_range(m.layout.wl_base // abi.PAGE, m.layout.npages)
            typer.echo(_status_line(m, dirty, now - last))
            last = now
    except KeyboardInterrupt:
        typer.echo("stopping the guest")


def register(app: typer.Typer) -> None:
    """Add this area's commands to the root app."""
    app.command("launch")(launch)
