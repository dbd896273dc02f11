"""Stage commands: ``confplan status PLAN`` shows the checkpoint of a plan's latest run.

It reads the checkpoint only (no lock, nothing created), and says what the next ``confplan apply`` would
do, using the same pure decision (``choose_run`` + ``plan_steps``) that apply uses. ``-o json`` prints the
report (docs/report.md, kind ``status``); the exit code is the report's.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from confplan.cli.formats import TextOrJson as OutputFormat
from confplan.cli.output import Output, ReportOutput
from confplan.cli.preflight_cmds import CheckpointDirOption, load_plan_at
from confplan.plan import Plan
from confplan.report import read_run, report_for_plan
from confplan.stages.base import stage_policies
from confplan.stages.checkpoint import DB_NAME, RunRecord, StageRecord
from confplan.stages.executor import RunChoice, Step, StepAction, choose_run, plan_steps
from confplan.stages.observers import format_bytes


def status(
    plan_file: Annotated[str, typer.Argument(help="The plan file.", metavar="PLAN")],
    output: Annotated[
        OutputFormat, typer.Option("--output", "-o", help="text (a table) or json (the report).")
    ] = OutputFormat.TEXT,
    checkpoint_dir: CheckpointDirOption = None,
) -> None:
    """Show the checkpoint of PLAN's latest run: each stage's status, duration, bytes and error, and its VMM
    processes. Exits 4 when that run failed or was interrupted."""
    out = ReportOutput(Output(output.value), kind="status", plan_file=plan_file)
    with out.reporting():
        plan = out.plan = load_plan_at(plan_file, checkpoint_dir)
        doc = report_for_plan(plan, plan_file)
    if output is OutputFormat.JSON:
        out.report(doc)
    else:
        run, records = read_run(plan)
        choice = choose_run(run, plan.plan_hash())
        steps = plan_steps(plan.stages, records if choice.resume else {}, policies=stage_policies())
        for line in [*_text(plan, run, records, choice, steps), *_processes(doc["processes"])]:
            typer.echo(line)
    raise typer.Exit(doc["exit_code"])


def _processes(processes: list[dict[str, Any]]) -> list[str]:
    lines = []
    for proc in processes:
        state = {True: "running", False: "gone", None: "cannot tell (no answer)"}[proc["alive"]]
        if proc["alive"] and proc["host"] != "local":
            state = "holds the guest, " + ("running" if proc.get("guest_running") else "not running")
        elif proc["alive"] is False and proc["host"] != "local":
            state = "holds no guest"
        where = "" if proc["host"] == "local" else f" at {proc['host']}"
        lines.append(f"{proc['role']} VMM pid {proc['pid']}{where}: {state}")
    return lines


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
