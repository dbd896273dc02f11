"""cleanup-source: only once ``reconcile`` sees the guest run on the target (handed over), the source VMM
stops, its older copy with it. Anything else and it refuses: stopping the source is never a guess."""

from __future__ import annotations

from confplan.agent import handle as vmm_handle
from confplan.errors import ConfplanError
from confplan.plan import STAGE_NEEDS
from confplan.stages.base import Stage, StageContext, StageResult, register_stage
from confplan.stages.modules import _common as common
from confplan.stages.modules import _handover as handover


@register_stage
class CleanupSource(Stage):
    name = "cleanup-source"
    needs = tuple(STAGE_NEEDS[name])  # the plan's table: validate checks the same order
    provides = ("source_pid",)

    def run(self, ctx: StageContext) -> StageResult:
        views = handover.read_views(ctx)
        resolution = views.resolution()
        if resolution.verdict is not handover.Verdict.RUNS_ON_TARGET:
            raise ConfplanError(
                f"the source is not stopped: the guest does not run on the target ({resolution.reason})",
                hint="rerun `confplan apply`: it reconciles with what each side holds",
            )
        if views.source.reach is not handover.Reach.ALIVE:
            return StageResult(data={"source_pid": None})
        source = common.vmm(ctx, "source")
        pid = source.pid
        vmm_handle.stop(source)
        return StageResult(data={"source_pid": pid})
