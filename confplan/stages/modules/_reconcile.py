"""A rerun's first step: ask both VMMs what they hold and settle the checkpoint with it (issue 11: "reruns
reconcile with what really runs"). Decided by ``migration.handover.reconcile`` from the two views
(stages/modules/_handover.py), never from the checkpoint alone:

- the guest runs on the target (handed over): it **is** the guest. The handover's stages are recorded done,
  nothing before them is redone (no target is stopped, no older copy migrated over it); cleanup follows.
- the guest runs on the source: a handover that began is recorded failed (the source took the guest back),
  so the rerun migrates again from start-incoming; the running source is never relaunched.
- the VMMs are still deciding, or need a relayed order: relayed, and watched until they settle.
- the guest is lost (its only current copy died with a VMM, or the source died before the target held a
  verified copy): the rerun stops with exit 6 and says so; it never boots a replacement by itself.
- a side in doubt or a conflict: the rerun stops with exit 7; nothing is changed.
"""

from __future__ import annotations

from collections.abc import Mapping

from confplan.migration.handover import SourceState
from confplan.plan import Plan
from confplan.stages.base import RECONCILERS, Reconciled, StageContext
from confplan.stages.checkpoint import StageRecord, StageStatus
from confplan.stages.modules import _handover as handover

HANDOVER_STAGES = ("stop-and-copy", "verify", "resume-target")
BEFORE_HANDOVER = ("launch-source", "provision-target", "attest-target", "start-incoming", "precopy")
_STARTED = (StageStatus.RUNNING, StageStatus.DONE, StageStatus.FAILED, StageStatus.SKIPPED)
_FINISHED = (StageStatus.DONE, StageStatus.SKIPPED)


def reconcile_run(plan: Plan, records: Mapping[str, StageRecord]) -> Reconciled:
    """What really is, for a rerun of ``plan`` whose run has ``records`` (see the module docstring)."""
    launched = records.get("launch-source")
    if launched is None or launched.status not in _FINISHED:
        return Reconciled()  # no guest exists yet: nothing to protect, the checkpoint decides
    ctx = StageContext(plan, 0, records, lambda stage, progress: None)
    try:
        return _reconcile(ctx, records)
    finally:
        for teardown in ctx.teardowns:  # the connections this look opened
            teardown.action()


def _reconcile(ctx: StageContext, records: Mapping[str, StageRecord]) -> Reconciled:
    views = handover.read_views(ctx)
    resolution = views.resolution()
    if resolution.verdict is handover.Verdict.PENDING:
        timeout = float(ctx.plan.limits.max_downtime) + handover.grace_of(ctx.plan) + 10.0
        views = handover.settle(ctx, _SETTLED, timeout=timeout, what="the rerun's reconcile")
        resolution = views.resolution()
    handover.fail_if_final(resolution, views)
    if resolution.verdict is handover.Verdict.IN_DOUBT:
        raise handover.HandoverInDoubt(
            f"cannot tell where the guest may run: {resolution.reason}",
            hint="nothing was changed; once the silent VMM (or its agent) answers again, rerun `confplan "
            "apply`; docs/handover.md ('When neither runs') says when this happens",
        )
    note = f"{resolution.verdict.value}: {resolution.reason}"
    if resolution.verdict is handover.Verdict.RUNS_ON_TARGET:
        return _on_target(records, views, note)
    return _on_source(records, views, note)


_SETTLED = {handover.Verdict.RUNS_ON_TARGET, handover.Verdict.RUNS_ON_SOURCE, handover.Verdict.LOST,
            handover.Verdict.CONFLICT, handover.Verdict.IN_DOUBT}  # fmt: skip


def _on_target(records: Mapping[str, StageRecord], views: handover.Views, note: str) -> Reconciled:
    """Handed over: the handover's stages are done, whatever the checkpoint says; nothing before them is
    redone (their products are the guest that runs on the target now)."""
    found = Reconciled(notes=[f"the guest runs on the target ({note})"])
    target = views.raw["target"]
    for stage in HANDOVER_STAGES:
        record = records.get(stage)
        if record is None or record.status not in _FINISHED:
            found.done[stage] = _reconciled_result(stage, target, note)
    found.still_valid.update({stage: True for stage in (*BEFORE_HANDOVER, *HANDOVER_STAGES)})
    return found


def _on_source(records: Mapping[str, StageRecord], views: handover.Views, note: str) -> Reconciled:
    """The source runs the guest (no handover, or the handover gave it back): a handover that began is
    over and failed; the running source is kept (never relaunched); the target gets a new attempt."""
    found = Reconciled(notes=[f"the guest runs on the source ({note})"])
    found.still_valid["launch-source"] = True
    began = [stage for stage in HANDOVER_STAGES if (r := records.get(stage)) and r.status in _STARTED]
    took_back = views.source.state in (SourceState.ABORTED, SourceState.RECLAIMED)
    if began or took_back:
        last = began[-1] if began else "stop-and-copy"
        why = views.raw["target"].get("refused") or views.raw["source"].get("target_error") or note
        found.failed[last] = f"the handover ended with the guest on the source: {why}"
    return found


def _reconciled_result(stage: str, target: dict[str, object], note: str) -> dict[str, object]:
    """The record of a handover stage the VMMs finished while no orchestrator watched."""
    result: dict[str, object] = {"reconciled": note}
    if stage == "resume-target":
        paused, resumed = target.get("paused_wall"), target.get("resumed_wall")
        timed = isinstance(paused, float) and isinstance(resumed, float)
        downtime = float(resumed) - float(paused) if timed else None  # type: ignore[arg-type]
        result.update({"downtime_seconds": downtime, "clock_gap_seconds": target.get("clock_gap_seconds"),
                       "ledger_checked_pages": None, "target_pid": target.get("pid")})  # fmt: skip
    if stage == "verify":
        check = target.get("verify")
        result.update(check if isinstance(check, dict) else {})
    return result


RECONCILERS.append(reconcile_run)
