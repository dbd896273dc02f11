"""resume-target: the target resumes the guest on the source's COMMIT, with its RESUMED record on disk first
(docs/handover.md); this stage waits until ``reconcile`` sees the guest run there (relaying the COMMIT if
the link between the VMMs was cut), then checks the workload's self-check ledger on the target. Once the
guest runs on the target it **is** the guest: a bad ledger is reported, never rolled back."""

from __future__ import annotations

import time
from typing import Any

from confplan.errors import ConfplanError
from confplan.plan import STAGE_NEEDS
from confplan.stages.base import ResumePolicy, Stage, StageContext, StageResult, TeardownWhen, register_stage
from confplan.stages.modules import _common as common
from confplan.stages.modules import _handover as handover


@register_stage
class ResumeTarget(Stage):
    name = "resume-target"
    needs = tuple(STAGE_NEEDS[name])  # the plan's table: validate checks the same order
    provides = ("downtime_seconds", "clock_gap_seconds", "guest_downtime_seconds", "clock_monotonic",
                "ledger_checked_pages", "vector_state", "enc_bitmap", "target_pid")
    # Before these apply, a rerun reconciles the records with what each side holds (stages/modules/
    # _handover.py): a guest that runs on the target makes this stage done; one that runs on the source
    # makes it failed; only a view that cannot be settled leaves it interrupted, and that blocks.
    policy = ResumePolicy(
        "start-incoming",
        "the target did not resume, so it is loaded again from the intact source",
        unsafe_if_interrupted=(
            "resume-target was interrupted: the guest may already run on the target while the source "
            "still holds it, and neither side's VMM says which"
        ),
        settled_on_rerun=handover.SETTLES_ON_RERUN,
    )

    def run(self, ctx: StageContext) -> StageResult:
        timeout = float(ctx.result_of("stop-and-copy").get("verdict_timeout") or 10.0) + 5.0
        started = time.monotonic()
        views = handover.settle(ctx, {handover.Verdict.RUNS_ON_TARGET, handover.Verdict.RUNS_ON_SOURCE},
                                timeout=timeout, what="resume-target")  # fmt: skip
        if views.resolution().verdict is handover.Verdict.RUNS_ON_SOURCE:
            raise ConfplanError(
                f"the handover ended with the guest on the source: {views.resolution().reason}",
                hint="the source guest runs; rerun the apply to migrate again",
            )
        now = time.monotonic()
        # Committed: the guest runs on the target now. No undo may resume the source or stop the target.
        for teardown in ctx.teardowns:
            if teardown.when is TeardownWhen.ON_FAILURE:
                teardown.cancel()
        target = common.vmm(ctx, "target")
        notes = views.raw["target"]
        downtime = _downtime(notes)
        ledger = target.call("workload_check", timeout=60.0)
        if not ledger["ok"]:
            what = f"data page {ledger['first_bad_page']} is wrong"
            if ledger["first_bad_page"] is None:
                what = "a vector register it keeps (ymm15) changed: the vCPU's XSAVE state was lost"
            raise ConfplanError(
                f"the guest's self-check failed on the target: {what}",
                hint="the guest runs on the target (it is the guest now: running the source's older copy "
                "would roll it back); report this as a bug in confplan",
            )
        if ledger.get("clock_monotonic") is False:
            raise ConfplanError(
                "the guest's kvm-clock went backwards on the target: its time was not carried over",
                hint="the guest runs on the target (it is the guest now); report this as a bug in confplan",
            )
        bitmaps = _enc_bitmaps(ctx, notes)
        paused = ctx.pause_started
        over = downtime is not None and downtime > float(ctx.plan.limits.max_downtime)
        return StageResult(data={
            "downtime_seconds": downtime, "clock_gap_seconds": notes.get("clock_gap_seconds"),
            # the pause as the guest saw it: its largest kvm-clock gap since the resume (None: not measured)
            "guest_downtime_seconds": ledger.get("guest_max_gap_seconds"),
            "clock_monotonic": ledger.get("clock_monotonic"), "timer_ticks": ledger.get("timer_ticks"),
            "over_max_downtime": over, "resume_seconds": now - started,
            "started_since_pause": started - paused if paused is not None else None,
            "ledger_checked_pages": ledger["checked_pages"], "vector_state": ledger.get("vector"),
            "enc_bitmap": bitmaps, "target_pid": target.pid,
            # the target's side of the pause: seconds from the pause to each moment, in order
            "pause_timeline": notes.get("pause_timeline"),
        })  # fmt: skip


def _enc_bitmaps(ctx: StageContext, notes: dict[str, Any]) -> dict[str, Any]:
    """The page-encryption bitmap the source sent in the pause against the one the target's guest started
    from (each VMM's own digest of its live bitmap): equal, conversions and all."""
    sent = dict(ctx.result_of("stop-and-copy").get("enc_bitmap") or {})
    there = notes.get("enc_bitmap_sha256")
    equal = None if sent.get("sha256") is None or there is None else sent["sha256"] == there
    return {**sent, "target_sha256": there, "equal": equal}


def _downtime(notes: dict[str, object]) -> float | None:
    """From the source's pause to the guest running on the target, by the two wall clocks the target saw
    (the same clock for a local target; across hosts it includes their skew)."""
    paused, resumed = notes.get("paused_wall"), notes.get("resumed_wall")
    if isinstance(paused, int | float) and isinstance(resumed, int | float):
        return max(0.0, float(resumed) - float(paused))
    return None
