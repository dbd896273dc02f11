"""Stand-in stages for tests of the runner, status and reports: every stage of the pipeline, each
returning a fixed result, one of them failing with a given error (no VMs)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from confplan.plan import STAGE_NAMES
from confplan.stages import Stage, StageContext, StageResult, register_stage
from confplan.stages.base import StageRegistry


def stand_in_stages(
    failing: str | None = None,
    *,
    error: str = "digest mismatch at gpa 0x2000\nmore detail",
    shared: int = 2048,
    sealed: int = 3 << 20,
    results: Mapping[str, dict[str, Any]] | None = None,
) -> StageRegistry:
    """A registry of the pipeline's stages: each returns ``shared``/``sealed`` bytes and its entry of
    ``results``; the one named ``failing`` raises RuntimeError(``error``) instead."""
    registry: StageRegistry = {}
    for stage_name in STAGE_NAMES:

        class StandIn(Stage):
            name: ClassVar[str] = stage_name

            def run(self, ctx: StageContext) -> StageResult:
                if ctx.current == failing:
                    raise RuntimeError(error)
                data = (results or {}).get(ctx.current, {})
                return StageResult(bytes_shared=shared, bytes_sealed=sealed, data=data)

        register_stage(StandIn, registry)
    return registry
