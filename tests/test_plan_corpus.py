"""The invalid-plan corpus: tests/plans/invalid/NAME.yaml must produce exactly the lines in NAME.expected.

Each file breaks one rule (or shows one kind of error); many-errors.yaml breaks several at once. To add a
case, write NAME.yaml and NAME.expected by hand with the message you want, then make the loader say it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from confplan.plan import PlanError, load_plan

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "plans" / "invalid"
CASES = sorted(CORPUS.glob("*.yaml"))


def test_every_case_has_its_expected_output() -> None:
    assert len(CASES) >= 30
    assert sorted(path.stem for path in CORPUS.glob("*.expected")) == sorted(path.stem for path in CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda path: path.stem)
def test_invalid_plan_produces_the_expected_lines(case: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the path in each message is the one passed, relative to the checkout
    relative = case.relative_to(ROOT).as_posix()
    with pytest.raises(PlanError) as caught:
        load_plan(relative)
    got = [diagnostic.render() for diagnostic in caught.value.diagnostics]
    assert got == case.with_suffix(".expected").read_text().splitlines()


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("aux-vcpus-zero", "when helper.mode is aux-vcpu"),
        ("mirror-vm-no-vcpus", "the mirror VM needs a vCPU"),
        ("nosend-flag", "the guest owner forbade sending"),
        ("nosend-raw", "NOSEND (bit 3)"),
        ("sev-es-without-es", "must set ES (bit 2)"),
        ("sev-es-raw-without-es", "must set ES (bit 2)"),
        ("snp-reserved-bit", "bit 17 must be set"),
        ("undefined-policy-bits", "not defined for generation sev"),
        ("memory-not-2mib", "not a multiple of 2MiB"),
        ("stage-duplicate", "each stage runs once"),
        ("stage-attest-missing", "needs attest-target before it"),
        ("stage-attest-after", "must come after attest-target"),
        ("stage-precopy-after", "must come after precopy"),
        ("stage-verify-missing", "needs verify before it"),
        ("stage-cleanup-not-last", "must be the last stage"),
        ("stage-cleanup-before-resume", "needs resume-target before it"),
        ("same-remote-endpoint", "a remote target must be a different agent"),
        ("yaml-syntax", "invalid YAML"),
        ("unknown-key", "did you mean 'aux_vcpus'?"),
        ("duplicate-key", "duplicate key 'memory'"),
        ("bad-units", "is not a duration"),
        ("wrong-types", "must be an integer"),
    ],
)
def test_the_corpus_covers_every_rule(case: str, fragment: str) -> None:
    # Guards the corpus itself: editing an .expected file cannot silently drop a rule's coverage.
    assert fragment in (CORPUS / f"{case}.expected").read_text()
