"""`confplan report PLAN --html FILE --junit FILE [-o json]`: the plan's last run, read from a real
checkpoint by the real report builder, written as a page and as JUnit.

The runs here are real applies (real checkpoint, real executor) of stand-in stages that record what the
real precopy and stop-and-copy record (rounds, the final round, the pause's steps), so the readers meet
the builder's real field names without booting a guest; and the hand-written fixtures are checked
against the builder's published schema. Skipped before ``confplan.report`` is merged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import xmlschema
from htmlpage import Page
from reportdata import DATA, OUTCOMES, load
from standins import stand_in_stages
from typer.testing import CliRunner

from confplan.cli import app, main
from confplan.plan import load_plan
from confplan.stages import StageFailed, apply
from confplan.stages.base import StageRegistry

PLAN = "guest: {memory: 64MiB}\ncheckpoint: {dir: state}\n"
ROUNDS = [
    {"round": n, "shared_pages": 10, "zero_pages": 0, "sealed_pages": 90 // n, "seconds": 0.2 / n,
     "bytes_sent": (100 // n) * 4200, "dirty_after": 50 // n, "bytes_shared": 10 * 4112,
     "bytes_sealed": (90 // n) * 4144}
    for n in (1, 2, 3)
]  # fmt: skip
RESULTS: dict[str, dict[str, Any]] = {
    "precopy": {"rounds": ROUNDS, "decision": "16 dirty pages fit in max_downtime"},
    "stop-and-copy": {
        "final_round": {**ROUNDS[-1], "round": 4, "dirty_after": 0},
        "source_paused_seconds": 0.02,
        "steps": {"pause_vcpus": 0.001, "final_pages": 0.012, "vcpu_and_device_state": 0.003},
    },
    "resume-target": {"downtime_seconds": 0.025, "target_pid": None},
}



def recorded(failing: str | None) -> StageRegistry:
    return stand_in_stages(failing, error="digest mismatch at gpa 0x2000 <&>", shared=4096, sealed=8192,
                           results=RESULTS)  # fmt: skip


@pytest.fixture
def plan_file(tmp_path: Path) -> Path:
    path = tmp_path / "mig.yaml"
    path.write_text(PLAN)
    return path


def report(plan_file: Path, *extra: str) -> tuple[dict[str, Any], Page, str]:
    html, junit = plan_file.parent / "out" / "report.html", plan_file.parent / "out" / "junit.xml"
    result = CliRunner().invoke(app, ["report", str(plan_file), "--html", str(html), "--junit", str(junit),
                                      "-o", "json", *extra])  # fmt: skip
    assert result.exit_code == 0, result.output
    xml = junit.read_text()
    xmlschema.XMLSchema(DATA / "junit" / "junit-ci.xsd").validate(xml)
    return json.loads(result.output), Page(html.read_text()), xml


def test_a_plan_never_applied(plan_file: Path) -> None:
    doc, page, xml = report(plan_file)
    assert doc["outcome"] == "none"
    assert all(page.attrs[p]["data-has-data"] == "no" for p in ("plot-rounds", "plot-pause", "plot-timeline"))
    assert "never applied" in page.text("plot-rounds")
    assert 'failures="0"' in xml


def test_a_failed_run_from_its_checkpoint(plan_file: Path) -> None:
    with pytest.raises(StageFailed):
        apply(load_plan(plan_file), registry=recorded("verify"))
    doc, page, xml = report(plan_file)
    assert doc["outcome"] == "failed" and doc["migration"]["pause"] == RESULTS["stop-and-copy"]["steps"]
    rounds = page.texts["plot-rounds-svg"]
    assert {"1", "2", "3", "4", "final"} <= set(rounds), "precopy's rounds and stop-and-copy's final one"
    assert {"pause_vcpus", "final_pages"} <= set(page.texts["plot-pause-svg"])
    assert "verify" in page.texts["plot-timeline-svg"]
    assert "digest mismatch at gpa 0x2000 <&>" in page.text("error"), "a status report's failed stage"
    assert 'failures="1"' in xml and "digest mismatch at gpa 0x2000 &lt;&amp;&gt;" in xml


def test_a_succeeded_run_and_the_text_output(plan_file: Path) -> None:
    apply(load_plan(plan_file), registry=recorded(None))
    doc, page, xml = report(plan_file)
    assert doc["outcome"] == "succeeded" and "error" not in page.ids
    drawn = ("plot-rounds", "plot-throughput", "plot-pause", "plot-timeline")
    assert all(page.attrs[p]["data-has-data"] == "yes" for p in drawn)
    assert 'failures="0"' in xml and 'errors="0"' in xml
    result = CliRunner().invoke(app, ["report", str(plan_file)])
    assert result.exit_code == 0 and result.output.startswith("plan mig: run 1: succeeded")
    assert "--html FILE" in result.output


def test_an_unwritable_path_is_an_error_with_a_hint(
    plan_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = plan_file.parent / "blocker"
    blocker.write_text("")
    assert main(["report", str(plan_file), "--html", str(blocker / "r.html")]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot write the HTML report to {blocker / 'r.html'}" in err and "hint:" in err


@pytest.mark.parametrize("outcome", OUTCOMES)
def test_the_hand_written_fixtures_follow_the_published_schema(outcome: str) -> None:
    """The readers' fixtures stay what the builder writes: valid against ``confplan schema --report``."""
    from confplan.report import report_schema

    jsonschema.Draft202012Validator(report_schema()).validate(load(outcome))


def test_apply_junit_is_written_when_the_preflight_refuses(
    plan_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`apply --junit` writes its report whatever the outcome: here a host without KVM (a device that is
    not one), refused before anything launched, the failed check a failing testcase with its hint."""
    monkeypatch.setenv("CONFPLAN_KVM_DEVICE", "/dev/null")
    junit = plan_file.parent / "junit.xml"
    assert main(["apply", str(plan_file), "--junit", str(junit)]) == 3
    xml = junit.read_text()
    xmlschema.XMLSchema(DATA / "junit" / "junit-ci.xsd").validate(xml)
    assert "confplan.mig.preflight" in xml and 'failures="' in xml and "kvm (source)" in xml
    assert "hint:" in xml and not (plan_file.parent / "state").exists()
