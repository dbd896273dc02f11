"""confplan validate / schema / --version through the real CLI (typer's CliRunner and cli.main)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import confplan.cli.plan_cmds as plan_cmds
from confplan import __version__
from confplan.cli import app, main
from confplan.plan import plan_schema, schema_text
from confplan.plan.schema import SCHEMA_PATH

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "plans").glob("*.yaml"))
INVALID = "tests/plans/invalid/many-errors.yaml"
runner = CliRunner()


@pytest.fixture(autouse=True)
def _in_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


def test_valid_plans_exit_0() -> None:
    result = runner.invoke(app, ["validate", *EXAMPLES])
    assert result.exit_code == 0, result.output
    assert all(f"{path}: valid plan" in result.stdout for path in EXAMPLES)


def test_an_invalid_plan_exits_2_with_compiler_style_lines_and_no_traceback() -> None:
    result = runner.invoke(app, ["validate", EXAMPLES[0], INVALID])
    assert result.exit_code == 2
    expected = Path(INVALID).with_suffix(".expected").read_text()
    assert expected in result.stderr
    assert f"error: {INVALID}: not a valid plan (8 errors)" in result.stderr
    assert "Traceback" not in result.output


def test_a_missing_file_is_a_user_error() -> None:
    result = runner.invoke(app, ["validate", "no/such/plan.yaml"])
    assert result.exit_code == 2
    assert "no/such/plan.yaml:1:1: cannot read the plan: No such file or directory" in result.stderr


def test_json_output_lists_every_file() -> None:
    result = runner.invoke(app, ["validate", "--output", "json", EXAMPLES[0], INVALID])
    assert result.exit_code == 2
    document = json.loads(result.stdout)
    assert document["valid"] is False
    good, bad = document["files"]
    assert good["valid"] and len(good["plan"]["hash"]) == 64 and good["diagnostics"] == []
    assert not bad["valid"] and bad["plan"] is None
    assert bad["diagnostics"][2] == {
        "file": INVALID,
        "line": 5,
        "column": 37,
        "field": "helper.aux_vcpus",
        "message": "must be at least 1 when helper.mode is aux-vcpu",
    }


def test_an_internal_error_exits_1_without_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(path: str) -> None:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(plan_cmds, "load_plan", broken)
    monkeypatch.delenv("CONFPLAN_DEBUG", raising=False)
    assert main(["validate", EXAMPLES[0]]) == 1
    err = capsys.readouterr().err
    assert "internal error: RuntimeError: simulated bug" in err and "Traceback" not in err


def test_main_returns_2_for_an_invalid_plan(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", INVALID]) == 2
    assert "helper.aux_vcpus: must be at least 1" in capsys.readouterr().err


def test_schema_command_prints_the_shipped_schema() -> None:
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    assert json.loads(result.stdout) == plan_schema()


def test_shipped_schema_is_up_to_date() -> None:
    assert SCHEMA_PATH.read_text() == schema_text(), (
        "confplan/plan/schema.json is stale: regenerate it with "
        "'.venv/bin/confplan schema > confplan/plan/schema.json'"
    )


def _properties(node: object, where: str = "") -> list[tuple[str, dict[str, object]]]:
    found: list[tuple[str, dict[str, object]]] = []
    if isinstance(node, dict):
        for name, prop in node.get("properties", {}).items():
            found.append((f"{where}.{name}", prop))
        for key, child in node.items():
            found.extend(_properties(child, f"{where}/{key}"))
    elif isinstance(node, list):
        for child in node:
            found.extend(_properties(child, where))
    return found


def test_every_schema_field_has_a_description() -> None:
    properties = _properties(plan_schema())
    assert len(properties) > 40
    assert [where for where, prop in properties if not prop.get("description")] == []


def test_schema_describes_the_yaml_as_written() -> None:
    schema = plan_schema()
    assert "apiVersion" in schema["properties"] and schema["required"] == ["guest"]
    memory = schema["$defs"]["Guest"]["properties"]["memory"]
    assert {"type": "integer", "exclusiveMinimum": 0} in memory["anyOf"]
    assert schema["$defs"]["Limits"]["properties"]["bandwidth"]["default"] == "unlimited"


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"confplan {__version__}"


def test_editors_can_check_plans_with_the_schema() -> None:
    # What yaml-language-server does with the shipped schema: examples pass, wrong types and keys do not.
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema (a test dependency) is not installed")
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))
    for path in EXAMPLES:
        assert list(validator.iter_errors(yaml.safe_load(Path(path).read_text()))) == [], path
    for bad in (
        {"guest": {"memory": "256 parsecs"}},
        {"guest": {"memory": "2MiB", "memroy": 1}},
        {"guest": {"memory": "2MiB"}, "stages": ["pre-copy"]},
        {"guest": {"memory": "2MiB"}, "limits": {"bandwidth": "64MiB"}},
        {"helper": {"mode": "aux-vcpu"}},
    ):
        assert list(validator.iter_errors(bad)), bad
