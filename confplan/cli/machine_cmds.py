"""Machine commands: ``confplan launch PLAN`` boots the plan's guest on the built-in VMM and shows what
it is doing until Ctrl-C (or ``--duration``), then shuts it down cleanly."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from confplan.vmm import Machine, MachineConfig, abi


def config_from_plan(plan: Any) -> MachineConfig:
    """Map a ``confplan.plan`` Plan onto the VMM's config (the VMM itself never imports the plan)."""
    guest, helper = plan.guest, plan.helper
    mirror = helper.mode == "mirror-vm"
    return MachineConfig(
        memory=int(guest.memory),
        vcpus=guest.vcpus,
        aux_vcpus=0 if mirror else helper.aux_vcpus,
        mirror_vcpus=max(1, helper.aux_vcpus) if mirror else 1,
        helper_mode=helper.mode,
        batch_pages=helper.batch_pages,
        workload_kind=guest.workload.kind,
        dirty_rate=guest.workload.dirty_rate,
        shared_fraction=guest.workload.shared_fraction,
        seed=guest.workload.seed,
    )


def _status_line(m: Machine, dirty_pages: int, seconds: float) -> str:
    progress = m.workload.progress()
    rate = dirty_pages * abi.PAGE / max(seconds, 1e-9) / abi.MIB
    aux = sum(a.ready for a in m.aux)
    exits = sum(r.exits for r in m.runners)
    return (
        f"vCPUs {','.join(progress.states)} | aux ready {aux}/{len(m.aux)} | dirty {rate:8.1f} MiB/s | "
        f"shared {m.enc_bitmap.shared_pages()} pages | written {progress.pages_written} | exits {exits}"
    )


def launch(
    plan_path: Annotated[Path, typer.Argument(metavar="PLAN", help="The plan whose guest to boot.")],
    duration: Annotated[
        float | None, typer.Option(help="Stop after this many seconds (default: run until Ctrl-C).")
    ] = None,
    interval: Annotated[float, typer.Option(help="Seconds between status lines.")] = 1.0,
    console: Annotated[bool, typer.Option(help="Show the guest's console lines.")] = True,
) -> None:
    """Boot the plan's guest and show live what it does (vCPUs, aux vCPUs, dirty rate, shared pages)."""
    from confplan.plan import load_plan

    config = config_from_plan(load_plan(plan_path))
    echo = (lambda line: typer.echo(f"  {line}")) if console else None
    with Machine(config, echo=echo) as m:
        typer.echo(f"firmware {m.firmware.path} sha256 {m.firmware.sha256}")
        typer.echo(
            f"guest: {config.memory // abi.MIB} MiB, {config.vcpus} vCPUs + {config.aux_vcpus} aux, "
            f"workload {config.workload_kind}; Ctrl-C stops it"
        )
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
