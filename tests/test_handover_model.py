"""An exhaustive model check of the handover (docs/handover.md), in the spirit of TLA+: every reachable
state of the source VMM (S), the target VMM (T) and the orchestrator (O) is enumerated, with the real
state machines of ``confplan.migration.handover`` (not a copy), two channels of in-flight messages (which
may be delayed, reordered, duplicated or lost), the link (broken, re-dialled, partitioned), the durable
records, each side's guest (running, paused, gone), and the history that matters (did the source's copy
run after the pause, did the target's). Every action of a step is a transition of its own, so a crash can
fall between writing a record and what it licenses.

Safety, in every state, with both VMMs crashing and O dying any number of times: never both copies
running; never both copies run after the pause (which covers fork and rollback); every resume follows its
own durable record and happens once; records only move forward; O never stops or discards a running guest.
Liveness, in every quiescent state (no step left but waiting) with at most one VMM crash: one copy runs,
or the guest is lost in an unavoidable way, or the state is one of the documented in-doubt states; and
from every such state (at most one crash) a quiescent state can be reached, so nothing livelocks.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import pytest

from confplan.migration import handover as h
from confplan.migration.handover import (
    Action,
    ArmTimer,
    Command,
    Do,
    Input,
    Msg,
    Order,
    Reach,
    Resolution,
    Send,
    SourceHandover,
    SourceState,
    SourceView,
    TargetHandover,
    TargetState,
    TargetView,
    Verdict,
    WriteRecord,
    reconcile,
    record_may_follow,
)

S_TO_T = frozenset({Msg.DONE, Msg.COMMIT, Msg.ABORT})
RAN = (SourceState.ABORTED, SourceState.RECLAIMED)
SETTLED = (SourceState.HANDED_OVER, *RAN)


class Proc(enum.IntEnum):  # IntEnum: hashed in C, and the model hashes states millions of times
    ALIVE = 1
    DEAD = 2  # crashed: the copy went with the process
    STOPPED = 3  # the source, stopped by O after the handover
    GHOST = 4  # the target's agent restarted after its VMM died: answers from the record, no guest


class Guest(enum.IntEnum):
    RUNNING = 1
    PAUSED = 2
    GONE = 3


class OProc(enum.IntEnum):
    ALIVE = 1  # a crash that O comes back from is a reset of its memory (o_seen, o_todo)
    GONE = 2  # never comes back


class World(NamedTuple):
    s: SourceState
    s_link: bool
    s_proc: Proc
    s_todo: tuple[Action, ...]
    s_rec: SourceState | None
    s_guest: Guest
    s_ran: bool  # the source's copy ran after the pause
    s_readable: bool  # a dead source's record can be read (local host, or its agent restarted)
    t: TargetState
    t_link: bool
    t_proc: Proc
    t_todo: tuple[Action, ...]
    t_rec: TargetState | None
    t_guest: Guest
    t_ran: bool
    t_verified: bool  # the target ever held a verified copy
    st: frozenset[Msg]
    ts: frozenset[Msg]
    link: bool
    cut: bool  # partitioned: re-dials fail
    o: OProc
    o_seen: tuple[Reach, TargetState | None, str | None, int, bool] | None  # a TargetView's fields
    o_todo: Command | None
    crashes: int


UNREACHED = (Reach.UNKNOWN, None, None, 0, False)  # O's reading of a VMM it cannot reach


class Violation(AssertionError):
    """A property fails; ``at``: the state it fails in, when not the one being expanded."""

    def __init__(self, message: str, at: int | None = None) -> None:
        super().__init__(message)
        self.at = at


@dataclass
class Model:
    """The composed system. ``remote``: a dead VMM's record is read only once its host's agent restarts
    (which may never happen), and the target's agent then answers the source's re-dial; else (local) O
    reads it at once. ``duplicates``: a message may also be delivered and stay in flight. ``unreachable``:
    O may fail to reach a live VMM (and must then not take it for dead). The last three
    fields exist to check the checker: a broken variant of a machine or of ``reconcile`` must fail it
    (``licenses=False`` leaves out the per-action record check, so the global invariants must catch it)."""

    remote: bool = False
    duplicates: bool = True
    unreachable: bool = False
    max_crashes: int = 2
    source_cls: type[SourceHandover] = SourceHandover
    target_cls: type[TargetHandover] = TargetHandover
    decide: Callable[[SourceView, TargetView], Resolution] = reconcile
    licenses: bool = True

    def initial(self) -> World:
        return World(
            SourceState.PRECOPY, True, Proc.ALIVE, (), None, Guest.RUNNING, False, not self.remote,
            TargetState.RECEIVING, True, Proc.ALIVE, (), None, Guest.PAUSED, False, False,
            frozenset(), frozenset(), True, False, OProc.ALIVE, None, None, 0,
        )  # fmt: skip

    def canonical(self, w: World) -> World:
        """One state for states that differ only where it cannot matter: a cut link matters only to a
        source that may still re-dial (alive and not settled)."""
        if w.cut and (w.s_proc is not Proc.ALIVE or w.s in SETTLED):
            return w._replace(cut=False)
        return w

    # -- the machines ----------------------------------------------------------------------------------
    def _src(self, w: World) -> SourceHandover:
        return self.source_cls(verdict_timeout=0.05, retry_interval=0.01, state=w.s, link_up=w.s_link)

    def _feed_s(self, w: World, event: h.Event) -> World:
        m = self._src(w)
        todo = [a for a in m.step(event) if not isinstance(a, ArmTimer)]  # timers: see _source_events
        return w._replace(s=m.state, s_link=m.link_up, s_todo=w.s_todo + tuple(todo))

    def _feed_t(self, w: World, event: h.Event) -> World:
        m = self.target_cls(w.t, w.t_link)
        todo = m.step(event)
        return w._replace(t=m.state, t_link=m.link_up, t_todo=w.t_todo + tuple(todo))

    def t_reachable(self, w: World) -> bool:
        """Does something answer on the target's stream address?"""
        return w.t_proc in (Proc.ALIVE, Proc.GHOST)

    # -- actions ---------------------------------------------------------------------------------------
    def _run_s(self, w: World) -> World:
        action, w = w.s_todo[0], w._replace(s_todo=w.s_todo[1:])
        if isinstance(action, WriteRecord):
            if not isinstance(action.state, SourceState) or not record_may_follow(w.s_rec, action.state):
                raise Violation(f"source record {w.s_rec} -> {action.state}")
            return w._replace(s_rec=action.state)
        if isinstance(action, Send):
            ok = w.link and self.t_reachable(w) and action.msg in S_TO_T
            return w._replace(st=w.st | {action.msg}) if ok else w
        if action is Do.PAUSE_GUEST:
            return w._replace(s_guest=Guest.PAUSED)
        if action is Do.RESUME_GUEST:
            if self.licenses and (w.s_rec not in RAN or w.s_ran or w.s_guest is not Guest.PAUSED):
                raise Violation(f"source resumed with record {w.s_rec}, ran before: {w.s_ran}")
            return w._replace(s_guest=Guest.RUNNING, s_ran=True)
        if action is Do.REDIAL:
            return self._redial(w)
        if action is Do.EXIT:
            if w.s_guest is Guest.RUNNING:
                raise Violation("the source VMM exited while its guest ran")
            return w._replace(s_proc=Proc.STOPPED, s_guest=Guest.GONE, s_todo=(), ts=frozenset(), link=False)
        return w  # ArmTimer: the model fires timers whenever the machine would listen

    def _run_t(self, w: World) -> World:
        action, w = w.t_todo[0], w._replace(t_todo=w.t_todo[1:])
        if isinstance(action, WriteRecord):
            if not isinstance(action.state, TargetState) or not record_may_follow(w.t_rec, action.state):
                raise Violation(f"target record {w.t_rec} -> {action.state}")
            return w._replace(t_rec=action.state)
        if isinstance(action, Send):
            ok = w.link and w.s_proc is Proc.ALIVE and action.msg not in S_TO_T
            return w._replace(ts=w.ts | {action.msg}) if ok else w
        if action is Do.RESUME_GUEST:
            licensed = w.t_rec is TargetState.RESUMED and not w.t_ran and w.t_proc is Proc.ALIVE
            if self.licenses and not licensed:
                raise Violation(f"target resumed with record {w.t_rec}, ran before: {w.t_ran}")
            return w._replace(t_guest=Guest.RUNNING, t_ran=True)
        if action is Do.DISCARD_GUEST:
            if w.t_guest is Guest.RUNNING:
                raise Violation("the target discarded a running guest")
            return w._replace(t_guest=Guest.GONE)
        return w  # VERIFY: the model offers VERIFY_OK and VERIFY_FAIL next

    def _futile_retry(self, w: World) -> bool:
        """A retry whose every action changes nothing (a re-send of what is in flight, a re-dial that
        fails) is waiting, not progress: without this, waiting forever would look like a livelock."""
        after = self._feed_s(w, Input.RETRY)
        while after.s_todo and after.s_proc is Proc.ALIVE:
            after = self._run_s(after)
        return after == w

    def _redial(self, w: World) -> World:
        if w.link or w.cut or not self.t_reachable(w):
            return w  # fails (or is not needed); the source retries on its timer
        w = w._replace(link=True)  # what the old connection still carries may yet arrive
        if w.t_link:  # the target sees the old connection end before the new one
            w = self._feed_t(w, Input.LINK_DOWN)
        return self._feed_s(self._feed_t(w, Input.LINK_UP), Input.LINK_UP)

    # -- what O sees -----------------------------------------------------------------------------------
    def source_view(self, w: World) -> SourceView:
        if w.s_proc is Proc.ALIVE:
            return SourceView(Reach.ALIVE, w.s, "g", 1, w.s_guest is Guest.RUNNING)
        return SourceView(Reach.DEAD, w.s_rec, "g", 1) if w.s_readable else SourceView(Reach.UNKNOWN)

    def target_view(self, w: World) -> TargetView:
        if w.t_proc is Proc.ALIVE:
            return TargetView(Reach.ALIVE, w.t, "g", 1, w.t_guest is Guest.RUNNING)
        if w.t_proc is Proc.GHOST or not self.remote:
            return TargetView(Reach.DEAD, w.t_rec, "g", 1)
        return TargetView(Reach.UNKNOWN)

    # -- transitions -----------------------------------------------------------------------------------
    def progress(self, w: World) -> Iterator[tuple[str, World]]:
        """Steps that happen unless something fails: fairness says each enabled one eventually runs."""
        s_up, t_up = w.s_proc is Proc.ALIVE, self.t_reachable(w)
        # A step's actions touch only their own VMM (its record, its guest) or append to a channel, whose
        # delivery may be delayed anyway; nothing else reads them halfway (O asks between steps). So they
        # run before any other party's step (partial-order reduction), while a crash may still fall
        # between any two of them.
        if s_up and w.s_todo:
            yield f"S does {w.s_todo[0]}", self._run_s(w)
            return
        if t_up and w.t_todo:
            yield f"T does {w.t_todo[0]}", self._run_t(w)
            return
        if s_up:
            yield from self._source_events(w)
        if t_up:
            yield from self._target_events(w)
        if w.o is OProc.ALIVE:
            yield from self._orchestrator(w)

    def _source_events(self, w: World) -> Iterator[tuple[str, World]]:
        for msg in w.ts:
            yield f"S gets {msg}", self._feed_s(w._replace(ts=w.ts - {msg}), msg)
        if w.s_link and not w.link:
            yield "S sees the link down", self._feed_s(w, Input.LINK_DOWN)
        if w.s is SourceState.AWAIT_VERDICT:
            yield "S deadline", self._feed_s(w, Input.DEADLINE)
        if w.s is SourceState.COMMITTED and not self._futile_retry(w):
            yield "S retry", self._feed_s(w, Input.RETRY)

    def _target_events(self, w: World) -> Iterator[tuple[str, World]]:
        for msg in w.st:
            yield f"T gets {msg}", self._feed_t(w._replace(st=w.st - {msg}), msg)
        if w.t_link and not w.link:
            yield "T sees the link down", self._feed_t(w, Input.LINK_DOWN)
        if w.t is TargetState.VERIFYING:
            yield "T verify ok", self._feed_t(w, Input.VERIFY_OK)._replace(t_verified=True)
            yield "T verify fails", self._feed_t(w, Input.VERIFY_FAIL)

    def _orchestrator(self, w: World) -> Iterator[tuple[str, World]]:
        if w.s_proc is Proc.ALIVE and w.s is SourceState.PRECOPY and not w.s_todo:
            yield "O stop_and_copy", self._feed_s(w, Input.START)
        # A VMM answers between steps (its RPC and its steps share one lock), never halfway through one.
        view = self.target_view(w)
        seen = (view.reach, view.state, view.guest_id, view.attempt, view.running)
        # O reads the target first, then the source (docs/handover.md): the views may be apart in time.
        if w.o_seen != seen and not w.t_todo:
            yield "O reads T", w._replace(o_seen=seen)
        if w.o_seen is not None and w.o_todo is None and not w.s_todo:
            command = self.decide(self.source_view(w), TargetView(*w.o_seen)).command()
            if command is not None:
                yield f"O decides {command.order}", w._replace(o_todo=command)
        if w.o_todo is not None:
            yield from self._send_order(w, w.o_todo)

    def _send_order(self, w: World, command: Command) -> Iterator[tuple[str, World]]:
        done = w._replace(o_todo=None)
        to_source = command.order in (Order.ABORT_SOURCE, Order.RECLAIM_SOURCE, Order.STOP_SOURCE)
        if to_source and w.s_proc is Proc.ALIVE:
            if not w.s_todo:
                yield f"O orders {command.order}", self._feed_s(done, command)
        elif not to_source and w.t_proc is Proc.ALIVE:
            if not w.t_todo:
                yield f"O orders {command.order}", self._feed_t(done, command)
        else:
            yield f"O's {command.order} finds nobody", done

    def faults(self, w: World) -> Iterator[tuple[str, World]]:
        """What may go wrong, at any point: crashes, lost, duplicated or cut messages, partitions."""
        if w.crashes < self.max_crashes and w.s_proc is Proc.ALIVE:
            yield "S crashes", w._replace(s_proc=Proc.DEAD, s_guest=Guest.GONE, s_todo=(), ts=frozenset(),
                                          link=False, crashes=w.crashes + 1)  # fmt: skip
        if w.crashes < self.max_crashes and w.t_proc is Proc.ALIVE:
            yield "T crashes", w._replace(t_proc=Proc.DEAD, t_guest=Guest.GONE, t_todo=(), st=frozenset(),
                                          link=False, crashes=w.crashes + 1)  # fmt: skip
        if self.remote and w.t_proc is Proc.DEAD:
            ghost, todo = self.target_cls.restarted(w.t_rec)
            yield "T's agent restarts", w._replace(t_proc=Proc.GHOST, t=ghost.state, t_link=ghost.link_up,
                                                   t_todo=tuple(todo))  # fmt: skip
        if w.s_proc is not Proc.ALIVE and not w.s_readable:
            yield "S's agent restarts", w._replace(s_readable=True)
        if w.o is OProc.ALIVE and self.unreachable:  # O cannot reach a VMM that lives: UNKNOWN, not DEAD
            if w.t_proc is Proc.ALIVE and w.o_seen != UNREACHED:
                yield "O cannot reach T", w._replace(o_seen=UNREACHED)
            if w.s_proc is Proc.ALIVE and w.o_seen is not None and w.o_todo is None:
                command = self.decide(SourceView(Reach.UNKNOWN), TargetView(*w.o_seen)).command()
                if command is not None:
                    yield f"O cannot reach S, decides {command.order}", w._replace(o_todo=command)
        if w.o is OProc.ALIVE:
            if w.o_seen is not None or w.o_todo is not None:
                yield "O dies and reruns", w._replace(o_seen=None, o_todo=None)
            yield "O dies for good", w._replace(o=OProc.GONE, o_seen=None, o_todo=None)
        # The link breaks, and re-dials fail until it heals (a partition; healing at once is a plain break).
        if w.cut:
            yield "link heals", w._replace(cut=False)
        else:
            yield "link breaks", w._replace(cut=True, link=False)
        for msg in w.st:
            yield f"{msg} to T lost", w._replace(st=w.st - {msg})
            if self.duplicates and self.t_reachable(w) and not w.t_todo:
                yield f"T gets {msg} twice", self._feed_t(w, msg)
        for msg in w.ts:
            yield f"{msg} to S lost", w._replace(ts=w.ts - {msg})
            if self.duplicates and w.s_proc is Proc.ALIVE and not w.s_todo:
                yield f"S gets {msg} twice", self._feed_s(w, msg)


# -- the checker -------------------------------------------------------------------------------------------
def check_safety(w: World) -> None:
    if w.s_guest is Guest.RUNNING and w.t_guest is Guest.RUNNING:
        raise Violation("both copies run")
    if w.s_ran and w.t_ran:
        raise Violation("both copies ran after the pause (a fork, or a rollback)")


class Outcome(enum.Enum):
    ON_SOURCE = "on source"
    ON_TARGET = "on target"
    LOST = "lost (unavoidable)"
    IN_DOUBT = "in doubt (documented)"


def classify(model: Model, w: World, cases: dict[str, int]) -> Outcome:
    """A quiescent state with at most one VMM crash, judged; a Violation if it is none of the allowed.
    ``cases`` counts the in-doubt states by case."""
    if w.s_guest is Guest.RUNNING:
        outcome = Outcome.ON_SOURCE
    elif w.t_guest is Guest.RUNNING:
        outcome = Outcome.ON_TARGET
    elif (w.s_proc is Proc.DEAD and (not w.t_verified or w.s_rec in RAN)) or (
        w.t_proc in (Proc.DEAD, Proc.GHOST) and w.t_rec is TargetState.RESUMED
    ):
        outcome = Outcome.LOST  # the copy that was (or may have been) running died, or no whole copy was left
    elif case := in_doubt(model, w):
        outcome = Outcome.IN_DOUBT
        cases[case] = cases.get(case, 0) + 1
    else:
        raise Violation("quiescent with no copy running, nothing lost and not a documented in-doubt state")
    if w.o is OProc.ALIVE:  # O, when there, reports what really runs, a loss as a loss, a doubt as a doubt
        verdict = model.decide(model.source_view(w), model.target_view(w)).verdict
        unread = model.source_view(w).reach is Reach.UNKNOWN or model.target_view(w).reach is Reach.UNKNOWN
        if verdict is not REPORTED[outcome] and not (unread and verdict is Verdict.IN_DOUBT):
            raise Violation(f"O says {verdict} where the guest is {outcome.value}")
    return outcome


REPORTED = {Outcome.ON_SOURCE: Verdict.RUNS_ON_SOURCE, Outcome.ON_TARGET: Verdict.RUNS_ON_TARGET,
            Outcome.LOST: Verdict.LOST, Outcome.IN_DOUBT: Verdict.IN_DOUBT}  # fmt: skip


def in_doubt(model: Model, w: World) -> str | None:
    """Which documented in-doubt state this is (docs/handover.md, "When neither runs"), if any: no copy
    runs, none is lost, and only contact with a silent party can tell which copy may run."""
    t_waits = w.t_proc is Proc.ALIVE and w.t is TargetState.VERIFIED
    s_waits = w.s_proc is Proc.ALIVE and w.s is SourceState.COMMITTED
    o_gone = w.o is OProc.GONE
    ghost = w.t_proc is Proc.GHOST
    if t_waits and w.s_proc is Proc.DEAD and (o_gone or not w.s_readable):
        return "A"  # the source died paused; only O, reading its record, can tell T it never resumed
    if t_waits and s_waits and w.cut and o_gone:
        return "B"  # the link is cut right after COMMIT, and there is no O to relay it
    # C: the target died in the commit window (no RESUMED), and nobody who could read its record is
    # there: O (local: the file; remote: once the target's agent restarted), or that agent on a re-dial.
    t_dead = w.t_proc in (Proc.DEAD, Proc.GHOST) and w.t_rec is not TargetState.RESUMED
    o_cannot = o_gone or (model.remote and not ghost)
    s_cannot = not ghost or w.cut
    return "C" if s_waits and t_dead and o_cannot and s_cannot else None


@dataclass
class Report:
    states: int = 0
    edges: int = 0
    quiescent: dict[Outcome, int] = field(default_factory=dict)
    in_doubt: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


class Graph:
    """Every state found, by number, with how it was first reached (for traces) and the progress edges
    reversed (for the livelock check)."""

    def __init__(self, start: World) -> None:
        self.ids: dict[World, int] = {start: 0}
        self.states, self.parent, self.label = [start], [-1], ["start"]
        self.back: list[list[int]] = [[]]
        self.quiescent: list[int] = []

    def add(self, w: World, parent: int, label: str) -> tuple[int, bool]:
        known = self.ids.get(w)
        if known is not None:
            return known, False
        self.ids[w] = n = len(self.states)
        self.states.append(w)
        self.parent.append(parent)
        self.label.append(label)
        self.back.append([])
        return n, True

    def trace(self, n: int) -> str:
        steps: list[str] = []
        while n >= 0:
            w = self.states[n]
            steps.append(f"  {self.label[n]:34} -> S {w.s} {w.s_guest.name} rec={w.s_rec} | T {w.t} "
                         f"{w.t_guest.name} rec={w.t_rec} | link={w.link} cut={w.cut} O={w.o.name}")
            n = self.parent[n]
        return "\n".join(reversed(steps))


def explore(model: Model) -> Report:
    """BFS over every reachable state; raises a Violation with the trace that leads to it."""
    started = time.monotonic()
    graph, report = Graph(model.initial()), Report()
    queue = deque([0])
    while queue:
        n = queue.popleft()
        try:
            queue.extend(_expand(model, graph, n, report))
        except Violation as err:
            raise Violation(f"{err}\n{graph.trace(n if err.at is None else err.at)}") from None
    _no_livelock(graph)
    report.states, report.seconds = len(graph.states), time.monotonic() - started
    return report


def _expand(model: Model, graph: Graph, n: int, report: Report) -> list[int]:
    """The new states one step from state ``n``; judges ``n`` if nothing but faults can move it."""
    w, moved, new_states = graph.states[n], False, []
    for is_progress, steps in ((True, model.progress(w)), (False, model.faults(w))):
        for label, found in steps:
            report.edges += 1
            nxt = model.canonical(found)
            if nxt == w:
                continue
            m, new = graph.add(nxt, n, label)
            if is_progress:
                moved = True
                graph.back[m].append(n)
            if new:
                new_states.append(m)
                try:
                    check_safety(nxt)
                except Violation as err:
                    raise Violation(str(err), at=m) from None
    if not moved and w.crashes <= 1:
        outcome = classify(model, w, report.in_doubt)
        report.quiescent[outcome] = report.quiescent.get(outcome, 0) + 1
        graph.quiescent.append(n)
    return new_states


def _no_livelock(graph: Graph) -> None:
    """From every state with at most one crash, progress alone can reach a quiescent state."""
    reached, queue = set(graph.quiescent), deque(graph.quiescent)
    while queue:
        for before in graph.back[queue.popleft()]:
            if before not in reached:
                reached.add(before)
                queue.append(before)
    stuck = [n for n, w in enumerate(graph.states) if w.crashes <= 1 and n not in reached]
    if stuck:
        raise Violation(f"{len(stuck)} states can never settle, e.g.\n{graph.trace(stuck[0])}")


# -- the checks --------------------------------------------------------------------------------------------
def _summary(name: str, report: Report) -> str:
    found = ", ".join(f"{k.value} {v}" for k, v in report.quiescent.items())
    cases = ", ".join(f"{k} {v}" for k, v in sorted(report.in_doubt.items()))
    return f"\nhandover model, {name}: {report.states} states, {report.edges} transitions, " \
           f"{report.seconds:.1f} s; quiescent: {found} (in doubt by case: {cases})"  # fmt: skip


@pytest.mark.parametrize(
    # Each feature multiplies the states; the two configurations share them out to stay fast.
    "model", [Model(), Model(remote=True, duplicates=False, unreachable=True)], ids=["local", "remote"]
)
def test_no_crash_or_lost_message_forks_freezes_or_rolls_back_the_guest(model: Model) -> None:
    report = explore(model)
    print(_summary("remote" if model.remote else "local", report))
    assert report.states > 20_000  # the model is the protocol's, not a toy: it must stay this big
    assert all(report.quiescent.get(outcome) for outcome in Outcome)
    assert set(report.in_doubt) == {"A", "B", "C"}


def test_the_committed_record_may_come_before_or_after_the_commit() -> None:
    """Whether COMMITTED is on disk before COMMIT leaves is not load-bearing (docs/handover.md)."""

    class RecordFirst(SourceHandover):
        def step(self, event: h.Event) -> list[Action]:
            actions = super().step(event)
            if actions[:2] == [Send(Msg.COMMIT), WriteRecord(SourceState.COMMITTED)]:
                actions[:2] = actions[1::-1]
            return actions

    explore(Model(duplicates=False, source_cls=RecordFirst))


class ResumesThenRecords(SourceHandover):
    """Broken: runs the guest again before ABORTED is on disk."""

    def step(self, event: h.Event) -> list[Action]:
        actions = super().step(event)
        return sorted(actions, key=lambda a: a is not Do.RESUME_GUEST)


class TargetResumesThenRecords(TargetHandover):
    """Broken: runs the guest before RESUMED is on disk."""

    def step(self, event: h.Event) -> list[Action]:
        actions = super().step(event)
        return sorted(actions, key=lambda a: a is not Do.RESUME_GUEST)


class ImpatientTarget(TargetHandover):
    """Broken: a verified target that loses the source resumes on its own."""

    def step(self, event: h.Event) -> list[Action]:
        if event is Input.LINK_DOWN and self.state is TargetState.VERIFIED:
            self.link_up = False
            return self._resume()
        return super().step(event)


class BlindTarget(TargetHandover):
    """Broken: applies the orchestrator's orders whatever state it is in now (no compare and set)."""

    def step(self, event: h.Event) -> list[Action]:
        if isinstance(event, Command):
            event = Command(event.order, self.state)
        return super().step(event)


class ReleasesOnDrop(TargetHandover):
    """Broken: a target holding the whole copy gives it up when the link drops (the source may have died
    paused, and this copy is then the guest)."""

    def step(self, event: h.Event) -> list[Action]:
        if event is Input.LINK_DOWN and self.state in (TargetState.VERIFYING, TargetState.VERIFIED):
            self.link_up = False
            return self._release()
        return super().step(event)


def never_relays(source: SourceView, target: TargetView) -> Resolution:
    """Broken: O does not relay the COMMIT of a live source (a cut link then freezes the guest)."""
    resolution = reconcile(source, target)
    if resolution.order is Order.COMMIT_TARGET and source.reach is Reach.ALIVE:
        return Resolution(Verdict.PENDING, "broken")
    return resolution


def reclaims_on_silence(source: SourceView, target: TargetView) -> Resolution:
    """Broken: takes a target that does not answer for dead."""
    silent = target.reach is Reach.UNKNOWN
    if silent and source.reach is Reach.ALIVE and source.state is SourceState.COMMITTED:
        return Resolution(Verdict.PENDING, "broken", Order.RECLAIM_SOURCE, SourceState.COMMITTED)
    return reconcile(source, target)


def commits_any_dead_source(source: SourceView, target: TargetView) -> Resolution:
    """Broken: the proposal's rule without the record: a dead source -> the target commits."""
    if source.reach is Reach.DEAD and target.reach is Reach.ALIVE and target.state is TargetState.VERIFIED:
        return Resolution(Verdict.PENDING, "broken", Order.COMMIT_TARGET, TargetState.VERIFIED)
    return reconcile(source, target)


@pytest.mark.parametrize(
    ("model", "finds"),
    [
        (Model(duplicates=False, source_cls=ResumesThenRecords, licenses=False), "both copies ran"),
        (Model(duplicates=False, target_cls=TargetResumesThenRecords, licenses=False), "both copies ran"),
        (Model(duplicates=False, target_cls=ImpatientTarget), "both copies r"),
        (Model(duplicates=False, target_cls=BlindTarget), "quiescent with no copy running"),
        (Model(duplicates=False, decide=commits_any_dead_source), "both copies ran"),
        (Model(duplicates=False, target_cls=ReleasesOnDrop), "quiescent with no copy running"),
        (Model(duplicates=False, decide=never_relays), "quiescent with no copy running"),
        (Model(remote=True, duplicates=False, unreachable=True, decide=reclaims_on_silence), "both copies r"),
    ],
    ids=["source-resumes-first", "target-resumes-first", "impatient-target", "no-compare-and-set",
         "commit-without-record", "release-on-drop", "no-relay", "silence-is-death"],
)  # fmt: skip
def test_the_model_catches_a_broken_protocol(model: Model, finds: str) -> None:
    with pytest.raises(Violation, match=finds) as caught:
        explore(model)
    print(f"\n{caught.value}")
