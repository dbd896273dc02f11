"""`confplan apply` output without running VMs: the dry run, the rich live view (a bar per round), and the
report's migration summary."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import typer
from reports import check_report
from rich.console import Console
from typer.testing import CliRunner

from confplan.cli.apply_cmds import register
from confplan.cli.output import RichObserver
from confplan.report import build_report
from confplan.stages.base import Progress
from confplan.stages.checkpoint import StageRecord, StageStatus
from confplan.stages.executor import Step, StepAction


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


def _rich_precopy() -> tuple[RichObserver, io.StringIO]:
    """The terminal view on a string, with precopy started."""
    out = io.StringIO()
    view = RichObserver(Console(file=out, force_terminal=True, width=150))
    step = Step("precopy", StepAction.RUN, "not run yet")
    view.steps_planned([step], False)
    view.stage_started(step)
    return view, out


def test_rich_view_shows_round_dirty_pages_throughput_eta() -> None:
    view, out = _rich_precopy()
    view.stage_progress(
        "precopy", Progress(100, None, "pages", "round 2: 1234 dirty pages left, 300 MiB/s, ETA 0.02s")
    )
    view.bar.refresh()
    view.bar.stop()
    text = out.getvalue()
    assert "precopy" in text and "round 2: 1234 dirty pages left, 300 MiB/s, ETA 0.02s" in text


def test_rich_view_fills_a_bar_within_a_round() -> None:
    """Like `virsh migrate --verbose`: the percent of the round's pages sent, as the round goes."""
    view, out = _rich_precopy()
    view.stage_progress("precopy", Progress(2500, 10000, "pages", "round 1: 32 MiB/s, 7500 pages to go"))
    view.bar.refresh()
    assert "25%" in out.getvalue() and "7500 pages to go" in out.getvalue()
    ended = Progress(10000, None, "pages", "round 1: 40 dirty pages left", milestone=True)
    view.stage_progress("precopy", ended)
    view.bar.refresh()
    view.bar.stop()
    assert "100%" in out.getvalue()  # the round ended: its bar is full


def _record(stage: str, result: dict[str, object], shared: int = 0, sealed: int = 0) -> StageRecord:
    return StageRecord(run_id=1, position=0, stage=stage, status=StageStatus.DONE, inputs="", attempt=1,
                       started=0.0, finished=1.0, duration=0.5, bytes_shared=shared, bytes_sealed=sealed,
                       result=result, error=None)  # fmt: skip


def test_report_gathers_rounds_bytes_pause_and_downtime(tmp_path: Path) -> None:
    from confplan.plan import load_plan_text

    rounds = [_round(1, 10), _round(2, 3)]
    steps = {"pause_vcpus": 0.001, "final_pages": 0.01}
    records = {
        "precopy": _record("precopy", {"rounds": rounds, "decision": "converged"}, shared=100, sealed=200),
        "stop-and-copy": _record(
            "stop-and-copy", {"final_round": _round(3, 1), "source_paused_seconds": 0.01, "steps": steps},
            sealed=50,
        ),
        "resume-target": _record("resume-target", {"downtime_seconds": 0.04, "target_pid": 7}),
    }
    plan = load_plan_text("guest: {memory: 32MiB}\n", str(tmp_path / "p.yaml"))
    doc = check_report(build_report(kind="apply", plan=plan, plan_file="p.yaml", records=records))
    moved = doc["migration"]
    assert [r["round"] for r in moved["rounds"]] == [1, 2, 3]
    assert [r["final"] for r in moved["rounds"]] == [False, False, True]
    assert moved["bytes_shared"] == 100 and moved["bytes_sealed"] == 250
    assert moved["downtime_seconds"] == 0.04 and moved["target_pid"] == 7
    assert moved["pause"] == steps and moved["decision"] == "converged"
    assert [stage["name"] for stage in doc["stages"]] == ["precopy", "stop-and-copy", "resume-target"]
    assert doc["stages"][0]["started"] == "1970-01-01T00:00:00.000Z"
    json.dumps(doc)


def _round(number: int, sealed: int) -> dict[str, object]:
    return {"round": number, "shared_pages": 1, "zero_pages": 0, "sealed_pages": sealed, "bytes_sent": 4160,
            "seconds": 0.1, "dirty_after": 2, "bytes_shared": 0, "bytes_sealed": 4160}  # fmt: skip
