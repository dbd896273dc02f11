"""A model of the source's dirty log and its re-arm (docs/dirty-log.md), checked exhaustively.

The code it stands for: ``vmm/dirty_log.py`` (KVM's log), ``migration/dirty.py`` (the pending set) and the
readers that re-arm pages before they read them (the round's shared pages, ``core/rearm.c`` ahead of the
data loop's SAVEs). Pages are abstract; a page's content is its version (the guest's writes count it up);
the target holds the version each page had when the stream read it. The cast:

- KVM, per page: ``bit`` (logged) and ``wp`` (write-protected). A write to a protected page sets the bit
  and unprotects it; a write to an unprotected one changes nothing (its bit is set already: KVM keeps
  "not protected => logged"). A clear (a re-arm, or a fetch that re-arms) clears the bit and protects.
  With ``initially_set`` the log goes on with every bit set and nothing protected, else the reverse.
- the guest's writer: writes any page at any moment until the pause, at most ``writes`` times;
- the source: ``reset`` (a new stream: everything pending), rounds (take: fetch, the list is the pending
  set; then each lane re-arms pages of its part, in order, any number ahead of its reads, and reads them;
  at the end a fetch adds what was logged to the pending set), at most ``rounds`` precopy rounds, then the
  pause (the writer stops) and the final round; a precopy round may fail part way (at most ``aborts``
  times), after which a new stream starts from nothing on a new target.

The invariant, checked when the final round is done: the target holds every page's last version. And, at
every clear, the tables' rule: a page's log is cleared only while it is in the running round's list and
not yet read (``take_changed_gpas`` then names it). ``Design`` switches the real rules off one at a time.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import NamedTuple


@dataclass(frozen=True)
class Design:
    """What the code does. ``rearm``: the readers clear each page's log just before they read it and a
    fetch leaves the log alone (manual protection); False: every fetch clears and protects what it
    reported (the legacy way, also where KVM offers no manual protection)."""

    rearm: bool = True
    initially_set: bool = True
    read_before_rearm: bool = False  # a reader that re-arms a page only after reading it
    rearm_neighbour: bool = False  # a re-arm that also clears the next page (a whole bitmap word)
    pages: int = 3
    lanes: int = 2  # channels: consecutive parts of the list, each with its own reader
    rounds: int = 2  # precopy rounds at most
    writes: int = 3
    aborts: int = 1


class Lane(NamedTuple):
    start: int  # the lane's part of the list: [start, end)
    end: int
    armed: int  # list[start:armed] re-armed
    read: int  # list[start:read] read


class State(NamedTuple):
    version: tuple[int, ...]  # the source's pages
    target: tuple[int, ...]  # what the target holds (-1: nothing)
    bit: tuple[bool, ...]
    wp: tuple[bool, ...]
    pending: frozenset[int]
    phase: str  # "idle" (between rounds) | "round" | "paused" (final round running) | "done"
    rounds: int  # precopy rounds finished in this stream
    work: tuple[int, ...]  # the running round's list
    lanes: tuple[Lane, ...]
    writes: int  # the writer's budget left
    aborts: int


def initial(d: Design) -> State:
    """The log just turned on and a stream reset: everything pending, the target empty."""
    n = d.pages
    bit, wp = (True,) * n, (False,) * n
    if not (d.rearm and d.initially_set):
        bit, wp = (False,) * n, (True,) * n
    return State((0,) * n, (-1,) * n, bit, wp, frozenset(range(n)), "idle", 0, (), (), d.writes, d.aborts)


def _mark(s: State, pages: Iterable[int], logged: bool) -> State:
    """KVM's two moves: a write fault (logged, writable) or a clear (not logged, protected)."""
    bit, wp = list(s.bit), list(s.wp)
    for p in pages:
        bit[p], wp[p] = logged, not logged
    return s._replace(bit=tuple(bit), wp=tuple(wp))


def _fetch(d: Design, s: State) -> State:
    """KVM_GET_DIRTY_LOG into the pending set; legacy: KVM clears and protects what it reported."""
    logged = frozenset(p for p in range(d.pages) if s.bit[p])
    s = s._replace(pending=s.pending | logged)
    if not d.rearm:
        s = _mark(s, logged, False)
    return s


def _take(d: Design, s: State, phase: str) -> State:
    s = _fetch(d, s)
    work = tuple(sorted(s.pending))
    cuts = [len(work) * k // d.lanes for k in range(d.lanes + 1)]
    lanes = tuple(Lane(a, b, a, a) for a, b in itertools.pairwise(cuts))
    return s._replace(pending=frozenset(), phase=phase, work=work, lanes=lanes)


def _clear(d: Design, s: State, page: int) -> tuple[State, str | None]:
    """A re-arm of ``page``; the second item names a broken rule (a clear of a page the round will not
    read after it)."""
    cleared = [page] + ([(page + 1) % d.pages] if d.rearm_neighbour else [])
    unread = {s.work[i] for lane in s.lanes for i in range(lane.read, lane.end)}
    broken = next((f"cleared page {p}, which the round does not read after it" for p in cleared
                   if p not in unread), None)  # fmt: skip
    return _mark(s, cleared, False), broken


def _lane(s: State, k: int, lane: Lane) -> State:
    return s._replace(lanes=(*s.lanes[:k], lane, *s.lanes[k + 1 :]))


def _reader_steps(d: Design, s: State) -> Iterator[tuple[str, State, str | None]]:
    """Each lane re-arms the next page of its part, or reads the next one re-armed (the real order); the
    mutation reads first and re-arms what it read."""
    for k, lane in enumerate(s.lanes):
        rearm_upto, read_upto = (lane.read, lane.end) if d.read_before_rearm else (lane.end, lane.armed)
        if d.rearm and lane.armed < rearm_upto:
            page = s.work[lane.armed]
            t, broken = _clear(d, _lane(s, k, lane._replace(armed=lane.armed + 1)), page)
            yield f"lane {k} re-arms page {page}", t, broken
        if lane.read < (read_upto if d.rearm else lane.end):
            page = s.work[lane.read]
            target = list(s.target)
            target[page] = s.version[page]
            t = _lane(s._replace(target=tuple(target)), k, lane._replace(read=lane.read + 1))
            yield f"lane {k} reads page {page} (version {s.version[page]})", t, None


def steps(d: Design, s: State) -> Iterator[tuple[str, State, str | None]]:
    """Every move from ``s``: (what, the next state, a broken rule or None)."""
    if s.writes and s.phase in ("idle", "round"):
        for p in range(d.pages):
            version = list(s.version)
            version[p] += 1
            t = s._replace(version=tuple(version), writes=s.writes - 1)
            if s.wp[p]:
                t = _mark(t, [p], True)
            yield f"guest writes page {p}", t, None
    if s.phase == "idle":
        if s.rounds < d.rounds:
            yield "precopy round starts", _take(d, s, "round"), None
        if s.rounds:
            yield "pause: final round starts", _take(d, s, "paused"), None
    if s.phase in ("round", "paused"):
        yield from _reader_steps(d, s)
        if all(lane.read == lane.end and (lane.armed == lane.end or not d.rearm) for lane in s.lanes):
            if s.phase == "round":
                yield "round ends", _fetch(d, s)._replace(phase="idle", rounds=s.rounds + 1), None
            else:
                yield "final round ends", s._replace(phase="done"), None
    if s.phase == "round" and s.aborts:
        yield "round fails; a new stream to a new target", _reset(d, s), None


def _reset(d: Design, s: State) -> State:
    """``DirtyTracker.reset``: everything pending; legacy: the whole log fetched (so cleared) too."""
    s = s._replace(pending=frozenset(range(d.pages)), phase="idle", rounds=0, work=(), lanes=(),
                   target=(-1,) * d.pages, aborts=s.aborts - 1)  # fmt: skip
    if not d.rearm:
        s = _fetch(d, s)._replace(pending=frozenset(range(d.pages)))
    return s


class Result(NamedTuple):
    states: int
    violation: str | None
    trace: tuple[str, ...]


def explore(d: Design, *, rule: bool = True) -> Result:
    """Breadth first over every reachable state; the first broken rule with the moves that reach it.
    ``rule`` False: only the invariant (a stale page at the end) counts, not the clear-only-unread rule."""
    start = initial(d)
    parent: dict[State, tuple[State, str] | None] = {start: None}
    queue = deque([start])
    while queue:
        s = queue.popleft()
        for what, t, broken in steps(d, s):
            if t in parent:
                continue
            parent[t] = (s, what)
            broken = broken if rule else None
            if broken is None and t.phase == "done" and t.target != t.version:
                stale = [p for p in range(d.pages) if t.target[p] != t.version[p]]
                broken = f"the target resumes with a stale page {stale[0]}"
            if broken is not None:
                return Result(len(parent), broken, _trace(parent, t))
            queue.append(t)
    return Result(len(parent), None, ())


def _trace(parent: dict[State, tuple[State, str] | None], s: State) -> tuple[str, ...]:
    out: list[str] = []
    while (link := parent[s]) is not None:
        s, what = link
        out.append(what)
    return tuple(reversed(out))


def designs() -> dict[str, Design]:
    """The real rules and the weakened ones the tests expect the model to catch."""
    real = Design()
    return {
        "real": real,
        "real, without initially-set": replace(real, initially_set=False),
        "legacy (fetch re-arms)": replace(real, rearm=False),
        "re-arm after the read": replace(real, read_before_rearm=True),
        "re-arm of a neighbour": replace(real, rearm_neighbour=True),
    }
