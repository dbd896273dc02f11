"""``confplan preflight PLAN``: check the hosts for a plan before anything runs (docs/preflight.md).

One line per check (``OK``/``FAIL``, the check, the side, what was found; a ``hint:`` under each FAIL), or
with ``--output json`` a ``confplan.report/v1`` document of kind ``preflight`` (docs/report.md). Exit 0
when every check passes, 3 when one fails, 2 when the plan is invalid. ``confplan apply`` runs the same
checks first. ``--checkpoint-dir`` and ``load_plan_at`` are shared by every command that reads the plan's
checkpoint folder.
"""

from __future__ import annotations

import datetime
import enum
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from confplan import __version__
from confplan.errors import ConfplanError, ExitCode
from confplan.plan import Plan, PlanError

REPORT_SCHEMA = "confplan.report/v1"

CheckpointDirOption = Annotated[
    Path | None,
    typer.Option("--checkpoint-dir", metavar="DIR",
                 help="Use this checkpoint folder instead of the plan's checkpoint.dir."),
]  # fmt: skip


class Output(enum.StrEnum):
    TEXT = "text"
    JSON = "json"


def load_plan_at(plan_path: Path | str, checkpoint_dir: Path | None) -> Plan:
    """Load the plan; ``--checkpoint-dir`` (when given) overrides its checkpoint.dir."""
    from confplan.plan import load_plan

    return load_plan(plan_path).with_checkpoint_dir(checkpoint_dir)


def preflight_cmd(
    plan_path: Annotated[Path, typer.Argument(metavar="PLAN", help="The plan to check the hosts for.")],
    output: Annotated[Output, typer.Option("--output", "-o", help="text (a line per check) or json.")] = (
        Output.TEXT
    ),
    checkpoint_dir: CheckpointDirOption = None,
) -> None:
    """Check the hosts for PLAN before anything runs: KVM, memory, disk, ports, the target agent."""
    from confplan import preflight

    try:
        plan = load_plan_at(plan_path, checkpoint_dir)
    except PlanError as err:
        if output is Output.JSON:
            typer.echo(json.dumps(report(str(plan_path), None, [], err), indent=2))
        raise
    try:
        checks = preflight.require(plan, on_check=print_check if output is Output.TEXT else None,
                                   shown=output is Output.TEXT)  # fmt: skip
    except preflight.PreflightFailed as err:
        if output is Output.JSON:
            typer.echo(json.dumps(report(str(plan_path), plan, err.checks, err), indent=2))
        raise
    if output is Output.JSON:
        typer.echo(json.dumps(report(str(plan_path), plan, checks, None), indent=2))
    else:
        typer.echo(f"preflight passed: {len(checks)} checks; `confplan apply {plan_path}` may run")


def print_check(check: Any) -> None:
    """A check's lines on stdout (``OK``/``FAIL``, and the hint under a FAIL)."""
    for line in check.lines():
        typer.echo(line)


def report(
    plan_file: str, plan: Plan | None, checks: list[Any], error: ConfplanError | None
) -> dict[str, Any]:
    """The ``confplan.report/v1`` document of a preflight (docs/report.md)."""
    from confplan.stages.checkpoint import DB_NAME

    code = ExitCode.OK if error is None else ExitCode(error.exit_code)
    error_class = "plan" if isinstance(error, PlanError) else "environment"
    migration = dict.fromkeys(("rounds", "bytes_shared", "bytes_sealed", "downtime_seconds",
                               "source_paused_seconds", "pause", "decision", "target_pid"))  # fmt: skip
    return {
        "schema": REPORT_SCHEMA,
        "kind": "preflight",
        "confplan_version": __version__,
        "generated_at": _now(),
        "plan": {
            "file": plan_file,
            "name": plan.metadata.name if plan else None,
            "hash": plan.plan_hash() if plan else None,
        },
        "checkpoint": str(plan.checkpoint.dir / DB_NAME) if plan else None,
        "outcome": "planned" if error is None else "refused",
        "exit_code": int(code),
        "error": None
        if error is None
        else {"class": error_class, "stage": None, "message": error.message, "hint": error.hint},
        "run": None,
        "steps": [],
        "stages": [],
        "preflight": [check.to_json() for check in checks],
        "migration": migration,
        "processes": [],
    }


def _now() -> str:
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def register(app: typer.Typer) -> None:
    """Add this area's commands to the root app."""
    app.command("preflight")(preflight_cmd)
