"""The handover: how the source and the target VMM end a migration between themselves (docs/handover.md).

Once the orchestrator has asked the source to stop and copy, the two VMMs finish or abort on their own
stream, so the orchestrator's death cannot leave the guest paused on both sides. Everything here is pure:
no I/O, no threads, no clock. A VMM feeds events (a peer's message, the link going down or up, a timer, a
command of the orchestrator) into ``step`` and carries out the returned actions **in order**; a
``WriteRecord`` must be on disk (``save_record``) before the next action runs, because the next action
is what the record licenses. The rules that make one copy, and only one, run the guest:

- a copy runs after the pause only with a durable record saying so, written first: the source's
  ABORTED or RECLAIMED, the target's RESUMED; a VMM's death takes its copy with it, so such a record is
  how anyone else learns that this copy may have run;
- the target resumes only on COMMIT, which the source sends (or the orchestrator relays, when the source
  is committed or dead without such a record); the source resumes only before it committed, or once the
  target has promised never to resume (RELEASED) or is dead without RESUMED.

``reconcile`` is the orchestrator's decision (on a rerun, or when a VMM died) from what each side says it
holds, never from the checkpoint alone. ``tests/test_handover_model.py`` checks all of it exhaustively.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from pathlib import Path

from confplan.errors import ConfplanError
from confplan.statefile import pack_state, unpack_state, write_private

RECORD_MAGIC = b"CPHANDOV"
RECORD_VERSION = 1


class Role(enum.StrEnum):
    SOURCE = "source"
    TARGET = "target"


class SourceState(enum.StrEnum):
    PRECOPY = "precopy"  # guest running, handover not started
    AWAIT_VERDICT = "await-verdict"  # guest paused, DONE sent, the target verifies; deadline armed
    COMMITTED = "committed"  # COMMIT sent: never resumes on its own from here (in doubt until answered)
    HANDED_OVER = "handed-over"  # the target resumed; this copy never runs again
    ABORTED = "aborted"  # gave up before committing; runs the guest again (durable before the resume)
    RECLAIMED = "reclaimed"  # the target released (or died) without resuming; runs it again (durable first)


class TargetState(enum.StrEnum):
    RECEIVING = "receiving"  # the stream is coming in; no DONE yet
    VERIFYING = "verifying"  # DONE arrived; the helpers check the manifest and digests
    VERIFIED = "verified"  # holds a verified copy, paused; resumes only on COMMIT
    RESUMED = "resumed"  # durable before the vCPUs run: the guest is here now
    REFUSED = "refused"  # the check failed; never resumes
    RELEASED = "released"  # aborted, released or the stream broke before DONE; never resumes


State = SourceState | TargetState


class Msg(enum.StrEnum):
    """Messages on the stream. DONE stands for the pause's frames: final pages, vCPU and device state,
    the encryption bitmap, MANIFEST (the source's digests), DONE."""

    DONE = "done"  # S->T
    COMMIT = "commit"  # S->T: resume; re-sent until answered, so it also asks "what is your state?"
    ABORT = "abort"  # S->T: the source runs the guest again; release
    VERIFIED = "verified"  # T->S; this and the three below are also T's answer to COMMIT
    REFUSED = "refused"
    RESUMED = "resumed"
    RELEASED = "released"


class Input(enum.StrEnum):
    """Events a VMM raises itself."""

    START = "start"  # the orchestrator's stop_and_copy (source)
    LINK_DOWN = "link-down"  # the stream broke, or the peer's process died
    LINK_UP = "link-up"  # the source re-dialled the target
    DEADLINE = "deadline"  # no verdict within max_downtime + grace of the pause (source)
    RETRY = "retry"  # periodic while committed: re-send COMMIT or re-dial (source)
    VERIFY_OK = "verify-ok"  # the helpers' check passed (target)
    VERIFY_FAIL = "verify-fail"


class Order(enum.StrEnum):
    """What the orchestrator may tell a VMM (``reconcile`` says which)."""

    NONE = "none"
    COMMIT_TARGET = "commit-target"
    RELEASE_TARGET = "release-target"
    ABORT_SOURCE = "abort-source"
    RECLAIM_SOURCE = "reclaim-source"
    STOP_SOURCE = "stop-source"


@dataclass(frozen=True)
class Command:
    """An order with the state the orchestrator saw: applied only if the VMM is still in it (compare and
    set), so an order decided on an old view does nothing instead of something wrong."""

    order: Order
    expect: State


Event = Msg | Input | Command


class Do(enum.StrEnum):
    PAUSE_GUEST = "pause-guest"
    RESUME_GUEST = "resume-guest"
    DISCARD_GUEST = "discard-guest"  # drop the received copy (target)
    VERIFY = "verify"  # start the helpers' check; report VERIFY_OK or VERIFY_FAIL (target)
    REDIAL = "redial"  # try to reconnect to the target; LINK_UP on success (source)
    EXIT = "exit"  # the source VMM stops: its copy is older than the one that runs


class Timer(enum.StrEnum):
    DEADLINE = "deadline"  # once, from the pause
    RETRY = "retry"  # periodic, from COMMITTED until ``settled``


@dataclass(frozen=True)
class WriteRecord:
    state: State


@dataclass(frozen=True)
class Send:
    msg: Msg  # dropped by the VMM when the link is down


@dataclass(frozen=True)
class ArmTimer:
    timer: Timer
    seconds: float


Action = Do | WriteRecord | Send | ArmTimer

_SOURCE_RAN = frozenset({SourceState.ABORTED, SourceState.RECLAIMED})
_NEXT_RECORD: dict[State | None, frozenset[State]] = {
    None: frozenset({SourceState.COMMITTED, SourceState.ABORTED, SourceState.HANDED_OVER,
                     TargetState.RESUMED, TargetState.REFUSED, TargetState.RELEASED}),
    SourceState.COMMITTED: frozenset({SourceState.HANDED_OVER, SourceState.RECLAIMED}),
}  # fmt: skip


def record_may_follow(old: State | None, new: State) -> bool:
    """Records only move forward, each state written once (the model checks every write against this)."""
    return new in _NEXT_RECORD.get(old, frozenset())


@dataclass
class SourceHandover:
    """The source VMM's side. ``verdict_timeout`` = max_downtime + grace, counted from the pause."""

    verdict_timeout: float
    retry_interval: float
    state: SourceState = SourceState.PRECOPY
    link_up: bool = True

    @property
    def settled(self) -> bool:
        return self.state in (SourceState.HANDED_OVER, SourceState.ABORTED, SourceState.RECLAIMED)

    def step(self, event: Event) -> list[Action]:
        if isinstance(event, Command):
            return self._command(event)
        if event in (Input.LINK_DOWN, Input.LINK_UP):
            self.link_up = event is Input.LINK_UP
        if self.state is SourceState.PRECOPY:
            return self._start() if event is Input.START and self.link_up else []
        if self.state is SourceState.AWAIT_VERDICT:
            return self._awaiting(event)
        if self.state is SourceState.COMMITTED:
            return self._committed(event)
        # A verdict after we aborted: the target still waits for one, tell it again.
        return [Send(Msg.ABORT)] if self.state is SourceState.ABORTED and event is Msg.VERIFIED else []

    def _start(self) -> list[Action]:
        # The deadline runs from the pause: it bounds how long the guest can stay paused before one side
        # runs it, whatever happens to the orchestrator.
        self.state = SourceState.AWAIT_VERDICT
        return [Do.PAUSE_GUEST, Send(Msg.DONE), ArmTimer(Timer.DEADLINE, self.verdict_timeout)]

    def _awaiting(self, event: Event) -> list[Action]:
        if event is Msg.VERIFIED:
            # COMMIT goes first: the COMMITTED record licenses nothing (the target's RESUMED does), so
            # its fsync stays out of the downtime.
            self.state = SourceState.COMMITTED
            retry = ArmTimer(Timer.RETRY, self.retry_interval)
            return [Send(Msg.COMMIT), WriteRecord(SourceState.COMMITTED), retry]
        if event is Msg.RESUMED:  # cannot happen (no COMMIT yet); never run this copy if it does
            self.state = SourceState.HANDED_OVER
            return [WriteRecord(SourceState.HANDED_OVER)]
        if event in (Msg.REFUSED, Msg.RELEASED, Input.DEADLINE, Input.LINK_DOWN):
            return self._abort()  # not committed: the target cannot resume, so this side may
        return []

    def _committed(self, event: Event) -> list[Action]:
        if event is Msg.RESUMED:
            self.state = SourceState.HANDED_OVER
            return [WriteRecord(SourceState.HANDED_OVER)]
        if event in (Msg.RELEASED, Msg.REFUSED):
            return self._reclaim()  # the target promised never to resume
        if event in (Msg.VERIFIED, Input.LINK_UP) or (event is Input.RETRY and self.link_up):
            return [Send(Msg.COMMIT)]  # idempotent at the target: it answers RESUMED or RELEASED
        if event is Input.LINK_DOWN or event is Input.RETRY:
            return [Do.REDIAL]  # in doubt: stay paused until the target (or the orchestrator) answers
        return []

    def _abort(self) -> list[Action]:
        self.state = SourceState.ABORTED
        return [WriteRecord(SourceState.ABORTED), Do.RESUME_GUEST, Send(Msg.ABORT)]

    def _reclaim(self) -> list[Action]:
        self.state = SourceState.RECLAIMED
        return [WriteRecord(SourceState.RECLAIMED), Do.RESUME_GUEST]

    def _command(self, command: Command) -> list[Action]:
        if command.expect is not self.state:
            return []
        if self.state is SourceState.AWAIT_VERDICT and command.order is not Order.STOP_SOURCE:
            return self._abort()  # abort or reclaim: not committed, so the target cannot resume
        if command.order is Order.RECLAIM_SOURCE and self.state is SourceState.COMMITTED:
            return self._reclaim()  # the orchestrator found the target dead, its record without RESUMED
        if command.order is Order.STOP_SOURCE and self.state is SourceState.COMMITTED:
            self.state = SourceState.HANDED_OVER  # the orchestrator saw the target resumed
            return [WriteRecord(SourceState.HANDED_OVER), Do.EXIT]
        if command.order is Order.STOP_SOURCE and self.state is SourceState.HANDED_OVER:
            return [Do.EXIT]
        return []


_REPLY = {TargetState.RESUMED: Msg.RESUMED, TargetState.REFUSED: Msg.REFUSED,
          TargetState.RELEASED: Msg.RELEASED}  # fmt: skip
_UNDECIDED = frozenset({TargetState.RECEIVING, TargetState.VERIFYING, TargetState.VERIFIED})


@dataclass
class TargetHandover:
    """The target VMM's side. It never decides to resume: it resumes on COMMIT, and only from VERIFIED."""

    state: TargetState = TargetState.RECEIVING
    link_up: bool = True

    @classmethod
    def restarted(cls, recorded: TargetState | None) -> tuple[TargetHandover, list[Action]]:
        """A target agent restarted after its VMM died (the copy went with it), reading that VMM's record
        under its lock: it answers the source's re-dial from the record, and RELEASED unless RESUMED."""
        if recorded in (TargetState.RESUMED, TargetState.REFUSED, TargetState.RELEASED):
            return cls(recorded, link_up=False), []
        return cls(TargetState.RELEASED, link_up=False), [WriteRecord(TargetState.RELEASED)]

    @property
    def settled(self) -> bool:
        return self.state not in _UNDECIDED

    def step(self, event: Event) -> list[Action]:
        if isinstance(event, Command):
            return self._command(event)
        if event in (Input.LINK_DOWN, Input.LINK_UP):
            self.link_up = event is Input.LINK_UP
            # Before DONE the copy can never be completed: the source re-dials only to settle a verdict.
            return self._release() if event is Input.LINK_DOWN and self.state is TargetState.RECEIVING else []
        if event is Msg.DONE and self.state is TargetState.RECEIVING:
            self.state = TargetState.VERIFYING
            return [Do.VERIFY]
        if event in (Input.VERIFY_OK, Input.VERIFY_FAIL) and self.state is TargetState.VERIFYING:
            return self._verdict(event is Input.VERIFY_OK)
        if event is Msg.COMMIT and self.state is TargetState.VERIFIED:
            return self._resume()
        if event is Msg.ABORT and self.state in _UNDECIDED:
            return self._release()
        reply = _REPLY.get(self.state)  # a COMMIT re-sent after a re-dial, or sent to a restarted agent
        return [Send(reply)] if event is Msg.COMMIT and reply else []

    def _verdict(self, ok: bool) -> list[Action]:
        if ok:
            self.state = TargetState.VERIFIED
            return [Send(Msg.VERIFIED)]
        self.state = TargetState.REFUSED
        return [WriteRecord(TargetState.REFUSED), Do.DISCARD_GUEST, Send(Msg.REFUSED)]

    def _resume(self) -> list[Action]:
        # RESUMED is on disk before a vCPU runs: whoever finds this VMM dead then knows its copy may have
        # run, and never runs the older one.
        self.state = TargetState.RESUMED
        return [WriteRecord(TargetState.RESUMED), Do.RESUME_GUEST, Send(Msg.RESUMED)]

    def _release(self) -> list[Action]:
        self.state = TargetState.RELEASED  # no message: whoever released it knows; a COMMIT gets the answer
        return [WriteRecord(TargetState.RELEASED), Do.DISCARD_GUEST]

    def _command(self, command: Command) -> list[Action]:
        if command.expect is not self.state:
            return []
        if command.order is Order.COMMIT_TARGET and self.state is TargetState.VERIFIED:
            return self._resume()
        if command.order is Order.RELEASE_TARGET and self.state in _UNDECIDED:
            return self._release()
        return []


class Reach(enum.StrEnum):
    ALIVE = "alive"  # the VMM answered: its state is its live handover state
    DEAD = "dead"  # known dead (its record's lock was free): its state is its durable record
    UNKNOWN = "unknown"  # no answer, and not known dead: it may still act


@dataclass(frozen=True)
class SourceView:
    """What the source says it holds, asked between two of its steps (never while a step's actions run).
    ``guest_id``: the migration id (the guest's identity on both sides); ``attempt``: the handover attempt
    the state belongs to. A source running its guest with no handover under way is PRECOPY; a dead one
    without a record of this attempt (the checkpoint says it was launched, nothing serves it) has None."""

    reach: Reach
    state: SourceState | None = None
    guest_id: str | None = None
    attempt: int = 0
    running: bool = False


@dataclass(frozen=True)
class TargetView:
    """What the target says it holds (state None: nothing of this attempt)."""

    reach: Reach
    state: TargetState | None = None
    guest_id: str | None = None
    attempt: int = 0
    running: bool = False


class Verdict(enum.StrEnum):
    RUNS_ON_SOURCE = "runs-on-source"  # not migrated (or not yet): the source runs (or may run) the guest
    RUNS_ON_TARGET = "runs-on-target"  # handed over: the target runs it; never stop it, never copy over it
    PENDING = "pending"  # the VMMs are deciding (bounded by the source's deadline), or an order is due
    IN_DOUBT = "in-doubt"  # neither may run it until the silent side answers
    LOST = "lost"  # the guest is gone: report it, never replace it silently
    CONFLICT = "conflict"  # the views cannot both be true (another guest, both ran): an operator decides


@dataclass(frozen=True)
class Resolution:
    verdict: Verdict
    reason: str
    order: Order = Order.NONE
    expect: State | None = None

    def command(self) -> Command | None:
        return None if self.order is Order.NONE or self.expect is None else Command(self.order, self.expect)


def reconcile(source: SourceView, target: TargetView) -> Resolution:
    """What to do, from what each side holds. Read the target first, then the source: states only move
    forward, so the source can only be ahead, which no rule here mistakes for a conflict. Every order
    rests on a fact that cannot change (a death, a durable record) or on the state it expects."""
    if source.guest_id and target.guest_id and source.guest_id != target.guest_id:
        why = f"the source holds guest {source.guest_id}, the target {target.guest_id}"
        return Resolution(Verdict.CONFLICT, why)
    now = max(source.attempt, target.attempt)
    # A state of an older attempt says nothing of this one; a side that does not answer says nothing.
    s = source.state if source.attempt == now and source.reach is not Reach.UNKNOWN else None
    t = target.state if target.attempt == now and target.reach is not Reach.UNKNOWN else None
    if (source.reach is Reach.ALIVE and source.attempt < now) or (
        target.attempt < now and target.state is TargetState.RESUMED
    ):
        return Resolution(Verdict.CONFLICT, f"attempts: source {source.attempt}, target {target.attempt}")
    s_ran = s in _SOURCE_RAN or (source.reach is Reach.ALIVE and s is SourceState.PRECOPY)
    if (s_ran and t is TargetState.RESUMED) or (source.running and target.running):
        return Resolution(Verdict.CONFLICT, "both copies ran after the pause; an operator decides")
    if t is TargetState.RESUMED:
        if target.reach is not Reach.ALIVE:
            return Resolution(Verdict.LOST, "the guest resumed on the target and died with it; the source's "
                              "copy is older and must never run")  # fmt: skip
        if source.reach is Reach.ALIVE and s in (SourceState.COMMITTED, SourceState.HANDED_OVER):
            return Resolution(Verdict.RUNS_ON_TARGET, "handed over; stop the source", Order.STOP_SOURCE, s)
        return Resolution(Verdict.RUNS_ON_TARGET, "handed over")
    if s_ran:
        return _source_ran(source, s, target, t)
    if source.reach is Reach.ALIVE:
        return _source_paused(s, target, t)
    if source.reach is Reach.UNKNOWN:
        return Resolution(Verdict.IN_DOUBT, "the source does not answer and is not known dead: it may still "
                          "run the guest, so the target may not")  # fmt: skip
    return _source_died_paused(target, t)


def _source_ran(source: SourceView, s: State | None, target: TargetView, t: TargetState | None) -> Resolution:
    # The target's copy is older than what ran (or, in precopy, still coming): release it once it is moot.
    moot = target.reach is Reach.ALIVE and t in _UNDECIDED and s is not SourceState.PRECOPY
    order, expect = (Order.RELEASE_TARGET, t) if moot else (Order.NONE, None)
    if source.reach is Reach.ALIVE:
        why = "not handed over (yet)" if s is SourceState.PRECOPY else f"the handover {s}: the source runs it"
        return Resolution(Verdict.RUNS_ON_SOURCE, why, order, expect)
    return Resolution(Verdict.LOST, f"the guest ran on the source after the pause ({s}) and died with it",
                      order, expect)  # fmt: skip


def _source_paused(s: SourceState | None, target: TargetView, t: TargetState | None) -> Resolution:
    """The source lives, paused, and has not run the guest since the pause."""
    gave_up = target.reach is Reach.DEAD or (target.reach is Reach.ALIVE and t not in _UNDECIDED)
    if s is SourceState.AWAIT_VERDICT:
        if gave_up:
            return Resolution(Verdict.PENDING, "the target cannot take the guest", Order.ABORT_SOURCE, s)
        return Resolution(Verdict.PENDING, "the VMMs are deciding (bounded by the source's deadline)")
    if s is SourceState.COMMITTED and target.reach is Reach.ALIVE and t is TargetState.VERIFIED:
        return Resolution(Verdict.PENDING, "relaying the source's COMMIT", Order.COMMIT_TARGET, t)
    if s is SourceState.COMMITTED and gave_up:
        return Resolution(Verdict.PENDING, "the target never resumed and never will: the source takes the "
                          "guest back", Order.RECLAIM_SOURCE, s)  # fmt: skip
    if target.reach is Reach.UNKNOWN:
        return Resolution(Verdict.IN_DOUBT, f"the source is {s}, paused; the target does not answer")
    return Resolution(Verdict.PENDING, f"source {s}, target {t}: settling")


def _source_died_paused(target: TargetView, t: TargetState | None) -> Resolution:
    """The source died without running the guest after the pause: a verified target copy is the guest."""
    alive = target.reach is Reach.ALIVE
    if alive and t is TargetState.VERIFIED:
        return Resolution(Verdict.PENDING, "the source died paused: resuming the target's verified copy",
                          Order.COMMIT_TARGET, t)  # fmt: skip
    if alive and t is TargetState.VERIFYING:
        return Resolution(Verdict.PENDING, "the source died paused; the target is still checking its copy")
    if alive and t is TargetState.RECEIVING:  # released first, so that "lost" is final when reported
        return Resolution(Verdict.PENDING, "the source died before the target had the whole guest",
                          Order.RELEASE_TARGET, t)  # fmt: skip
    if target.reach is Reach.UNKNOWN:
        return Resolution(Verdict.IN_DOUBT, "the source died paused; the target does not answer")
    return Resolution(Verdict.LOST, f"the source died and the target holds no verified copy ({t or 'none'})")


@dataclass(frozen=True)
class HandoverRecord:
    """One side's durable record: the latest state it wrote for this guest and attempt."""

    role: Role
    guest_id: str
    attempt: int
    state: State


def save_record(path: Path, record: HandoverRecord) -> None:
    """Write ``record`` atomically and durably (fsync the file, rename, fsync the directory): when this
    returns, a crash cannot lose it, so the action it licenses may run."""
    write_private(path, record_bytes(record))


def record_bytes(record: HandoverRecord) -> bytes:
    """The record file's bytes (``statefile`` format, JSON payload)."""
    doc = {"role": record.role.value, "guest_id": record.guest_id, "attempt": record.attempt,
           "state": record.state.value}  # fmt: skip
    return pack_state(RECORD_MAGIC, RECORD_VERSION, json.dumps(doc, sort_keys=True).encode())


def load_record(path: Path) -> HandoverRecord | None:
    """The record at ``path`` (None if there is none); a damaged one is a ConfplanError, never a guess."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    payload = unpack_state(path, raw, RECORD_MAGIC, RECORD_VERSION)
    try:
        doc = json.loads(payload)
        role = Role(doc["role"])
        kind: type[SourceState] | type[TargetState] = SourceState if role is Role.SOURCE else TargetState
        return HandoverRecord(role, str(doc["guest_id"]), int(doc["attempt"]), kind(doc["state"]))
    except (ValueError, KeyError, TypeError) as err:
        raise ConfplanError(
            f"{path}: handover record does not decode: {err}",
            hint="the record cannot be trusted; an operator decides which copy is the guest",
        ) from None
