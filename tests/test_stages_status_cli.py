"""`confplan status PLAN`: the checkpoint as a table or JSON, and what the next apply would do."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import ClassVar

import pytest
from typer.testing import CliRunner

from confplan.cli import app, main
from confplan.plan import STAGE_NAMES, load_plan
from confplan.stages import Stage, StageContext, StageFailed, StageResult, apply, register_stage
from confplan.stages.base import StageRegistry
from confplan.stages.checkpoint import DB_NAME

PLAN = "guest: {memory: 64MiB}\ncheckpoint: {dir: state}\n"


def registry_failing_at(failing: str) -> StageRegistry:
    registry: StageRegistry = {}
    for stage_name in STAGE_NAMES:

        class Simple(Stage):
            name: ClassVar[str] = stage_name

            def run(self, ctx: StageContext) -> StageResult:
                if ctx.current == failing:
                    raise RuntimeError("digest mismatch at gpa 0x2000\nmore detail")
                return StageResult(bytes_shared=2048, bytes_sealed=3 << 20)

        register_stage(Simple, registry)
    return registry


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
    document = json.loads(CliRunner().invoke(app, ["status", str(plan_file), "-o", "json"]).output)
    assert document["run"] is None and document["stages"] == []
    assert [step["action"] for step in document["next_apply"]["steps"]] == ["run"] * 9


def test_status_after_a_failure(plan_file: Path) -> None:
    with pytest.raises(StageFailed):
        apply(load_plan(plan_file), registry=registry_failing_at("verify"))
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

    document = json.loads(CliRunner().invoke(app, ["status", str(plan_file), "--output", "json"]).output)
    assert document["run"]["outcome"] == "failed" and document["run"]["run_id"] == 1
    by_stage = {record["stage"]: record for record in document["stages"]}
    assert by_stage["verify"]["error"].startswith("RuntimeError: digest mismatch")
    assert by_stage["precopy"]["bytes_sealed"] == 3 << 20
    assert document["next_apply"]["resume"] is True
    assert document["checkpoint"] == str(plan_file.parent / "state" / DB_NAME)


def test_status_after_success_and_after_a_plan_change(plan_file: Path) -> None:
    apply(load_plan(plan_file), registry=registry_failing_at("none"))
    result = CliRunner().invoke(app, ["status", str(plan_file)])
    assert "run 1: succeeded" in result.output
    assert result.output.splitlines()[-1] == "next apply: nothing to do: every stage is done"
    plan_file.write_text(PLAN.replace("64MiB", "128MiB"))
    changed = CliRunner().invoke(app, ["status", str(plan_file)])
    assert "next apply: the plan changed since run 1" in changed.output


def test_status_of_a_newer_checkpoint_schema_is_a_clean_error(
    plan_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    apply(load_plan(plan_file), registry=registry_failing_at("none"))
    db = sqlite3.connect(plan_file.parent / "state" / DB_NAME)
    db.execute("UPDATE schema_version SET version = 99")
    db.commit()
    db.close()
    assert main(["status", str(plan_file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "schema version 99; this confplan reads version 1" in err
    assert "\nhint: " in err


def test_status_exits_130_after_an_interrupt_and_checks_the_pids(plan_file: Path) -> None:
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    registry: StageRegistry = {}
    for stage_name in STAGE_NAMES:

        class Simple(Stage):
            name: ClassVar[str] = stage_name

            def run(self, ctx: StageContext) -> StageResult:
                if ctx.current == "verify":
                    raise KeyboardInterrupt
                return StageResult(data={"pid": dead.pid} if ctx.current == "launch-source" else {})

        register_stage(Simple, registry)
    with pytest.raises(StageFailed):
        apply(load_plan(plan_file), registry=registry)
    result = CliRunner().invoke(app, ["status", str(plan_file)])
    assert result.exit_code == 130, result.output
    assert f"source VMM: pid {dead.pid} on local: not running (dead)" in result.output
    document = json.loads(CliRunner().invoke(app, ["status", str(plan_file), "-o", "json"]).output)
    assert document["processes"] == [{"role": "source", "pid": dead.pid, "host": "local", "alive": False}]


def test_checkpoint_dir_overrides_the_plans(plan_file: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    apply(load_plan(plan_file).with_checkpoint_dir(elsewhere), registry=registry_failing_at("none"))
    assert (elsewhere / DB_NAME).exists() and not (plan_file.parent / "state").exists()
    moved = CliRunner().invoke(app, ["status", str(plan_file), "--checkpoint-dir", str(elsewhere)])
    assert moved.exit_code == 0 and "run 1: succeeded" in moved.output
    plain = CliRunner().invoke(app, ["status", str(plan_file)])
    assert "the plan has not been applied" in plain.output
