"""``confplan identity show`` and ``confplan trust add/list/remove`` through typer's CliRunner, real files."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from confplan.cli import app, main
from confplan.errors import ConfplanError
from confplan.transport import Identity, Role, TrustStore


def run(*argv: str | Path, stdin: str | None = None) -> Result:
    return CliRunner().invoke(app, [str(a) for a in argv], input=stdin)


def test_identity_show_makes_the_identity_once_and_prints_its_fingerprint(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = run("identity", "show", "--role", "agent", "--home", home)
    assert first.exit_code == 0, first.output
    identity = Identity.load_or_create(home, Role.AGENT)
    assert first.stdout.startswith(f"agent identity {identity.fingerprint}\n")
    assert str(identity.cert_path) in first.stdout
    assert f"fingerprint: {identity.fingerprint}" in first.stdout  # how to pin it in a plan
    assert stat.S_IMODE(identity.key_path.stat().st_mode) == 0o600
    again = run("identity", "show", "--role", "agent", "--home", home)
    assert again.stdout == first.stdout


def test_identity_show_defaults_to_the_orchestrator_and_confplan_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONFPLAN_HOME", str(tmp_path / "env-home"))
    result = run("identity", "show")
    assert result.exit_code == 0, result.output
    identity = Identity.load_or_create(tmp_path / "env-home", Role.ORCHESTRATOR)
    assert result.stdout.startswith(f"orchestrator identity {identity.fingerprint}\n")
    assert "ssh AGENT-HOST confplan trust add --orchestrator -" in result.stdout


def test_identity_show_pem_prints_only_the_certificate(tmp_path: Path) -> None:
    result = run("identity", "show", "--role", "orchestrator", "--pem", "--home", tmp_path)
    assert result.exit_code == 0, result.output
    assert result.stdout == Identity.load_or_create(tmp_path, Role.ORCHESTRATOR).pem


def test_trust_add_from_a_file_and_from_stdin_then_list_and_remove(tmp_path: Path) -> None:
    home = tmp_path / "agent-host"
    orch = Identity.load_or_create(tmp_path / "orch-host", Role.ORCHESTRATOR)
    agent = Identity.load_or_create(tmp_path / "other-agent", Role.AGENT)

    added = run("trust", "add", "--orchestrator", orch.cert_path, "--home", home)
    assert added.exit_code == 0, added.output
    assert added.stdout == f"trusted orchestrator {orch.fingerprint} ({orch.subject})\n"
    again = run("trust", "add", "--orchestrator", orch.cert_path, "--home", home)
    assert again.stdout.startswith(f"already trusted: orchestrator {orch.fingerprint}")
    piped = run("trust", "add", "--agent", "-", "--home", home, stdin=agent.pem)
    assert piped.exit_code == 0, piped.output

    table = run("trust", "list", "--home", home)
    assert table.exit_code == 0
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["FINGERPRINT", "ROLE", "SUBJECT", "ADDED"]
    assert {row.split()[0]: row.split()[1] for row in rows} == {
        orch.fingerprint: "orchestrator",
        agent.fingerprint: "agent",
    }
    listed = json.loads(run("trust", "list", "--output", "json", "--home", home).stdout)
    assert {(e["fingerprint"], e["role"], e["subject"]) for e in listed} == {
        (orch.fingerprint, "orchestrator", orch.subject),
        (agent.fingerprint, "agent", agent.subject),
    }

    removed = run("trust", "remove", orch.fingerprint[:20], "--home", home)
    assert removed.exit_code == 0, removed.output
    assert removed.stdout == f"removed orchestrator {orch.fingerprint} ({orch.subject})\n"
    assert TrustStore.at_home(home).fingerprints(Role.ORCHESTRATOR) == set()
    assert TrustStore.at_home(home).fingerprints(Role.AGENT) == {agent.fingerprint}


def test_trust_list_when_empty_says_how_to_add(tmp_path: Path) -> None:
    result = run("trust", "list", "--home", tmp_path)
    assert result.exit_code == 0
    assert "no trusted peers" in result.stdout and "confplan trust add" in result.stdout
    assert json.loads(run("trust", "list", "-o", "json", "--home", tmp_path).stdout) == []


@pytest.mark.parametrize("flags", [[], ["--agent", "--orchestrator"]], ids=["neither", "both"])
def test_trust_add_needs_exactly_one_role(tmp_path: Path, flags: list[str]) -> None:
    orch = Identity.load_or_create(tmp_path / "o", Role.ORCHESTRATOR)
    result = run("trust", "add", *flags, orch.cert_path, "--home", tmp_path / "h")
    assert isinstance(result.exception, ConfplanError)
    assert "--agent or --orchestrator" in result.exception.message


def test_cli_errors_are_one_clean_message_with_a_hint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    agent = Identity.load_or_create(tmp_path / "a", Role.AGENT)
    code = main(["trust", "add", "--orchestrator", str(agent.cert_path), "--home", str(tmp_path / "h")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and "confplan agent identity" in err
    assert "\nhint: use `confplan trust add --agent ...`" in err
    assert "Traceback" not in err

    code = main(["trust", "remove", "sha256:00", "--home", str(tmp_path / "h")])
    err = capsys.readouterr().err
    assert code == 2 and "no trusted certificate" in err and "confplan trust list" in err

    code = main(["trust", "add", "--agent", str(tmp_path / "missing.pem"), "--home", str(tmp_path / "h")])
    assert code == 2 and "cannot read certificate" in capsys.readouterr().err
