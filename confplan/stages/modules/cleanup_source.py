"""cleanup-source: only after resume-target succeeded, the source VMM stops (its guest with it)."""

from __future__ import annotations

from confplan.agent import handle as vmm_handle
from confplan.stages.base import Stage, StageContext, StageResult, register_stage
from confplan.stages.modules import _common as common


@register_stage
class CleanupSource(Stage):
    name = "cleanup-source"
    needs = ("resume-target",)
    provides = ("source_pid",)

    def run(self, ctx: StageContext) -> StageResult:
        source = common.vmm(ctx, "source")
        pid = source.pid
        vmm_handle.stop(source)
        return StageResult(data={"source_pid": pid})
