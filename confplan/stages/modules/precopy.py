"""precopy: rounds over the dirty log until what is left fits in max_downtime at the measured bandwidth
(``confplan.migration.precopy.decide``), or the rounds run out, or the completion timeout says abort or
throttle. Each round is one call to the source VMM; page data never passes through here.

SAVE and LOAD keep both MHs' per-page MAC tables for every sealed page (mailbox v4). When the policy
first says stop, both MHs MAC the pages moved as shared so far (the guest still runs), and two more
rounds send what changed meanwhile: in the pause, verify then MACs only the shared pages moved since and
folds the tables (confplan/migration/verify.py).

Parameter ``max_rounds`` overrides limits.max_precopy_rounds.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from confplan.agent.handle import VmmHandle
from confplan.errors import ConfplanError
from confplan.migration.precopy import WIRE_BYTES_PER_PAGE, Action, Limits, RoundStats, decide
from confplan.plan import STAGE_NEEDS
from confplan.plan.models import PrecopyParams
from confplan.stages.base import ResumePolicy, Stage, StageContext, StageResult, register_stage
from confplan.stages.modules import _common as common

ROUND_TIMEOUT = 600.0
PROGRESS_INTERVAL = 0.5  # seconds between the source's progress events within a round
MAC_FILL_ROUNDS = 2
_ABORT_HINTS = {
    "max_precopy_rounds": "the source guest keeps running; raise limits.max_precopy_rounds or max_downtime, "
    "or set limits.on_timeout: throttle (slow the guest) or force-complete (accept a longer pause)",
    "completion_timeout": "the source guest keeps running; raise limits.completion_timeout_per_gib, or set "
    "limits.on_timeout: throttle or force-complete",
}
APPLY_TIMEOUT = 120.0


def limits_of(ctx: StageContext, max_rounds: int | None) -> Limits:
    lim, gib = ctx.plan.limits, ctx.plan.guest.memory / (1 << 30)
    return Limits(
        max_downtime=float(lim.max_downtime), max_rounds=max_rounds or int(lim.max_precopy_rounds),
        completion_timeout=float(lim.completion_timeout_per_gib) * max(gib, 1 / 64),
        on_timeout=str(lim.on_timeout), bandwidth_cap=lim.bandwidth,
    )  # fmt: skip


def _seconds(value: float | None) -> str:
    return f"{value:.1f}s" if value is not None else "?"


def _status_line(stats: RoundStats, eta: float | None, bandwidth: float) -> str:
    eta_text = f"ETA {eta:.2f}s" if eta is not None else "ETA ?"
    return (f"round {stats.round}: {stats.dirty_after} dirty pages left, {bandwidth / (1 << 20):.0f} MiB/s, "
            f"{eta_text}")  # fmt: skip


def progress_fields(
    round_: int, bytes_sent: int, rate: float | None, left: int | None, eta: float | None
) -> dict[str, Any]:
    """precopy's figures in a stage-progress event (docs/report.md, "Events")."""
    return {"round": round_, "bytes_sent": bytes_sent, "rate_bytes_per_second": rate,
            "dirty_pages_left": left, "eta_seconds": eta}  # fmt: skip


class RoundWatch:
    """Turns the source's ``precopy-progress`` events (RPC reader thread) into the stage's progress."""

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        self.bytes_before = 0  # sent by the rounds before this one
        self.error: BaseException | None = None  # an observer raised it: the stage raises it after the round
        # A round's last events may be read after its answer: they must not count its bytes twice.
        self._finished: set[int] = set()
        self._lock = threading.Lock()

    def round_done(self, stats: RoundStats) -> None:
        """The round's answer came: later events of it are stale; its bytes join ``bytes_before``."""
        with self._lock:
            self._finished.add(stats.round)
            self.bytes_before += stats.bytes_sent

    def on_event(self, event: str, params: dict[str, Any]) -> None:
        if event != "precopy-progress" or self.error is not None:
            return
        try:
            self._progress(params)
        except BaseException as err:  # never in the RPC reader thread: that would cut the connection
            self.error = err

    def _progress(self, params: dict[str, Any]) -> None:
        pages, sent = int(params.get("pages", 0)), int(params.get("pages_sent", 0))
        seconds, sent_bytes = float(params.get("seconds", 0.0)), int(params.get("bytes_sent", 0))
        rate = sent_bytes / seconds if seconds > 0 and sent_bytes else None
        left = max(pages - sent, 0)
        eta = left * WIRE_BYTES_PER_PAGE / rate if rate else None
        round_ = int(params.get("round", 0))
        with self._lock:
            if round_ in self._finished:
                return
            before = self.bytes_before
        speed = f"{rate / (1 << 20):.0f} MiB/s" if rate else "? MiB/s"
        message = f"round {round_}: {speed}, {left} pages to go, ETA {_seconds(eta)}"
        fields = progress_fields(round_, before + sent_bytes, rate, left, eta)
        self.ctx.progress(sent, pages, unit="pages", message=message, fields=fields)


@register_stage
class Precopy(Stage):
    name = "precopy"
    needs = tuple(STAGE_NEEDS[name])  # the plan's table: validate checks the same order
    provides = ("rounds", "decision", "limit", "forced", "bandwidth", "throttle", "mac_tables")
    policy = ResumePolicy("start-incoming", "the target's partly received memory went with the failed stream")

    def run(self, ctx: StageContext) -> StageResult:
        source, target = common.vmm(ctx, "source"), common.vmm(ctx, "target")
        common.undo_on_source(ctx)
        limits = limits_of(ctx, PrecopyParams.model_validate(self.params).max_rounds)
        # The MAC fill costs two more rounds (what the guest wrote meanwhile, then a short one): they are
        # kept in reserve, so max_precopy_rounds holds with them.
        reserve = MAC_FILL_ROUNDS if limits.max_rounds > MAC_FILL_ROUNDS else 0
        judge = dataclasses.replace(limits, max_rounds=limits.max_rounds - reserve)
        rounds: list[RoundStats] = []
        started, throttle, sent_pages = time.monotonic(), 0.0, 0
        watch = RoundWatch(ctx)
        ctx.mac_tables = False
        tables: dict[str, Any] = {}
        while True:
            stats = self._round(ctx, source, target, watch)
            rounds.append(stats)
            ctx.partial[self.name] = {"rounds": [r.to_json() for r in rounds]}  # kept should a later one fail
            sent_pages += stats.pages
            decision = decide(rounds, judge, elapsed=time.monotonic() - started, throttle=throttle)
            fields = progress_fields(stats.round, watch.bytes_before, decision.bandwidth or None,
                                     stats.dirty_after, decision.eta)  # fmt: skip
            ctx.progress(sent_pages, None, unit="pages", message=_status_line(stats, decision.eta,
                         decision.bandwidth), fields=fields, milestone=True)  # fmt: skip
            if decision.action is Action.ABORT:
                raise ConfplanError(decision.reason, hint=_ABORT_HINTS.get(decision.limit or "", ""))
            if decision.action is Action.THROTTLE:
                throttle = decision.throttle
                source.call("set_throttle", {"fraction": throttle})
            if decision.action is Action.STOP_AND_COPY:
                if reserve and not tables and (tables := self._fill_mac_tables(source, target, len(rounds))):
                    judge = limits  # the rounds after the fill count against the whole max_precopy_rounds
                    continue  # one more round: what the guest wrote while the tables filled
                break
        if tables and len(rounds) < limits.max_rounds and (rounds[-1].pages or rounds[-1].dirty_after):
            # One more short round: the pause then sends only what the guest writes during it, not what it
            # wrote during the fill and the round after (none if that round had nothing to send and nothing
            # was written meanwhile). No MAC update in between (mailbox v4): SAVE and LOAD keep the sealed
            # pages' entries, and the pause MACs the few pages moved as shared since.
            rounds.append(self._round(ctx, source, target, watch))
        ctx.mac_tables = bool(tables)
        return StageResult(
            bytes_shared=sum(r.bytes_shared for r in rounds),
            bytes_sealed=sum(r.bytes_sealed for r in rounds),
            data={"rounds": [r.to_json() for r in rounds], "decision": decision.reason,
                  "limit": decision.limit, "forced": decision.forced, "eta": decision.eta,
                  "bandwidth": decision.bandwidth,
                  "throttle": throttle, "mac_tables": tables},
        )  # fmt: skip

    def _round(
        self, ctx: StageContext, source: VmmHandle, target: VmmHandle, watch: RoundWatch
    ) -> RoundStats:
        """One precopy round on the source, its progress reported while it runs; a stream the target
        refused fails the stage."""
        previous, source.client.on_event = source.client.on_event, watch.on_event
        try:
            params = {"progress_interval": PROGRESS_INTERVAL}
            stats = RoundStats.from_json(source.call("precopy_round", params, timeout=ROUND_TIMEOUT))
        except ConfplanError as err:
            raise common.stream_error(ctx, err) from None
        finally:
            source.client.on_event = previous
        if watch.error is not None:
            raise watch.error
        watch.round_done(stats)
        self._check_target(target)
        return stats

    @staticmethod
    def _fill_mac_tables(source: VmmHandle, target: VmmHandle, rounds: int) -> dict[str, Any]:
        """Both sides fill their MAC tables (the pages moved as shared so far) and shared CRC tables while
        the guest still runs: the source's at once, the target's once it has applied every round (the
        source's needs nothing of the target's). {} if a side has no helper."""
        with ThreadPoolExecutor(max_workers=1) as pool:
            ours = pool.submit(source.call, "mac_table", {"action": "fill"}, timeout=common.DIGEST_TIMEOUT)
            deadline = time.monotonic() + APPLY_TIMEOUT
            while (status := target.call("incoming_status"))["rounds"] < rounds:
                if status["state"] == "failed" or time.monotonic() > deadline:
                    raise ConfplanError(
                        f"the target did not apply the precopy rounds: {status['error'] or status}"
                    )
                time.sleep(0.002)
            there = target.call("mac_table", {"action": "fill"}, timeout=common.DIGEST_TIMEOUT)
            here = ours.result()
        if here["pages"] is None or there["pages"] is None:
            return {}
        return {"fill_pages": [here["pages"], there["pages"]],
                "fill_shared_pages": [here["shared_pages"], there["shared_pages"]],
                "fill_seconds": [here["seconds"], there["seconds"]]}  # fmt: skip

    @staticmethod
    def _check_target(target: VmmHandle) -> None:
        status = target.call("incoming_status", {"wait": 0.0})
        if status["state"] == "failed":
            raise ConfplanError(
                f"the target refused the stream: {status['error']}",
                hint="the source guest keeps running; rerun the apply to migrate again",
            )
