"""``junit_xml``: a v1 report as the JUnit XML CI servers read, for every outcome.

Each document is validated against a JUnit schema written to the readers' format (tests/data/junit/), read
back by junitparser (a JUnit reader CI tools build on) and by ElementTree, and checked for what a CI page
shows: a testcase per stage and per preflight check, the failure's message and hint, skips, counts.
"""

from __future__ import annotations

import stat
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import junitparser
import pytest
import xmlschema
from reportdata import DATA, OUTCOMES, load

from confplan.errors import ConfplanError
from confplan.report_junit import junit_xml, write_junit

SCHEMA = xmlschema.XMLSchema(DATA / "junit" / "junit-ci.xsd")
STAGES = ["launch-source", "provision-target", "attest-target", "start-incoming", "precopy",
          "stop-and-copy", "verify", "resume-target", "cleanup-source"]  # fmt: skip


def parse(doc: dict[str, Any], tmp_path: Path) -> tuple[ET.Element, junitparser.JUnitXml]:
    """The document as text, validated, then read back twice (ElementTree, and junitparser from a file)."""
    text = junit_xml(doc)
    SCHEMA.validate(text)
    path = tmp_path / "junit.xml"
    write_junit(path, doc)
    assert path.read_text() == text
    return ET.fromstring(text), junitparser.JUnitXml.fromfile(str(path))


def cases(root: ET.Element, suite: str) -> dict[str, ET.Element]:
    found = root.find(f"testsuite[@name='{suite}']")
    assert found is not None, f"no testsuite {suite}"
    return {case.get("name", ""): case for case in found.iter("testcase")}


@pytest.mark.parametrize("outcome", OUTCOMES)
def test_every_outcome_is_valid_junit_with_consistent_counts(outcome: str, tmp_path: Path) -> None:
    root, parsed = parse(load(outcome), tmp_path)
    assert root.tag == "testsuites"
    for suite in root.iter("testsuite"):
        tests = list(suite.iter("testcase"))
        assert int(suite.get("tests", "-1")) == len(tests)
        for tag, attr in (("failure", "failures"), ("error", "errors"), ("skipped", "skipped")):
            assert int(suite.get(attr, "-1")) == sum(case.find(tag) is not None for case in tests)
    assert parsed.tests == sum(int(s.get("tests", "0")) for s in root.iter("testsuite"))
    assert parsed.failures == int(root.get("failures", "-1"))


def test_success_is_a_passing_testcase_per_stage_with_its_time(tmp_path: Path) -> None:
    doc = load("success")
    root, parsed = parse(doc, tmp_path)
    stages = cases(root, "confplan.quickstart")
    assert list(stages) == STAGES
    assert all(case.get("classname") == "confplan.quickstart" for case in stages.values())
    assert all(len(case) == 0 for case in stages.values()), "a passed testcase has no failure/skip child"
    assert float(stages["precopy"].get("time", "0")) == pytest.approx(2.31)
    assert parsed.failures == 0 and parsed.errors == 0 and parsed.skipped == 0
    checks = cases(root, "confplan.quickstart.preflight")
    assert "memory (target)" in checks and "kvm (source)" in checks
    props = {p.get("name"): p.get("value") for p in root.iter("property")}
    assert props["outcome"] == "succeeded" and props["exit_code"] == "0" and props["run.id"] == "3"


def test_a_failed_stage_carries_the_first_line_as_message_and_the_hint_in_the_text(tmp_path: Path) -> None:
    doc = load("failed-precopy")
    root, parsed = parse(doc, tmp_path)
    stages = cases(root, "confplan.quickstart")
    failure = stages["precopy"].find("failure")
    assert failure is not None
    message = doc["error"]["message"]
    assert failure.get("message") == message.splitlines()[0]
    assert failure.get("type") == "migration"
    assert failure.text == f"{message}\nhint: {doc['error']['hint']}"
    for later in STAGES[5:]:
        assert stages[later].find("skipped") is not None
    assert parsed.failures == 1
    # junitparser reads the result as a CI plugin would: the precopy case failed, with that message.
    results = {case.name: case.result for suite in parsed for case in suite}
    assert isinstance(results["precopy"][0], junitparser.Failure)
    assert results["precopy"][0].message == message.splitlines()[0]
    assert results["launch-source"] == []


def test_an_interrupted_run_is_an_error_not_a_failure(tmp_path: Path) -> None:
    root, parsed = parse(load("interrupted"), tmp_path)
    error = cases(root, "confplan.quickstart")["precopy"].find("error")
    assert error is not None and error.get("type") == "interrupted"
    assert parsed.errors == 1 and parsed.failures == 0


def test_a_refused_preflight_fails_its_checks_and_skips_every_stage(tmp_path: Path) -> None:
    root, parsed = parse(load("preflight-refused"), tmp_path)
    checks = cases(root, "confplan.quickstart.preflight")
    failed = {name for name, case in checks.items() if case.find("failure") is not None}
    assert failed == {"memory (target)", "ports (target)"}
    ports = checks["ports (target)"].find("failure")
    assert ports is not None and ports.text is not None
    assert '<pid 812 "nginx"> & in use' in ports.text, "markup in a message survives, escaped"
    assert ports.text.endswith("hint: pick another port in target.port, or stop the process that holds it")
    stages = cases(root, "confplan.quickstart")
    assert list(stages) == STAGES
    assert all(case.find("skipped") is not None for case in stages.values())
    first = next(s.get("name", "") for s in root.iter("testsuite"))
    assert first.endswith(".preflight"), "preflight ran first"
    assert parsed.failures == 2


def test_a_dry_run_lists_the_planned_steps_as_skipped(tmp_path: Path) -> None:
    root, parsed = parse(load("dry-run"), tmp_path)
    stages = cases(root, "confplan.quickstart")
    skipped = stages["launch-source"].find("skipped")
    assert skipped is not None and "would skip (done in run 3" in (skipped.get("message") or "")
    assert parsed.failures == 0 and parsed.errors == 0


def test_an_error_outside_every_stage_gets_its_own_testcase(tmp_path: Path) -> None:
    """A failure before the first stage, with no failed check, must still turn CI red."""
    doc = load("dry-run")
    doc.update(kind="apply", outcome="failed", exit_code=3, preflight=[],
               error={"class": "environment", "stage": None, "message": "/dev/kvm is not a KVM device",
                      "hint": "load the kvm module"})  # fmt: skip
    root, parsed = parse(doc, tmp_path)
    stages = cases(root, "confplan.quickstart")
    own = stages["apply"].find("failure")
    assert own is not None and own.get("type") == "environment"
    assert own.text == "/dev/kvm is not a KVM device\nhint: load the kvm module"
    assert parsed.failures == 1


def test_characters_xml_cannot_carry_are_replaced_not_fatal(tmp_path: Path) -> None:
    doc = load("failed-precopy")
    doc["error"]["message"] = "stage precopy failed: peer sent \x00\x1b[31m garbage \ud800"
    root, _ = parse(doc, tmp_path)
    failure = cases(root, "confplan.quickstart")["precopy"].find("failure")
    assert failure is not None
    assert failure.get("message") == "stage precopy failed: peer sent \ufffd\ufffd[31m garbage \ufffd"


def test_write_junit_is_readable_by_others_and_names_a_path_it_cannot_write(tmp_path: Path) -> None:
    path = tmp_path / "out" / "junit.xml"
    write_junit(path, load("success"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfplanError) as err:
        write_junit(blocker / "junit.xml", load("success"))
    assert str(blocker / "junit.xml") in err.value.message and err.value.exit_code == 2


def test_an_invalid_plan_fails_with_its_diagnostics_under_the_file_name(tmp_path: Path) -> None:
    """An apply of an invalid plan: no name, no run, the findings in ``diagnostics`` (docs/report.md)."""
    doc = load("dry-run")
    doc.update(kind="apply", outcome="failed", exit_code=2, preflight=[], steps=[],
               plan={"file": "plans/edge.yaml", "name": None, "hash": None},
               error={"class": "plan", "stage": None, "message": "plans/edge.yaml: 1 problem", "hint": None},
               diagnostics=[{"file": "plans/edge.yaml", "line": 4, "column": 11, "field": "guest.memory",
                             "message": "6 MiB is below the 8 MiB minimum"}])  # fmt: skip
    root, parsed = parse(doc, tmp_path)
    case = cases(root, "confplan.edge")["apply"]
    failure = case.find("failure")
    assert failure is not None and failure.get("type") == "plan"
    assert failure.get("message") == "plans/edge.yaml: 1 problem"
    assert (
        failure.text
        == "plans/edge.yaml: 1 problem\nplans/edge.yaml:4:11: guest.memory: 6 MiB is below the 8 MiB minimum"
    )
    assert parsed.failures == 1
