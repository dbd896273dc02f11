"""Checks every test applies to a report or an event the CLI printed: the shipped JSON Schema
(confplan/report_schema.json, draft 2020-12) with the jsonschema package, and the event names of
docs/report.md."""

from __future__ import annotations

import json
from typing import Any

import jsonschema

from confplan.report import report_schema

SCHEMA = report_schema()
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.FormatChecker())
EVENT_VALIDATOR = VALIDATOR.evolve(schema=SCHEMA["$defs"]["event"])  # "$ref": "#" stays the report
EVENTS = set(SCHEMA["$defs"]["event"]["properties"]["event"]["enum"])


def check_report(doc: Any) -> dict[str, Any]:
    """``doc`` (a dict, or the JSON text) as a valid v1 report; raises ValidationError otherwise."""
    if isinstance(doc, str):
        doc = json.loads(doc)
    VALIDATOR.validate(doc)
    assert isinstance(doc, dict)
    return doc


def check_events(text: str) -> list[dict[str, Any]]:
    """Every line of an ``-o ndjson`` stream as a valid v1 event, the last one the report."""
    events = [json.loads(line) for line in text.splitlines() if line.strip()]
    for event in events:
        EVENT_VALIDATOR.validate(event)
        assert event["event"] in EVENTS
    assert events and events[-1]["event"] == "report", "the report is the last event"
    assert [e["event"] for e in events].count("report") == 1
    return events
