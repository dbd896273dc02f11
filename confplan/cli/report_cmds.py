"""``confplan report PLAN``: the plan's last run, from its checkpoint, as one self-contained HTML page with
plots (``--html FILE``), as JUnit XML for CI (``--junit FILE``), or as the v1 JSON report (``-o json``).

The report is the one ``confplan status -o json`` prints (``confplan.report.report_for_plan``); the HTML
and JUnit writers read nothing else (docs/report.md). The command exits 0 when it wrote what it was asked
to, whatever the run's outcome: the outcome is in the report. (``confplan.report`` is imported with a
type-ignore that only matters before the report builder's branch is merged.)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from confplan.cli.formats import TextOrJson as Output
from confplan.cli.preflight_cmds import CheckpointDirOption, load_plan_at


def report_cmd(
    plan_path: Annotated[Path, typer.Argument(metavar="PLAN", help="The plan whose last run to report.")],
    html: Annotated[
        Path | None,
        typer.Option("--html", metavar="FILE", help="Write one self-contained HTML page with plots to FILE."),
    ] = None,
    junit: Annotated[
        Path | None,
        typer.Option(
            "--junit", metavar="FILE", help="Write JUnit XML to FILE (a testcase per stage), for CI."
        ),
    ] = None,
    output: Annotated[
        Output, typer.Option("--output", "-o", help="text (what was written) or json (the v1 report).")
    ] = Output.TEXT,
    checkpoint_dir: CheckpointDirOption = None,
) -> None:
    """Report PLAN's last run: an HTML page with plots (--html), JUnit XML (--junit), the JSON (-o json)."""
    from confplan.report import report_for_plan
    from confplan.report_html import write_html
    from confplan.report_junit import write_junit

    plan = load_plan_at(plan_path, checkpoint_dir)
    doc = report_for_plan(plan, str(plan_path))
    if html is not None:
        write_html(html, doc)
    if junit is not None:
        write_junit(junit, doc)
    if output is Output.JSON:
        typer.echo(json.dumps(doc, indent=2))
        return
    for line in _said(doc, html=html, junit=junit):
        typer.echo(line)


def _said(doc: Mapping[str, Any], *, html: Path | None, junit: Path | None) -> list[str]:
    run = doc.get("run") or {}
    name = (doc.get("plan") or {}).get("name")
    what = f"run {run.get('id')}: {doc.get('outcome')}" if run else "never applied"
    lines = [f"plan {name}: {what}"]
    if html is not None:
        lines.append(f"wrote {html} (HTML report with plots; open it in a browser)")
    if junit is not None:
        lines.append(f"wrote {junit} (JUnit XML)")
    if html is None and junit is None:
        lines.append("hint: --html FILE writes a page with plots, --junit FILE JUnit XML, -o json the report")
    return lines


def register(app: typer.Typer) -> None:
    """Add this area's commands to the root app."""
    app.command("report")(report_cmd)
