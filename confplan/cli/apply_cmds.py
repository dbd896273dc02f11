"""``confplan apply PLAN``: live-migrate the plan's guest; ``confplan vmm`` / ``confplan agent``: the VMM
process the orchestrator drives (locally a detached child, remotely an agent); ``confplan stop PLAN``:
shut down the VMM processes a plan left running (the migrated guest on the target, or a source that an
interrupted apply left to be resumed).

Output: a rich live view on a terminal, plain lines otherwise, and with ``--output json`` one JSON report
at the end (per-stage timings, rounds, bytes shared/sealed, downtime).
"""

from __future__ import annotations

import enum
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

# Registers the migration's stages, so `confplan status` sees their resume policies too.
import confplan.stages.modules  # noqa: F401
from confplan.errors import ConfplanError, PlanBusy
from confplan.plan import Plan
from confplan.stages.base import Progress, Teardown
from confplan.stages.checkpoint import RunRecord, StageRecord
from confplan.stages.executor import ApplyReport, Observer, RunChoice, StageFailed, Step
from confplan.stages.observers import TextObserver


class Output(enum.StrEnum):
    TEXT = "text"
    JSON = "json"


class RichObserver(Observer):
    """A live line per stage on a terminal: the stage, its round, dirty pages left, throughput, ETA."""

    def __init__(self, console: Any = None) -> None:
        from rich.console import Console
        from rich.progress import Progress as Bar
        from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn

        self.console = console if console is not None else Console()
        self.text = TextObserver(self.console.print)
        columns = (SpinnerColumn(), TextColumn("[bold]{task.description:<16}"), TimeElapsedColumn())
        self.bar = Bar(*columns, TextColumn("{task.fields[status]}"), console=self.console)
        self.tasks: dict[str, Any] = {}

    def run_chosen(self, choice: RunChoice) -> None:
        self.text.run_chosen(choice)

    def reconciled(self, note: str) -> None:
        self.text.reconciled(note)

    def steps_planned(self, steps: Sequence[Step], dry_run: bool) -> None:
        self.text.steps_planned(steps, dry_run)
        if not dry_run:
            self.bar.start()

    def stage_started(self, step: Step) -> None:
        self.tasks[step.stage] = self.bar.add_task(step.stage, total=None, status=step.action.value)

    def stage_progress(self, stage: str, progress: Progress) -> None:
        if stage in self.tasks:
            self.bar.update(self.tasks[stage], status=progress.message or f"{progress.done} {progress.unit}")

    def stage_skipped(self, step: Step) -> None:
        self.bar.console.print(f"[dim]{step.stage}: skipped ({step.reason})")

    def stage_finished(self, step: Step, record: StageRecord) -> None:
        task = self.tasks.get(step.stage)
        if task is not None:
            self.bar.update(task, total=1, completed=1, status=f"[green]done in {record.duration or 0:.2f}s")

    def stage_failed(self, step: Step, error: str) -> None:
        task = self.tasks.get(step.stage)
        if task is not None:
            self.bar.update(task, total=1, completed=0, status=f"[red]FAILED: {error.splitlines()[0]}")

    def teardown_ran(self, teardown: Teardown, error: str | None) -> None:
        self.bar.console.print(f"  tear-down {teardown.label}: {'ok' if error is None else error}")

    def run_finished(self, run: RunRecord) -> None:
        self.bar.stop()
        self.text.run_finished(run)


def final_report(report: ApplyReport) -> dict[str, Any]:
    """The JSON report: per-stage status and timings, precopy rounds, bytes, downtime."""
    records = report.records
    stages = {name: rec.to_json() for name, rec in records.items()}

    def data(stage: str) -> dict[str, Any]:
        rec = records.get(stage)
        return dict(rec.result) if rec is not None and rec.result else {}

    precopy, final, resume = data("precopy"), data("stop-and-copy"), data("resume-target")
    rounds = list(precopy.get("rounds", []))
    if final.get("final_round"):
        rounds.append({**final["final_round"], "final": True})
    return {
        "plan": report.run.plan_name if report.run else None,
        "run": report.run.to_json() if report.run else None,
        "stages": stages,
        "rounds": rounds,
        "bytes_shared": sum(rec.bytes_shared for rec in records.values()),
        "bytes_sealed": sum(rec.bytes_sealed for rec in records.values()),
        "downtime_seconds": resume.get("downtime_seconds"),
        "guest_downtime_seconds": resume.get("guest_downtime_seconds"),
        "clock_monotonic": resume.get("clock_monotonic"),
        "source_paused_seconds": final.get("source_paused_seconds"),
        "target_pid": resume.get("target_pid"),
    }


def _observer(output: Output) -> Observer:
    if output is Output.JSON:
        return Observer()  # only the final report goes to stdout
    if sys.stdout.isatty():
        return RichObserver()
    return TextObserver(typer.echo)


def apply_cmd(
    plan_path: Annotated[Path, typer.Argument(metavar="PLAN", help="The migration plan to carry out.")],
    output: Annotated[Output, typer.Option("--output", "-o", help="text (live) or json (final report).")] = (
        Output.TEXT
    ),
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would run; run nothing.")] = False,
    restart: Annotated[bool, typer.Option("--restart", help="Start a new run instead of resuming.")] = False,
    yes: Annotated[
        bool,
        typer.Option(
            "--yes", "-y", help="Consent to stopping a guest that runs (a new run replaces the plan's VMMs)."
        ),
    ] = False,
) -> None:
    """Live-migrate the plan's guest, resuming an earlier failed run where that is safe."""
    from confplan.plan import load_plan
    from confplan.stages import apply

    plan = load_plan(plan_path)
    if not dry_run:
        _consent_to_replace(plan, restart=restart, yes=yes, plan_ref=str(plan_path))
    observer = _observer(output)
    try:
        report = apply(plan, observer=observer, dry_run=dry_run, restart=restart, plan_ref=str(plan_path))
    except StageFailed as err:
        if output is Output.JSON:
            typer.echo(json.dumps({"plan": plan.metadata.name, "failed": err.stage, "error": err.message,
                                   "hint": err.hint}, indent=2))  # fmt: skip
        raise
    if output is Output.JSON:
        typer.echo(json.dumps(final_report(report), indent=2, sort_keys=True))
        return
    doc = final_report(report)
    if doc["downtime_seconds"] is not None:
        guest = doc.get("guest_downtime_seconds")
        seen = f" (the guest saw {guest * 1e3:.1f} ms)" if guest is not None else ""
        typer.echo(f"downtime {doc['downtime_seconds'] * 1e3:.1f} ms{seen}; the guest runs in the target VMM "
                   f"(pid {doc['target_pid']}); `confplan stop {plan_path}` shuts it down")  # fmt: skip


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

    host, _, port = listen.rpartition(":")
    if not port.isdigit() or not host:
        raise ConfplanError(f"--listen {listen!r} is not HOST:PORT", hint="e.g. --listen 0.0.0.0:4444")
    code = run_agent(host.strip("[]"), int(port), home=home or default_home(), psp_dir=psp_dir,
                     firmware_dir=firmware)  # fmt: skip
    raise typer.Exit(code)


def stop_cmd(
    plan_path: Annotated[Path, typer.Argument(metavar="PLAN", help="The plan whose VMM processes to stop.")],
) -> None:
    """Stop the guests of PLAN: its local VMM processes, and the guest in a remote target's agent (the
    agent itself keeps serving)."""
    from confplan.agent import handle as vmm_handle
    from confplan.plan import load_plan

    plan = load_plan(plan_path)
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
