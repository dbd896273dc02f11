"""precopy: rounds over the dirty log until what is left fits in max_downtime at the measured bandwidth
(``confplan.migration.precopy.decide``), or the rounds run out, or the completion timeout says abort or
throttle. Each round is one call to the source VMM; page data never passes through here.

Parameter ``max_rounds`` overrides limits.max_precopy_rounds.
"""

from __future__ import annotations

import time

from confplan.agent.handle import VmmHandle
from confplan.errors import ConfplanError
from confplan.migration.precopy import Action, Limits, RoundStats, decide
from confplan.migration.verify import CHUNK_PAGES
from confplan.stages.base import Stage, StageContext, StageResult, register_stage
from confplan.stages.modules import _common as common

ROUND_TIMEOUT = 600.0
APPLY_TIMEOUT = 120.0


def limits_of(ctx: StageContext, max_rounds: int | None) -> Limits:
    lim, gib = ctx.plan.limits, ctx.plan.guest.memory / (1 << 30)
    return Limits(
        max_downtime=float(lim.max_downtime), max_rounds=max_rounds or int(lim.max_precopy_rounds),
        completion_timeout=float(lim.completion_timeout_per_gib) * max(gib, 1 / 64),
        on_timeout=str(lim.on_timeout), bandwidth_cap=lim.bandwidth,
    )  # fmt: skip


def _status_line(stats: RoundStats, eta: float | None, bandwidth: float) -> str:
    eta_text = f"ETA {eta:.2f}s" if eta is not None else "ETA ?"
    return (f"round {stats.round}: {stats.dirty_after} dirty pages left, {bandwidth / (1 << 20):.0f} MiB/s, "
            f"{eta_text}")  # fmt: skip


def worth_early_digests(dirty_pages: int, memory: int) -> bool:
    """Early digests pay off when the final round will leave most chunks untouched: a few dirty pages
    (an idle guest), not thousands spread over all of RAM (then every chunk is digested again anyway)."""
    chunks = -(-memory // (CHUNK_PAGES * 4096))
    return dirty_pages < chunks // 2


@register_stage
class Precopy(Stage):
    name = "precopy"

    def check(self, ctx: StageContext) -> None:
        ctx.result_of("start-incoming")

    def run(self, ctx: StageContext) -> StageResult:
        source, target = common.vmm(ctx, "source"), common.vmm(ctx, "target")
        common.undo_on_source(ctx)
        limits = limits_of(ctx, self.params.get("max_rounds"))
        rounds: list[RoundStats] = []
        started, throttle, sent_pages = time.monotonic(), 0.0, 0
        while True:
            try:
                stats = RoundStats.from_json(source.call("precopy_round", timeout=ROUND_TIMEOUT))
            except ConfplanError as err:
                raise common.stream_error(ctx, err) from None
            self._check_target(target)
            rounds.append(stats)
            sent_pages += stats.pages
            decision = decide(rounds, limits, elapsed=time.monotonic() - started, throttle=throttle)
            ctx.progress(
                sent_pages, None, unit="pages", message=_status_line(stats, decision.eta, decision.bandwidth)
            )
            if decision.action is Action.ABORT:
                raise ConfplanError(decision.reason, hint="raise limits.completion_timeout_per_gib, or use "
                                    "limits.on_timeout: throttle")  # fmt: skip
            if decision.action is Action.THROTTLE:
                throttle = decision.throttle
                source.call("set_throttle", {"fraction": throttle})
            if decision.action is Action.STOP_AND_COPY:
                break
        if worth_early_digests(rounds[-1].dirty_after, int(ctx.plan.guest.memory)):
            self._early_digests(ctx, source, target, len(rounds))
        return StageResult(
            bytes_shared=sum(r.shared_pages for r in rounds) * 4112,
            bytes_sealed=sum(r.sealed_pages for r in rounds) * 4160,
            data={"rounds": [r.to_json() for r in rounds], "decision": decision.reason,
                  "bandwidth": decision.bandwidth, "throttle": throttle},
        )  # fmt: skip

    @staticmethod
    def _early_digests(ctx: StageContext, source: VmmHandle, target: VmmHandle, rounds: int) -> None:
        """Once the target has applied every round, both sides digest all chunks while the guest still
        runs; verify then re-digests only what the final round touched."""
        deadline = time.monotonic() + APPLY_TIMEOUT
        while (status := target.call("incoming_status"))["rounds"] < rounds:
            if status["state"] == "failed" or time.monotonic() > deadline:
                raise ConfplanError(
                    f"the target did not apply the precopy rounds: {status['error'] or status}"
                )
            time.sleep(0.005)
        here, there = common.both_digests(source, target, {"shared": False, "mark": True})
        if here["private"] is not None and there["private"] is not None:
            ctx.state[common.EARLY_DIGESTS] = (here["private"], there["private"])

    @staticmethod
    def _check_target(target: VmmHandle) -> None:
        status = target.call("incoming_status", {"wait": 0.0})
        if status["state"] == "failed":
            raise ConfplanError(
                f"the target refused the stream: {status['error']}",
                hint="the source guest keeps running; rerun the apply to migrate again",
            )
