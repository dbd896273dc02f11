"""Two hosts with no trust in the network (issue 10), for real: the target is a `confplan agent` in its own
network namespace, joined to this one by a veth pair; the orchestrator and the source VMM run here. The
control channel is mutual TLS with the agent pinned by fingerprint, the page stream is authenticated under
a fresh stream key, and the guest's ledger checks out on the target. Skipped where `ip netns` cannot run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from agents import Agent
from netns import Host
from reports import check_report

from confplan.agent import handle as vmm_handle
from confplan.cli import main
from confplan.transport import UntrustedPeer

WHY_NOT = Host.unavailable()
pytestmark = [pytest.mark.kvm, pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")]


@pytest.fixture
def other_host() -> Iterator[Host]:
    host = Host.create()
    yield host
    host.remove()


def test_migrate_to_an_agent_on_another_host(
    other_host: Host, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    agent = Agent.start(tmp_path, host=other_host.address, prefix=other_host.prefix())
    monkeypatch.setenv("CONFPLAN_HOME", str(agent.orchestrator_home))
    try:
        plan = tmp_path / "plan.yaml"
        where = f"tcp://{other_host.address}:{agent.port}"
        plan.write_text(
            "guest:\n  memory: 64MiB\n"
            "  workload: {kind: dirty-writer, dirty_rate: 16MiB/s, shared_fraction: 0.1}\n"
            "helper: {mode: aux-vcpu, aux_vcpus: 2, batch_pages: 128}\nlimits: {max_downtime: 300ms}\n"
            f'target: {{host: "{where}", fingerprint: "{agent.fingerprint}"}}\n'
        )
        assert main(["apply", str(plan), "--output", "json"]) == 0
        report = check_report(capsys.readouterr().out)["migration"]
        assert report["target_pid"] is not None and report["downtime_seconds"] > 0
        handle = vmm_handle.connect_remote(other_host.address, agent.port, "target", pin=agent.fingerprint)
        try:
            assert handle.call("info")["resumed"] and handle.call("workload_check")["ok"]
        finally:
            handle.close()
        # a stranger from this host's side of the wire is refused in the handshake
        with pytest.raises(UntrustedPeer):
            vmm_handle.connect_remote(other_host.address, agent.port, "target", pin=agent.fingerprint,
                                      home=tmp_path / "stranger")  # fmt: skip
        assert "not an enrolled orchestrator" in agent.wait_log("not an enrolled orchestrator")
        # `confplan status` asks the agent: it holds the guest, which runs
        assert main(["status", str(plan), "-o", "json"]) == 0
        target = {p["role"]: p for p in check_report(capsys.readouterr().out)["processes"]}["target"]
        assert target["host"] == f"{other_host.address}:{agent.port}"
        assert target["alive"] is True and target["guest_running"] is True
        # `confplan stop` reaches the remote target too; the agent serves on, empty
        assert main(["stop", str(plan)]) == 0
        assert "target: the guest in the agent" in capsys.readouterr().out
        assert main(["status", str(plan)]) == 0
        said = capsys.readouterr().out
        assert f"target VMM pid {target['pid']} at {target['host']}: holds no guest" in said
        handle = vmm_handle.connect_remote(other_host.address, agent.port, "target", pin=agent.fingerprint)
        try:
            assert not handle.call("info")["machine"]
        finally:
            handle.close()
    finally:
        agent.stop()
