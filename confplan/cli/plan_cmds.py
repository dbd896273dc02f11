"""Plan commands: ``confplan validate PLAN...`` and ``confplan schema [--report]``.

validate exits 0 when every plan is valid and 2 when any is not (diagnostics on stderr, compiler-style, or
one JSON document on stdout with ``--output json``); anything unexpected reaches ``cli.main`` as exit 1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer

from confplan.cli.formats import TextOrJson as OutputFormat
from confplan.plan import API_VERSION, Diagnostic, Plan, PlanError, load_plan, schema_text

HINT = "hint: 'confplan schema' prints every field with its description; docs/plan.md explains the rules"


@dataclass
class CheckedPlan:
    """The outcome for one plan file."""

    file: str
    plan: Plan | None = None
    diagnostics: list[Diagnostic] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return self.plan is not None

    def to_json(self) -> dict[str, Any]:
        summary = {"name": self.plan.metadata.name, "hash": self.plan.plan_hash()} if self.plan else None
        return {
            "file": self.file,
            "valid": self.valid,
            "plan": summary,
            "diagnostics": [diagnostic.to_json() for diagnostic in self.diagnostics],
        }


def check_plan(file: str) -> CheckedPlan:
    """Load ``file``; a plan error becomes diagnostics, anything else propagates (an internal error)."""
    try:
        return CheckedPlan(file, plan=load_plan(file))
    except PlanError as err:
        return CheckedPlan(file, diagnostics=err.diagnostics)


def validate(
    plans: Annotated[list[str], typer.Argument(help="Plan files to check.", metavar="PLAN...")],
    output: Annotated[
        OutputFormat, typer.Option("--output", "-o", help="text (compiler-style) or json (for pipelines).")
    ] = OutputFormat.TEXT,
) -> None:
    """Check plans: types, units and the migration rules; report every problem with file:line:column."""
    results = [check_plan(file) for file in plans]
    if output is OutputFormat.JSON:
        document = {
            "apiVersion": API_VERSION,
            "valid": all(result.valid for result in results),
            "files": [result.to_json() for result in results],
        }
        typer.echo(json.dumps(document, indent=2))
    else:
        _print_text(results)
    raise typer.Exit(0 if all(result.valid for result in results) else 2)


def _print_text(results: list[CheckedPlan]) -> None:
    for result in results:
        if result.plan is not None:
            name, digest = result.plan.metadata.name, result.plan.plan_hash()[:12]
            typer.echo(f"{result.file}: valid plan {name!r} (hash {digest})")
            continue
        for diagnostic in result.diagnostics:
            typer.echo(diagnostic.render(), err=True)
        count = len(result.diagnostics)
        typer.echo(
            f"error: {result.file}: not a valid plan ({count} error{'s' if count != 1 else ''})", err=True
        )
    if not all(result.valid for result in results):
        typer.echo(HINT, err=True)


def schema(
    report: Annotated[
        bool, typer.Option("--report", help="Print the report's schema (confplan.report/v1) instead.")
    ] = False,
) -> None:
    """Print the plan's JSON Schema (confplan/plan/schema.json), or with --report the schema of the report
    that apply, status and the others print with -o json (confplan/report_schema.json)."""
    if report:
        from confplan.report import schema_text as report_schema_text

        typer.echo(report_schema_text(), nl=False)
        return
    typer.echo(schema_text(), nl=False)


def register(app: typer.Typer) -> None:
    """Add this area's commands to the root app."""
    app.command("validate")(validate)
    app.command("schema")(schema)
