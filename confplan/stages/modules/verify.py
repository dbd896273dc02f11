"""verify: both MHs' keyed digests of all guest memory are equal, and so are both VMMs' CRC-32C of the
shared pages. The target resumes only after this. When precopy filled the MHs' MAC tables, each side MACs
only the pages written since and folds its table (confplan/migration/verify.py); else all of RAM is
hashed in the pause."""

from __future__ import annotations

import time
from typing import Any

from confplan.errors import ConfplanError
from confplan.migration.helper import HelperUnavailable
from confplan.migration.verify import CHUNK_PAGES
from confplan.stages.base import ResumePolicy, Stage, StageContext, StageResult, register_stage
from confplan.stages.modules import _common as common


@register_stage
class Verify(Stage):
    name = "verify"
    needs = ("stop-and-copy",)
    provides = ("shared", "chunks", "from_mac_tables", "seconds")
    policy = ResumePolicy("start-incoming", "the target's memory cannot be trusted after a failed verify")

    def run(self, ctx: StageContext) -> StageResult:
        source, target = common.vmm(ctx, "source"), common.vmm(ctx, "target")
        common.undo_on_source(ctx)
        tables = ctx.mac_tables
        started = time.monotonic()
        here, there = common.both_digests(source, target, {"table": tables})
        digested = time.monotonic()
        self._check_shared(here, there)
        if here["private"] is None or there["private"] is None:
            raise HelperUnavailable(
                "private memory cannot be verified: a side has no migration helper to digest it",
                hint="the target resumes only after both helpers' digests match",
            )
        ours, theirs = here["private"], there["private"]
        bad = sorted((int(k) for k in ours if ours[k] != theirs.get(k)), key=int)
        if bad or len(ours) != len(theirs):
            raise ConfplanError(
                f"the helpers' digests of guest memory differ in chunks {bad[:8]} of {len(ours)} "
                f"({CHUNK_PAGES * 4} KiB each)",
                hint="the target's memory cannot be trusted; the source guest resumes, rerun the apply",
            )
        return StageResult(data={
            "shared": here["shared"], "chunks": len(ours), "from_mac_tables": tables,
            "pages_hashed_in_pause": [here["pages_maced"], there["pages_maced"]] if tables else None,
            "shared_pages_crcd_in_pause": [here.get("shared_pages_crcd"), there.get("shared_pages_crcd")],
            "seconds": {"source": here["seconds"], "target": there["seconds"]},
            "since_pause": _since_pause(ctx, started=started, digested=digested),
        })  # fmt: skip

    @staticmethod
    def _check_shared(here: dict[str, Any], there: dict[str, Any]) -> None:
        if here["shared"] != there["shared"]:
            raise ConfplanError(
                f"shared pages differ: source {here['shared']}, target {there['shared']}",
                hint="the target's memory cannot be trusted; the source guest resumes, rerun the apply",
            )


def _since_pause(ctx: StageContext, **moments: float) -> dict[str, float] | None:
    """Seconds from the pause to each moment: where the downtime goes between the stages."""
    paused = ctx.pause_started
    return {k: t - paused for k, t in moments.items()} if paused is not None else None
