"""The MigrationPlan document (apiVersion confplan/v1): the model that gathers the sections of
``models.py``, the defaults it takes from its file (its name, its checkpoint folder) and its hash.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from confplan.plan.models import (
    NAME_PATTERN,
    STAGE_NAMES,
    Endpoint,
    Guest,
    Helper,
    Limits,
    Metadata,
    Sev,
    Stage,
    StageSpec,
    StrictModel,
)

API_VERSION: Final = "confplan/v1"
KIND: Final = "MigrationPlan"


def default_state_dir(stem: object, metadata: object) -> str:
    """``.confplan/<file stem>[.<name>]``: one folder per plan, so two plans beside each other never share
    a checkpoint, a VMM socket or a guest (falls back to the name, then to ``state``, without a file)."""
    name = metadata.get("name") if isinstance(metadata, dict) else None
    parts = [str(part) for part in (stem, name) if isinstance(part, str) and part]
    if len(parts) == 2 and parts[0] == parts[1]:
        parts.pop()
    safe = ".".join(re.sub(r"[^A-Za-z0-9_.-]", "_", part) for part in parts)
    return f".confplan/{safe or 'state'}"


class Checkpoint(StrictModel):
    """Where `confplan apply` records finished stages, so a rerun resumes."""

    dir: Path = Field(
        Path(".confplan/state"),
        strict=False,
        validate_default=True,
        description=(
            "Checkpoint folder (also the plan's VMM sockets, logs and owner keys); relative paths are "
            "taken from the plan file's folder. Default: .confplan/<plan file stem>, plus .<metadata.name> "
            "when the name differs, so every plan has its own."
        ),
    )

    @field_validator("dir")
    @classmethod
    def _relative_to_plan(cls, value: Path, info: ValidationInfo) -> Path:
        base = (info.context or {}).get("base_dir")
        if value.is_absolute() or base is None:
            return value
        return Path(base) / value


class Plan(StrictModel):
    """A confidential-VM live-migration plan."""

    api_version: Literal["confplan/v1"] = Field(
        API_VERSION, alias="apiVersion", description="Schema version of this plan: confplan/v1."
    )
    kind: Literal["MigrationPlan"] = Field(KIND, description="Document kind: MigrationPlan.")
    metadata: Metadata = Field(default_factory=Metadata, description="Name and description of the plan.")
    guest: Guest = Field(description="The guest: memory, vCPUs and workload.")
    helper: Helper = Field(default_factory=Helper, description="The migration helper inside the guest.")
    sev: Sev = Field(default_factory=Sev, description="Generation and policy of the confidential guest.")
    source: Endpoint = Field(default_factory=Endpoint, description="Where the guest runs now.")
    target: Endpoint = Field(default_factory=Endpoint, description="Where the guest will run.")
    limits: Limits = Field(default_factory=Limits, description="Downtime, timeout and bandwidth limits.")
    stages: list[Stage] = Field(
        default_factory=lambda: [StageSpec(name=name) for name in STAGE_NAMES],
        min_length=1,
        description="Stages in the order they run: names, or {name: {params}} mappings.",
    )
    checkpoint: Checkpoint = Field(default_factory=Checkpoint, description="Where progress is recorded.")

    @model_validator(mode="before")
    @classmethod
    def _defaults_from_file(cls, data: Any, info: ValidationInfo) -> Any:
        # Defaults that depend on the plan file: the name (its stem) and the checkpoint folder (beside it).
        if not isinstance(data, dict):
            return data
        data = {"checkpoint": {}, **data}
        stem = (info.context or {}).get("file_stem")
        metadata = data.get("metadata", {})
        if isinstance(stem, str) and re.match(NAME_PATTERN, stem) and isinstance(metadata, dict):
            data["metadata"] = {"name": stem, **metadata}
        checkpoint = data["checkpoint"]
        if isinstance(checkpoint, dict) and "dir" not in checkpoint:
            data["checkpoint"] = {**checkpoint, "dir": default_state_dir(stem, data.get("metadata"))}
        return data

    def with_checkpoint_dir(self, directory: Path | str | None) -> Plan:
        """This plan with its checkpoint folder moved (``--checkpoint-dir``; relative to the current
        folder, as a command-line path is); the plan hash does not change."""
        if directory is None:
            return self
        moved = Checkpoint(dir=Path(directory).absolute())
        return self.model_copy(update={"checkpoint": moved})

    def stage_names(self) -> list[str]:
        return [stage.name for stage in self.stages]

    def plan_hash(self) -> str:
        """Hex SHA-256 of the normalised plan: units parsed, policy as its word, checkpoint left out."""
        normal = self.model_dump(mode="json", by_alias=True, exclude={"checkpoint"})
        normal["sev"]["policy"] = self.sev.policy_int
        text = json.dumps(normal, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()
