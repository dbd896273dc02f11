"""Stages: the executor that runs a plan's stages in order, the SQLite checkpoint store, the stage base.

Stage modules (one per stage) subclass ``Stage`` and decorate it with ``register_stage``; ``apply`` runs
them, resuming a failed run where that is safe; ``plan_steps`` is the pure decision of what runs.
"""

from confplan.stages.base import (
    REGISTRY,
    Progress,
    ResumePolicy,
    Stage,
    StageContext,
    StageResult,
    Teardown,
    TeardownWhen,
    register_stage,
    stage_inputs,
    stage_policies,
)
from confplan.stages.checkpoint import (
    SCHEMA_VERSION,
    CheckpointStore,
    RunOutcome,
    RunRecord,
    StageRecord,
    StageStatus,
)
from confplan.stages.executor import (
    ApplyReport,
    Observer,
    RunChoice,
    StageFailed,
    Step,
    StepAction,
    apply,
    choose_run,
    plan_steps,
)

__all__ = [
    "REGISTRY",
    "SCHEMA_VERSION",
    "ApplyReport",
    "CheckpointStore",
    "Observer",
    "Progress",
    "ResumePolicy",
    "RunChoice",
    "RunOutcome",
    "RunRecord",
    "Stage",
    "StageContext",
    "StageFailed",
    "StageRecord",
    "StageResult",
    "StageStatus",
    "Step",
    "StepAction",
    "Teardown",
    "TeardownWhen",
    "apply",
    "choose_run",
    "plan_steps",
    "register_stage",
    "stage_inputs",
    "stage_policies",
]
