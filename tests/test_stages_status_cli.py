"""`confplan status PLAN`: the checkpoint as a table or the report (validated against its schema), what the
next apply would do, and an exit code that says how the last run ended."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from reports import check_report
from standins import stand_in_stages
from typer.testing import CliRunner

from confplan.cli import app, main
from confplan.plan import load_plan
from confplan.stages import StageContext, StageFailed, StageResult, apply
from confplan.stages.checkpoint import DB_NAME

PLAN = "guest: {memory: 64MiB}\ncheckpoint: {dir: state}\n"


@pytest.fixture
def plan_file(tmp_path: Path) -> Path:
    path = tmp_path / "mig.yaml"
    path.write_text(PLAN)
    return path


def test_status_before_any_apply(plan_file: Path) -> None:
    result = CliRunner().invoke(app, ["status", str(plan_file)])
    assert result.exit_code == 0, result.output
    assert "the plan has not been applied" in result.output
    assert not (plan_file.parent / "state").exists()  # status creates nothing
    result = CliRunner().invoke(app, ["status", str(plan_file), "-o", "json"])
    document = check_report(result.output)
    assert result.exit_code == document["exit_code"] == 0
    assert document["kind"] == "status" and document["outcome"] == "none"
    assert document["run"] is None and document["stages"] == [] and document["processes"] == []
    assert [step["action"] for step in document["steps"]] == ["run"] * 9


def test_status_after_a_failure(plan_file: Path) -> None:
    with pytest.raises(StageFailed):
        apply(load_plan(plan_file), registry=stand_in_stages("verify"))
    result = CliRunner().invoke(app, ["status", str(plan_file)])
    assert result.exit_code == 4, result.output  # the last run failed
    lines = result.output.splitlines()
    assert lines[0].startswith("plan mig (hash ")
    assert lines[1].startswith("run 1: failed, started ")
    assert lines[2].split() == ["STAGE", "STATUS", "DURATION", "SHARED", "SEALED", "ERROR"]
    precopy = next(line for line in lines if line.strip().startswith("precopy"))
    assert precopy.split()[1] == "done" and "2.0 KiB" in precopy and "3.0 MiB" in precopy
    verify = next(line for line in lines if line.strip().startswith("verify"))
    assert verify.split()[1] == "failed" and verify.endswith("RuntimeError: digest mismatch at gpa 0x2000")
    assert next(line for line in lines if line.strip().startswith("cleanup-source")).split()[1] == "pending"
    assert lines[-1].startswith("next apply: resume at stage start-incoming (verify failed and ")

    result = CliRunner().invoke(app, ["status", str(plan_file), "--output", "json"])
    document = check_report(result.output)
    assert result.exit_code == document["exit_code"] == 4
    assert document["outcome"] == "failed" and document["error"] is None  # status itself worked
    assert document["run"]["outcome"] == "failed" and document["run"]["id"] == 1
    assert document["run"]["started"].endswith("Z")
    by_stage = {record["name"]: record for record in document["stages"]}
    assert by_stage["verify"]["error"].startswith("RuntimeError: digest mismatch")
    assert by_stage["precopy"]["bytes_sealed"] == 3 << 20
    assert document["run_choice"]["resume"] is True
    assert next(step["stage"] for step in document["steps"] if step["action"] != "skip") == "start-incoming"
    assert document["checkpoint"] == str(plan_file.parent / "state" / DB_NAME)


def test_status_after_success_and_after_a_plan_change(plan_file: Path) -> None:
    apply(load_plan(plan_file), registry=stand_in_stages("none"))
    result = CliRunner().invoke(app, ["status", str(plan_file)])
    assert result.exit_code == 0 and "run 1: succeeded" in result.output
    assert result.output.splitlines()[-1] == "next apply: nothing to do: every stage is done"
    plan_file.write_text(PLAN.replace("64MiB", "128MiB"))
    changed = CliRunner().invoke(app, ["status", str(plan_file)])
    assert "next apply: the plan changed since run 1" in changed.output


def test_status_of_a_newer_checkpoint_schema_is_a_clean_error(
    plan_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    apply(load_plan(plan_file), registry=stand_in_stages("none"))
    db = sqlite3.connect(plan_file.parent / "state" / DB_NAME)
    db.execute("UPDATE schema_version SET version = 99")
    db.commit()
    db.close()
    assert main(["status", str(plan_file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "schema version 99; this confplan reads version 1" in err
    assert "\nhint: " in err


def test_status_of_an_interrupted_run(plan_file: Path) -> None:
    registry = stand_in_stages("none")

    class Interrupted(registry["precopy"]):  # type: ignore[misc,valid-type]
        def run(self, ctx: StageContext) -> StageResult:
            raise KeyboardInterrupt

    registry["precopy"] = Interrupted
    with pytest.raises(StageFailed):
        apply(load_plan(plan_file), registry=registry)
    result = CliRunner().invoke(app, ["status", str(plan_file), "-o", "json"])
    document = check_report(result.output)
    assert document["outcome"] == "interrupted" and result.exit_code == document["exit_code"] == 4


def test_status_names_the_vmm_processes_and_whether_they_live(plan_file: Path) -> None:
    """A pid the run recorded is checked now: a dead VMM is never reported as running."""
    registry = stand_in_stages("verify")
    # stands in for a VMM process: alive, and a confplan one by its command line
    alive = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()", "confplan"],
                             stdin=subprocess.PIPE)  # fmt: skip

    class Launch(registry["launch-source"]):  # type: ignore[misc,valid-type]
        def run(self, ctx: StageContext) -> StageResult:
            return StageResult(data={"pid": alive.pid})

    class Provision(registry["provision-target"]):  # type: ignore[misc,valid-type]
        def run(self, ctx: StageContext) -> StageResult:
            return StageResult(data={"pid": dead_pid()})

    registry["launch-source"], registry["provision-target"] = Launch, Provision
    try:
        with pytest.raises(StageFailed):
            apply(load_plan(plan_file), registry=registry)
        document = check_report(CliRunner().invoke(app, ["status", str(plan_file), "-o", "json"]).output)
        text = CliRunner().invoke(app, ["status", str(plan_file)]).output
    finally:
        alive.communicate(b"")
    assert [(p["role"], p["alive"]) for p in document["processes"]] == [("source", True), ("target", False)]
    assert f"source VMM pid {alive.pid}: running" in text and "target VMM pid" in text and ": gone" in text


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_status_of_an_invalid_plan_prints_a_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = tmp_path / "bad.yaml"
    plan.write_text("guest: {memory: 12}\n")
    code = main(["status", str(plan), "-o", "json"])
    document = check_report(capsys.readouterr().out)
    assert code == document["exit_code"] == 2
    assert document["outcome"] == "failed" and document["error"]["class"] == "plan"
    assert document["diagnostics"][0]["field"] == "guest.memory"


def test_checkpoint_dir_overrides_the_plans(plan_file: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    apply(load_plan(plan_file).with_checkpoint_dir(elsewhere), registry=stand_in_stages("none"))
    assert (elsewhere / DB_NAME).exists() and not (plan_file.parent / "state").exists()
    moved = CliRunner().invoke(app, ["status", str(plan_file), "--checkpoint-dir", str(elsewhere)])
    assert moved.exit_code == 0 and "run 1: succeeded" in moved.output
    plain = CliRunner().invoke(app, ["status", str(plan_file)])
    assert "the plan has not been applied" in plain.output
