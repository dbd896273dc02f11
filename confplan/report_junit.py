"""A run's report (``confplan.report/v1``, docs/report.md) as JUnit XML, the test-result format CI
servers read (Jenkins, GitLab, GitHub Actions' test reporters): ``apply --junit FILE``,
``confplan report PLAN --junit FILE``.

When preflight ran, one ``<testsuite>`` for its checks (a ``<testcase>`` per check), then one for the
plan's stages (a ``<testcase>`` per stage). A failed stage or check is a ``<failure>`` (message: the
error's first line; text: the message and the hint); an interrupted or internal error is an ``<error>``;
a stage that did not run is ``<skipped>``. An error outside every stage (a failure before the first
stage) gets a testcase of its own, so a failed run never shows green in CI.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from confplan.statefile import write_output

# XML 1.0 cannot carry these code points at all, not even escaped: a stray byte in an error message
# would make the whole file unreadable to CI.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
# Errors that are not the migration failing a check but the run being cut short or confplan's bug.
_ERROR_CLASSES = {"interrupted", "internal"}


def junit_xml(report: Mapping[str, Any]) -> str:
    """The JUnit XML document (UTF-8 text with its XML declaration) for one v1 report."""
    # An invalid plan has no name in its report: its file's name stands in.
    plan = _text(_get(report, "plan", "name")) or Path(_text(_get(report, "plan", "file")) or "plan").stem
    suites = ET.Element("testsuites", name=f"confplan {report.get('kind') or 'report'} {plan}")
    checks = report.get("preflight") or []
    if checks:  # first: it ran first
        suites.append(_preflight_suite(report, plan, checks))
    stages = _stage_suite(report, plan)
    suites.append(stages)
    _add_error_case(report, plan, stages, suites)
    _total(suites, list(suites))
    ET.indent(suites)
    body = ET.tostring(suites, encoding="unicode")
    return f'<?xml version="1.0" encoding="UTF-8"?>\n{body}\n'


def write_junit(path: Path, report: Mapping[str, Any]) -> None:
    """Write ``junit_xml(report)`` to ``path`` atomically (CI never reads half a file)."""
    write_output(path, junit_xml(report), what="JUnit report")


# -- the suites ----------------------------------------------------------------------------------------


def _stage_suite(report: Mapping[str, Any], plan: str) -> ET.Element:
    suite = _suite(f"confplan.{plan}", report)
    _properties(suite, report)
    stages = report.get("stages") or []
    if stages:
        for stage in stages:
            suite.append(_stage_case(report, plan, stage))
    else:  # no run (dry run, refused preflight): what would have run, none of it run
        for step in report.get("steps") or []:
            case = _case(f"confplan.{plan}", _text(step.get("stage")), None)
            why = f"{_text(step.get('action'))} ({_text(step.get('reason'))})"
            ET.SubElement(case, "skipped", message=_clean(f"not run ({report.get('outcome')}): would {why}"))
            suite.append(case)
    out = ET.SubElement(suite, "system-out")
    out.text = _clean(_summary(report))
    return suite


def _stage_case(report: Mapping[str, Any], plan: str, stage: Mapping[str, Any]) -> ET.Element:
    name = _text(stage.get("name"))
    case = _case(f"confplan.{plan}", name, stage.get("duration_seconds"))
    status = stage.get("status")
    error = report.get("error") or {}
    if status == "failed":
        own = error if error.get("stage") == name else {}
        message = _text(own.get("message") or stage.get("error") or f"stage {name} failed")
        interrupted = report.get("outcome") == "interrupted"  # a status report has no error of its own
        kind = _text(own.get("class") or ("interrupted" if interrupted else "migration"))
        tag = "error" if kind in _ERROR_CLASSES else "failure"
        _fault(case, tag, message, own.get("hint"), kind)
    elif status == "running" and report.get("outcome") != "running":
        _fault(case, "error", f"stage {name} was still running when the run ended", None, "interrupted")
    elif status == "skipped":
        ET.SubElement(case, "skipped", message=_clean(f"skipped: {_step_reason(report, name)}"))
    elif status == "running":
        ET.SubElement(case, "skipped", message="running: the run is still in progress")
    elif status == "pending":
        ET.SubElement(case, "skipped", message="not run")
    return case


def _preflight_suite(report: Mapping[str, Any], plan: str, checks: Sequence[Mapping[str, Any]]) -> ET.Element:
    suite = _suite(f"confplan.{plan}.preflight", report)
    for check in checks:
        name = f"{_text(check.get('check'))} ({_text(check.get('side'))})"
        case = _case(f"confplan.{plan}.preflight", name, check.get("seconds"))
        detail = _text(check.get("detail"))
        if check.get("ok"):
            out = ET.SubElement(case, "system-out")
            out.text = _clean(detail)
        else:
            _fault(case, "failure", detail or f"{name} failed", check.get("hint"), "preflight")
        suite.append(case)
    return suite


def _add_error_case(report: Mapping[str, Any], plan: str, stages: ET.Element, suites: ET.Element) -> None:
    """An error no stage or check testcase carries gets a testcase named after the command."""
    error = report.get("error")
    if not error:
        return
    carried = any(case.find("failure") is not None or case.find("error") is not None
                  for suite in suites for case in suite.iter("testcase"))  # fmt: skip
    if carried:
        return
    kind = _text(error.get("class") or "internal")
    case = _case(f"confplan.{plan}", _text(report.get("kind") or "apply"), None)
    tag = "error" if kind in _ERROR_CLASSES else "failure"
    message = _text(error.get("message")) or "failed"
    where = [_diagnostic(d) for d in report.get("diagnostics") or [] if isinstance(d, Mapping)]
    _fault(case, tag, "\n".join([message, *where]), error.get("hint"), kind)
    stages.insert(_first_case_index(stages), case)


# -- building blocks -----------------------------------------------------------------------------------


def _suite(name: str, report: Mapping[str, Any]) -> ET.Element:
    suite = ET.Element("testsuite", name=name)
    started = _get(report, "run", "started") or report.get("generated_at")
    stamp = _timestamp(started)
    if stamp:
        suite.set("timestamp", stamp)
    suite.set("hostname", "localhost")
    return suite


def _case(classname: str, name: str, seconds: Any) -> ET.Element:
    return ET.Element("testcase", classname=_clean(classname), name=_clean(name), time=_seconds(seconds))


def _fault(case: ET.Element, tag: str, message: str, hint: Any, kind: str) -> None:
    """``<failure>``/``<error>``: the first line as the message, the whole message and the hint as text."""
    first = message.strip().splitlines()[0] if message.strip() else message
    fault = ET.SubElement(case, tag, message=_clean(first), type=_clean(kind))
    fault.text = _clean(message + (f"\nhint: {hint}" if hint else ""))


def _properties(suite: ET.Element, report: Mapping[str, Any]) -> None:
    """The report's identity, so a CI page shows which plan, run and outcome the suite is about."""
    props = ET.SubElement(suite, "properties")
    migration = report.get("migration") or {}
    pairs = {
        "schema": report.get("schema"), "kind": report.get("kind"), "outcome": report.get("outcome"),
        "exit_code": report.get("exit_code"), "plan.file": _get(report, "plan", "file"),
        "plan.hash": _get(report, "plan", "hash"), "run.id": _get(report, "run", "id"),
        "run.started": _get(report, "run", "started"), "run.finished": _get(report, "run", "finished"),
        "confplan_version": report.get("confplan_version"),
        "downtime_seconds": migration.get("downtime_seconds"),
    }  # fmt: skip
    for key, value in pairs.items():
        if value is not None:
            ET.SubElement(props, "property", name=key, value=_clean(str(value)))


def _total(parent: ET.Element, suites: Sequence[ET.Element]) -> None:
    """The counts and times JUnit readers show, on each suite and summed on ``<testsuites>``."""
    sums = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
    seconds = 0.0
    for suite in suites:
        cases = list(suite.iter("testcase"))
        counts = {
            "tests": len(cases),
            "failures": sum(case.find("failure") is not None for case in cases),
            "errors": sum(case.find("error") is not None for case in cases),
            "skipped": sum(case.find("skipped") is not None for case in cases),
        }
        time = sum(float(case.get("time") or 0) for case in cases)
        for key, count in counts.items():
            suite.set(key, str(count))
            sums[key] += count
        suite.set("time", f"{time:.3f}")
        seconds += time
    for key, count in sums.items():
        parent.set(key, str(count))
    parent.set("time", f"{seconds:.3f}")


def _first_case_index(suite: ET.Element) -> int:
    """Where the first testcase goes: after ``<properties>``, before ``<system-out>`` (the schema's order)."""
    for index, child in enumerate(suite):
        if child.tag != "properties":
            return index
    return len(suite)


def _summary(report: Mapping[str, Any]) -> str:
    migration = report.get("migration") or {}
    lines = [f"outcome: {report.get('outcome')} (exit code {report.get('exit_code')})"]
    error = report.get("error")
    if error:
        lines.append(f"error: {error.get('message')}")
        if error.get("hint"):
            lines.append(f"hint: {error.get('hint')}")
    if migration.get("downtime_seconds") is not None:
        lines.append(f"downtime: {float(migration['downtime_seconds']) * 1e3:.1f} ms")
    rounds = migration.get("rounds") or []
    if rounds:
        lines.append(f"precopy rounds: {len(rounds)} (the last one in the pause)")
    for key in ("bytes_shared", "bytes_sealed"):
        if migration.get(key) is not None:
            lines.append(f"{key}: {migration[key]}")
    return "\n".join(lines)


def _diagnostic(diagnostic: Mapping[str, Any]) -> str:
    """An invalid plan's finding as compilers print theirs: ``file:line:column: field: message``."""
    place = ":".join(_text(diagnostic.get(key)) for key in ("file", "line", "column") if diagnostic.get(key))
    field = f"{diagnostic['field']}: " if diagnostic.get("field") else ""
    return (
        f"{place}: {field}{_text(diagnostic.get('message'))}"
        if place
        else f"{field}{diagnostic.get('message')}"
    )


def _step_reason(report: Mapping[str, Any], stage: str) -> str:
    for step in report.get("steps") or []:
        if step.get("stage") == stage and step.get("reason"):
            return _text(step["reason"])
    return "already done"


def _timestamp(value: Any) -> str | None:
    """JUnit's timestamp: ``YYYY-MM-DDTHH:MM:SS`` without a zone (the Ant format CI parsers expect); UTC."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S")


def _seconds(value: Any) -> str:
    return f"{float(value):.3f}" if isinstance(value, int | float) and value >= 0 else "0.000"


def _get(report: Mapping[str, Any], key: str, field: str) -> Any:
    part = report.get(key)
    return part.get(field) if isinstance(part, Mapping) else None


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _clean(text: str) -> str:
    return _NOT_XML.sub("\ufffd", text)
