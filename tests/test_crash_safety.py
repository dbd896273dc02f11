"""The guest is never lost, forked, frozen or rolled back (issue 11), with real VMM processes: the
orchestrator dies at the handover's stage boundaries (an exception that escapes `apply` without any
tear-down, as a kill -9 would leave it), VMMs are killed with SIGKILL, and the stream stalls. In every case
exactly one side runs the same guest with its ledger OK, a rerun reconciles with it, and a guest that is
really gone is reported as lost (exit 6), never replaced."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from relay import StallingRelay

from confplan.agent import handle as vmm_handle
from confplan.errors import ConfplanError
from confplan.plan import Plan, load_plan
from confplan.stages import StageFailed, apply
from confplan.stages.base import Progress
from confplan.stages.executor import Observer, Step
from confplan.stages.modules import __name__ as _stages  # noqa: F401  (registers the stages)
from confplan.stages.modules._handover import GuestLost

pytestmark = pytest.mark.kvm


class Crash(BaseException):
    """The orchestrator's death: escapes apply with no tear-down and no record (like SIGKILL)."""


class CrashAt(Observer):
    def __init__(self, stage: str) -> None:
        self.stage = stage

    def stage_started(self, step: Step) -> None:
        if step.stage == self.stage:
            raise Crash


class KillSourceMidPrecopy(Observer):
    def __init__(self, plan: Plan) -> None:
        self.plan, self.killed = plan, False

    def stage_progress(self, stage: str, progress: Progress) -> None:
        if stage == "precopy" and not self.killed:
            self.killed = True
            os.kill(_pid(self.plan, "source"), signal.SIGKILL)


def write_plan(tmp: Path, stages: str = "", limits: str = "") -> Plan:
    (tmp / "plan.yaml").write_text(
        "guest:\n  memory: 32MiB\n"
        "  workload: {kind: dirty-writer, dirty_rate: 8MiB/s, shared_fraction: 0.1}\n"
        "helper: {mode: aux-vcpu, aux_vcpus: 1, batch_pages: 64}\n"
        f"limits: {{max_downtime: 200ms{limits}}}\ncheckpoint: {{dir: state}}\n" + stages
    )
    return load_plan(tmp / "plan.yaml")


def _pid(plan: Plan, role: str) -> int:
    found = vmm_handle.find_local(Path(plan.checkpoint.dir), role)
    assert found is not None and found.pid is not None
    found.close()
    return found.pid


def handover_of(plan: Plan, role: str) -> dict[str, Any] | None:
    found = vmm_handle.find_local(Path(plan.checkpoint.dir), role)
    if found is None:
        return None
    try:
        doc: dict[str, Any] = found.call("handover_state")
        doc["ledger_ok"] = found.call("workload_check")["ok"] if doc.get("running") else None
        return doc
    finally:
        found.close()


def wait_for(plan: Plan, role: str, state: str, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        doc = handover_of(plan, role)
        if (doc and doc.get("state") == state) or time.monotonic() > deadline:
            assert doc is not None and doc.get("state") == state, doc
            return doc
        time.sleep(0.05)


def exactly_one_runs(plan: Plan) -> str:
    """Which side runs the guest; asserts it is exactly one, with its ledger OK."""
    source, target = handover_of(plan, "source"), handover_of(plan, "target")
    running = [role for role, doc in (("source", source), ("target", target)) if doc and doc.get("running")]
    assert len(running) == 1, (source, target)
    doc = source if running[0] == "source" else target
    assert doc is not None and doc["ledger_ok"]
    return running[0]


def test_orchestrator_dies_in_the_pause_the_vmms_finish_alone(plan_dir: Path) -> None:
    plan = write_plan(plan_dir)
    with pytest.raises(Crash):
        apply(plan, observer=CrashAt("verify"))  # dies right after stop-and-copy STARTed the handover
    resumed = wait_for(plan, "target", "resumed")  # nobody watches, and the target resumes within the bound
    assert wait_for(plan, "source", "handed-over")["running"] is False
    assert exactly_one_runs(plan) == "target"
    target_pid = resumed["pid"]
    report = apply(plan)  # the rerun reconciles: the guest runs on the target, only cleanup is left
    assert report.run is not None and report.run.outcome.value == "succeeded"
    assert "reconciled" in report.records["resume-target"].result
    assert vmm_handle.find_local(Path(plan.checkpoint.dir), "source") is None
    assert _pid(plan, "target") == target_pid  # the same guest: nothing restarted, nothing rolled back
    assert exactly_one_runs(plan) == "target"


def test_orchestrator_dies_before_the_pause_the_rerun_goes_on(plan_dir: Path) -> None:
    plan = write_plan(plan_dir)
    with pytest.raises(Crash):
        apply(plan, observer=CrashAt("stop-and-copy"))
    assert exactly_one_runs(plan) == "source"
    source_pid = _pid(plan, "source")
    report = apply(plan)
    assert report.run is not None and report.run.outcome.value == "succeeded"
    assert report.steps[0].action.value == "skip"  # the same source guest, never relaunched
    assert exactly_one_runs(plan) == "target"
    assert report.records["launch-source"].result["pid"] == source_pid


def test_source_killed_after_the_handover_is_not_replaced(plan_dir: Path) -> None:
    plan = write_plan(plan_dir)
    with pytest.raises(Crash):
        apply(plan, observer=CrashAt("cleanup-source"))
    target_pid = _pid(plan, "target")
    os.kill(_pid(plan, "source"), signal.SIGKILL)
    time.sleep(0.3)
    report = apply(plan)  # reconciles: the target runs the guest; no fresh guest anywhere
    assert report.run is not None and report.run.outcome.value == "succeeded"
    assert _pid(plan, "target") == target_pid
    assert vmm_handle.find_local(Path(plan.checkpoint.dir), "source") is None
    assert exactly_one_runs(plan) == "target"


def test_source_killed_before_the_handover_is_reported_lost(plan_dir: Path) -> None:
    plan = write_plan(plan_dir)
    with pytest.raises(StageFailed):
        apply(plan, observer=KillSourceMidPrecopy(plan))
    with pytest.raises(GuestLost) as lost:
        apply(plan)
    assert lost.value.exit_code == 6 and "lost" in lost.value.message
    assert vmm_handle.find_local(Path(plan.checkpoint.dir), "source") is None  # nothing relaunched


def test_target_killed_after_it_resumed_is_lost_and_the_older_source_never_runs(plan_dir: Path) -> None:
    plan = write_plan(plan_dir)
    with pytest.raises(Crash):
        apply(plan, observer=CrashAt("cleanup-source"))
    os.kill(_pid(plan, "target"), signal.SIGKILL)
    time.sleep(0.3)
    with pytest.raises(GuestLost, match="resumed on the target and died with it"):
        apply(plan)
    source = handover_of(plan, "source")
    assert source is not None and not source["running"]  # its copy is older: never run again


def test_a_stalled_stream_fails_within_the_progress_timeout(plan_dir: Path) -> None:
    port = _free_port()
    stall = StallingRelay(port, after=3 << 20)  # a few frames, then silence (no FIN, no RST)
    stages = ("stages: [launch-source, provision-target, attest-target, "
              f"{{start-incoming: {{listen_port: {port}, connect_to: '127.0.0.1:{stall.port}'}}}}, precopy, "
              "stop-and-copy, verify, resume-target, cleanup-source]\n")  # fmt: skip
    plan = write_plan(plan_dir, stages, limits=", progress_timeout: 2s")
    started = time.monotonic()
    with pytest.raises(StageFailed, match="made no progress"):
        apply(plan)
    assert time.monotonic() - started < 60  # not 600 s of silence
    assert stall.stalled.is_set()
    assert exactly_one_runs(plan) == "source"


def _free_port() -> int:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as probe:
        return int(probe.getsockname()[1])


def test_a_lost_guest_is_an_error_the_cli_names(plan_dir: Path) -> None:
    assert issubclass(GuestLost, ConfplanError) and GuestLost.exit_code == 6


def test_a_restarted_agent_is_provisioned_again_and_the_source_is_kept(
    plan_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agents import Agent

    agent = Agent.start(plan_dir)
    monkeypatch.setenv("CONFPLAN_HOME", str(agent.orchestrator_home))
    target = f'target: {{host: "tcp://127.0.0.1:{agent.port}", fingerprint: "{agent.fingerprint}"}}\n'
    plan = write_plan(plan_dir, target)
    try:
        with pytest.raises(Crash):
            apply(plan, observer=CrashAt("stop-and-copy"))  # the orchestrator dies in precopy...
        source_pid = _pid(plan, "source")
        agent.stop()  # ...and the target host's agent restarts, its machine gone
        agent = Agent.start(plan_dir, port=agent.port, enrol=False)
        report = apply(plan)  # a plain rerun: the target is provisioned again, the source kept
        assert report.run is not None and report.run.outcome.value == "succeeded"
        actions = {step.stage: step.action.value for step in report.steps}
        assert actions["launch-source"] == "skip" and actions["provision-target"] == "redo"
        assert report.records["launch-source"].result["pid"] == source_pid
    finally:
        agent.stop()
