"""plan_steps and choose_run: the pure decisions of an apply, on literal inputs."""

from __future__ import annotations

import pytest

import confplan.stages.modules  # noqa: F401  (registers the pipeline's stages with their resume policies)
from confplan.plan import STAGE_NAMES, StageSpec
from confplan.stages.base import ResumePolicy, stage_inputs, stage_policies
from confplan.stages.checkpoint import RunOutcome, RunRecord, StageRecord, StageStatus
from confplan.stages.executor import RunChoice, Step, StepAction, choose_run
from confplan.stages.executor import plan_steps as _plan_steps
from confplan.stages.observers import format_steps

SPECS = [StageSpec(name=name) for name in STAGE_NAMES]
RUN, SKIP, REDO, BLOCKED = StepAction.RUN, StepAction.SKIP, StepAction.REDO, StepAction.BLOCKED


# The stages whose own resume policy redoes from an earlier stage after a failure in the middle of the stream;
# the decisions below are checked with their real policies (each stage class declares its own).
STREAM_POLICIES = {
    name: policy
    for name, policy in stage_policies().items()
    if name in ("precopy", "stop-and-copy", "verify", "resume-target")
}


def plan_steps(specs: list[StageSpec], records: dict[str, StageRecord], **options: object) -> list[Step]:
    options.setdefault("policies", STREAM_POLICIES)
    return _plan_steps(specs, records, **options)  # type: ignore[arg-type]


def record(name: str, status: StageStatus, error: str | None = None) -> StageRecord:
    spec = next(spec for spec in SPECS if spec.name == name)
    return StageRecord(name, status, inputs=stage_inputs(spec), finished=1.0e9, error=error)


def failed_at(index: int, status: StageStatus = StageStatus.FAILED) -> dict[str, StageRecord]:
    """Records of a run that finished stages [0, index) and then failed (or crashed) at ``index``."""
    records = {name: record(name, StageStatus.DONE) for name in STAGE_NAMES[:index]}
    records[STAGE_NAMES[index]] = record(STAGE_NAMES[index], status, error="boom")
    for name in STAGE_NAMES[index + 1 :]:
        records[name] = record(name, StageStatus.PENDING)
    return records


def actions(steps: list) -> list[StepAction]:  # type: ignore[type-arg]
    return [step.action for step in steps]


def test_fresh_run_runs_everything() -> None:
    steps = plan_steps(SPECS, {})
    assert actions(steps) == [RUN] * 9
    assert {step.reason for step in steps} == {"not run yet"}


def test_everything_done_skips_everything() -> None:
    steps = plan_steps(SPECS, {name: record(name, StageStatus.DONE) for name in STAGE_NAMES})
    assert actions(steps) == [SKIP] * 9
    assert all("inputs unchanged" in step.reason for step in steps)


def test_skipped_counts_as_done() -> None:
    records = {name: record(name, StageStatus.SKIPPED) for name in STAGE_NAMES[:3]}
    assert actions(plan_steps(SPECS, records)) == [SKIP] * 3 + [RUN] * 6


# (failed stage, first stage that runs again) for every stage of the pipeline.
RESUME_POINTS = [
    ("launch-source", "launch-source"),
    ("provision-target", "provision-target"),
    ("attest-target", "attest-target"),
    ("start-incoming", "start-incoming"),
    ("precopy", "start-incoming"),
    ("stop-and-copy", "start-incoming"),
    ("verify", "start-incoming"),
    ("resume-target", "start-incoming"),
    ("cleanup-source", "cleanup-source"),
]


@pytest.mark.parametrize(("failed", "resume_at"), RESUME_POINTS)
def test_resume_after_failure_at_each_stage(failed: str, resume_at: str) -> None:
    index, start = STAGE_NAMES.index(failed), STAGE_NAMES.index(resume_at)
    steps = plan_steps(SPECS, failed_at(index))
    expected = [SKIP] * start + [REDO] * (index - start + 1) + [RUN] * (8 - index)
    assert actions(steps) == expected
    assert steps[index].reason == "failed: boom"
    for step in steps[start:index]:
        assert step.reason.startswith(f"{failed} failed and ")


def test_crash_mid_stage_redoes_it() -> None:
    steps = plan_steps(SPECS, failed_at(1, StageStatus.RUNNING))
    assert actions(steps) == [SKIP, REDO] + [RUN] * 7
    assert "interrupted" in steps[1].reason


def test_crash_in_resume_target_is_blocked() -> None:
    steps = plan_steps(SPECS, failed_at(STAGE_NAMES.index("resume-target"), StageStatus.RUNNING))
    assert actions(steps) == [BLOCKED] * 9
    assert "may already run on the target" in steps[7].reason


def test_done_stage_whose_product_is_gone_runs_again_with_all_after_it() -> None:
    records = failed_at(5)  # stop-and-copy failed; provision-target's VMM has exited since
    steps = plan_steps(SPECS, records, still_valid={"provision-target": False})
    assert actions(steps) == [SKIP] + [REDO] * 5 + [RUN] * 3
    assert steps[1].reason == "done earlier, but what it produced is gone"
    assert steps[2].reason == "after provision-target, which runs again"


def test_changed_parameters_redo_from_that_stage() -> None:
    records = {name: record(name, StageStatus.DONE) for name in STAGE_NAMES}
    specs = list(SPECS)
    specs[4] = StageSpec(name="precopy", params={"max_rounds": 3})
    steps = plan_steps(specs, records)
    assert actions(steps) == [SKIP] * 4 + [REDO] * 5
    assert steps[4].reason == "its parameters changed"


def test_policy_override() -> None:
    policies = {"precopy": ResumePolicy("launch-source", "the source is launched afresh")}
    steps = plan_steps(SPECS, failed_at(4), policies=policies)
    assert actions(steps) == [REDO] * 5 + [RUN] * 4
    assert steps[0].reason == "precopy failed and the source is launched afresh"


def test_policy_pointing_outside_the_plan_redoes_the_stage_itself() -> None:
    specs = [StageSpec(name="precopy")]
    steps = plan_steps(specs, {"precopy": record("precopy", StageStatus.FAILED, error="x")})
    assert actions(steps) == [REDO]


def test_dry_run_lines() -> None:
    lines = format_steps(plan_steps(SPECS, failed_at(4)))
    assert lines[0].split() == ["skip", "launch-source", "done", "at", *lines[0].split()[4:]]
    assert lines[3].split()[:2] == ["redo", "start-incoming"]
    assert lines[4].split() == ["redo", "precopy", "failed:", "boom"]
    assert lines[5].split()[:2] == ["run", "stop-and-copy"]


def run_record(digest: str, outcome: RunOutcome) -> RunRecord:
    return RunRecord(7, "p", digest, 1.0, None, outcome)


def test_choose_run() -> None:
    assert choose_run(None, "h") == RunChoice(None, "first run of this plan")
    resumed = choose_run(run_record("h" * 64, RunOutcome.FAILED), "h" * 64)
    assert resumed.run_id == 7 and "resuming run 7" in resumed.reason
    changed = choose_run(run_record("a" * 64, RunOutcome.FAILED), "b" * 64)
    assert changed.run_id is None
    assert "plan changed since run 7" in changed.reason and "new run, not resuming" in changed.reason
    restarted = choose_run(run_record("h", RunOutcome.FAILED), "h", restart=True)
    assert restarted.run_id is None and "--restart" in restarted.reason
    done = choose_run(run_record("h", RunOutcome.SUCCEEDED), "h")
    assert done.run_id == 7 and "already succeeded" in done.reason


def test_a_failed_attestation_provisions_a_fresh_target() -> None:
    # attest-target's own policy: a machine's launch is measured once, so its VMM is provisioned again.
    index = STAGE_NAMES.index("attest-target")
    steps = plan_steps(SPECS, failed_at(index), policies=stage_policies())
    assert actions(steps) == [SKIP, REDO, REDO] + [RUN] * 6
    assert steps[1].reason.startswith("attest-target failed and a machine's launch is measured once")
