"""A new run never silently stops a guest that runs (issue 11): `apply --restart` (or an edited plan) after
a successful migration names the target VMM that runs the migrated guest and refuses without consent (no
terminal, no --yes: exit 5); with --yes it says what it stops and starts over. Real VMM processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from reports import check_report

from confplan.agent import handle as vmm_handle
from confplan.cli import main

pytestmark = pytest.mark.kvm


@pytest.fixture
def plan(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "plan.yaml"
    path.write_text(
        "guest:\n  memory: 32MiB\n"
        "  workload: {kind: dirty-writer, dirty_rate: 8MiB/s, shared_fraction: 0.1}\n"
        "helper: {mode: aux-vcpu, aux_vcpus: 1, batch_pages: 64}\n"
        "limits: {max_downtime: 200ms}\ncheckpoint: {dir: state}\n"
    )
    yield path
    for role in ("source", "target"):
        found = vmm_handle.find_local(tmp_path / "state", role)
        if found is not None:
            vmm_handle.stop(found)


def test_restart_names_the_running_guest_and_needs_consent(
    plan: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["apply", str(plan), "--output", "json"]) == 0
    target_pid = check_report(capsys.readouterr().out)["migration"]["target_pid"]

    assert main(["apply", str(plan), "--restart"]) == 5  # stdin is no terminal here, and no --yes
    refused = capsys.readouterr().err
    assert f"the target VMM (pid {target_pid}) runs the migrated guest" in refused
    assert "--yes" in refused
    target = vmm_handle.find_local(plan.parent / "state", "target")
    assert target is not None and target.pid == target_pid  # untouched
    target.close()

    assert main(["apply", str(plan), "--restart", "--yes", "--output", "json"]) == 0
    again = capsys.readouterr()
    assert f"would stop the target VMM (pid {target_pid})" in again.err
    assert check_report(again.out)["migration"]["target_pid"] != target_pid


def test_another_plan_in_the_same_folder_never_touches_this_ones_guest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = (
        "guest:\n  memory: 32MiB\n  workload: {kind: idle}\n"
        "helper: {mode: aux-vcpu, aux_vcpus: 1, batch_pages: 64}\ncheckpoint: {dir: shared}\n"
    )
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text(body)
    second.write_text(body)  # another plan (name b), told to share the folder
    try:
        assert main(["apply", str(first), "--output", "json"]) == 0
        target_pid = check_report(capsys.readouterr().out)["migration"]["target_pid"]
        assert main(["apply", str(second)]) == 5
        assert "of plan 'a', not of 'b'" in capsys.readouterr().err
        assert main(["stop", str(second)]) == 5  # not even `stop` reaches another plan's guest
        assert "of plan 'a', not of 'b'" in capsys.readouterr().err
        target = vmm_handle.find_local(tmp_path / "shared", "target")
        assert target is not None and target.pid == target_pid and target.call("info")["resumed"]
        target.close()
    finally:
        for role in ("source", "target"):
            found = vmm_handle.find_local(tmp_path / "shared", role)
            if found is not None:
                vmm_handle.stop(found)
