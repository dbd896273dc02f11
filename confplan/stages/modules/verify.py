"""verify: the target checks the whole copy by itself against the source's MANIFEST (both helpers' keyed
digests of all guest memory, and the CRC-32C of the shared pages) as part of the handover
(docs/handover.md), and says VERIFIED or REFUSED; this stage waits for that verdict and reports the check.
When precopy filled the MAC tables, each side MACs only the pages moved as shared since and folds its table
(confplan/migration/verify.py); else all of RAM is hashed in the pause. A refused copy never runs: the
source takes the guest back by itself.
"""

from __future__ import annotations

import time
from typing import Any

from confplan.errors import ConfplanError
from confplan.migration.handover import TargetState
from confplan.plan import STAGE_NEEDS
from confplan.stages.base import ResumePolicy, Stage, StageContext, StageResult, register_stage
from confplan.stages.modules import _handover as handover

_VERDICT = (TargetState.VERIFIED, TargetState.RESUMED, TargetState.REFUSED, TargetState.RELEASED)


@register_stage
class Verify(Stage):
    name = "verify"
    needs = tuple(STAGE_NEEDS[name])  # the plan's table: validate checks the same order
    provides = ("shared", "chunks", "from_mac_tables", "seconds")
    policy = ResumePolicy(
        "start-incoming", "the target's memory cannot be trusted after a failed verify",
        settled_on_rerun=handover.SETTLES_ON_RERUN,
    )

    def run(self, ctx: StageContext) -> StageResult:
        timeout = float(ctx.result_of("stop-and-copy").get("verdict_timeout") or 10.0) + 5.0
        started = time.monotonic()
        views = handover.wait_for(
            ctx, lambda v: v.target.state in _VERDICT or handover.source_took_back(v), timeout=timeout,
            what="verify",
        )  # fmt: skip
        target = views.raw["target"]
        check: dict[str, Any] = dict(target.get("verify") or {})
        refused = views.target.state in (TargetState.REFUSED, TargetState.RELEASED)
        if refused or handover.source_took_back(views):
            why = target.get("refused") or views.raw["source"].get("target_error") or views.target.state
            raise ConfplanError(
                f"the target did not take the guest: {why}",
                hint="the target's copy never runs; the source guest runs again; rerun the apply",
            )
        return StageResult(data={
            "shared": check.get("shared"), "chunks": check.get("chunks"),
            "from_mac_tables": check.get("from_mac_tables"),
            "pages_hashed_in_pause": check.get("pages_hashed_in_pause"),
            "shared_pages_crcd_in_pause": check.get("shared_pages_crcd_in_pause"),
            "seconds": {"target": check.get("seconds"), "target_check": check.get("check_seconds"),
                        "source_digest": views.raw["source"].get("digest_seconds")},
            "since_pause": _since_pause(ctx, started=started, verified=time.monotonic()),
        })  # fmt: skip


def _since_pause(ctx: StageContext, **moments: float) -> dict[str, float] | None:
    """Seconds from the pause to each moment: where the downtime goes between the stages."""
    paused = ctx.pause_started
    return {k: t - paused for k, t in moments.items()} if paused is not None else None
