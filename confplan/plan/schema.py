"""The plan's JSON Schema: generated from the models, shipped as ``schema.json`` beside this module.

Editors use it through yaml-language-server (``# yaml-language-server: $schema=...`` at the top of a plan);
a test fails when the shipped file is stale; regenerate it with
``confplan schema > confplan/plan/schema.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from confplan.plan.migration_plan import API_VERSION, Plan

SCHEMA_PATH = Path(__file__).with_name("schema.json")


def plan_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a plan file as it is written (aliases, unit strings)."""
    schema = Plan.model_json_schema(by_alias=True, mode="validation")
    schema["title"] = f"confplan plan ({API_VERSION})"
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def schema_text() -> str:
    """The schema as ``confplan schema`` prints it and as ``schema.json`` holds it."""
    return json.dumps(plan_schema(), indent=2, ensure_ascii=False) + "\n"
