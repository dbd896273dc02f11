"""Property tests: whatever the file holds, validate answers 0 or 2 with a message, never a traceback."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from confplan.cli import app
from confplan.plan import plan_schema

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "plans").glob("*.yaml"))
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
runner = CliRunner()

# Every key the schema knows, plus a typo and YAML's merge key.
_SCHEMA = plan_schema()
KEYS = [
    *sorted({key for model in [_SCHEMA, *_SCHEMA["$defs"].values()] for key in model.get("properties", {})}),
    "memroy",
    "<<",
]
WORDS = [
    *[
        "256MiB",
        "3MiB",
        "50ms",
        "64MiB/s",
        "unlimited",
        "local",
        "tcp://a:1",
        "aux-vcpu",
        "mirror-vm",
        "sev-snp",
        "sev-es",
        "precopy",
    ],
    *["cleanup-source", "confplan/v1", "MigrationPlan", "~", "0x30000", "1e400"],
    "",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(WORDS),
    st.text(max_size=12),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=6)), children, max_size=5),
    ),
    max_leaves=20,
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("plans")


def _validate_text(workdir: Path, text: str) -> None:
    path = workdir / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code in (0, 2), f"exit {result.exit_code}: {result.exception!r}\n{text}"
    assert "Traceback" not in result.output
    if result.exit_code == 0:
        assert f"{path}: valid plan" in result.stdout
        return
    lines = result.stderr.splitlines()
    assert lines[-1].startswith("hint: ") and lines[-2].startswith(f"error: {path}: not a valid plan")
    diagnostic = re.compile(rf"^{re.escape(str(path))}:[0-9]+:[0-9]+: \S")
    assert lines[:-2] and all(diagnostic.match(line) for line in lines[:-2]), result.stderr


@SETTINGS
@given(document=values)
def test_random_documents(workdir: Path, document: Any) -> None:
    _validate_text(workdir, yaml.safe_dump(document, allow_unicode=True))


@SETTINGS
@given(text=st.text(max_size=200))
def test_random_text(workdir: Path, text: str) -> None:
    _validate_text(workdir, text.replace("\x00", ""))


def _mutate(data: Any, choices: list[int], replacement: Any) -> Any:
    """Walk into ``data`` along ``choices`` and replace, drop or add at the spot reached."""
    if not choices or not isinstance(data, dict | list) or not data:
        return replacement
    choice, rest = choices[0], choices[1:]
    if isinstance(data, list):
        index = choice % len(data)
        return [*data[:index], _mutate(data[index], rest, replacement), *data[index + 1 :]]
    keys = list(data)
    key = keys[choice % len(keys)]
    if not rest and choice % 3 == 0:
        return {k: v for k, v in data.items() if k != key}  # drop a key
    if not rest and choice % 3 == 1:
        return {**data, KEYS[choice % len(KEYS)]: replacement}  # add (or overwrite) one
    return {**data, key: _mutate(data[key], rest, replacement)}


@SETTINGS
@given(
    example=st.sampled_from(EXAMPLES),
    choices=st.lists(st.integers(min_value=0, max_value=100), min_size=1, max_size=4),
    replacement=values,
)
def test_mutated_example_plans(workdir: Path, example: Path, choices: list[int], replacement: Any) -> None:
    data = yaml.safe_load(example.read_text())
    _validate_text(workdir, yaml.safe_dump(_mutate(data, choices, replacement), allow_unicode=True))


@SETTINGS
@given(
    example=st.sampled_from(EXAMPLES),
    position=st.floats(min_value=0, max_value=1),
    cut=st.integers(min_value=0, max_value=8),
    insert=st.sampled_from(
        ["", ":", " ", "\n", "- ", "{", "]", "&a ", "*a", "!!int ", "'", "\t", "  x: 1\n"]
    ),
)
def test_text_edits_of_example_plans(
    workdir: Path, example: Path, position: float, cut: int, insert: str
) -> None:
    text = example.read_text()
    at = int(position * len(text))
    _validate_text(workdir, text[:at] + insert + text[at + cut :])


def test_a_stage_name_with_a_line_break_stays_one_diagnostic_line(workdir: Path) -> None:
    """Found by test_mutated_example_plans: U+0085 in a stage name split the message's example in two."""
    _validate_text(workdir, 'stages:\n- {" \\x85": false}\n')
