"""The orchestrator's part of the handover (docs/handover.md, "The orchestrator's part"): it only watches the
two VMMs settle the guest between themselves, and when one of them is dead or the link between them is cut,
it relays what ``migration.handover.reconcile`` decides from what each side really holds. Never from the
checkpoint alone, and never an order that is not compare-and-set on the state it was decided from.

A view is read from a VMM's ``handover_state`` (alive), else from a local VMM's record once its liveness
lock is free (dead), else it is unknown. The target is read first, then the source: states only move
forward, so the pair can only show the source ahead, which ``reconcile`` never mistakes for a conflict.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confplan.agent.handle import VmmHandle
from confplan.errors import ConfplanError
from confplan.migration.handover import (
    Order,
    Reach,
    Resolution,
    Role,
    SourceState,
    SourceView,
    TargetState,
    TargetView,
    Verdict,
    reconcile,
)
from confplan.migration.handover_io import HandoverFiles, dead_view
from confplan.plan import Plan
from confplan.stages.base import StageContext
from confplan.stages.modules import _common as common

__all__ = ["SETTLES_ON_RERUN", "GuestLost", "HandoverInDoubt", "Reach", "Verdict", "Views", "read_views",
           "relay", "settle", "source_took_back", "verdict_timeout", "wait_for"]  # fmt: skip
POLL = 0.01  # seconds between looks while the VMMs settle (the pause is running)
# What a failed or interrupted handover stage's hint says: the VMMs may have finished without the apply.
SETTLES_ON_RERUN = (
    "the two VMMs may have finished the handover without this apply, so it first asks both where the guest "
    "runs now, then goes on from there"
)


class GuestLost(ConfplanError):
    """The guest is gone (its only current copy died with a VMM): reported, never replaced silently."""

    exit_code = 6


class HandoverInDoubt(ConfplanError):
    """Neither side may run the guest until the silent one answers (docs/handover.md, states A-C)."""

    exit_code = 7


@dataclass(frozen=True)
class Views:
    source: SourceView
    target: TargetView
    raw: dict[str, dict[str, Any]]  # what each side answered (notes: verify details, resume times)

    def resolution(self) -> Resolution:
        return reconcile(self.source, self.target)


def grace_of(plan: Plan) -> float:
    """How long past max_downtime the source waits for the target's verdict before it takes the guest back."""
    return float(plan.limits.handover_grace)


def verdict_timeout(ctx: StageContext) -> float:
    """The source's deadline from the pause: max_downtime + grace, plus the estimated pause when precopy
    accepted a longer one (on_timeout: force-complete)."""
    timeout = float(ctx.plan.limits.max_downtime) + grace_of(ctx.plan)
    precopy = ctx.records.get("precopy")
    if precopy is not None and precopy.result.get("forced"):
        timeout += 2.0 * float(precopy.result.get("eta") or 1.0)
    return timeout


def _ask(ctx: StageContext, role: str) -> dict[str, Any] | None:
    """``handover_state`` of ``role``'s VMM, or None when it does not answer."""
    try:
        handle: VmmHandle = common.vmm(ctx, role)
        answer: dict[str, Any] = handle.call("handover_state", timeout=5.0)
        return answer
    except ConfplanError:
        ctx.vmms.pop(role, None)
        return None


def _view_doc(ctx: StageContext, role: str) -> dict[str, Any]:
    doc = _ask(ctx, role)
    if doc is not None:
        return doc
    endpoint = ctx.plan.source if role == "source" else ctx.plan.target
    if endpoint.is_local:
        dead = dead_view(HandoverFiles(common.state_dir(ctx.plan), Role(role)))
        if dead is not None:
            return dead
    return {"reach": "unknown", "state": None, "attempt": 0, "guest_id": None, "running": False}


def read_views(ctx: StageContext) -> Views:
    target = _view_doc(ctx, "target")  # first: see the docstring
    source = _view_doc(ctx, "source")
    return Views(_source_view(source), _target_view(target), {"source": source, "target": target})


def _source_view(doc: dict[str, Any]) -> SourceView:
    state = doc.get("state")
    reach = Reach(doc.get("reach", "unknown"))
    if reach is Reach.ALIVE and state is None:
        state = SourceState.PRECOPY.value  # a live source with no handover runs its guest (or was paused
        # by nothing of ours): precopy in the handover's terms
    return SourceView(reach, SourceState(state) if state else None, doc.get("guest_id"),
                      int(doc.get("attempt") or 0), bool(doc.get("running")))  # fmt: skip


def _target_view(doc: dict[str, Any]) -> TargetView:
    state = doc.get("state")
    reach = Reach(doc.get("reach", "unknown"))
    return TargetView(reach, TargetState(state) if state else None, doc.get("guest_id"),
                      int(doc.get("attempt") or 0), bool(doc.get("running")))  # fmt: skip


def relay(ctx: StageContext, resolution: Resolution) -> None:
    """Send the resolution's order (compare and set) to the side it is for; best effort: a VMM that does not
    answer is seen as such at the next look."""
    if resolution.order is Order.NONE or resolution.expect is None:
        return
    role = "target" if resolution.order in (Order.COMMIT_TARGET, Order.RELEASE_TARGET) else "source"
    try:
        order = {"order": resolution.order.value, "expect": resolution.expect.value}
        common.vmm(ctx, role).call("handover_order", order, timeout=10.0)
    except ConfplanError:
        ctx.vmms.pop(role, None)


def settle(ctx: StageContext, done: set[Verdict], *, timeout: float, what: str) -> Views:
    """Watch (and relay for) the VMMs until ``reconcile`` gives one of ``done``; LOST, CONFLICT and a
    lasting IN_DOUBT end it with an error that says what happened and what to do."""
    return wait_for(ctx, lambda views: views.resolution().verdict in done, timeout=timeout, what=what)


def wait_for(ctx: StageContext, want: Callable[[Views], bool], *, timeout: float, what: str) -> Views:
    """Watch until ``want(views)``; relays orders and ends like ``settle`` meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        views = read_views(ctx)
        if want(views):
            return views
        resolution = views.resolution()
        fail_if_final(resolution, views)
        if time.monotonic() > deadline:
            raise HandoverInDoubt(
                f"{what}: not there within {timeout:.1f} s: {resolution.reason}",
                hint="the two VMMs go on settling it by themselves; rerun `confplan apply` to see and act "
                "on what each holds",
            )
        relay(ctx, resolution)
        time.sleep(POLL)


def source_took_back(views: Views) -> bool:
    return views.source.state in (SourceState.ABORTED, SourceState.RECLAIMED)


def fail_if_final(resolution: Resolution, views: Views) -> None:
    if resolution.verdict is Verdict.LOST:
        raise GuestLost(
            f"the guest is lost: {resolution.reason}",
            hint="no copy of it is left to run; nothing was relaunched in its place (`confplan apply "
            "--restart` boots a new guest, if that is what you want)",
        )
    if resolution.verdict is Verdict.CONFLICT:
        raise HandoverInDoubt(
            f"the two sides disagree about the guest: {resolution.reason} (source {views.raw['source']}, "
            f"target {views.raw['target']})",
            hint="an operator must decide which copy is the guest; nothing was changed",
        )
