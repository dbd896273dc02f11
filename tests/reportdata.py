"""The hand-written ``confplan.report/v1`` fixtures (tests/data/handwritten-report-v1-*.json): reports of
the shape docs/report.md specifies, for the readers of a report (JUnit, HTML) to be tested on every
outcome without running a migration. They are not output of confplan; the end-to-end tests check the
real reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "data"
OUTCOMES = ("success", "failed-precopy", "interrupted", "preflight-refused", "dry-run")


def fixture_path(outcome: str) -> Path:
    return DATA / f"handwritten-report-v1-{outcome}.json"


def load(outcome: str) -> dict[str, Any]:
    """A fresh copy of one fixture (tests may change it)."""
    doc: dict[str, Any] = json.loads(fixture_path(outcome).read_text())
    return doc
