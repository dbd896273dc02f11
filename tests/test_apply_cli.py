"""`confplan apply` output without running VMs: the dry run, the rich live view, and the JSON report."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from confplan.cli.apply_cmds import RichObserver, final_report, register
from confplan.stages.base import Progress
from confplan.stages.checkpoint import StageRecord, StageStatus
from confplan.stages.executor import ApplyReport, RunChoice, Step, StepAction


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


@pytest.mark.kvm  # a dry run checks the host first (the preflight): it needs a usable KVM
def test_dry_run_lists_the_stages_and_runs_nothing(tmp_path: Path) -> None:
    plan = tmp_path / "p.yaml"
    plan.write_text("guest: {memory: 32MiB}\ncheckpoint: {dir: state}\n")
    result = CliRunner().invoke(_app(), ["apply", str(plan), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "would do:" in result.output and "precopy" in result.output and "cleanup-source" in result.output
    assert not (tmp_path / "state").exists()


def test_rich_view_shows_round_dirty_pages_throughput_eta() -> None:
    out = io.StringIO()
    view = RichObserver(Console(file=out, force_terminal=True, width=150))
    step = Step("precopy", StepAction.RUN, "not run yet")
    view.steps_planned([step], False)
    view.stage_started(step)
    view.stage_progress(
        "precopy", Progress(100, None, "pages", "round 2: 1234 dirty pages left, 300 MiB/s, ETA 0.02s")
    )
    view.bar.refresh()
    view.bar.stop()
    text = out.getvalue()
    assert "precopy" in text and "round 2: 1234 dirty pages left, 300 MiB/s, ETA 0.02s" in text


def _record(stage: str, result: dict[str, object], shared: int = 0, sealed: int = 0) -> StageRecord:
    return StageRecord(run_id=1, position=0, stage=stage, status=StageStatus.DONE, inputs="", attempt=1,
                       started=0.0, finished=1.0, duration=0.5, bytes_shared=shared, bytes_sealed=sealed,
                       result=result, error=None)  # fmt: skip


def test_json_report_gathers_rounds_bytes_and_downtime() -> None:
    rounds = [{"round": 1, "sealed_pages": 10}, {"round": 2, "sealed_pages": 3}]
    records = {
        "precopy": _record("precopy", {"rounds": rounds}, shared=100, sealed=200),
        "stop-and-copy": _record(
            "stop-and-copy", {"final_round": {"round": 3}, "source_paused_seconds": 0.01}, sealed=50
        ),
        "resume-target": _record("resume-target", {"downtime_seconds": 0.04, "target_pid": 7}),
    }
    report = final_report(ApplyReport(RunChoice(None, "first"), [], None, records))
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3] and report["rounds"][-1]["final"]
    assert report["bytes_shared"] == 100 and report["bytes_sealed"] == 250
    assert report["downtime_seconds"] == 0.04 and report["target_pid"] == 7
    json.dumps(report)
