"""Stage commands: ``confplan status PLAN`` shows the checkpoint of a plan's latest run.

It reads the checkpoint only (no lock, nothing created), and says what the next ``confplan apply`` would
do, using the same pure decision (``choose_run`` + ``plan_steps``) that apply uses.
"""

from __future__ import annotations

import enum
import json
import time
from typing import Annotated, Any

import typer

from confplan.agent import handle as vmm_handle
from confplan.cli.preflight_cmds import CheckpointDirOption, load_plan_at
from confplan.errors import ExitCode
from confplan.plan import Plan
from confplan.stages.base import stage_policies
from confplan.stages.checkpoint import (
    DB_NAME,
    CheckpointStore,
    RunOutcome,
    RunRecord,
    StageRecord,
    StageStatus,
)
from confplan.stages.executor import RunChoice, Step, StepAction, choose_run, plan_steps
from confplan.stages.observers import format_bytes


class OutputFormat(enum.StrEnum):
    TEXT = "text"
    JSON = "json"


def status(
    plan_file: Annotated[str, typer.Argument(help="The plan file.", metavar="PLAN")],
    output: Annotated[
        OutputFormat, typer.Option("--output", "-o", help="text (a table) or json (for pipelines).")
    ] = OutputFormat.TEXT,
    checkpoint_dir: CheckpointDirOption = None,
) -> None:
    """Show the checkpoint of PLAN's latest run: each stage's status, duration, bytes and error."""
    plan = load_plan_at(plan_file, checkpoint_dir)
    run, records = _read_checkpoint(plan)
    choice = choose_run(run, plan.plan_hash())
    policies = stage_policies()
    steps = plan_steps(plan.stages, records if choice.resume else {}, policies=policies)
    processes = vmm_processes(records)
    if output is OutputFormat.JSON:
        document = {**_document(plan, plan_file, run, records, choice, steps), "processes": processes}
        typer.echo(json.dumps(document, indent=2))
    else:
        for line in [*_text(plan, run, records, choice, steps), *_process_lines(processes)]:
            typer.echo(line)
    raise typer.Exit(status_exit_code(run, records))


def status_exit_code(run: RunRecord | None, records: dict[str, StageRecord]) -> int:
    """0 unless the last run failed: 4 (the migration failed), 130 when it was interrupted."""
    if run is None or run.outcome is not RunOutcome.FAILED:
        return int(ExitCode.OK)
    failed = [rec for rec in records.values() if rec.status is StageStatus.FAILED]
    if failed and (failed[-1].error or "").startswith("interrupted"):
        return int(ExitCode.INTERRUPTED)
    return int(ExitCode.MIGRATION_FAILED)


def vmm_processes(records: dict[str, StageRecord]) -> list[dict[str, Any]]:
    """``{role, pid, host, alive}`` of the VMMs the run recorded (docs/report.md ``processes``): a local
    pid is checked with ``agent.handle.vmm_alive`` (a dead or recycled pid is not alive); a remote
    agent's is null (this host cannot tell)."""
    found = []
    for stage, role in (("launch-source", "source"), ("provision-target", "target")):
        record = records.get(stage)
        result = record.result if record is not None and isinstance(record.result, dict) else {}
        if not result.get("pid"):
            continue
        agent = result.get("agent")
        host = f"{agent[0]}:{agent[1]}" if agent else "local"
        alive = None if agent else vmm_handle.vmm_alive(int(result["pid"]))
        found.append({"role": role, "pid": int(result["pid"]), "host": host, "alive": alive})
    return found


def _process_lines(processes: list[dict[str, Any]]) -> list[str]:
    state = {True: "running", False: "not running (dead)", None: "not checked (on the agent's host)"}
    return [f"{p['role']} VMM: pid {p['pid']} on {p['host']}: {state[p['alive']]}" for p in processes]


def _read_checkpoint(plan: Plan) -> tuple[RunRecord | None, dict[str, StageRecord]]:
    if not (plan.checkpoint.dir / DB_NAME).exists():
        return None, {}
    with CheckpointStore.open(plan.checkpoint.dir, create=False) as store:
        run = store.latest_run(plan.metadata.name)
        return run, store.stage_records(run.run_id) if run is not None else {}


def _document(
    plan: Plan,
    plan_file: str,
    run: RunRecord | None,
    records: dict[str, StageRecord],
    choice: RunChoice,
    steps: list[Step],
) -> dict[str, Any]:
    return {
        "plan": {"file": plan_file, "name": plan.metadata.name, "hash": plan.plan_hash()},
        "checkpoint": str(plan.checkpoint.dir / DB_NAME),
        "run": run.to_json() if run is not None else None,
        "stages": [record.to_json() for record in records.values()],
        "next_apply": {**choice.to_json(), "steps": [step.to_json() for step in steps]},
    }


def _text(
    plan: Plan,
    run: RunRecord | None,
    records: dict[str, StageRecord],
    choice: RunChoice,
    steps: list[Step],
) -> list[str]:
    lines = [f"plan {plan.metadata.name} (hash {plan.plan_hash()[:12]})"]
    if run is None:
        lines.append(f"no run recorded in {plan.checkpoint.dir / DB_NAME}: the plan has not been applied")
        return lines
    finished = f", finished {_when(run.finished)}" if run.finished else ""
    lines.append(
        f"run {run.run_id}: {run.outcome.value}, started {_when(run.started)}{finished}, "
        f"attempt {run.attempts} (checkpoint {plan.checkpoint.dir / DB_NAME})"
    )
    lines.extend(_table(records))
    lines.append(f"next apply: {_next(choice, steps)}")
    return lines


def _table(records: dict[str, StageRecord]) -> list[str]:
    rows = [("STAGE", "STATUS", "DURATION", "SHARED", "SEALED", "ERROR")]
    for record in records.values():
        duration = f"{record.duration:.2f}s" if record.duration is not None else "-"
        error = (record.error or "").strip().splitlines()
        rows.append(
            (
                record.stage,
                record.status.value,
                duration,
                format_bytes(record.bytes_shared) if record.bytes_shared else "-",
                format_bytes(record.bytes_sealed) if record.bytes_sealed else "-",
                error[0] if error else "",
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(5)]
    # The error column is last and not padded: it is as long as it is.
    return [
        ("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, [*widths, 0], strict=True))).rstrip()
        for row in rows
    ]


def _next(choice: RunChoice, steps: list[Step]) -> str:
    if not choice.resume:
        return choice.reason
    first = next((step for step in steps if step.action is not StepAction.SKIP), None)
    if first is None:
        return "nothing to do: every stage is done"
    if first.action is StepAction.BLOCKED:
        return f"blocked: {first.reason} (check the guest, then `confplan apply --restart PLAN`)"
    return f"resume at stage {first.stage} ({first.reason})"


def _when(stamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) if stamp else "-"


def register(app: typer.Typer) -> None:
    """Add this area's commands to the root app."""
    app.command("status")(status)
