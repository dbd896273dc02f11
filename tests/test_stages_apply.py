"""apply() with small real stage classes, a real checkpoint file and real tear-downs (no mocks)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import ClassVar

import pytest

import confplan.stages.modules  # noqa: F401  (registers the real stages, whose resume policies these copy)
from confplan.errors import ConfplanError
from confplan.plan import STAGE_NAMES, Plan, load_plan_text
from confplan.stages import (
    CheckpointStore,
    RunOutcome,
    Stage,
    StageContext,
    StageFailed,
    StageRecord,
    StageResult,
    StageStatus,
    StepAction,
    TeardownWhen,
    apply,
    register_stage,
    stage_inputs,
)
from confplan.stages.base import REGISTRY, StageRegistry
from confplan.stages.checkpoint import DB_NAME
from confplan.stages.observers import JsonObserver, TextObserver

PLAN_TEXT = "guest: {memory: 64MiB}\nmetadata: {name: demo}\n"


def make_plan(tmp_path: Path, extra: str = "") -> Plan:
    return load_plan_text(PLAN_TEXT + extra, str(tmp_path / "demo.yaml"))


class World:
    """What the test stages do, in order, and where they are told to fail."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.fail: dict[str, BaseException] = {}
        self.gone: set[str] = set()  # stages whose product has vanished since they were done


def make_registry(world: World) -> StageRegistry:
    registry: StageRegistry = {}
    for name in STAGE_NAMES:
        register_stage(_stage_class(name, world), registry)
    return registry


def _stage_class(stage_name: str, world: World) -> type[Stage]:
    class Recorded(Stage):
        name: ClassVar[str] = stage_name
        policy = REGISTRY[stage_name].policy  # the real stage's resume policy

        def check(self, ctx: StageContext) -> None:
            if stage_name == "cleanup-source":
                ctx.result_of("resume-target")  # raises unless resume-target succeeded

        def run(self, ctx: StageContext) -> StageResult:
            world.log.append(f"run {stage_name}")
            ctx.progress(1, 2, unit="pages")
            ctx.add_teardown(f"undo {stage_name}", lambda: world.log.append(f"undo {stage_name}"))
            close = f"close {stage_name}"
            ctx.add_teardown(close, lambda: world.log.append(close), when=TeardownWhen.ALWAYS)
            if stage_name in world.fail:
                raise world.fail[stage_name]
            return StageResult(bytes_shared=100, bytes_sealed=4096, data={"stage": stage_name})

        def resume_safe(self, previous: StageRecord) -> bool:
            return stage_name not in world.gone

    Recorded.__qualname__ = f"Recorded[{stage_name}]"
    return Recorded


def runs_of(world: World) -> list[str]:
    return [entry.removeprefix("run ") for entry in world.log if entry.startswith("run ")]


def records(plan: Plan) -> dict[str, StageRecord]:
    with CheckpointStore.open(plan.checkpoint.dir, create=False) as store:
        run = store.latest_run(plan.metadata.name)
        assert run is not None
        return store.stage_records(run.run_id)


def test_fresh_apply_runs_every_stage_and_records_it(tmp_path: Path) -> None:
    world, plan, lines = World(), make_plan(tmp_path), []
    report = apply(plan, registry=make_registry(world), observer=TextObserver(lines.append))
    assert runs_of(world) == list(STAGE_NAMES)
    assert report.run is not None and report.run.outcome is RunOutcome.SUCCEEDED
    assert report.run.plan_hash == plan.plan_hash()
    saved = records(plan)
    assert all(record.status is StageStatus.DONE for record in saved.values())
    assert saved["precopy"].result == {"stage": "precopy"} and saved["precopy"].bytes_sealed == 4096
    # On success only the ALWAYS tear-downs run, in reverse.
    assert [e for e in world.log if not e.startswith("run ")] == [f"close {n}" for n in reversed(STAGE_NAMES)]
    assert "first run of this plan" in lines[0] and lines[-1] == f"run {report.run.run_id}: succeeded"
    assert "[precopy] 1/2 pages" in lines


def test_failure_tears_down_in_reverse_and_resume_skips_what_is_done(tmp_path: Path) -> None:
    world, plan = World(), make_plan(tmp_path)
    registry = make_registry(world)
    world.fail["precopy"] = RuntimeError("stream reset by peer")
    with pytest.raises(StageFailed) as caught:
        apply(plan, registry=registry, plan_ref="demo.yaml")
    err = caught.value
    assert err.stage == "precopy" and not err.interrupted and err.exit_code == 4
    assert err.message == "stage precopy failed: RuntimeError: stream reset by peer"
    assert err.hint is not None
    assert "rerun `confplan apply demo.yaml` to resume at stage start-incoming" in err.hint
    undone = [e for e in world.log if not e.startswith("run ")]
    expected = []
    for name in reversed(STAGE_NAMES[:5]):
        expected += [f"close {name}", f"undo {name}"]
    assert undone == expected
    saved = records(plan)
    assert saved["precopy"].status is StageStatus.FAILED
    assert saved["precopy"].error == "RuntimeError: stream reset by peer"
    assert saved["attest-target"].status is StageStatus.DONE
    assert saved["stop-and-copy"].status is StageStatus.PENDING

    world.log.clear()
    del world.fail["precopy"]
    report = apply(plan, registry=registry)
    assert runs_of(world) == list(STAGE_NAMES[3:])
    assert [step.action for step in report.steps[:5]] == [StepAction.SKIP] * 3 + [StepAction.REDO] * 2
    assert report.choice.resume and report.run is not None and report.run.attempts == 2
    saved = records(plan)
    assert saved["launch-source"].status is StageStatus.SKIPPED
    assert saved["launch-source"].result == {"stage": "launch-source"}  # kept from the first attempt
    assert saved["precopy"].status is StageStatus.DONE and saved["precopy"].attempt == 2


def test_keyboard_interrupt_is_a_recorded_failure(tmp_path: Path) -> None:
    world, plan = World(), make_plan(tmp_path)
    world.fail["attest-target"] = KeyboardInterrupt()
    with pytest.raises(StageFailed) as caught:
        apply(plan, registry=make_registry(world))
    assert caught.value.interrupted and caught.value.exit_code == 130
    assert "stage attest-target was interrupted: interrupted (Ctrl-C)" in caught.value.message
    assert world.log[-1] == "undo launch-source"
    saved = records(plan)
    assert saved["attest-target"].status is StageStatus.FAILED
    with CheckpointStore.open(plan.checkpoint.dir) as store:
        run = store.latest_run("demo")
        assert run is not None and run.outcome is RunOutcome.FAILED


def test_failing_teardown_does_not_stop_the_others(tmp_path: Path) -> None:
    world, plan = World(), make_plan(tmp_path)
    registry = make_registry(world)

    class BadUndo(registry["provision-target"]):  # type: ignore[misc,valid-type]
        def run(self, ctx: StageContext) -> StageResult:
            result: StageResult = super().run(ctx)

            def explode() -> None:
                raise OSError("target VMM already gone")

            ctx.add_teardown("destroy target", explode)
            return result

    registry["provision-target"] = BadUndo
    world.fail["start-incoming"] = ConfplanError("port 4444 in use", hint="pick another port")
    with pytest.raises(StageFailed) as caught:
        apply(plan, registry=registry)
    message, hint = caught.value.message, caught.value.hint or ""
    assert "tear-down 'destroy target' (from stage provision-target) failed: OSError" in message
    assert world.log[-1] == "undo launch-source"  # ran after the failing one
    assert hint.startswith("pick another port; then rerun")


def test_precondition_failure_names_what_is_missing(tmp_path: Path) -> None:
    world = World()
    plan = make_plan(tmp_path)
    # Pretend resume-target never succeeded: its record is failed, then cleanup-source's check refuses.
    world.fail["resume-target"] = RuntimeError("no")
    with pytest.raises(StageFailed):
        apply(plan, registry=make_registry(world))
    with CheckpointStore.open(plan.checkpoint.dir) as store:
        run = store.latest_run("demo")
        assert run is not None
        ctx = StageContext(plan, run.run_id, store.stage_records(run.run_id), lambda stage, progress: None)
    ctx.current = "cleanup-source"
    with pytest.raises(ConfplanError, match="needs the result of stage resume-target, which is failed"):
        make_registry(world)["cleanup-source"]({}).check(ctx)


def test_changed_plan_starts_a_new_run(tmp_path: Path) -> None:
    world = World()
    registry = make_registry(world)
    apply(make_plan(tmp_path), registry=registry)
    world.log.clear()
    lines: list[str] = []
    changed = load_plan_text("guest: {memory: 128MiB}\nmetadata: {name: demo}\n", str(tmp_path / "demo.yaml"))
    report = apply(changed, registry=registry, observer=TextObserver(lines.append))
    assert "the plan changed since run 1" in lines[0] and not report.choice.resume
    assert runs_of(world) == list(STAGE_NAMES)
    assert report.run is not None and report.run.run_id == 2


def test_succeeded_run_is_not_redone(tmp_path: Path) -> None:
    world, plan = World(), make_plan(tmp_path)
    registry = make_registry(world)
    apply(plan, registry=registry)
    world.log.clear()
    world.gone.add("launch-source")  # cleanup-source destroyed it: that is no reason to migrate again
    report = apply(plan, registry=registry)
    assert runs_of(world) == [] and all(step.action is StepAction.SKIP for step in report.steps)


def test_vanished_product_redoes_from_that_stage(tmp_path: Path) -> None:
    world, plan = World(), make_plan(tmp_path)
    registry = make_registry(world)
    world.fail["verify"] = RuntimeError("digest mismatch")
    with pytest.raises(StageFailed):
        apply(plan, registry=registry)
    world.log.clear()
    del world.fail["verify"]
    world.gone.add("provision-target")
    apply(plan, registry=registry)
    assert runs_of(world) == list(STAGE_NAMES[1:])


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    world, plan = World(), make_plan(tmp_path)
    lines: list[str] = []
    report = apply(plan, registry={}, observer=TextObserver(lines.append), dry_run=True)
    assert not (plan.checkpoint.dir / DB_NAME).exists()
    assert [step.action for step in report.steps] == [StepAction.RUN] * 9 and report.run is None
    assert lines[:2] == ["first run of this plan", "would do:"]
    registry = make_registry(world)
    world.fail["stop-and-copy"] = RuntimeError("downtime exceeded")
    with pytest.raises(StageFailed):
        apply(plan, registry=registry)
    before = records(plan)
    world.log.clear()
    events: list[str] = []
    report = apply(plan, registry=registry, observer=JsonObserver(events.append), dry_run=True)
    assert world.log == [] and records(plan) == before
    steps = json.loads(events[1])["steps"]
    assert [step["action"] for step in steps[2:6]] == ["skip", "redo", "redo", "redo"]
    assert steps[5]["reason"] == "failed: RuntimeError: downtime exceeded"


def test_unregistered_stages_fail_clearly_before_anything_runs(tmp_path: Path) -> None:
    world, plan = World(), make_plan(tmp_path)
    registry = make_registry(world)
    del registry["precopy"], registry["verify"]
    with pytest.raises(ConfplanError, match="no action for stages precopy, verify"):
        apply(plan, registry=registry)
    assert world.log == [] and not (plan.checkpoint.dir / DB_NAME).exists()


CRASHING_APPLY = textwrap.dedent(
    """
    import os, sys
    from typing import ClassVar
    from confplan.plan import load_plan
    from confplan.stages import Stage, StageContext, StageResult, apply, register_stage

    registry = {}
    for stage_name in %r:
        class S(Stage):
            name: ClassVar[str] = stage_name
            def run(self, ctx: StageContext) -> StageResult:
                if ctx.current == "provision-target":
                    os._exit(9)  # the orchestrator dies mid-stage: no except, no tear-down, no finally
                return StageResult()
        register_stage(S, registry)
    apply(load_plan(sys.argv[1]), registry=registry)
    """
)


def test_crash_mid_stage_is_redone_by_the_next_apply(tmp_path: Path) -> None:
    plan_file = tmp_path / "demo.yaml"
    plan_file.write_text(PLAN_TEXT)
    script = CRASHING_APPLY % (list(STAGE_NAMES),)
    crashed = subprocess.run([sys.executable, "-c", script, str(plan_file)], check=False)
    assert crashed.returncode == 9
    plan = make_plan(tmp_path)
    assert records(plan)["provision-target"].status is StageStatus.RUNNING
    world = World()
    lines: list[str] = []
    apply(plan, registry=make_registry(world), observer=TextObserver(lines.append))
    assert runs_of(world) == list(STAGE_NAMES[1:])
    assert any("redo" in line and "provision-target" in line and "interrupted" in line for line in lines)


def test_crash_in_resume_target_refuses_to_resume(tmp_path: Path) -> None:
    plan = make_plan(tmp_path)
    with CheckpointStore.open(plan.checkpoint.dir) as store:
        run = store.begin_run("demo", plan.plan_hash(), [(s.name, stage_inputs(s)) for s in plan.stages])
        for name in STAGE_NAMES[:7]:
            store.mark_running(run.run_id, name)
            store.mark_done(run.run_id, name, duration=0, bytes_shared=0, bytes_sealed=0, result={})
        store.mark_running(run.run_id, "resume-target")
    world = World()
    with pytest.raises(ConfplanError, match="cannot resume run 1 automatically") as caught:
        apply(plan, registry=make_registry(world), plan_ref="demo.yaml")
    assert "confplan apply --restart demo.yaml" in (caught.value.hint or "")
    assert world.log == []
    report = apply(plan, registry=make_registry(world), restart=True)
    assert runs_of(world) == list(STAGE_NAMES) and report.run is not None and report.run.run_id == 2


def test_a_result_that_cannot_be_recorded_fails_the_stage(tmp_path: Path) -> None:
    world, plan = World(), make_plan(tmp_path)
    registry = make_registry(world)

    class Unrecordable(registry["launch-source"]):  # type: ignore[misc,valid-type]
        def run(self, ctx: StageContext) -> StageResult:
            super().run(ctx)
            return StageResult(data={"vmm": object()})

    registry["launch-source"] = Unrecordable
    with pytest.raises(
        StageFailed, match="stage launch-source failed: TypeError: a stage result must be JSON"
    ):
        apply(plan, registry=registry)
    assert world.log[-2:] == ["close launch-source", "undo launch-source"]
    assert records(plan)["launch-source"].status is StageStatus.FAILED


def test_a_failed_handover_stage_says_a_rerun_asks_the_vmms_first(tmp_path: Path) -> None:
    """verify, stop-and-copy and resume-target may finish without the apply (the VMMs' handover): their
    failure's hint says a rerun first asks the VMMs where the guest runs, not a stage it would resume at."""
    from standins import stand_in_stages

    from confplan.stages.base import Reconciled, ResumePolicy
    from confplan.stages.modules._handover import SETTLES_ON_RERUN

    registry = stand_in_stages("verify")

    class Verify(registry["verify"]):  # type: ignore[misc,valid-type]
        policy = ResumePolicy("start-incoming", "redo", settled_on_rerun=SETTLES_ON_RERUN)

    registry["verify"] = Verify
    with pytest.raises(StageFailed) as caught:
        apply(make_plan(tmp_path), registry=registry, plan_ref="p.yaml",
              reconciler=lambda plan, records: Reconciled())  # fmt: skip
    assert caught.value.hint == f"rerun `confplan apply p.yaml`: {SETTLES_ON_RERUN}"


def test_a_rounds_late_progress_event_does_not_count_its_bytes_twice(tmp_path: Path) -> None:
    """The source's last progress event of a round may be read after the round's answer; the bytes the
    report shows must stay those sent (an 8 GiB run showed 17 GB after its 8.6 GB first round)."""
    from confplan.migration.precopy import RoundStats
    from confplan.stages.modules.precopy import RoundWatch

    seen: list[int] = []
    ctx = StageContext(make_plan(tmp_path), "run", {}, lambda stage, p: seen.append(p.fields["bytes_sent"]))
    ctx.current = "precopy"
    watch = RoundWatch(ctx)
    event = {"round": 1, "pages": 100, "pages_sent": 50, "bytes_sent": 1000, "seconds": 1.0}
    watch.on_event("precopy-progress", event)
    watch.round_done(RoundStats(1, 10, 0, 90, 2000, 1.0, 5))
    watch.on_event("precopy-progress", {**event, "bytes_sent": 2000})  # round 1's, late: dropped
    watch.on_event("precopy-progress", {**event, "round": 2, "bytes_sent": 300})
    assert seen == [1000, 2300] and watch.error is None
