"""`confplan apply` against real VMM processes, where it must fail safely: a measurement mismatch stops at
attest-target with the key never released; a target killed mid-precopy and a corrupted frame fail with a
clear message, leave the source guest running with its ledger OK, and a rerun resumes. Each test boots two
small guests in two `confplan vmm` processes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import pytest
from relay import CorruptingRelay

from confplan.agent import handle as vmm_handle
from confplan.migration import helper
from confplan.migration.helper import helper_mailboxes
from confplan.plan import Plan, load_plan
from confplan.stages import StageFailed, apply
from confplan.stages.base import Progress
from confplan.stages.executor import Observer, Step, StepAction
from confplan.stages.modules import __name__ as _stages  # noqa: F401  (registers the stages)
from confplan.vmm import Machine, MachineConfig, abi
from confplan.vmm.firmware import Firmware

pytestmark = pytest.mark.kvm
HELPER_WIRED = callable(getattr(helper, "open_mailboxes", None))


def write_plan(tmp: Path, extra_stages: dict[str, str] | None = None, mode: str = "aux-vcpu") -> Plan:
    stages = ["launch-source", "provision-target", "attest-target", "start-incoming", "precopy",
              "stop-and-copy", "verify", "resume-target", "cleanup-source"]  # fmt: skip
    lines = [f"  - {extra_stages[s]}" if extra_stages and s in extra_stages else f"  - {s}" for s in stages]
    (tmp / "plan.yaml").write_text(
        "guest:\n  memory: 32MiB\n"
        "  workload: {kind: dirty-writer, dirty_rate: 16MiB/s, shared_fraction: 0.1}\n"
        f"helper: {{mode: {mode}, aux_vcpus: 2, batch_pages: 64}}\n"
        "limits: {max_downtime: 50ms, max_precopy_rounds: 5}\n"
        "stages:\n" + "\n".join(lines) + "\ncheckpoint: {dir: state}\n"
    )
    return load_plan(tmp / "plan.yaml")


def source_ledger_ok(plan: Plan) -> bool:
    source = vmm_handle.find_local(Path(plan.checkpoint.dir), "source")
    assert source is not None, "the source VMM must still run"
    try:
        info = source.call("info")
        assert info["running"] and not info["outgoing"]
        return bool(source.call("workload_check")["ok"])
    finally:
        source.close()


class KillTargetAt(Observer):
    """Kills the target VMM with SIGKILL as the given stage starts (a crash of the target host)."""

    def __init__(self, plan: Plan, stage: str) -> None:
        self.plan, self.stage = plan, stage
        self.killed: int | None = None

    def stage_started(self, step: Step) -> None:
        if step.stage == self.stage and self.killed is None:
            target = vmm_handle.find_local(Path(self.plan.checkpoint.dir), "target")
            assert target is not None
            self.killed = target.pid
            target.close()
            os.kill(self.killed or 0, signal.SIGKILL)


def test_measurement_mismatch_stops_at_attest_target(plan_dir: Path) -> None:
    other = plan_dir / "other-fw"
    fw = Firmware.load()
    other.mkdir()
    (other / "confplan-fw.bin").write_bytes(fw.image + b"\x90" * 16)  # one more block: another digest
    shutil.copy(fw.path.with_suffix(".sym"), other / "confplan-fw.sym")
    plan = write_plan(plan_dir, {"provision-target": f"provision-target: {{firmware: {other}}}"})
    with pytest.raises(StageFailed, match="matches none of the 1 allowed_digests") as failed:
        apply(plan)
    assert failed.value.stage == "attest-target"
    log = (Path(plan.checkpoint.dir) / "vmm-target.log").read_text()
    assert "launch measured" in log and "secret injected" not in log  # the key was never released
    assert source_ledger_ok(plan)


def test_target_killed_mid_precopy_then_rerun_resumes(plan_dir: Path) -> None:
    plan = write_plan(plan_dir)
    killer = KillTargetAt(plan, "precopy")
    with pytest.raises(StageFailed, match="killed by SIGKILL") as failed:
        apply(plan, observer=killer)
    assert failed.value.stage == "precopy"
    assert "resume at stage start-incoming" in (failed.value.hint or "")
    assert source_ledger_ok(plan)
    first_source = vmm_handle.find_local(Path(plan.checkpoint.dir), "source")
    assert first_source is not None
    source_pid = first_source.pid
    first_source.close()

    class Steps(Observer):
        planned: ClassVar[list[Step]] = []

        def steps_planned(self, steps: Sequence[Step], dry_run: bool) -> None:
            Steps.planned = list(steps)

    if HELPER_WIRED:
        report = apply(plan, observer=Steps())
        assert report.run is not None and report.run.outcome.value == "succeeded"
    else:
        with pytest.raises(StageFailed, match="migration helper") as again:
            apply(plan, observer=Steps())
        assert again.value.stage == "precopy"
    actions = {step.stage: step.action for step in Steps.planned}
    assert actions["launch-source"] is StepAction.SKIP  # the same source guest, not a new one
    assert actions["provision-target"] is StepAction.REDO  # the killed target is replaced
    if not HELPER_WIRED:
        assert source_ledger_ok(plan)
        again_source = vmm_handle.find_local(Path(plan.checkpoint.dir), "source")
        assert again_source is not None and again_source.pid == source_pid
        again_source.close()


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return int(probe.getsockname()[1])


def test_corrupted_frame_is_refused_nothing_resumed(plan_dir: Path) -> None:
    port = _free_port()
    relay = CorruptingRelay(port, offset=100_000)
    param = f"start-incoming: {{listen_port: {port}, connect_to: '127.0.0.1:{relay.port}'}}"
    plan = write_plan(plan_dir, {"start-incoming": param})
    # wire v2: a flipped bit fails the frame's tag (shared and control frames) or its CRC (sealed records)
    refused = r"refused the migration stream: .*(CRC-32C|authentication)"
    with pytest.raises(StageFailed, match=refused) as failed:
        apply(plan)
    assert failed.value.stage == "precopy"
    assert source_ledger_ok(plan)


def test_helper_seam_reports_missing_helper() -> None:
    with Machine(MachineConfig(memory=32 * abi.MIB, helper_mode="none")) as bare:  # no helper vCPUs
        assert helper_mailboxes(bare) is None


class CtrlCInPrecopy(Observer):
    """Raises KeyboardInterrupt at precopy's first progress report: Ctrl-C in the middle of the rounds."""

    def stage_progress(self, stage: str, progress: Progress) -> None:
        if stage == "precopy":
            raise KeyboardInterrupt


def test_ctrl_c_mid_precopy_leaves_the_source_running(plan_dir: Path) -> None:
    plan = write_plan(plan_dir)
    with pytest.raises(StageFailed, match="interrupted") as failed:
        apply(plan, observer=CtrlCInPrecopy())
    assert failed.value.stage == "precopy" and failed.value.exit_code == 130
    assert source_ledger_ok(plan)
