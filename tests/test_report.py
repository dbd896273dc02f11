"""The report (`confplan.report/v1`): its JSON Schema is a real draft 2020-12 schema that `confplan schema
--report` prints; every document the CLI prints without running a guest (dry run, invalid plan, a failure
before any stage) is valid against it, with the exit code the process exits with; `build_report` maps
errors to classes, outcomes and exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from reports import SCHEMA, check_events, check_report
from standins import stand_in_stages

from confplan.cli import main
from confplan.errors import ConfplanError, EnvironmentProblem, ExitCode, PlanBusy
from confplan.plan import STAGE_NAMES, Plan, load_plan
from confplan.report import SCHEMA_PATH, build_report, iso, report_for_plan
from confplan.stages import StageFailed, apply
from confplan.stages.checkpoint import StageRecord, StageStatus

PLAN = "metadata: {name: mig}\nguest: {memory: 64MiB}\ncheckpoint: {dir: state}\n"


@pytest.fixture
def plan_file(tmp_path: Path) -> Path:
    path = tmp_path / "mig.yaml"
    path.write_text(PLAN)
    return path


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_schema_is_draft_2020_12_and_printed_by_schema_report(capsys: pytest.CaptureFixture[str]) -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert {"schema", "kind", "outcome", "exit_code", "stages", "migration", "processes"} <= set(
        SCHEMA["required"]
    )
    code, out, _ = run_cli(capsys, "schema", "--report")
    assert code == 0 and json.loads(out) == json.loads(SCHEMA_PATH.read_text())
    code, out, _ = run_cli(capsys, "schema")
    assert code == 0 and json.loads(out)["title"].startswith("confplan plan")  # the plan's, as before


def test_the_schema_refuses_what_v1_forbids(plan_file: Path) -> None:
    doc = build_report(kind="dry-run", plan=load_plan(plan_file), plan_file=str(plan_file))
    check_report(doc)
    for broken in (
        {**doc, "schema": "confplan.report/v2"},
        {**doc, "generated_at": 1796223148.29},  # an epoch float, not ISO-8601 UTC
        {**doc, "stages": {}},  # stages is a list everywhere
        {key: value for key, value in doc.items() if key != "exit_code"},
    ):
        with pytest.raises(jsonschema.ValidationError):
            check_report(broken)
    check_report({**doc, "a_field_from_v1_1": 1})  # fields may be added within v1


def test_iso_times_are_utc_with_z() -> None:
    assert iso(0.0) == "1970-01-01T00:00:00.000Z"
    assert iso(1796223148.2904) == "2026-12-02T14:52:28.290Z"
    assert iso(None) is None


@pytest.mark.kvm  # a dry run runs the preflight, which needs a usable KVM to pass
def test_dry_run_json_is_a_planned_report(plan_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "apply", str(plan_file), "--dry-run", "-o", "json")
    doc = check_report(out)
    assert code == doc["exit_code"] == 0
    assert doc["kind"] == "dry-run" and doc["outcome"] == "planned" and doc["error"] is None
    assert doc["plan"] == {"file": str(plan_file), "name": "mig", "hash": load_plan(plan_file).plan_hash()}
    assert doc["run"] is None and doc["stages"] == []
    assert [step["action"] for step in doc["steps"]] == ["run"] * len(STAGE_NAMES)
    assert doc["preflight"] and all(check["ok"] for check in doc["preflight"])
    assert not (plan_file.parent / "state").exists()  # a dry run creates nothing


@pytest.mark.kvm  # a dry run runs the preflight, which needs a usable KVM to pass
def test_dry_run_after_a_failure_is_about_the_run_it_would_resume(
    plan_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(StageFailed):
        apply(load_plan(plan_file), registry=stand_in_stages("verify"))
    code, out, _ = run_cli(capsys, "apply", str(plan_file), "--dry-run", "-o", "ndjson")
    events = check_events(out)
    checks = [event for event in events if event["event"] == "preflight-check"]
    assert checks and events[: len(checks)] == checks  # the hosts are checked first
    assert [event["event"] for event in events[len(checks) :]] == ["run-chosen", "steps", "report"]
    doc = events[-1]["report"]
    assert code == doc["exit_code"] == 0 and doc["outcome"] == "planned"
    assert doc["run"]["id"] == 1 and doc["run"]["outcome"] == "failed"
    assert {stage["name"]: stage["status"] for stage in doc["stages"]}["verify"] == "failed"
    assert doc["run_choice"] == {"run_id": 1, "resume": True, "reason": "resuming run 1 (failed)"}


@pytest.mark.parametrize("output", ["json", "ndjson"])
def test_an_invalid_plan_prints_a_failed_report_with_the_diagnostics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], output: str
) -> None:
    plan = tmp_path / "bad.yaml"
    plan.write_text("guest: {memory: 12}\nfoo: 1\n")
    code, out, err = run_cli(capsys, "apply", str(plan), "-o", output)
    doc = check_report(out) if output == "json" else check_events(out)[-1]["report"]
    assert code == doc["exit_code"] == ExitCode.USAGE
    assert doc["outcome"] == "failed" and doc["error"]["class"] == "plan"
    assert doc["plan"] == {"file": str(plan), "name": None, "hash": None} and doc["checkpoint"] is None
    assert [d["field"] for d in doc["diagnostics"]] == ["guest.memory", "foo"]
    assert doc["diagnostics"][0]["line"] == 1 and doc["diagnostics"][0]["column"] == 17
    assert "not a valid plan" in err  # and the message for people, on stderr


def test_a_failure_before_any_stage_prints_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = tmp_path / "p.yaml"
    (tmp_path / "state").write_text("a file where the checkpoint folder should be")
    plan.write_text(PLAN)
    code, out, _ = run_cli(capsys, "apply", str(plan), "-o", "json")
    doc = check_report(out)
    assert code == doc["exit_code"] != 0
    assert doc["outcome"] in ("failed", "refused") and doc["run"] is None
    assert "checkpoint" in doc["error"]["message"] and doc["error"]["hint"]


# ---- build_report ----


def _plan(tmp_path: Path) -> Plan:
    path = tmp_path / "mig.yaml"
    path.write_text(PLAN)
    return load_plan(path)


@pytest.mark.parametrize(
    ("error", "code", "klass", "outcome"),
    [
        (None, 0, None, "succeeded"),
        (StageFailed("stage precopy failed: x", hint="rerun", stage="precopy", interrupted=False), None,
         "migration", "failed"),
        (StageFailed("stage precopy was interrupted", hint="rerun", stage="precopy", interrupted=True), 130,
         "interrupted", "interrupted"),
        (KeyboardInterrupt(), 130, "interrupted", "interrupted"),
        (PlanBusy("in use", hint="wait"), 5, "busy", "failed"),
        (EnvironmentProblem("/dev/kvm is not KVM", hint="load kvm"), 3, "environment", "refused"),
        (ConfplanError("bad usage"), 2, "usage", "failed"),
        (ValueError("a bug"), 1, "internal", "failed"),
    ],
)  # fmt: skip
def test_errors_map_to_class_outcome_and_exit_code(
    tmp_path: Path, error: BaseException | None, code: int | None, klass: str | None, outcome: str
) -> None:
    doc = check_report(build_report(kind="apply", plan=_plan(tmp_path), plan_file="mig.yaml", error=error))
    assert doc["outcome"] == outcome
    if error is None:
        assert doc["error"] is None and doc["exit_code"] == 0
        return
    expected = code if code is not None else getattr(error, "exit_code", 1)
    assert doc["exit_code"] == expected == main_exit_code(error)
    assert doc["error"]["class"] == klass and doc["error"]["message"]
    assert doc["error"]["stage"] == ("precopy" if isinstance(error, StageFailed) else None)


def main_exit_code(error: BaseException) -> int:
    """What `cli.main` exits with when a command raises ``error`` (the rule the report follows)."""
    from confplan.cli import app

    @app.command("raise-for-test", hidden=True)
    def raiser() -> None:
        raise error

    try:
        return main(["raise-for-test"])
    finally:
        app.registered_commands.pop()


def test_processes_are_checked_local_pids_probed_remote_ones_not(tmp_path: Path) -> None:
    records = {
        "launch-source": StageRecord("launch-source", StageStatus.DONE, result={"pid": 41}),
        "provision-target": StageRecord(
            "provision-target", StageStatus.DONE, result={"pid": 42, "agent": ["10.0.0.2", 4444]}
        ),
    }
    probed: list[int] = []

    def probe(pid: int) -> bool:
        probed.append(pid)
        return False

    doc = check_report(build_report(kind="status", plan=_plan(tmp_path), plan_file="mig.yaml",
                                    records=records, probe=probe))  # fmt: skip
    assert doc["processes"] == [
        {"role": "source", "pid": 41, "host": "local", "alive": False},
        {"role": "target", "pid": 42, "host": "10.0.0.2:4444", "alive": None},
    ]
    assert probed == [41]


def test_preflight_checks_are_carried(tmp_path: Path) -> None:
    checks = [
        {"check": "kvm", "side": "source", "ok": True, "detail": "/dev/kvm API 12", "hint": None},
        {"check": "memory", "side": "target", "ok": False, "detail": "1 GiB free", "hint": "free memory"},
    ]
    error = EnvironmentProblem("preflight failed: memory", hint="free memory")
    doc = check_report(build_report(kind="preflight", plan=_plan(tmp_path), plan_file="mig.yaml",
                                    preflight=checks, error=error))  # fmt: skip
    assert doc["preflight"] == checks and doc["outcome"] == "refused" and doc["exit_code"] == 3
    ok = check_report(build_report(kind="preflight", plan=_plan(tmp_path), plan_file="mig.yaml",
                                   preflight=checks[:1]))  # fmt: skip
    assert ok["outcome"] == "planned" and ok["exit_code"] == 0


def test_report_for_plan_reads_the_checkpoint(plan_file: Path) -> None:
    plan = load_plan(plan_file)
    assert report_for_plan(plan, str(plan_file))["outcome"] == "none"
    apply(plan, registry=stand_in_stages(shared=0, sealed=1 << 20))
    doc = check_report(report_for_plan(plan, str(plan_file)))
    assert doc["kind"] == "status" and doc["outcome"] == "succeeded" and doc["exit_code"] == 0
    assert [stage["status"] for stage in doc["stages"]] == ["done"] * len(STAGE_NAMES)
    assert doc["migration"]["bytes_sealed"] == len(STAGE_NAMES) << 20
    assert {step["action"] for step in doc["steps"]} == {"skip"}
