"""stop-and-copy: the guest's own vCPUs pause (aux vCPUs keep serving), the last dirty pages, the vCPU
states and the encryption bitmap go across, and the target confirms it holds all of it."""

from __future__ import annotations

import time

from confplan.errors import ConfplanError
from confplan.stages.base import ResumePolicy, Stage, StageContext, StageResult, register_stage
from confplan.stages.modules import _common as common

FINAL_TIMEOUT = 600.0


@register_stage
class StopAndCopy(Stage):
    name = "stop-and-copy"
    needs = ("start-incoming",)
    provides = ("final_round", "source_paused_seconds", "target", "steps")
    policy = ResumePolicy("start-incoming", "the target's state is incomplete after a failed final copy")

    def run(self, ctx: StageContext) -> StageResult:
        source, target = common.vmm(ctx, "source"), common.vmm(ctx, "target")
        common.undo_on_source(ctx)
        ctx.pause_started = paused = time.monotonic()
        try:
            sent = source.call("stop_and_copy", timeout=FINAL_TIMEOUT)
        except ConfplanError as err:
            raise common.stream_error(ctx, err) from None
        status = target.call("incoming_status", {"wait": FINAL_TIMEOUT / 2}, timeout=FINAL_TIMEOUT)
        if status["state"] != "complete":
            raise ConfplanError(
                f"the target's incoming stream is {status['state']} after the final copy"
                + (f": {status['error']}" if status.get("error") else ""),
                hint="the source guest resumes; rerun the apply to migrate again",
            )
        final = sent["round"]
        steps = {**sent["steps"], "target_confirmed": time.monotonic() - paused}
        return StageResult(
            bytes_shared=int(final["bytes_shared"]), bytes_sealed=int(final["bytes_sealed"]),
            data={"final_round": final, "source_paused_seconds": sent["paused_seconds"], "target": status,
                  "steps": steps},
        )  # fmt: skip
