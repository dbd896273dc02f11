"""The migration plan: pydantic models, a loader that keeps line:column for every node, rules, JSON Schema.

Entry points: ``load_plan(path)`` / ``load_plan_text(text, filename)`` return a frozen ``Plan`` or raise
``PlanError`` whose ``diagnostics`` list every problem, compiler-style.
"""

from confplan.plan.diagnostics import Diagnostic, PlanError
from confplan.plan.loader import load_plan, load_plan_text
from confplan.plan.migration_plan import API_VERSION, KIND, Checkpoint, Plan
from confplan.plan.models import (
    STAGE_NAMES,
    STAGE_NEEDS,
    Endpoint,
    Guest,
    Helper,
    Limits,
    Metadata,
    PolicyFlags,
    Sev,
    StageName,
    StageSpec,
    Workload,
)
from confplan.plan.schema import plan_schema, schema_text

__all__ = [
    "API_VERSION",
    "KIND",
    "STAGE_NAMES",
    "STAGE_NEEDS",
    "Checkpoint",
    "Diagnostic",
    "Endpoint",
    "Guest",
    "Helper",
    "Limits",
    "Metadata",
    "Plan",
    "PlanError",
    "PolicyFlags",
    "Sev",
    "StageName",
    "StageSpec",
    "Workload",
    "load_plan",
    "load_plan_text",
    "plan_schema",
    "schema_text",
]
