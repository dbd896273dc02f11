"""verify: both MHs' keyed digests of all guest memory are equal, and so are both VMMs' CRC-32C of the
shared pages. The target resumes only after this. Incremental when precopy left early digests: in the
pause only the chunks the final round touched are digested again (confplan/migration/verify.py)."""

from __future__ import annotations

from typing import Any

from confplan.errors import ConfplanError
from confplan.migration.helper import HelperUnavailable
from confplan.migration.verify import CHUNK_PAGES
from confplan.stages.base import Stage, StageContext, StageResult, register_stage
from confplan.stages.modules import _common as common


@register_stage
class Verify(Stage):
    name = "verify"

    def check(self, ctx: StageContext) -> None:
        ctx.result_of("stop-and-copy")

    def run(self, ctx: StageContext) -> StageResult:
        source, target = common.vmm(ctx, "source"), common.vmm(ctx, "target")
        common.undo_on_source(ctx)
        early: tuple[dict[str, str], dict[str, str]] | None = ctx.state.get(common.EARLY_DIGESTS)
        incremental = early is not None and common.TOUCHED_CHUNKS in ctx.state
        touched: list[int] = []
        if (
            incremental
        ):  # what the source sent in the pause, and what the target wrote since the early digests
            written = target.call("incoming_status")["written_chunks"]
            touched = sorted(set(ctx.state[common.TOUCHED_CHUNKS]) | set(written))
        params: dict[str, Any] = {"chunks": touched} if incremental else {}
        here, there = common.both_digests(source, target, params)
        self._check_shared(here, there)
        if here["private"] is None or there["private"] is None:
            raise HelperUnavailable(
                "private memory cannot be verified: a side has no migration helper to digest it",
                hint="the target resumes only after both helpers' digests match",
            )
        ours, theirs = here["private"], there["private"]
        if early is not None and incremental:
            ours, theirs = {**early[0], **ours}, {**early[1], **theirs}
        bad = sorted((int(k) for k in ours if ours[k] != theirs.get(k)), key=int)
        if bad or len(ours) != len(theirs):
            raise ConfplanError(
                f"the helpers' digests of guest memory differ in chunks {bad[:8]} of {len(ours)} "
                f"({CHUNK_PAGES * 4} KiB each)",
                hint="the target's memory cannot be trusted; the source guest resumes, rerun the apply",
            )
        return StageResult(data={
            "shared": here["shared"], "chunks": len(ours),
            "chunks_digested_in_pause": len(touched) if incremental else len(ours),
        })  # fmt: skip

    @staticmethod
    def _check_shared(here: dict[str, Any], there: dict[str, Any]) -> None:
        if here["shared"] != there["shared"]:
            raise ConfplanError(
                f"shared pages differ: source {here['shared']}, target {there['shared']}",
                hint="the target's memory cannot be trusted; the source guest resumes, rerun the apply",
            )
