"""How ``confplan apply`` and ``confplan status`` speak: plain lines (pipes, logs), a rich live view with a
progress bar per round on a terminal, the report (``-o json``, docs/report.md) or the event stream
(``-o ndjson``) whose last line is the report; and Ctrl-C, which says at once that it is stopping.

``ReportOutput`` is the one place a command's outcome becomes a report: it remembers what the apply did
(through its observer) and prints the report on success and on any failure, the failure then going on
up to ``cli.main`` for its message and exit code.
"""

from __future__ import annotations

import contextlib
import enum
import json
import signal
import sqlite3
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import typer

from confplan.errors import ConfplanError
from confplan.plan import Plan
from confplan.report import build_report, read_run, stage_json
from confplan.stages.base import Progress, Teardown
from confplan.stages.checkpoint import RunRecord, StageRecord
from confplan.stages.executor import ApplyReport, Observer, RunChoice, Step
from confplan.stages.observers import JsonObserver, TextObserver

if TYPE_CHECKING:
    from confplan.preflight import Check

STOPPING = "stopping at the next safe point..."
STILL_STOPPING = (
    "still stopping: the tear-downs leave the source guest running (Ctrl-C once more abandons them)"
)


class Output(enum.StrEnum):
    TEXT = "text"
    JSON = "json"
    NDJSON = "ndjson"


class RichObserver(Observer):
    """A live line per stage on a terminal: the stage, a bar of the round's pages (like `virsh migrate
    --verbose`), the round, throughput, pages to go, ETA."""

    def __init__(self, console: Any = None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, SpinnerColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as Bar

        self.console = console if console is not None else Console()
        self.text = TextObserver(self.console.print)
        columns = (SpinnerColumn(), TextColumn("[bold]{task.description:<16}"), BarColumn(bar_width=24),
                   TaskProgressColumn(), TimeElapsedColumn())  # fmt: skip
        self.bar = Bar(*columns, TextColumn("{task.fields[status]}"), console=self.console)
        self.tasks: dict[str, Any] = {}

    def preflight_checked(self, check: Check) -> None:
        self.text.preflight_checked(check)

    def run_chosen(self, choice: RunChoice) -> None:
        self.text.run_chosen(choice)

    def reconciled(self, note: str) -> None:
        self.text.reconciled(note)

    def steps_planned(self, steps: Sequence[Step], dry_run: bool) -> None:
        self.text.steps_planned(steps, dry_run)
        if not dry_run:
            self.bar.start()

    def stage_started(self, step: Step) -> None:
        self.tasks[step.stage] = self.bar.add_task(step.stage, total=None, status=step.action.value)

    def stage_progress(self, stage: str, progress: Progress) -> None:
        task = self.tasks.get(stage)
        if task is None:
            return
        status = progress.message or f"{progress.done} {progress.unit}"
        if progress.total:  # within a round: its pages sent of its pages
            self.bar.update(task, total=progress.total, completed=progress.done, status=status)
        elif self.bar.tasks[task].total:  # a round ended: its bar is full
            self.bar.update(task, completed=self.bar.tasks[task].total, status=status)
        else:
            self.bar.update(task, status=status)

    def stage_skipped(self, step: Step) -> None:
        self.bar.console.print(f"[dim]{step.stage}: skipped ({step.reason})")

    def stage_finished(self, step: Step, record: StageRecord) -> None:
        task = self.tasks.get(step.stage)
        if task is not None:
            self.bar.update(task, total=1, completed=1, status=f"[green]done in {record.duration or 0:.2f}s")

    def stage_failed(self, step: Step, error: str) -> None:
        task = self.tasks.get(step.stage)
        if task is not None:
            self.bar.update(task, status="[red]FAILED (the error follows below)")

    def teardown_ran(self, teardown: Teardown, error: str | None) -> None:
        self.bar.console.print(f"  tear-down {teardown.label}: {'ok' if error is None else error}")

    def run_finished(self, run: RunRecord) -> None:
        self.bar.stop()
        self.text.run_finished(run)


class Recorder(Observer):
    """Passes every event on to ``inner`` and keeps what a report needs: the run chosen, the steps, the run
    (its end), and whether any stage started."""

    def __init__(self, inner: Observer) -> None:
        self.inner = inner
        self.choice: RunChoice | None = None
        self.steps: list[Step] = []
        self.run: RunRecord | None = None
        self.started = False
        self.preflight: list[dict[str, Any]] = []  # the preflight checks run, in the report

    def preflight_checked(self, check: Check) -> None:
        self.preflight.append(check.to_json())
        self.inner.preflight_checked(check)

    def run_chosen(self, choice: RunChoice) -> None:
        self.choice = choice
        self.inner.run_chosen(choice)

    def reconciled(self, note: str) -> None:
        self.inner.reconciled(note)

    def steps_planned(self, steps: Sequence[Step], dry_run: bool) -> None:
        self.steps = list(steps)
        self.inner.steps_planned(steps, dry_run)

    def stage_started(self, step: Step) -> None:
        self.started = True
        self.inner.stage_started(step)

    def stage_progress(self, stage: str, progress: Progress) -> None:
        self.inner.stage_progress(stage, progress)

    def stage_skipped(self, step: Step) -> None:
        self.inner.stage_skipped(step)

    def stage_finished(self, step: Step, record: StageRecord) -> None:
        self.inner.stage_finished(step, record)

    def stage_failed(self, step: Step, error: str) -> None:
        self.inner.stage_failed(step, error)

    def teardown_ran(self, teardown: Teardown, error: str | None) -> None:
        self.inner.teardown_ran(teardown, error)

    def run_finished(self, run: RunRecord) -> None:
        self.run = run
        self.inner.run_finished(run)


class ReportOutput:
    """What one command prints, by ``output``: ``observer`` hears the apply; ``succeeded``/``reporting``
    print the report (json: at the end; ndjson: as the last event; text: nothing)."""

    def __init__(self, output: Output, *, kind: str, plan_file: str, junit: Path | None = None) -> None:
        self.output, self.kind, self.plan_file = output, kind, plan_file
        self.junit = junit  # also write the report as JUnit XML here, whatever the outcome
        self.plan: Plan | None = None  # once loaded
        self._lock = threading.Lock()  # progress arrives from RPC threads too: whole lines only
        self.events = JsonObserver(self.line, record_json=stage_json) if output is Output.NDJSON else None
        self.observer = Recorder(self.events or _display(output))

    def line(self, text: str) -> None:
        with self._lock:
            typer.echo(text)  # flushed: a pipe gets each line as it happens

    def report(self, doc: Mapping[str, Any]) -> None:
        if self.output is Output.JSON:
            self.line(json.dumps(doc, indent=2))
        elif self.events is not None:
            self.events.event("report", report=doc)

    @contextlib.contextmanager
    def reporting(self) -> Iterator[None]:
        """A failure inside (an exception, Ctrl-C) prints its report, then goes on up to ``cli.main``."""
        try:
            yield
        except (Exception, KeyboardInterrupt) as err:
            if self.output is not Output.TEXT or self.junit is not None:
                doc = self.failed(err)
                if self.output is not Output.TEXT:
                    self.report(doc)
                self._write_junit(doc, after=err)
            raise

    def _write_junit(self, doc: Mapping[str, Any], *, after: BaseException | None = None) -> None:
        """``--junit FILE``: the report as JUnit XML. When the command failed already, a failure to write
        is said on stderr and the command's own error (and exit code) stands."""
        if self.junit is None:
            return
        from confplan.report_junit import write_junit

        try:
            write_junit(self.junit, doc)
        except ConfplanError as err:
            if after is None:
                raise
            typer.echo(err.render(), err=True)

    def failed(self, error: BaseException) -> dict[str, Any]:
        """The report of a command that ``error`` ended, with its run as the checkpoint has it."""
        recorder = self.observer
        run: RunRecord | None = None
        records: dict[str, StageRecord] = {}
        if self.plan is not None and (recorder.run is not None or recorder.started):
            with contextlib.suppress(ConfplanError, sqlite3.Error, OSError, KeyError):
                run, records = read_run(self.plan, recorder.run.run_id if recorder.run else None)
        return build_report(
            kind=self.kind, plan=self.plan, plan_file=self.plan_file, run=run, records=records,
            steps=recorder.steps, error=error, preflight=self.observer.preflight, choice=recorder.choice,
        )  # fmt: skip

    def succeeded(self, result: ApplyReport) -> dict[str, Any]:
        """The report of an apply (or dry run) that returned ``result``; printed unless output is text."""
        assert self.plan is not None
        run = result.run
        if run is None and result.choice.run_id is not None:  # a dry run: the run it would go on with
            run = read_run(self.plan, result.choice.run_id)[0]
        doc = build_report(kind=self.kind, plan=self.plan, plan_file=self.plan_file, run=run,
                           records=result.records, steps=result.steps, preflight=self.observer.preflight,
                           choice=result.choice)  # fmt: skip
        if self.output is not Output.TEXT:
            self.report(doc)
        self._write_junit(doc)
        return doc


def _display(output: Output) -> Observer:
    if output is Output.JSON:
        return Observer()  # only the report goes to stdout
    if sys.stdout.isatty():
        return RichObserver()
    return TextObserver(typer.echo)


def _say(text: str) -> None:
    with contextlib.suppress(RuntimeError, OSError):  # a write the signal interrupted: the stop matters more
        sys.stderr.write(text + "\n")
        sys.stderr.flush()


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Ctrl-C inside says "stopping at the next safe point..." at once (stderr) and stops the apply: the
    stage fails as interrupted and its tear-downs leave the source guest running. A second Ctrl-C does not
    cut those short (it says so); a third does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    presses = 0

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        nonlocal presses
        presses += 1
        if presses == 2:
            _say(STILL_STOPPING)
            return
        if presses == 1:
            _say(STOPPING)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
