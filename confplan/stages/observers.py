"""Renderers of an apply's progress: plain lines (logs, pipes) and JSON lines (tools, ``-o ndjson``).

Both write through an ``emit(line)`` callable so the CLI decides where lines go (typer.echo, a file).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from confplan.stages.base import Progress, Teardown
from confplan.stages.checkpoint import RunRecord, StageRecord
from confplan.stages.executor import Observer, RunChoice, Step, StepAction

if TYPE_CHECKING:
    from confplan.preflight import Check

Emit = Callable[[str], None]


def format_bytes(count: int) -> str:
    """``count`` bytes for people: "512 B", "1.5 MiB", up to TiB."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"  # pragma: no cover - the loop always returns


def format_steps(steps: Sequence[Step]) -> list[str]:
    """One line per step: ``run    precopy        not run yet``."""
    width = max((len(step.stage) for step in steps), default=0)
    return [f"  {step.action.value:<7} {step.stage:<{width}}  {step.reason}" for step in steps]


class TextObserver(Observer):
    """Plain lines, one per event; progress at most once a second per stage so logs stay readable."""

    def __init__(self, emit: Emit, *, progress_interval: float = 1.0) -> None:
        self.emit = emit
        self.progress_interval = progress_interval
        self._last_progress: dict[str, float] = {}

    def preflight_checked(self, check: Check) -> None:
        for line in check.lines():
            self.emit(line)

    def run_chosen(self, choice: RunChoice) -> None:
        self.emit(choice.reason)

    def reconciled(self, note: str) -> None:
        self.emit(f"reconciled: {note}")

    def steps_planned(self, steps: Sequence[Step], dry_run: bool) -> None:
        todo = [step for step in steps if step.action is not StepAction.SKIP]
        if not todo:
            self.emit("nothing to do: every stage is done")
        self.emit("would do:" if dry_run else "plan:")
        for line in format_steps(steps):
            self.emit(line)

    def stage_started(self, step: Step) -> None:
        self.emit(f"[{step.stage}] {'redo' if step.action is StepAction.REDO else 'start'}")

    def stage_progress(self, stage: str, progress: Progress) -> None:
        now = time.monotonic()
        last = self._last_progress.get(stage, -self.progress_interval)
        if not progress.milestone and now - last < self.progress_interval:
            return
        self._last_progress[stage] = now
        total = f"/{progress.total}" if progress.total is not None else ""
        unit = f" {progress.unit}" if progress.unit else ""
        message = f" {progress.message}" if progress.message else ""
        self.emit(f"[{stage}] {progress.done}{total}{unit}{message}")

    def stage_skipped(self, step: Step) -> None:
        self.emit(f"[{step.stage}] skipped: {step.reason}")

    def stage_finished(self, step: Step, record: StageRecord) -> None:
        moved = record.bytes_shared + record.bytes_sealed
        size = f", {format_bytes(moved)}" if moved else ""
        self.emit(f"[{step.stage}] done in {record.duration or 0.0:.2f}s{size}")

    def stage_failed(self, step: Step, error: str) -> None:
        self.emit(f"[{step.stage}] FAILED (the error follows below)")  # printed once, with its hint

    def teardown_ran(self, teardown: Teardown, error: str | None) -> None:
        outcome = "ok" if error is None else f"failed: {error}"
        self.emit(f"  tear-down {teardown.label} (from {teardown.stage}): {outcome}")

    def run_finished(self, run: RunRecord) -> None:
        self.emit(f"run {run.run_id}: {run.outcome.value}")


EVENT_SCHEMA = "confplan.event/v1"


def iso(stamp: float | None) -> str | None:
    """Epoch seconds as ISO-8601 UTC with milliseconds and a Z (None stays None)."""
    if stamp is None:
        return None
    text = datetime.fromtimestamp(stamp, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")
    return f"{text[:-3]}Z"


class JsonObserver(Observer):
    """One ``confplan.event/v1`` object per line (docs/report.md, "Events"); every progress is passed on.
    ``record_json`` shapes a stage record in stage-finished (the report's ``stages[]`` form, say)."""

    def __init__(
        self, emit: Emit, *, record_json: Callable[[StageRecord], Mapping[str, Any]] | None = None
    ) -> None:
        self.emit = emit
        self.record_json = record_json or StageRecord.to_json

    def event(self, event: str, **fields: Any) -> None:
        """Emit one event; the fields are the event's own."""
        line = {"schema": EVENT_SCHEMA, "event": event, "time": iso(time.time()), **fields}
        self.emit(json.dumps(line))

    def preflight_checked(self, check: Check) -> None:
        self.event("preflight-check", check=check.to_json())

    def run_chosen(self, choice: RunChoice) -> None:
        self.event("run-chosen", **choice.to_json())

    def reconciled(self, note: str) -> None:
        self.event("reconciled", note=note)

    def steps_planned(self, steps: Sequence[Step], dry_run: bool) -> None:
        self.event("steps", dry_run=dry_run, steps=[step.to_json() for step in steps])

    def stage_started(self, step: Step) -> None:
        self.event("stage-started", **step.to_json())

    def stage_progress(self, stage: str, progress: Progress) -> None:
        self.event(
            "stage-progress",
            **progress.fields,
            stage=stage,
            done=progress.done,
            total=progress.total,
            unit=progress.unit,
            message=progress.message,
        )

    def stage_skipped(self, step: Step) -> None:
        self.event("stage-skipped", **step.to_json())

    def stage_finished(self, step: Step, record: StageRecord) -> None:
        self.event("stage-finished", stage=step.stage, record=dict(self.record_json(record)))

    def stage_failed(self, step: Step, error: str) -> None:
        self.event("stage-failed", stage=step.stage, error=error)

    def teardown_ran(self, teardown: Teardown, error: str | None) -> None:
        self.event("teardown", label=teardown.label, stage=teardown.stage, error=error)

    def run_finished(self, run: RunRecord) -> None:
        self.event("run-finished", run={**run.to_json(), "started": iso(run.started),
                                        "finished": iso(run.finished)})  # fmt: skip
