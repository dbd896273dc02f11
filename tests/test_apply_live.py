"""`confplan apply` as a CI job or an operator sees it live, through a real `confplan apply` process with its
output piped: `-o ndjson` streams one event per line as it happens (precopy progress within a round, the
report last), and Ctrl-C (SIGINT) says at once that it stops, stops, exits 130 and leaves the source guest
running. The plans cap the stream's bandwidth so that precopy's first round lasts a few seconds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

import pytest
from reports import EVENT_VALIDATOR, check_events, check_report

from confplan.agent import handle as vmm_handle
from confplan.cli.output import STOPPING

pytestmark = pytest.mark.kvm
DEADLINE = 300  # seconds a test's apply may take at worst on a loaded machine (never a timing assert)


def write_plan(tmp: Path, memory: str, bandwidth: str) -> Path:
    path = tmp / "plan.yaml"
    path.write_text(
        "metadata: {name: live}\n"
        f"guest:\n  memory: {memory}\n  vcpus: 1\n"
        "  workload: {kind: dirty-writer, dirty_rate: 2MiB/s, shared_fraction: 0.05}\n"
        "helper: {mode: aux-vcpu, aux_vcpus: 1, batch_pages: 64}\n"
        f"limits: {{max_downtime: 300ms, bandwidth: {bandwidth}}}\n"
        "checkpoint: {dir: state}\n"
    )
    return path


def start_apply(plan: Path, *args: str) -> subprocess.Popen[str]:
    """`confplan apply PLAN -o ndjson`, stdout and stderr piped (as in CI)."""
    return subprocess.Popen(
        [sys.executable, "-m", "confplan", "apply", str(plan), "-o", "ndjson", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=plan.parent,
        env={**os.environ, "PYTHONUNBUFFERED": ""},
    )  # fmt: skip


def read_until(stream: IO[str], seen: list[dict[str, Any]], wanted: Any) -> dict[str, Any]:
    """Read events off ``stream`` into ``seen`` until one for which ``wanted(event)`` holds."""
    for line in stream:
        event = json.loads(line)
        EVENT_VALIDATOR.validate(event)
        seen.append(event)
        if wanted(event):
            return event
    raise AssertionError(f"the stream ended before the event wanted; last events: {seen[-3:]}")


def in_round(event: dict[str, Any]) -> bool:
    """A precopy progress event from within a round (the round's pages sent of its pages)."""
    return event["event"] == "stage-progress" and event["stage"] == "precopy" and event["total"] is not None


def test_ndjson_streams_events_as_they_happen_and_ends_with_the_report(plan_dir: Path) -> None:
    plan = write_plan(plan_dir, "32MiB", "12MiB/s")  # round 1: ~2.7 s at the cap
    proc = start_apply(plan)
    assert proc.stdout is not None
    seen: list[dict[str, Any]] = []
    read_until(proc.stdout, seen, lambda e: e["event"] == "stage-started" and e["stage"] == "precopy")
    assert proc.poll() is None  # the lines arrive while the apply runs, not at its end
    rest, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 0, err
    events = seen + check_events(rest)
    names = [event["event"] for event in events]
    checks = names.count("preflight-check")  # the hosts are checked first
    assert checks and names[:checks] == ["preflight-check"] * checks
    assert names[checks : checks + 2] == ["run-chosen", "steps"] and names[-2:] == ["run-finished", "report"]
    started = [e["stage"] for e in events if e["event"] == "stage-started"]
    finished = [e["stage"] for e in events if e["event"] == "stage-finished"]
    assert started == finished and started[0] == "launch-source" and started[-1] == "cleanup-source"
    # within round 1, more than once: bytes sent, rate, pages to go and ETA
    round_one = [e for e in events if in_round(e) and e["round"] == 1]
    assert len(round_one) >= 2, [e for e in events if e["event"] == "stage-progress"]
    for event in round_one:
        assert 0 <= event["done"] <= event["total"]
        assert event["dirty_pages_left"] == event["total"] - event["done"]
        assert event["bytes_sent"] > 0 and event["rate_bytes_per_second"] > 0 and event["eta_seconds"] >= 0
    assert [e["bytes_sent"] for e in round_one] == sorted(e["bytes_sent"] for e in round_one)
    # and between rounds, what the round left dirty
    progress = [e for e in events if e["event"] == "stage-progress" and e["stage"] == "precopy"]
    ends = [e for e in progress if not in_round(e)]
    assert ends and all(e["dirty_pages_left"] is not None for e in ends)
    pause = next(e for e in events if e["event"] == "stage-finished" and e["stage"] == "stop-and-copy")
    assert "pause_vcpus" in pause["record"]["result"]["steps"]  # the pause broken down
    report = check_report(events[-1]["report"])
    assert report["outcome"] == "succeeded" and report["exit_code"] == 0
    assert report["migration"]["rounds"][-1]["final"] and report["migration"]["downtime_seconds"] > 0


def test_ctrl_c_says_so_at_once_stops_and_leaves_the_source_running(
    plan_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGINT within precopy's first round: the message at once on stderr, the round cut short on the
    source (the `cancel` RPC), exit 130, the report last; the source guest runs on with its ledger intact,
    and the checkpoint says the run was interrupted, so a rerun resumes."""
    from confplan.cli import main

    plan = write_plan(plan_dir, "64MiB", "4MiB/s")  # round 1 would take ~16 s
    proc = start_apply(plan)
    assert proc.stdout is not None
    seen: list[dict[str, Any]] = []
    read_until(proc.stdout, seen, in_round)
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 130, err
    assert STOPPING in err
    assert err.count("error: ") == 1 and "stage precopy was interrupted" in err
    events = seen + check_events(rest)
    assert any(e["event"] == "stage-failed" and e["stage"] == "precopy" for e in events)
    report = check_report(events[-1]["report"])
    assert report["outcome"] == "interrupted" and report["exit_code"] == 130
    assert report["error"]["class"] == "interrupted" and report["error"]["stage"] == "precopy"
    assert [(p["role"], p["alive"]) for p in report["processes"]] == [("source", True), ("target", False)]
    source = vmm_handle.find_local(plan_dir / "state", "source")
    assert source is not None, "the source guest must keep running"
    try:
        info = source.call("info")
        assert info["running"] and not info["outgoing"] and source.call("workload_check")["ok"]
    finally:
        source.close()
    assert "source: the precopy round is cancelled" in (plan_dir / "state" / "vmm-source.log").read_text()
    assert main(["status", str(plan), "-o", "json"]) == 4
    status = check_report(capsys.readouterr().out)
    assert status["outcome"] == "interrupted"
    assert next(step for step in status["steps"] if step["action"] != "skip")["stage"] == "start-incoming"
