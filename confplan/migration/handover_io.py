"""Running the handover in a VMM: the pure machines of ``migration/handover.py`` fed with real events, their
actions carried out in order, their durable record written before what it licenses, their timers.

- ``HandoverFiles``: the side's record (``handover-ROLE.rec``) and its lock (``handover-ROLE.lock``), both
  in the VMM's state folder. The VMM holds the lock (``flock``) for its whole life, so whoever finds it
  free knows the VMM is dead and that its record is final (a lock on the record itself would be lost at its
  first atomic rename).
- ``Driver``: one machine, one lock. ``feed`` queues an event and, unless a step is already running in
  this thread, steps through the queue, running each step's actions in order; an action may feed events
  of its own (a failed send is LINK_DOWN, a finished check is VERIFY_OK), which run after it. ``view``
  answers under the same lock, so nobody ever sees a state whose record is still being written.
"""

from __future__ import annotations

import collections
import fcntl
import os
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confplan.core.wire import HandoverCode
from confplan.errors import EnvironmentProblem
from confplan.migration.handover import (
    Action,
    ArmTimer,
    Do,
    Event,
    HandoverRecord,
    Input,
    Msg,
    Role,
    Send,
    SourceHandover,
    State,
    TargetHandover,
    Timer,
    WriteRecord,
    load_record,
    record_bytes,
    save_record,
)
from confplan.statefile import StagedWrite

Log = Callable[[str], None]
# The handover's messages on the wire (core.wire.HandoverCode) and in the machines (handover.Msg).
SEND_CODES: dict[Msg, HandoverCode] = {
    Msg.COMMIT: HandoverCode.COMMIT, Msg.ABORT: HandoverCode.ABORT, Msg.VERIFIED: HandoverCode.VERIFIED,
    Msg.REFUSED: HandoverCode.REFUSED, Msg.RESUMED: HandoverCode.RESUMED, Msg.RELEASED: HandoverCode.RELEASED,
}  # fmt: skip
RECEIVE_CODES: dict[HandoverCode, Msg] = {code: msg for msg, code in SEND_CODES.items()}


@dataclass(frozen=True)
class HandoverFiles:
    """Where one side of one VMM keeps its record and its liveness lock."""

    folder: Path
    role: Role

    @property
    def record(self) -> Path:
        return self.folder / f"handover-{self.role.value}.rec"

    @property
    def lock(self) -> Path:
        return self.folder / f"handover-{self.role.value}.lock"

    def hold(self) -> int:
        """Take the lock for this process's life (the fd stays open); refused if another VMM holds it."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise EnvironmentProblem(
                f"another live {self.role.value} VMM holds {self.lock}",
                hint="one VMM per role and folder: stop the other one (`confplan stop PLAN`) first",
            ) from None
        return fd

    def holder_dead(self) -> bool:
        """True when no process holds the lock: the VMM that wrote the record is dead, the record final."""
        try:
            fd = os.open(self.lock, os.O_RDWR)
        except FileNotFoundError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            os.close(fd)  # closing releases a lock we took
        return True

    def load(self) -> HandoverRecord | None:
        return load_record(self.record)


Machine = SourceHandover | TargetHandover


class Driver:
    """Runs one side's handover machine: events in, actions out, in order, records first."""

    def __init__(
        self, machine: Machine, *, role: Role, guest_id: str, attempt: int, files: HandoverFiles | None,
        do: Mapping[Do, Callable[[], None]], send: Callable[[Msg], None], log: Log,
    ) -> None:  # fmt: skip
        self.machine, self.role, self.guest_id, self.attempt = machine, role, guest_id, attempt
        self.files, self._do, self._send, self.log = files, do, send, log
        self._lock = threading.RLock()
        self._queue: collections.deque[Event] = collections.deque()
        self._busy = False
        self._timers: list[threading.Timer] = []
        self._closed = False
        self._staged: dict[State, _Ahead] = {}  # records written ahead, committed by their WriteRecord
        self.notes: dict[str, Any] = {}  # what the side reports about its handover (verify details, times)

    @property
    def state(self) -> State:
        return self.machine.state

    @property
    def settled(self) -> bool:
        return self.machine.settled

    def feed(self, event: Event) -> None:
        """Queue ``event``; step through the queue unless this thread is already doing so."""
        with self._lock:
            self._queue.append(event)
            if self._busy:
                return
            self._busy = True
            try:
                while self._queue:
                    self._step(self._queue.popleft())
            finally:
                self._busy = False

    def _step(self, event: Event) -> None:
        before = self.machine.state
        actions = self.machine.step(event)
        if actions or self.machine.state is not before:
            after = self.machine.state.value
            self.log(f"{self.role.value} handover: {_name(event)}: {before.value} -> {after}")
        for action in actions:
            self._run(action)

    def _run(self, action: Action) -> None:
        if isinstance(action, WriteRecord):
            # Durable before the next action runs: the next action is what this record licenses.
            ahead = self._staged.pop(action.state, None)
            self._drop_staged()  # records only move forward: no other staged one can be written now
            staged = ahead.result() if ahead is not None else None  # waits for a write still under way
            if staged is not None:
                staged.commit()  # the file was written and fsynced ahead; rename, fsync the folder
            elif self.files is not None:
                record = HandoverRecord(self.role, self.guest_id, self.attempt, action.state)
                save_record(self.files.record, record)
        elif isinstance(action, Send):
            try:
                self._send(action.msg)
            except Exception as err:  # the link is down: the machine hears it as such
                self.log(f"{self.role.value} handover: sending {action.msg.value} failed: {err}")
                self._queue.append(Input.LINK_DOWN)
        elif isinstance(action, ArmTimer):
            self._arm(action.timer, action.seconds)
        else:
            self._do[action]()

    def _arm(self, timer: Timer, seconds: float) -> None:
        event = Input.DEADLINE if timer is Timer.DEADLINE else Input.RETRY

        def fire() -> None:
            if self._closed or self.machine.settled:
                return
            self.feed(event)
            if timer is Timer.RETRY:
                self._arm(timer, seconds)  # periodic until settled

        if self._closed:
            return
        handle = threading.Timer(seconds, fire)
        handle.daemon = True
        self._timers = [t for t in self._timers if t.is_alive()] + [handle]
        handle.start()

    def stage(self, state: State, *, while_in: Collection[State]) -> bool:
        """Write the record of ``state`` ahead (temp file, fsync) while the machine is in one of
        ``while_in``, so the WriteRecord of a later step only renames it into place (the target's RESUMED:
        written while the pause goes on, half its fsyncs leave it). What licenses what is unchanged: the
        record is ``state``'s only once that WriteRecord has committed it; any other record drops it. The
        file is written outside the step lock (a step may run meanwhile: its WriteRecord waits for the
        write). True: written ahead."""
        with self._lock:
            if self._closed or self.files is None or state in self._staged:
                return False
            if self.machine.state not in while_in:
                return False
            ahead = self._staged[state] = _Ahead()
            path, record = self.files.record, HandoverRecord(self.role, self.guest_id, self.attempt, state)
        try:
            ahead.set(StagedWrite(path, record_bytes(record)))
        except OSError as err:  # only a head start: the WriteRecord writes it whole then
            self.log(f"{self.role.value} handover: writing the {state.value} record ahead failed: {err}")
            ahead.set(None)
            return False
        return True

    def _drop_staged(self) -> None:
        for ahead in self._staged.values():
            ahead.discard()
        self._staged.clear()

    def view(self) -> dict[str, Any]:
        """The handover as this VMM holds it now (between steps, never in the middle of one)."""
        with self._lock:
            return {"reach": "alive", "role": self.role.value, "guest_id": self.guest_id,
                    "attempt": self.attempt, "state": self.machine.state.value,
                    "settled": self.machine.settled, **self.notes}  # fmt: skip

    def close(self) -> None:
        self._closed = True
        with self._lock:
            self._drop_staged()
        for timer in self._timers:
            timer.cancel()


class _Ahead:
    """A record being written ahead: its ``StagedWrite`` once written (None: the write failed). Whoever
    drops it before the write ended leaves the discard to the writer."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._staged: StagedWrite | None = None
        self._dropped = False

    def set(self, staged: StagedWrite | None) -> None:
        with self._lock:
            self._staged = staged
            if self._dropped and staged is not None:
                staged.discard()
        self._done.set()

    def result(self) -> StagedWrite | None:
        self._done.wait()
        return self._staged

    def discard(self) -> None:
        with self._lock:
            self._dropped = True
            if self._staged is not None:
                self._staged.discard()


def _name(event: Event) -> str:
    return event.value if isinstance(event, Msg | Input) else f"{event.order.value} (expected {event.expect})"


def dead_view(files: HandoverFiles) -> dict[str, Any] | None:
    """What a dead VMM's record says (``reach: dead``), or None while a live process holds its lock."""
    if not files.holder_dead():
        return None
    record = files.load()  # None when it never wrote one
    if record is None:
        return {"reach": "dead", "role": files.role.value, "guest_id": None, "attempt": 0, "state": None}
    return {"reach": "dead", "role": record.role.value, "guest_id": record.guest_id,
            "attempt": record.attempt, "state": record.state.value}  # fmt: skip
