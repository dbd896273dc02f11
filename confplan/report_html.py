"""A run's report (``confplan.report/v1``, docs/report.md) as one self-contained HTML page for people:
``confplan report PLAN --html FILE``.

The page: a header (plan, outcome, exit code, run times, downtime, totals), the error and its hint when
the run failed, the stages, the preflight checks, the steps, the VMM processes left, and four plots
(``report_plots``) inlined as SVG. Nothing is fetched: the style is inline, there are no scripts, fonts or
images from elsewhere, so the file can be mailed, attached to a CI job, or opened offline years later.
Every value from the report is HTML-escaped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from html import escape
from pathlib import Path
from typing import Any

from confplan.errors import ExitCode
from confplan.stages.observers import format_bytes
from confplan.statefile import write_output

_OUTCOME_CLASS = {"succeeded": "ok", "planned": "ok", "failed": "bad", "refused": "bad",
                  "interrupted": "warn", "running": "warn", "none": "muted"}  # fmt: skip
_EXIT_MEANING = {
    ExitCode.OK: "done", ExitCode.INTERNAL: "internal error (a bug in confplan)",
    ExitCode.USAGE: "usage error or invalid plan", ExitCode.ENVIRONMENT: "environment (preflight)",
    ExitCode.MIGRATION_FAILED: "migration failed, the source kept the guest", ExitCode.BUSY: "plan busy",
    ExitCode.GUEST_LOST: "the guest is lost", ExitCode.HANDOVER_IN_DOUBT: "handover in doubt",
    ExitCode.INTERRUPTED: "interrupted",
}  # fmt: skip

_STYLE = """
body { font-family: "DejaVu Sans", "Liberation Sans", Arial, sans-serif; margin: 0; color: #222;
       background: #f6f7f9; }
main { max-width: 1100px; margin: 0 auto; padding: 24px; }
h1 { font-size: 1.5em; margin: 0 0 4px 0; } h2 { font-size: 1.15em; margin: 28px 0 8px 0; }
.sub { color: #666; font-size: 0.9em; }
.badge { display: inline-block; padding: 2px 10px; border-radius: 10px; font-weight: bold; color: #fff; }
.ok { background: #2e7d32; } .bad { background: #c62828; } .warn { background: #ef8f00; }
.muted { background: #777; }
.facts { display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); gap: 8px;
         margin-top: 16px; }
.fact { background: #fff; border: 1px solid #dde; border-radius: 6px; padding: 8px 10px; }
.fact .k { color: #666; font-size: 0.8em; } .fact .v { font-size: 1.1em; font-weight: bold; }
.error { background: #fdecea; border: 1px solid #e57373; border-radius: 6px; padding: 12px 14px; }
.error pre { white-space: pre-wrap; margin: 4px 0; font-size: 0.95em; }
table { border-collapse: collapse; width: 100%; background: #fff; font-size: 0.9em; }
th, td { border: 1px solid #dde; padding: 4px 8px; text-align: left; vertical-align: top;
         white-space: nowrap; }
td.text { white-space: pre-wrap; }
th { background: #eef0f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.s-done, .s-true { color: #2e7d32; font-weight: bold; }
.s-failed, .s-false { color: #c62828; font-weight: bold; }
.s-running { color: #ef8f00; font-weight: bold; } .s-pending, .s-skipped { color: #777; }
figure.plot { background: #fff; border: 1px solid #dde; border-radius: 6px; margin: 12px 0; padding: 8px; }
figure.plot figcaption { font-weight: bold; margin-bottom: 4px; }
.no-data { color: #777; font-style: italic; margin: 8px 0; }
footer { color: #888; font-size: 0.8em; margin-top: 32px; }
"""


def render_html(report: Mapping[str, Any]) -> str:
    """The whole page for one v1 report (matplotlib is imported here, not when the CLI starts)."""
    from confplan.report_plots import plots

    plan = report.get("plan") or {}
    title = f"confplan {report.get('kind') or 'report'}: {plan.get('name') or 'plan'} {report.get('outcome')}"
    drawn = plots(report)
    figures = _section("Plots", "plots", "\n".join(_figure(p.id, p.title, p.svg, p.note) for p in drawn))
    tables = [
        _section("Stages", "stages", _stages(report)),
        _section("Preflight", "preflight", _preflight(report)) if report.get("preflight") else "",
        _section("Steps", "steps", _steps(report)) if report.get("steps") else "",
        _section("VMM processes", "processes", _processes(report)) if report.get("processes") else "",
    ]
    # Plots first when there is something to see; a dry run or a refused preflight leads with its tables.
    middle = [figures, *tables] if any(p.svg for p in drawn) else [*tables, figures]
    parts = [
        _header(report),
        _error(report),
        *middle,
        f"<footer>{_e(report.get('schema'))} written by confplan {_e(report.get('confplan_version'))} at "
        f"{_e(report.get('generated_at'))}; checkpoint {_e(report.get('checkpoint'))}</footer>",
    ]
    body = "\n".join(part for part in parts if part)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)}</title>\n<style>{_STYLE}</style>\n</head>\n"
        f"<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n"
    )


def write_html(path: Path, report: Mapping[str, Any]) -> None:
    """Write ``render_html(report)`` to ``path`` atomically."""
    write_output(path, render_html(report), what="HTML report")


# -- sections ------------------------------------------------------------------------------------------


def _header(report: Mapping[str, Any]) -> str:
    plan = report.get("plan") or {}
    run = report.get("run") or {}
    migration = report.get("migration") or {}
    outcome = str(report.get("outcome"))
    code = report.get("exit_code")
    facts = [
        ("exit code", f"{_e(code)} ({_e(_exit_meaning(code))})"),
        ("run", f"#{_e(run.get('id'))}, attempt {_e(run.get('attempts'))}" if run else "none"),
        ("started", _e(_when(run.get("started"))) if run else "&ndash;"),
        ("finished", _e(_when(run.get("finished"))) if run else "&ndash;"),
        ("run time", _e(_span(run.get("started"), run.get("finished"))) if run else "&ndash;"),
        ("downtime", _e(_ms(migration.get("downtime_seconds")))),
        ("the guest saw", _e(_ms(migration.get("guest_downtime_seconds")))),
        ("source paused", _e(_ms(migration.get("source_paused_seconds")))),
        ("precopy rounds", _e(len(migration.get("rounds") or []))),
        ("bytes shared", _e(_bytes(migration.get("bytes_shared")))),
        ("bytes sealed", _e(_bytes(migration.get("bytes_sealed")))),
        ("target VMM pid", _e(migration.get("target_pid"))),
    ]
    cells = "".join(f'<div class="fact"><div class="k">{k}</div><div class="v">{v or "&ndash;"}</div></div>'
                    for k, v in facts)  # fmt: skip
    decision = migration.get("decision")
    why = f'<p class="sub">precopy ended: {_e(decision)}</p>' if decision else ""
    return (
        f'<header id="summary">\n<h1>{_e(plan.get("name") or "plan")} '
        f'<span id="outcome" class="badge {_OUTCOME_CLASS.get(outcome, "muted")}">{_e(outcome)}</span></h1>\n'
        f'<div class="sub">{_e(report.get("kind"))} of {_e(plan.get("file"))} &middot; plan hash '
        f"<code>{_e(str(plan.get('hash') or '')[:16])}</code></div>\n"
        f'<div class="facts">{cells}</div>\n{why}</header>'
    )


def _error(report: Mapping[str, Any]) -> str:
    """The error and its hint; for a status report (no error of its own), the failed stage's error."""
    error = report.get("error")
    if not error:
        failed = next((s for s in report.get("stages") or [] if s.get("status") == "failed"), None)
        if failed is None:
            return ""
        error = {"class": "stage", "stage": failed.get("name"), "message": failed.get("error") or "failed"}
    where = f" in stage {_e(error.get('stage'))}" if error.get("stage") else ""
    hint = f"<p><b>hint:</b> {_e(error.get('hint'))}</p>" if error.get("hint") else ""
    return (
        f'<section id="error" class="error"><b>{_e(error.get("class"))} error{where}</b>'
        f"<pre>{_e(error.get('message'))}</pre>{hint}</section>"
    )


def _stages(report: Mapping[str, Any]) -> str:
    stages = report.get("stages") or []
    if not stages:
        return '<p class="no-data">No run: no stage has run yet (see the steps below).</p>'
    rows = [
        [_e(s.get("name")), _status(s.get("status")), _e(s.get("attempt")), _e(_when(s.get("started"))),
         _e(_seconds(s.get("duration_seconds"))), _e(_bytes(s.get("bytes_shared"))),
         _e(_bytes(s.get("bytes_sealed"))), _e(s.get("error") or "")]
        for s in stages
    ]  # fmt: skip
    heads = ["stage", "status", "attempt", "started", "duration", "shared", "sealed", "error"]
    return _table("stage-table", heads, rows, numeric={2, 4, 5, 6}, text={7})


def _preflight(report: Mapping[str, Any]) -> str:
    rows = [
        [_e(c.get("check")), _e(c.get("side")), _verdict(bool(c.get("ok"))), _e(c.get("detail")),
         _e(c.get("hint") or "")]
        for c in report.get("preflight") or []
    ]  # fmt: skip
    return _table("preflight-table", ["check", "side", "result", "found", "fix"], rows, text={3, 4})


def _steps(report: Mapping[str, Any]) -> str:
    rows = [[_e(s.get("stage")), _e(s.get("action")), _e(s.get("reason"))] for s in report.get("steps") or []]
    return _table("steps-table", ["stage", "action", "why"], rows, text={2})


def _processes(report: Mapping[str, Any]) -> str:
    rows = [
        [_e(p.get("role")), _e(p.get("pid")), _e(p.get("host")),
         _e({True: "yes", False: "no", None: "unknown"}.get(p.get("alive"), p.get("alive")))]
        for p in report.get("processes") or []
    ]  # fmt: skip
    return _table("processes-table", ["role", "pid", "host", "alive"], rows)


def _figure(plot_id: str, title: str, svg: str | None, note: str) -> str:
    inside = svg if svg is not None else f'<p class="no-data">{_e(note)}</p>'
    return (
        f'<figure class="plot" id="{plot_id}" data-has-data="{"yes" if svg is not None else "no"}">'
        f"<figcaption>{_e(title)}</figcaption>\n{inside}</figure>"
    )


# -- HTML pieces ---------------------------------------------------------------------------------------


def _section(title: str, section_id: str, inner: str) -> str:
    return f'<section id="{section_id}">\n<h2>{_e(title)}</h2>\n{inner}\n</section>'


def _table(
    table_id: str, heads: Sequence[str], rows: Iterable[Sequence[str]], *,
    numeric: Iterable[int] = (), text: Iterable[int] = (),
) -> str:  # fmt: skip
    """Cells arrive escaped (some hold markup of their own); ``numeric`` columns align right, ``text``
    columns (free text) wrap, the others do not."""
    kinds = {**dict.fromkeys(numeric, ' class="num"'), **dict.fromkeys(text, ' class="text"')}
    head = "".join(f"<th>{_e(h)}</th>" for h in heads)
    body = "\n".join(
        "<tr>" + "".join(f"<td{kinds.get(i, '')}>{cell}</td>" for i, cell in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f'<table id="{table_id}">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>'


def _status(status: Any, text: str | None = None) -> str:
    return f'<span class="s-{_e(status)}">{_e(text or status)}</span>'


def _verdict(ok: bool) -> str:
    return _status("true", "OK") if ok else _status("false", "FAIL")


def _e(value: Any) -> str:
    return "" if value is None else escape(str(value))


# -- units ---------------------------------------------------------------------------------------------


def _exit_meaning(code: Any) -> str:
    try:
        return _EXIT_MEANING[ExitCode(code)]
    except (ValueError, TypeError, KeyError):
        return "unknown"


def _bytes(value: Any) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "–"
    return format_bytes(int(value))


def _ms(value: Any) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "–"
    return f"{value * 1e3:.1f} ms"


def _seconds(value: Any) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "–"
    return f"{value:.2f} s" if value >= 1 else f"{value * 1e3:.1f} ms"


def _when(value: Any) -> Any:
    """An ISO-8601 UTC time as people read it: ``2026-12-02 14:48:00.123 UTC``; anything else as it is."""
    if not isinstance(value, str) or not value.endswith("Z"):
        return value
    return value[:-1].replace("T", " ") + " UTC"


def _span(start: Any, end: Any) -> str:
    try:
        seconds = (datetime.fromisoformat(str(end)) - datetime.fromisoformat(str(start))).total_seconds()
    except ValueError:
        return "–"
    return _seconds(seconds)
