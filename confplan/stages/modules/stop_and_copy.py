"""stop-and-copy: START the handover (docs/handover.md). The source pauses the guest's vCPUs (the
helpers serve on), sends the last dirty pages, the vCPU states, the encryption bitmap, its MANIFEST
and DONE; from here the two VMMs end the migration between themselves, and this stage only waits
until the target holds the whole copy. No undo of an earlier stage may resume the source any more:
the source decides (it takes the guest back by itself when no verdict comes within max_downtime +
limits.handover_grace).
"""

from __future__ import annotations

import time

from confplan.errors import ConfplanError
from confplan.migration.handover import TargetState
from confplan.plan import STAGE_NEEDS
from confplan.plan.models import StopAndCopyParams
from confplan.stages.base import ResumePolicy, Stage, StageContext, StageResult, TeardownWhen, register_stage
from confplan.stages.modules import _common as common
from confplan.stages.modules import _handover as handover

FINAL_TIMEOUT = 600.0


@register_stage
class StopAndCopy(Stage):
    name = "stop-and-copy"
    needs = tuple(STAGE_NEEDS[name])  # the plan's table: validate checks the same order
    provides = ("final_round", "source_paused_seconds", "target", "steps", "verdict_timeout", "enc_bitmap")
    policy = ResumePolicy(
        "start-incoming", "the target's state is incomplete after a failed final copy",
        settled_on_rerun=handover.SETTLES_ON_RERUN,
    )

    def run(self, ctx: StageContext) -> StageResult:
        source = common.vmm(ctx, "source")
        ctx.pause_started = paused = time.monotonic()
        timeout = handover.verdict_timeout(ctx)
        params = StopAndCopyParams.model_validate(self.params)
        try:
            call = {"verdict_timeout": timeout, "pause_in_cpl0": params.pause_in_cpl0}
            sent = source.call("stop_and_copy", call, timeout=FINAL_TIMEOUT)
        except ConfplanError as err:
            raise common.stream_error(ctx, err) from None
        # The handover has started: from here the VMMs decide, so no earlier undo may run (resuming the
        # source now could fork the guest, dropping the target's stream could freeze it).
        for teardown in ctx.teardowns:
            if teardown.when is TeardownWhen.ON_FAILURE:
                teardown.cancel()
        views = handover.wait_for(ctx, _whole_copy, timeout=timeout + 5.0, what="stop-and-copy")
        target = views.raw["target"]
        if handover.source_took_back(views):
            raise ConfplanError(
                f"the handover aborted before the target held the whole guest: {_why(views.raw)}",
                hint="the source guest runs again; rerun the apply to migrate again",
            )
        final = sent["round"]
        steps = {**sent["steps"], "target_confirmed": time.monotonic() - paused}
        bitmap = {"sha256": sent.get("enc_bitmap_sha256"), "conversions": sent.get("conversions"),
                  "held_back_pages": sent.get("held_back_pages")}  # fmt: skip
        return StageResult(
            bytes_shared=int(final["bytes_shared"]), bytes_sealed=int(final["bytes_sealed"]),
            data={"final_round": final, "source_paused_seconds": sent["paused_seconds"], "target": target,
                  "steps": steps, "verdict_timeout": timeout, "vcpus_at_cpl0": sent.get("vcpus_at_cpl0"),
                  "enc_bitmap": bitmap},
        )  # fmt: skip


def _whole_copy(views: handover.Views) -> bool:
    """The target holds (or held) the whole copy, or the source already took the guest back."""
    held = views.target.state not in (None, TargetState.RECEIVING)
    return held or handover.source_took_back(views)


def _why(raw: dict[str, dict[str, object]]) -> str:
    target = raw["target"]
    return str(target.get("refused") or raw["source"].get("target_error") or target.get("state"))
