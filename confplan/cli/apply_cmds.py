"""``confplan apply PLAN``: live-migrate the plan's guest; ``confplan vmm`` / ``confplan agent``: the VMM
process the orchestrator drives (locally a detached child, remotely an agent); ``confplan stop PLAN``:
shut down the VMM processes a plan left running (the migrated guest on the target, or a source that an
interrupted apply left to be resumed).

Output (``confplan.cli.output``): a rich live view on a terminal, plain lines otherwise; ``--output json``
prints the report (docs/report.md) at the end, ``--output ndjson`` streams events and ends with it.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated

import typer

# Registers the migration's stages, so `confplan status` sees their resume policies too.
import confplan.stages.modules  # noqa: F401
from confplan.cli.output import Output, ReportOutput, interruptible
from confplan.cli.preflight_cmds import CheckpointDirOption, load_plan_at
from confplan.errors import ConfplanError, PlanBusy
from confplan.plan import Plan


def apply_cmd(
    plan_path: Annotated[Path, typer.Argument(metavar="PLAN", help="The migration plan to carry out.")],
    output: Annotated[
        Output,
        typer.Option("--output", "-o", help="text (live), json (the report at the end) or ndjson (one event "
                     "per line as it happens, the report last); docs/report.md."),
    ] = Output.TEXT,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would run; run nothing.")] = False,
    restart: Annotated[bool, typer.Option("--restart", help="Start a new run instead of resuming.")] = False,
    yes: Annotated[
        bool,
        typer.Option(
            "--yes", "-y", help="Consent to stopping a guest that runs (a new run replaces the plan's VMMs)."
        ),
    ] = False,
    checkpoint_dir: CheckpointDirOption = None,
    junit: Annotated[
        Path | None,
        typer.Option("--junit", metavar="FILE", help="Also write the run's report as JUnit XML to FILE (a "
                     "testcase per stage and preflight check), whatever the outcome."),
    ] = None,
) -> None:
    """Live-migrate the plan's guest, resuming an earlier failed run where that is safe."""
    from confplan import preflight
    from confplan.stages import apply

    out = ReportOutput(output, kind="dry-run" if dry_run else "apply", plan_file=str(plan_path), junit=junit)
    with out.reporting():
        plan = out.plan = load_plan_at(plan_path, checkpoint_dir)
        # The hosts first: a host that lacks something stops the apply here, before a VMM starts.
        preflight.require(plan, on_check=out.observer.preflight_checked, shown=output is Output.TEXT)
        if not dry_run:
            _consent_to_replace(plan, restart=restart, yes=yes, plan_ref=str(plan_path))
        with interruptible() if not dry_run else contextlib.nullcontext():
            result = apply(
                plan, observer=out.observer, dry_run=dry_run, restart=restart, plan_ref=str(plan_path)
            )
        doc = out.succeeded(result)
    moved = doc["migration"]
    if output is Output.TEXT and moved["downtime_seconds"] is not None:
        guest = moved.get("guest_downtime_seconds")
        seen = f" (the guest saw {guest * 1e3:.1f} ms)" if guest is not None else ""
        typer.echo(f"downtime {moved['downtime_seconds'] * 1e3:.1f} ms{seen}; the guest runs in the target "
                   f"VMM (pid {moved['target_pid']}); `confplan stop {plan_path}` shuts it down")  # fmt: skip


def _consent_to_replace(plan: Plan, *, restart: bool, yes: bool, plan_ref: str) -> None:
    """A new run (``--restart``, an edited plan) stops this plan's VMMs: say exactly which guests that
    destroys and go on only with consent (``--yes``, or "y" on a terminal); refuse otherwise."""
    from confplan.stages import apply
    from confplan.stages.modules._common import live_vmms

    choice = apply(plan, dry_run=True, restart=restart).choice
    if choice.resume:
        return
    doomed = [vmm for vmm in live_vmms(plan) if vmm.precious]
    if not doomed:
        return
    what = "; ".join(vmm.describe() for vmm in doomed)
    message = f"a new run of {plan.metadata.name} ({choice.reason}) would stop {what}"
    if yes:
        typer.echo(f"{message}: going ahead (--yes)", err=True)
        return
    if sys.stdin.isatty() and typer.confirm(f"{message}. Stop it and start over?", default=False, err=True):
        return
    raise PlanBusy(
        f"{message}; refused without consent",
        hint=f"`confplan stop {plan_ref}` first, or rerun with --yes to stop it and start over",
    )


def vmm_cmd(
    socket_path: Annotated[Path, typer.Option("--socket", help="Unix socket to serve the control RPC on.")],
    psp_dir: Annotated[Path, typer.Option(help="Folder of the emulated secure processor's keys.")],
    firmware: Annotated[Path | None, typer.Option(help="Folder with another firmware build.")] = None,
    control_fd: Annotated[int | None, typer.Option(help="Also serve this inherited socket fd.")] = None,
) -> None:
    """Run a VMM process (started by `confplan apply`; serves until told to shut down)."""
    from confplan.agent.main import run_vmm

    raise typer.Exit(run_vmm(socket_path, psp_dir=psp_dir, firmware_dir=firmware, control_fd=control_fd))


def agent_cmd(
    listen: Annotated[
        str, typer.Option(help="HOST:PORT to serve the control RPC on, over mutual TLS 1.3 (port 0: any).")
    ],
    home: Annotated[
        Path | None,
        typer.Option(help="Folder of this agent's identity, trust store and state (default: $CONFPLAN_HOME, "
                     "else $XDG_STATE_HOME/confplan, else ~/.local/state/confplan)."),
    ] = None,
    psp_dir: Annotated[
        Path | None, typer.Option(help="Folder of the emulated secure processor's keys (default: in HOME).")
    ] = None,
    firmware: Annotated[Path | None, typer.Option(help="Folder with another firmware build.")] = None,
) -> None:
    """Serve a VMM for remote orchestrators (a migration target on this host).

    Only orchestrators enrolled with `confplan trust add --orchestrator FILE` get past the TLS handshake;
    the agent prints its fingerprint, which plans pin (target: {host: tcp://HOST:PORT, fingerprint: ...}).
    It takes no host path from the wire: its logs and state live under HOME/agent.
    """
    from confplan.agent.main import run_agent
    from confplan.transport import default_home

    host, port = _listen_address(listen)
    code = run_agent(host, port, home=home or default_home(), psp_dir=psp_dir,
                     firmware_dir=firmware)  # fmt: skip
    raise typer.Exit(code)


def _listen_address(listen: str) -> tuple[str, int]:
    """``--listen HOST:PORT`` checked as written (a usage error, exit 2); whether this host has that
    address is the listener's to say (an environment problem, exit 3)."""
    import ipaddress

    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    fix = "e.g. --listen 0.0.0.0:4444 (port 0: any free one), or --listen [::1]:4444"
    if not host or not port.isdigit() or int(port) > 65535:
        raise ConfplanError(f"--listen {listen!r} is not HOST:PORT with a port from 0 to 65535", hint=fix)
    if all(part.isdigit() for part in host.split(".")):  # looks like IPv4: must be one
        try:
            ipaddress.IPv4Address(host)
        except ValueError as err:
            raise ConfplanError(f"--listen {listen!r}: {err}", hint=fix) from None
    return host, int(port)


def stop_cmd(
    plan_path: Annotated[Path, typer.Argument(metavar="PLAN", help="The plan whose VMM processes to stop.")],
    checkpoint_dir: CheckpointDirOption = None,
) -> None:
    """Stop the guests of PLAN: its local VMM processes, and the guest in a remote target's agent (the
    agent itself keeps serving)."""
    from confplan.agent import handle as vmm_handle

    plan = load_plan_at(plan_path, checkpoint_dir)
    for role, endpoint in (("source", plan.source), ("target", plan.target)):
        if not endpoint.is_local:
            host, port = endpoint.address or ("", 0)
            remote = vmm_handle.connect_remote(host, port, role, pin=endpoint.fingerprint)
            try:
                stopped = remote.call("stop_guest")["stopped"]
            finally:
                remote.close()
            typer.echo(f"{role}: the guest in the agent at {host}:{port} stopped" if stopped
                       else f"{role}: the agent at {host}:{port} holds no guest")  # fmt: skip
            continue
        found = vmm_handle.find_local(Path(plan.checkpoint.dir), role, plan=plan.metadata.name)
        if found is None:
            typer.echo(f"{role}: no VMM process")
            continue
        vmm_handle.stop(found)
        typer.echo(f"{role}: VMM process {found.pid} stopped")


def register(app: typer.Typer) -> None:
    """Add this area's commands to the root app."""
    app.command("apply")(apply_cmd)
    app.command("vmm", hidden=True)(vmm_cmd)
    app.command("agent")(agent_cmd)
    app.command("stop")(stop_cmd)
