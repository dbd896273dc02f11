"""`confplan apply` of an SEV-SNP plan against real VMM processes (docs/key-release.md): each side's helper
gets the transport key only after the owner's broker checked a report made for the owner's nonce and the
helper's own key; a target whose measurement is not the predicted one gets no key, and the source guest
keeps running."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import typer
from agents import Agent
from reports import check_report
from typer.testing import CliRunner
from vmms import ledger_ok

from confplan.agent import handle as vmm_handle
from confplan.cli.apply_cmds import register
from confplan.plan import load_plan
from confplan.stages import StageFailed, apply
from confplan.vmm.firmware import Firmware

pytestmark = pytest.mark.kvm
PLANS = Path(__file__).resolve().parents[1] / "plans"


def _snp_plan(tmp: Path, stages: str = "") -> Path:
    """plans/sev-snp.yaml, shrunk to a 64 MiB guest in a checkpoint folder of the test's own."""
    text = (PLANS / "sev-snp.yaml").read_text()
    text = text.replace("memory: 256MiB", "memory: 64MiB")
    text = text.replace("dirty_rate: 64MiB/s", "dirty_rate: 16MiB/s")
    text = text.replace("checkpoint: {dir: .confplan/sev-snp}", "checkpoint: {dir: state}")
    path = tmp / "plan.yaml"
    path.write_text(text + (f"stages: [{stages}]\n" if stages else ""))
    return path


def _log(tmp: Path, role: str) -> str:
    return (tmp / "state" / f"vmm-{role}.log").read_text()


def test_an_snp_plan_migrates_with_the_key_released_against_reports(plan_dir: Path) -> None:
    app = typer.Typer()
    register(app)
    plan = _snp_plan(plan_dir)
    result = CliRunner().invoke(app, ["apply", str(plan), "--output", "json"])
    assert result.exit_code == 0, result.output
    report = check_report(result.stdout)
    assert report["outcome"] == "succeeded"
    stages = {stage["name"]: stage for stage in report["stages"]}
    # Both sides: the SNP launch, a report for the owner's nonce, and only then the key opened.
    for role, stage in (("source", "launch-source"), ("target", "attest-target")):
        log = _log(plan_dir, role)
        launched, reported = log.index("SNP launch measured"), log.index("SNP report for the owner's nonce")
        assert launched < reported < log.index("the owner's key opened")
        result = stages[stage]["result"]
        assert len(result["launch_digest"]) == 96  # SHA-384: the SNP launch digest
        checked = result["attestation"]
        assert checked["verified"] and checked["emulated_platform"] is True
        nonce = "report_data = nonce || the helper's key"
        assert {"measurement", "policy", "vmpl = 0", nonce} <= set(checked["checked"])
        assert checked["report"]["measurement"] == result["launch_digest"]
    digests = {stages[name]["result"]["launch_digest"] for name in ("launch-source", "attest-target")}
    assert len(digests) == 2  # the target boots MH-only: another measured boot
    assert report["migration"]["bytes_sealed"] > 20 << 20  # private pages went sealed under that key
    assert ledger_ok(plan_dir / "state", "target")


def test_an_snp_plan_migrates_to_a_remote_agent(plan_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The target is a `confplan agent` over mutual TLS: its own (emulated) secure processor launches the
    target and signs its helper's report; the broker here checks it and wraps the key to that helper."""
    agent = Agent.start(plan_dir)
    monkeypatch.setenv("CONFPLAN_HOME", str(agent.orchestrator_home))
    try:
        plan = _snp_plan(plan_dir)
        target = f'target: {{host: "tcp://127.0.0.1:{agent.port}", fingerprint: "{agent.fingerprint}"}}\n'
        plan.write_text(plan.read_text().replace("target: {host: local}\n", target))
        report = apply(load_plan(plan))
        assert report.run is not None and report.run.outcome.value == "succeeded"
        handle = vmm_handle.connect_remote("127.0.0.1", agent.port, "target", pin=agent.fingerprint)
        assert handle.call("workload_check")["ok"]
        vmm_handle.stop(handle)
    finally:
        agent.stop()


def test_an_snp_target_with_other_firmware_gets_no_key(plan_dir: Path) -> None:
    other = plan_dir / "other-fw"
    fw = Firmware.load()
    other.mkdir()
    (other / "confplan-fw.bin").write_bytes(fw.image + b"\x90" * 16)  # another image: another digest
    shutil.copy(fw.path.with_suffix(".sym"), other / "confplan-fw.sym")
    stages = (
        f"launch-source, {{provision-target: {{firmware: {other}}}}}, attest-target, start-incoming, "
        "precopy, stop-and-copy, verify, resume-target, cleanup-source"
    )
    plan = load_plan(_snp_plan(plan_dir, stages))
    with pytest.raises(StageFailed, match=r"SNP report does not pass.*measurement") as failed:
        apply(plan)
    assert failed.value.stage == "attest-target"
    log = _log(plan_dir, "target")
    assert "SNP report for the owner's nonce" in log and "the owner's key opened" not in log
    assert ledger_ok(plan_dir / "state", "source", running=True)
