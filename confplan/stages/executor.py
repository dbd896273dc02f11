"""Plan the steps of an apply (a pure function) and run them against the checkpoint store.

``choose_run`` decides whether this apply continues the plan's last run or starts a new one;
``plan_steps`` decides, stage by stage, run / skip / redo (and why) from the checkpoint records alone.
Both are pure and tested on literal inputs; ``apply`` is the only part that touches the store and stages.
Dry run is ``apply(dry_run=True)``: the same decisions, printed, nothing run.
"""

from __future__ import annotations

import enum
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

from confplan.errors import ConfplanError, ExitCode, environment_problem
from confplan.plan import Plan, StageSpec
from confplan.stages.base import (
    RECONCILERS,
    REGISTRY,
    Progress,
    Reconciled,
    Reconciler,
    ResumePolicy,
    Stage,
    StageContext,
    StageRegistry,
    StageResult,
    Teardown,
    TeardownWhen,
    stage_inputs,
)
from confplan.stages.checkpoint import (
    DB_NAME,
    CheckpointStore,
    RunOutcome,
    RunRecord,
    StageRecord,
    StageStatus,
)

if TYPE_CHECKING:
    from confplan.preflight import Check

_FINISHED = (StageStatus.DONE, StageStatus.SKIPPED)


class StepAction(enum.StrEnum):
    RUN = "run"  # not run yet in this run
    SKIP = "skip"  # done earlier in this run, inputs unchanged
    REDO = "redo"  # ran before (done, failed or interrupted) and must run again
    BLOCKED = "blocked"  # not safe to resume automatically


@dataclass(frozen=True)
class Step:
    stage: str
    action: StepAction
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"stage": self.stage, "action": self.action.value, "reason": self.reason}


@dataclass(frozen=True)
class RunChoice:
    """Which run this apply works on: ``run_id`` None means a new run."""

    run_id: int | None
    reason: str

    @property
    def resume(self) -> bool:
        return self.run_id is not None

    def to_json(self) -> dict[str, object]:
        return {"run_id": self.run_id, "resume": self.resume, "reason": self.reason}


def choose_run(latest: RunRecord | None, plan_hash: str, *, restart: bool = False) -> RunChoice:
    """Continue the plan's latest run when it is for this very plan (same hash); else start a new one."""
    if latest is None:
        return RunChoice(None, "first run of this plan")
    if restart:
        return RunChoice(None, f"--restart: run {latest.run_id} is set aside, starting over")
    if latest.plan_hash != plan_hash:
        return RunChoice(
            None,
            f"the plan changed since run {latest.run_id} (hash {latest.plan_hash[:12]} -> {plan_hash[:12]}): "
            "starting a new run, not resuming",
        )
    if latest.outcome is RunOutcome.SUCCEEDED:
        return RunChoice(latest.run_id, f"run {latest.run_id} already succeeded")
    return RunChoice(latest.run_id, f"resuming run {latest.run_id} ({latest.outcome.value})")


def plan_steps(
    stages: Sequence[StageSpec],
    records: Mapping[str, StageRecord],
    *,
    policies: Mapping[str, ResumePolicy] | None = None,
    still_valid: Mapping[str, bool] | None = None,
) -> list[Step]:
    """Decide each stage's step from the run's checkpoint ``records`` (empty for a new run).

    Stages before the first one that needs work are skipped; from there on every stage runs, because each
    builds on the state the one before left. ``still_valid[name]`` False says a done stage's product is
    gone (its VMM exited): it runs again. A stage that failed or was interrupted moves the start back to
    its policy's ``redo_from``.
    """
    start, reasons, blocked = _first_to_run(stages, records, policies, still_valid or {})
    if blocked is not None:
        return [
            Step(spec.name, StepAction.BLOCKED, blocked if index == start else "waits for the blocked stage")
            for index, spec in enumerate(stages)
        ]
    steps = []
    for index, spec in enumerate(stages):
        record = records.get(spec.name)
        if index < start:
            assert record is not None
            steps.append(Step(spec.name, StepAction.SKIP, _done_text(record)))
        elif record is None or record.status is StageStatus.PENDING:
            steps.append(Step(spec.name, StepAction.RUN, "not run yet"))
        else:
            reason = reasons.get(spec.name) or f"after {stages[start].name}, which runs again"
            steps.append(Step(spec.name, StepAction.REDO, reason))
    return steps


def _first_to_run(
    stages: Sequence[StageSpec],
    records: Mapping[str, StageRecord],
    policies: Mapping[str, ResumePolicy] | None,
    still_valid: Mapping[str, bool],
) -> tuple[int, dict[str, str], str | None]:
    """(index of the first stage to run, redo reasons by stage, why resuming is blocked or None)."""
    names: list[str] = [spec.name for spec in stages]
    for index, spec in enumerate(stages):
        record = records.get(spec.name)
        if record is None or record.status is StageStatus.PENDING:
            return index, {}, None
        if record.inputs and record.inputs != stage_inputs(spec):
            return index, {spec.name: "its parameters changed"}, None
        if record.status in _FINISHED:
            if not still_valid.get(spec.name, True):
                return index, {spec.name: "done earlier, but what it produced is gone"}, None
            continue
        policy = (policies or {}).get(spec.name, ResumePolicy())
        if record.status is StageStatus.RUNNING and policy.unsafe_if_interrupted:
            return index, {}, policy.unsafe_if_interrupted
        origin, reasons = _redo_point(names, index, record, policy)
        return origin, reasons, None
    return len(stages), {}, None


def _redo_point(
    names: list[str], index: int, record: StageRecord, policy: ResumePolicy
) -> tuple[int, dict[str, str]]:
    if record.status is StageStatus.RUNNING:
        what, detail = "was interrupted", "the apply process ended while it ran"
    else:
        what, detail = "failed", _first_line(record.error or "no error recorded")
    reasons = {names[index]: f"{what}: {detail}"}
    origin = names.index(policy.redo_from) if policy.redo_from in names else index
    for name in names[origin:index]:
        reasons[name] = f"{names[index]} {what} and {policy.reason}"
    return min(origin, index), reasons


def _done_text(record: StageRecord) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.finished)) if record.finished else "?"
    return f"done at {when}, inputs unchanged"


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


class Observer:
    """Hears what ``apply`` does; every method is a no-op here, renderers override what they show."""

    def preflight_checked(self, check: Check) -> None: ...
    def run_chosen(self, choice: RunChoice) -> None: ...
    def steps_planned(self, steps: Sequence[Step], dry_run: bool) -> None: ...
    def stage_started(self, step: Step) -> None: ...
    def stage_progress(self, stage: str, progress: Progress) -> None: ...
    def stage_skipped(self, step: Step) -> None: ...
    def stage_finished(self, step: Step, record: StageRecord) -> None: ...
    def stage_failed(self, step: Step, error: str) -> None: ...
    def teardown_ran(self, teardown: Teardown, error: str | None) -> None: ...
    def run_finished(self, run: RunRecord) -> None: ...
    def reconciled(self, note: str) -> None: ...


class StageFailed(ConfplanError):
    """A stage failed (or was interrupted); the checkpoint records it and the tear-downs have run.
    Exit code 4 (the migration failed, the source keeps the guest), 130 when interrupted, or the cause's
    own code when that says more (the guest lost, the handover in doubt, busy)."""

    def __init__(
        self, message: str, *, hint: str, stage: str, interrupted: bool, cause_code: int | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.stage = stage
        self.interrupted = interrupted
        self.exit_code = int(ExitCode.MIGRATION_FAILED)
        if interrupted:
            self.exit_code = int(ExitCode.INTERRUPTED)
        elif cause_code in (ExitCode.BUSY, ExitCode.GUEST_LOST, ExitCode.HANDOVER_IN_DOUBT):
            self.exit_code = int(cause_code)


@dataclass(frozen=True)
class ApplyReport:
    choice: RunChoice
    steps: list[Step]
    run: RunRecord | None  # None for a dry run
    records: dict[str, StageRecord]


def apply(
    plan: Plan,
    *,
    registry: StageRegistry | None = None,
    observer: Observer | None = None,
    dry_run: bool = False,
    restart: bool = False,
    plan_ref: str = "PLAN",
    reconciler: Reconciler | None = None,
) -> ApplyReport:
    """Run ``plan``'s stages, resuming its last run where that is safe. ``plan_ref`` names the plan file
    in messages. A rerun first asks ``reconciler`` (default: the pipeline's) what really is, and decides
    from that and the checkpoint. Raises StageFailed after recording the failure and running the
    tear-downs."""
    if reconciler is None and registry is None and RECONCILERS:
        reconciler = RECONCILERS[0]
    registry = REGISTRY if registry is None else registry
    observer = observer or Observer()
    directory = plan.checkpoint.dir
    if dry_run and not (directory / DB_NAME).exists():
        return _report_dry(plan, RunChoice(None, "first run of this plan"), {}, registry, observer)
    classes = {} if dry_run else _stage_classes(plan.stages, registry)
    with CheckpointStore.open(directory) as store:
        if dry_run:
            choice = choose_run(store.latest_run(plan.metadata.name), plan.plan_hash(), restart=restart)
            records = store.stage_records(choice.run_id) if choice.run_id is not None else {}
            return _report_dry(plan, choice, records, registry, observer)
        with store.exclusive():
            return _Apply(plan, store, classes, observer, plan_ref, reconciler).execute(restart)


def _report_dry(
    plan: Plan,
    choice: RunChoice,
    records: dict[str, StageRecord],
    registry: StageRegistry,
    observer: Observer,
) -> ApplyReport:
    # No probing of live processes in a dry run: done stages are taken as still valid.
    steps = plan_steps(plan.stages, records, policies=_policies(plan.stages, registry))
    observer.run_chosen(choice)
    observer.steps_planned(steps, True)
    return ApplyReport(choice, steps, None, records)


def _policies(stages: Sequence[StageSpec], registry: StageRegistry) -> dict[str, ResumePolicy]:
    return {spec.name: registry[spec.name].policy for spec in stages if spec.name in registry}


def _stage_classes(stages: Sequence[StageSpec], registry: StageRegistry) -> dict[str, type[Stage]]:
    missing = [spec.name for spec in stages if spec.name not in registry]
    if missing:
        raise ConfplanError(
            f"this confplan has no action for stage{'s' if len(missing) > 1 else ''} {', '.join(missing)}",
            hint="remove them from the plan's stages, or use a confplan that implements them "
            "(`confplan apply --dry-run PLAN` still shows what would run)",
        )
    return {spec.name: registry[spec.name] for spec in stages}


class _Apply:
    """One apply: owns the run id, the context and the tear-down list."""

    def __init__(
        self,
        plan: Plan,
        store: CheckpointStore,
        classes: dict[str, type[Stage]],
        observer: Observer,
        plan_ref: str,
        reconciler: Reconciler | None = None,
    ) -> None:
        self.plan = plan
        self.reconciler = reconciler
        self.store = store
        self.stages: dict[str, Stage] = {spec.name: classes[spec.name](spec.params) for spec in plan.stages}
        self.observer = observer
        self.plan_ref = plan_ref
        self.policies = _policies(plan.stages, classes)

    def execute(self, restart: bool) -> ApplyReport:
        latest = self.store.latest_run(self.plan.metadata.name)
        choice = choose_run(latest, self.plan.plan_hash(), restart=restart)
        records = self.store.stage_records(choice.run_id) if choice.run_id is not None else {}
        # After a success nothing is probed: the source is gone by design, and nothing is left to do.
        probe = latest is not None and latest.outcome is not RunOutcome.SUCCEEDED
        found = Reconciled()
        if probe and choice.run_id is not None and self.reconciler is not None:
            found = self.reconciler(self.plan, records)  # raises when the guest is lost or in doubt
            records = self._settle_records(choice.run_id, found)
        valid = {
            name: self.stages[name].resume_safe(record)
            for name, record in records.items()
            if probe and record.status in _FINISHED and name in self.stages and name not in found.still_valid
        }
        valid.update(found.still_valid)
        steps = plan_steps(self.plan.stages, records, policies=self.policies, still_valid=valid)
        self.observer.run_chosen(choice)
        self.observer.steps_planned(steps, False)
        blocked = next((step for step in steps if step.action is StepAction.BLOCKED), None)
        if blocked is not None:
            raise ConfplanError(
                f"cannot resume run {choice.run_id} automatically: {blocked.reason}",
                hint="check where the guest runs now; then `confplan apply --restart "
                f"{self.plan_ref}` starts a new run from the first stage",
            )
        run = self._open_run(choice, steps)
        ctx = StageContext(self.plan, run.run_id, self.store.stage_records(run.run_id), self._progress)
        for step in steps:
            self._step(run, ctx, step)
        self._teardown(ctx, failed=False)
        self.store.finish_run(run.run_id, RunOutcome.SUCCEEDED)
        run = self.store.run(run.run_id)
        self.observer.run_finished(run)
        return ApplyReport(choice, steps, run, self.store.stage_records(run.run_id))

    def _settle_records(self, run_id: int, found: Reconciled) -> dict[str, StageRecord]:
        """Write what the world settled into the run's records, before anything is planned from them."""
        for note in found.notes:
            self.observer.reconciled(note)
        for stage, result in found.done.items():
            self.store.mark_done(run_id, stage, duration=0.0, bytes_shared=0, bytes_sealed=0, result=result)
        for stage, error in found.failed.items():
            self.store.mark_failed(run_id, stage, duration=0.0, error=error)
        return self.store.stage_records(run_id)

    def _open_run(self, choice: RunChoice, steps: list[Step]) -> RunRecord:
        if choice.run_id is None:
            inputs = [(spec.name, stage_inputs(spec)) for spec in self.plan.stages]
            return self.store.begin_run(self.plan.metadata.name, self.plan.plan_hash(), inputs)
        run = self.store.reopen_run(choice.run_id)
        for step in steps:
            if step.action is StepAction.REDO:
                self.store.mark_pending(run.run_id, step.stage)
        return run

    def _progress(self, stage: str, progress: Progress) -> None:
        self.observer.stage_progress(stage, progress)

    def _step(self, run: RunRecord, ctx: StageContext, step: Step) -> None:
        if step.action is StepAction.SKIP:
            self.store.mark_skipped(run.run_id, step.stage)
            ctx.records[step.stage] = self.store.stage_records(run.run_id)[step.stage]
            self.observer.stage_skipped(step)
            return
        stage = self.stages[step.stage]
        ctx.current = step.stage
        self.observer.stage_started(step)
        self.store.mark_running(run.run_id, step.stage)
        started = time.monotonic()
        try:
            stage.check(ctx)
            result = stage.run(ctx)
            if not isinstance(result, StageResult):
                raise TypeError(f"stage {step.stage} returned {type(result).__name__}, not a StageResult")
            stage.check_result(result)
            # Written only now, after the action succeeded (synchronous=FULL: on disk when this returns).
            # Should the write itself fail, the stage is not done: it fails, and a rerun redoes it.
            self.store.mark_done(
                run.run_id,
                step.stage,
                duration=time.monotonic() - started,
                bytes_shared=result.bytes_shared,
                bytes_sealed=result.bytes_sealed,
                result=result.data,
            )
        except BaseException as err:  # Ctrl-C too: recorded and torn down like any failure
            self._fail(run, ctx, step, err, time.monotonic() - started)
        record = self.store.stage_records(run.run_id)[step.stage]
        ctx.records[step.stage] = record
        self.observer.stage_finished(step, record)

    def _fail(
        self, run: RunRecord, ctx: StageContext, step: Step, err: BaseException, duration: float
    ) -> NoReturn:
        interrupted = isinstance(err, KeyboardInterrupt)
        error = _describe(err)
        problems = []
        try:
            self.store.mark_failed(run.run_id, step.stage, duration=duration, error=error,
                                   result=ctx.partial.get(step.stage))  # fmt: skip
        except sqlite3.Error as db_err:  # the tear-downs matter more than the record: go on
            problems.append(f"the checkpoint could not record the failure: {db_err}")
        self.observer.stage_failed(step, error)
        problems += self._teardown(ctx, failed=True)
        try:
            self.store.finish_run(run.run_id, RunOutcome.FAILED)
            self.observer.run_finished(self.store.run(run.run_id))
        except sqlite3.Error as db_err:
            problems.append(f"the checkpoint could not record the run's end: {db_err}")
        message = f"stage {step.stage} {'was interrupted' if interrupted else 'failed'}: {error}"
        if problems:
            message += "\n" + "\n".join(problems)
        hint = self._resume_hint(run, step.stage)
        cause = environment_problem(err) or err
        if isinstance(cause, ConfplanError) and cause.hint:
            hint = f"{cause.hint}; then {hint}"
        code = err.exit_code if isinstance(err, ConfplanError) else None
        raise StageFailed(
            message, hint=hint, stage=step.stage, interrupted=interrupted, cause_code=code
        ) from err

    def _resume_hint(self, run: RunRecord, failed: str) -> str:
        settled = self.policies.get(failed, ResumePolicy()).settled_on_rerun
        if settled and self.reconciler is not None:
            return f"rerun `confplan apply {self.plan_ref}`: {settled}"
        # The same pure function the next apply will use, so the hint cannot disagree with it.
        steps = plan_steps(self.plan.stages, self.store.stage_records(run.run_id), policies=self.policies)
        first = next((step for step in steps if step.action is not StepAction.SKIP), None)
        if first is None or first.action is StepAction.BLOCKED:
            return f"check the VMs, then `confplan apply --restart {self.plan_ref}`"
        # The failed stage's own reason is the error just printed: say it once.
        why = "" if first.stage == failed else f" ({first.reason})"
        return f"rerun `confplan apply {self.plan_ref}` to resume at stage {first.stage}{why}"

    def _teardown(self, ctx: StageContext, *, failed: bool) -> list[str]:
        """Run the registered tear-downs in reverse; every one runs even when another fails."""
        errors = []
        for teardown in reversed(ctx.teardowns):
            if teardown.cancelled or (not failed and teardown.when is TeardownWhen.ON_FAILURE):
                continue
            error = None
            try:
                teardown.action()
            except BaseException as err:  # a second Ctrl-C must not leave the source half torn down
                error = _describe(err)
                errors.append(f"tear-down {teardown.label!r} (from stage {teardown.stage}) failed: {error}")
            self.observer.teardown_ran(teardown, error)
        ctx.teardowns.clear()
        return errors


def _describe(err: BaseException) -> str:
    if isinstance(err, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    problem = environment_problem(err)  # a full disk is the host's, never "OSError: [Errno 28] ..."
    if problem is not None:
        return problem.message
    if isinstance(err, ConfplanError):
        return err.message
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__

