"""``confplan preflight PLAN``: check the hosts for a plan before anything runs (docs/preflight.md).

One line per check (``OK``/``FAIL``, the check, the side, what was found; a ``hint:`` under each FAIL), or
with ``--output json`` a ``confplan.report/v1`` document of kind ``preflight`` (docs/report.md). Exit 0
when every check passes, 3 when one fails, 2 when the plan is invalid. ``confplan apply`` runs the same
checks first. ``--checkpoint-dir`` and ``load_plan_at`` are shared by every command that reads the plan's
checkpoint folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from confplan.cli.formats import TextOrJson as Output
from confplan.plan import Plan

CheckpointDirOption = Annotated[
    Path | None,
    typer.Option("--checkpoint-dir", metavar="DIR",
                 help="Use this checkpoint folder instead of the plan's checkpoint.dir."),
]  # fmt: skip


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
    from confplan.cli.output import Output as ReportFormat
    from confplan.cli.output import ReportOutput
    from confplan.report import build_report

    out = ReportOutput(ReportFormat(output.value), kind="preflight", plan_file=str(plan_path))
    with out.reporting():  # an invalid plan or a failed check: the report, then cli.main's message
        plan = out.plan = load_plan_at(plan_path, checkpoint_dir)
        checks = preflight.require(plan, on_check=out.observer.preflight_checked, shown=output is Output.TEXT)
    if output is Output.JSON:
        out.report(build_report(kind="preflight", plan=plan, plan_file=str(plan_path),
                                preflight=out.observer.preflight))  # fmt: skip
    else:
        typer.echo(f"preflight passed: {len(checks)} checks; `confplan apply {plan_path}` may run")


def register(app: typer.Typer) -> None:
    """Add this area's commands to the root app."""
    app.command("preflight")(preflight_cmd)
