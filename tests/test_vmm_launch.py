"""``confplan launch PLAN`` boots the plan's guest, reports it live, and shuts it down."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from confplan.cli import app

PLAN = """\
apiVersion: confplan/v1
kind: MigrationPlan
metadata: {name: launch-test}
guest:
  memory: 32MiB
  vcpus: 1
  workload: {kind: dirty-writer, dirty_rate: 8MiB/s, shared_fraction: 0.1}
helper: {mode: aux-vcpu, aux_vcpus: 1, batch_pages: 16}
"""


@pytest.mark.kvm
def test_launch_shows_the_guest_and_shuts_it_down(tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN)
    result = CliRunner().invoke(app, ["launch", str(plan), "--duration", "0.6", "--interval", "0.2"])
    assert result.exit_code == 0, result.output
    assert "sha256" in result.output and "1 vCPUs + 1 aux" in result.output
    assert "mh: helper vCPU 0 ready" in result.output
    assert "aux ready 1/1" in result.output and "guest shut down" in result.output
