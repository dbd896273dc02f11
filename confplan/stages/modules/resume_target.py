"""resume-target: the target installs the encryption bitmap and the vCPU states (TSC moved on by the
pause), runs the guest, and the workload's self-check ledger must pass. From here the source's undo is
withdrawn: the guest lives on the target."""

from __future__ import annotations

import time

from confplan.errors import ConfplanError
from confplan.stages.base import ResumePolicy, Stage, StageContext, StageResult, TeardownWhen, register_stage
from confplan.stages.modules import _common as common


@register_stage
class ResumeTarget(Stage):
    name = "resume-target"
    needs = ("verify",)
    provides = ("downtime_seconds", "clock_gap_seconds", "ledger_checked_pages", "target_pid")
    policy = ResumePolicy(
        "start-incoming",
        "the target did not resume, so it is loaded again from the intact source",
        unsafe_if_interrupted=(
            "resume-target was interrupted: the guest may already run on the target while the source "
            "still holds it"
        ),
    )

    def run(self, ctx: StageContext) -> StageResult:
        target = common.vmm(ctx, "target")
        common.undo_on_source(ctx)
        pause = ctx.add_teardown("pause the target guest's vCPUs", lambda: target.call("pause_guest"))
        started = time.monotonic()
        resumed = target.call("resume_incoming")
        now = time.monotonic()
        paused = ctx.pause_started
        downtime = now - paused if paused is not None else None
        ledger = target.call("workload_check", timeout=60.0)
        if not ledger["ok"]:
            raise ConfplanError(
                f"the guest's self-check failed on the target: data page {ledger['first_bad_page']} is wrong",
                hint="the target is paused again and the source guest resumes; rerun the apply",
            )
        pause.cancel()
        # Committed: the guest runs on the target now. No undo may resume the source or stop the target.
        for teardown in ctx.teardowns:
            if teardown.when is TeardownWhen.ON_FAILURE:
                teardown.cancel()
        return StageResult(data={
            "downtime_seconds": downtime, "clock_gap_seconds": resumed["clock_gap_seconds"],
            "resume_seconds": now - started,
            "started_since_pause": started - paused if paused is not None else None,
            "ledger_checked_pages": ledger["checked_pages"], "target_pid": target.pid,
        })  # fmt: skip
