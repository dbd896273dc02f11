"""The handover's pieces on literal inputs: each machine's steps, ``reconcile``'s table, the durable record.
The protocol as a whole is checked exhaustively in tests/test_handover_model.py."""

from __future__ import annotations

import itertools
import json
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from confplan.errors import ConfplanError
from confplan.migration import handover_io
from confplan.migration.handover import (
    RECORD_MAGIC,
    RECORD_VERSION,
    ArmTimer,
    Command,
    Do,
    HandoverRecord,
    Input,
    Msg,
    Order,
    Reach,
    Role,
    Send,
    SourceHandover,
    SourceState,
    SourceView,
    TargetHandover,
    TargetState,
    TargetView,
    Timer,
    Verdict,
    WriteRecord,
    load_record,
    reconcile,
    save_record,
)
from confplan.migration.handover_io import Driver, HandoverFiles
from confplan.statefile import StagedWrite, pack_state

S, T = SourceState, TargetState


def source(state: SourceState = S.PRECOPY) -> SourceHandover:
    return SourceHandover(verdict_timeout=5.05, retry_interval=0.1, state=state)


# -- the source ---------------------------------------------------------------------------------------------
def test_source_hands_over_on_verified_and_records_after_sending_commit() -> None:
    s = source()
    assert s.step(Input.START) == [Do.PAUSE_GUEST, Send(Msg.DONE), ArmTimer(Timer.DEADLINE, 5.05)]
    assert s.step(Msg.VERIFIED) == [Send(Msg.COMMIT), WriteRecord(S.COMMITTED), ArmTimer(Timer.RETRY, 0.1)]
    assert s.step(Input.DEADLINE) == []  # committed: no deadline any more
    assert s.step(Msg.RESUMED) == [WriteRecord(S.HANDED_OVER)]
    assert s.settled and s.step(Msg.RELEASED) == []  # never resumes once handed over


@pytest.mark.parametrize("event", [Input.DEADLINE, Input.LINK_DOWN, Msg.REFUSED, Msg.RELEASED])
def test_source_aborts_before_commit_recording_it_before_the_guest_runs(event: Msg | Input) -> None:
    s = source(S.AWAIT_VERDICT)
    assert s.step(event) == [WriteRecord(S.ABORTED), Do.RESUME_GUEST, Send(Msg.ABORT)]
    assert s.step(Msg.VERIFIED) == [Send(Msg.ABORT)]  # a late verdict: tell the target again


def test_committed_source_stays_paused_when_the_link_fails_and_redials() -> None:
    s = source(S.COMMITTED)
    assert s.step(Input.LINK_DOWN) == [Do.REDIAL]
    assert s.step(Input.RETRY) == [Do.REDIAL]
    assert s.step(Input.LINK_UP) == [Send(Msg.COMMIT)]
    assert s.step(Input.RETRY) == [Send(Msg.COMMIT)]
    assert s.state is S.COMMITTED and not s.settled


def test_committed_source_takes_the_guest_back_only_when_the_target_released_it() -> None:
    s = source(S.COMMITTED)
    assert s.step(Command(Order.ABORT_SOURCE, S.COMMITTED)) == []  # committed: it cannot just abort
    assert s.step(Msg.RELEASED) == [WriteRecord(S.RECLAIMED), Do.RESUME_GUEST]


def test_orders_apply_only_to_the_state_they_were_decided_on() -> None:
    s = source(S.COMMITTED)
    assert s.step(Command(Order.RECLAIM_SOURCE, S.AWAIT_VERDICT)) == []
    assert s.step(Command(Order.STOP_SOURCE, S.COMMITTED)) == [WriteRecord(S.HANDED_OVER), Do.EXIT]
    assert source(S.ABORTED).step(Command(Order.STOP_SOURCE, S.ABORTED)) == []  # never stops a running guest


# -- the target ---------------------------------------------------------------------------------------------
def test_target_resumes_once_on_commit_with_the_record_first() -> None:
    t = TargetHandover()
    assert t.step(Msg.COMMIT) == []  # not verified: a commit means nothing
    assert t.step(Msg.DONE) == [Do.VERIFY]
    assert t.step(Input.LINK_DOWN) == []  # holds a whole copy: waits for a verdict
    assert t.step(Input.VERIFY_OK) == [Send(Msg.VERIFIED)]
    assert t.step(Msg.COMMIT) == [WriteRecord(T.RESUMED), Do.RESUME_GUEST, Send(Msg.RESUMED)]
    assert t.step(Msg.COMMIT) == [Send(Msg.RESUMED)]  # a re-sent COMMIT is answered, not acted on
    assert t.step(Command(Order.RELEASE_TARGET, T.RESUMED)) == []


def test_target_refuses_a_bad_copy_and_releases_an_incomplete_one() -> None:
    t = TargetHandover(T.VERIFYING)
    assert t.step(Input.VERIFY_FAIL) == [WriteRecord(T.REFUSED), Do.DISCARD_GUEST, Send(Msg.REFUSED)]
    assert t.step(Msg.COMMIT) == [Send(Msg.REFUSED)]
    assert TargetHandover().step(Input.LINK_DOWN) == [WriteRecord(T.RELEASED), Do.DISCARD_GUEST]


def test_release_is_atomic_against_the_targets_state() -> None:
    t = TargetHandover(T.VERIFIED)
    assert t.step(Command(Order.RELEASE_TARGET, T.VERIFIED)) == [WriteRecord(T.RELEASED), Do.DISCARD_GUEST]
    assert t.step(Msg.COMMIT) == [Send(Msg.RELEASED)]  # a COMMIT that crossed the release


@pytest.mark.parametrize(
    ("recorded", "state", "writes"),
    [(None, T.RELEASED, [WriteRecord(T.RELEASED)]), (T.RESUMED, T.RESUMED, []), (T.REFUSED, T.REFUSED, [])],
)
def test_a_restarted_target_agent_answers_from_the_record(
    recorded: TargetState | None, state: TargetState, writes: list[WriteRecord]
) -> None:
    agent, actions = TargetHandover.restarted(recorded)
    assert (agent.state, actions) == (state, writes)
    assert Do.RESUME_GUEST not in agent.step(Msg.COMMIT)


# -- reconcile ----------------------------------------------------------------------------------------------
def sv(reach: Reach, state: SourceState | None, *, attempt: int = 1, running: bool = False) -> SourceView:
    return SourceView(reach, state, "g1", attempt, running)


def tv(reach: Reach, state: TargetState | None, *, attempt: int = 1, running: bool = False) -> TargetView:
    return TargetView(reach, state, "g1", attempt, running)


A, D, U = Reach.ALIVE, Reach.DEAD, Reach.UNKNOWN
CASES = [
    # (source, target) -> verdict, order, expect
    (sv(A, S.PRECOPY, running=True), tv(A, T.RECEIVING), Verdict.RUNS_ON_SOURCE, Order.NONE, None),
    (sv(A, S.AWAIT_VERDICT), tv(A, T.VERIFIED), Verdict.PENDING, Order.NONE, None),
    (sv(A, S.AWAIT_VERDICT), tv(D, None), Verdict.PENDING, Order.ABORT_SOURCE, S.AWAIT_VERDICT),
    (sv(A, S.COMMITTED), tv(A, T.VERIFIED), Verdict.PENDING, Order.COMMIT_TARGET, T.VERIFIED),
    (sv(A, S.COMMITTED), tv(D, None), Verdict.PENDING, Order.RECLAIM_SOURCE, S.COMMITTED),
    (sv(A, S.COMMITTED), tv(U, None), Verdict.IN_DOUBT, Order.NONE, None),
    (sv(A, S.COMMITTED), tv(A, T.RESUMED, running=True), Verdict.RUNS_ON_TARGET, Order.STOP_SOURCE,
     S.COMMITTED),
    (sv(A, S.COMMITTED), tv(D, T.RESUMED), Verdict.LOST, Order.NONE, None),
    (sv(A, S.ABORTED, running=True), tv(A, T.VERIFIED), Verdict.RUNS_ON_SOURCE, Order.RELEASE_TARGET,
     T.VERIFIED),
    (sv(D, S.ABORTED), tv(A, T.VERIFIED), Verdict.LOST, Order.RELEASE_TARGET, T.VERIFIED),
    (sv(D, None), tv(A, T.VERIFIED), Verdict.PENDING, Order.COMMIT_TARGET, T.VERIFIED),
    (sv(D, S.COMMITTED), tv(A, T.VERIFIED), Verdict.PENDING, Order.COMMIT_TARGET, T.VERIFIED),
    (sv(D, None), tv(A, T.VERIFYING), Verdict.PENDING, Order.NONE, None),
    (sv(D, None), tv(A, T.RECEIVING), Verdict.PENDING, Order.RELEASE_TARGET, T.RECEIVING),
    (sv(D, None), tv(A, T.RELEASED), Verdict.LOST, Order.NONE, None),  # lost with its source: say so
    (sv(U, None), tv(A, T.VERIFIED), Verdict.IN_DOUBT, Order.NONE, None),  # unreachable is not dead
    (sv(U, None), tv(A, T.RESUMED, running=True), Verdict.RUNS_ON_TARGET, Order.NONE, None),
    (sv(D, S.HANDED_OVER), tv(A, T.RESUMED, running=True), Verdict.RUNS_ON_TARGET, Order.NONE, None),
    # A source that aborted attempt 1 and died paused in attempt 2: its old ABORTED says nothing of 2.
    (sv(D, S.ABORTED, attempt=1), tv(A, T.VERIFIED, attempt=2), Verdict.PENDING, Order.COMMIT_TARGET,
     T.VERIFIED),
    # A target left over from attempt 1 holds nothing of attempt 2.
    (sv(A, S.COMMITTED, attempt=2), tv(A, T.RELEASED, attempt=1), Verdict.PENDING, Order.RECLAIM_SOURCE,
     S.COMMITTED),
    (sv(A, S.PRECOPY, attempt=2, running=True), tv(A, T.RESUMED, attempt=1, running=True), Verdict.CONFLICT,
     Order.NONE, None),
    (sv(A, S.ABORTED, running=True), tv(A, T.RESUMED, running=True), Verdict.CONFLICT, Order.NONE, None),
]  # fmt: skip


@pytest.mark.parametrize(("s", "t", "verdict", "order", "expect"), CASES)
def test_reconcile_decides_from_what_each_side_holds(
    s: SourceView, t: TargetView, verdict: Verdict, order: Order, expect: SourceState | TargetState | None
) -> None:
    got = reconcile(s, t)
    assert (got.verdict, got.order, got.expect) == (verdict, order, expect), got.reason


def test_reconcile_refuses_two_different_guests() -> None:
    got = reconcile(SourceView(A, S.COMMITTED, "g1", 1), TargetView(A, T.VERIFIED, "g2", 1))
    assert got.verdict is Verdict.CONFLICT and got.command() is None and "g2" in got.reason


def all_views() -> list[tuple[SourceView, TargetView]]:
    """Every pair of views a live or dead VMM can give (a running guest only where its state runs one)."""
    sources = [sv(r, st, attempt=a, running=run) for r, st, a, run in
               itertools.product(Reach, [None, *S], [1, 2], [False, True])
               if not run or (r is A and st in (S.PRECOPY, S.ABORTED, S.RECLAIMED))]
    targets = [tv(r, st, attempt=a, running=run) for r, st, a, run in
               itertools.product(Reach, [None, *T], [1, 2], [False, True])
               if not run or (r is A and st is T.RESUMED)]
    return list(itertools.product(sources, targets))  # fmt: skip


def test_reconcile_never_touches_a_resumed_target_nor_acts_on_silence() -> None:
    """Over every pair of views: the rules the orders rest on (docs/handover.md, "O's rules")."""
    for s, t in all_views():
        got = reconcile(s, t)
        command = got.command()
        if command is None:
            continue
        if command.order in (Order.COMMIT_TARGET, Order.RELEASE_TARGET):
            assert t.reach is A and t.state is command.expect and t.state is not T.RESUMED, (s, t, got)
            assert s.reach is not U, (s, t, got)  # a silent source may still run the guest
        if command.order is Order.COMMIT_TARGET:  # the source committed, or died never having run it since
            assert (s.reach is A and s.state is S.COMMITTED) or (
                s.reach is D and (s.state not in (S.ABORTED, S.RECLAIMED) or s.attempt < t.attempt)
            ), (s, t, got)
        if command.order in (Order.ABORT_SOURCE, Order.RECLAIM_SOURCE, Order.STOP_SOURCE):
            assert s.reach is A and s.state is command.expect and not s.running, (s, t, got)
            assert t.reach is not U, (s, t, got)  # a silent target may have resumed
        if command.order is Order.RECLAIM_SOURCE:  # the target can never resume this attempt
            assert t.reach is D or t.state in (T.RELEASED, T.REFUSED, None) or t.attempt < s.attempt
            assert t.state is not T.RESUMED
        if command.order is Order.STOP_SOURCE:
            assert t.reach is A and t.state is T.RESUMED, (s, t, got)


# -- the durable record -------------------------------------------------------------------------------------
def test_record_round_trip_is_private_and_missing_is_none(tmp_path: Path) -> None:
    path = tmp_path / "handover-target.rec"
    assert load_record(path) is None
    record = HandoverRecord(Role.TARGET, "00" * 16, 3, T.RESUMED)
    save_record(path, record)
    assert load_record(path) == record
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    save_record(path, HandoverRecord(Role.SOURCE, "ab" * 16, 1, S.ABORTED))
    assert load_record(path) == HandoverRecord(Role.SOURCE, "ab" * 16, 1, S.ABORTED)


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda raw: b"NOTAREC!" + raw[8:], "bad magic"),
        (lambda raw: raw[:8] + (RECORD_VERSION + 1).to_bytes(4, "little") + raw[12:], "format version 2"),
        (lambda raw: raw[:-1] + bytes([raw[-1] ^ 1]), "checksum mismatch"),
        (lambda raw: raw[:-5], "checksum mismatch"),
    ],
    ids=["magic", "version", "checksum", "truncated"],
)
def test_a_damaged_record_is_refused_not_guessed(
    tmp_path: Path, damage: Callable[[bytes], bytes], match: str
) -> None:
    path = tmp_path / "handover-source.rec"
    save_record(path, HandoverRecord(Role.SOURCE, "ab" * 16, 1, S.COMMITTED))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ConfplanError, match=match):
        load_record(path)


@pytest.mark.parametrize(
    "doc", [{"role": "source"}, {"role": "pilot", "guest_id": "x", "attempt": 1, "state": "committed"},
            {"role": "target", "guest_id": "x", "attempt": 1, "state": "committed"}],
)  # fmt: skip
def test_a_record_that_does_not_decode_is_refused(tmp_path: Path, doc: dict[str, object]) -> None:
    path = tmp_path / "handover.rec"
    path.write_bytes(pack_state(RECORD_MAGIC, RECORD_VERSION, json.dumps(doc).encode()))
    with pytest.raises(ConfplanError, match="does not decode"):
        load_record(path)


# -- a record written ahead (the target's RESUMED while COMMIT is on its way) -------------------------------
def _target_driver(tmp_path: Path, ran: list[HandoverRecord | None]) -> tuple[Driver, HandoverFiles]:
    files = HandoverFiles(tmp_path, Role.TARGET)
    driver = Driver(
        TargetHandover(), role=Role.TARGET, guest_id="00" * 16, attempt=2, files=files,
        do={Do.VERIFY: lambda: None, Do.RESUME_GUEST: lambda: ran.append(load_record(files.record)),
            Do.DISCARD_GUEST: lambda: None},
        send=lambda msg: None, log=lambda line: None,
    )  # fmt: skip
    return driver, files


def test_a_record_written_ahead_is_the_record_only_once_its_step_commits_it(tmp_path: Path) -> None:
    ran: list[HandoverRecord | None] = []
    driver, files = _target_driver(tmp_path, ran)
    driver.feed(Msg.DONE)
    assert not driver.stage(T.RESUMED, while_in={T.VERIFIED})  # not verified yet: nothing is written
    assert list(tmp_path.iterdir()) == []
    driver.feed(Input.VERIFY_OK)
    assert driver.stage(T.RESUMED, while_in={T.VERIFIED})
    assert not driver.stage(T.RESUMED, while_in={T.VERIFIED})  # once
    assert load_record(files.record) is None  # written ahead beside it, not the record
    driver.feed(Msg.COMMIT)
    assert ran == [HandoverRecord(Role.TARGET, "00" * 16, 2, T.RESUMED)]  # on disk before the guest runs
    assert [p.name for p in tmp_path.iterdir()] == [files.record.name]


def test_a_record_written_ahead_for_a_step_that_never_comes_is_dropped(tmp_path: Path) -> None:
    ran: list[HandoverRecord | None] = []
    driver, files = _target_driver(tmp_path, ran)
    assert driver.stage(T.RESUMED, while_in={T.RECEIVING, T.VERIFYING, T.VERIFIED})  # pages in, before DONE
    driver.feed(Msg.DONE)
    driver.feed(Input.VERIFY_FAIL)  # REFUSED: the record written ahead is dropped, never renamed
    assert load_record(files.record) == HandoverRecord(Role.TARGET, "00" * 16, 2, T.REFUSED)
    assert [p.name for p in tmp_path.iterdir()] == [files.record.name]
    driver.close()
    again = tmp_path / "again"
    driver, files = _target_driver(again, ran)
    driver.feed(Msg.DONE)
    driver.feed(Input.VERIFY_OK)
    driver.stage(T.RESUMED, while_in={T.VERIFIED})
    driver.feed(Msg.ABORT)  # RELEASED after VERIFIED: the same
    assert ran == []
    assert load_record(files.record) == HandoverRecord(Role.TARGET, "00" * 16, 2, T.RELEASED)
    assert [p.name for p in again.iterdir()] == [files.record.name]
    driver.close()


def test_a_step_whose_record_is_being_written_ahead_waits_for_that_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """COMMIT arrives while the RESUMED record's file is still being written ahead in another thread: the
    WriteRecord waits for that write and renames it; the guest runs only with the record on disk."""
    release = threading.Event()

    class SlowStagedWrite(StagedWrite):
        def __init__(self, path: Path, data: bytes) -> None:
            release.wait(10)
            super().__init__(path, data)

    monkeypatch.setattr(handover_io, "StagedWrite", SlowStagedWrite)
    ran: list[HandoverRecord | None] = []
    driver, files = _target_driver(tmp_path, ran)
    driver.feed(Msg.DONE)
    driver.feed(Input.VERIFY_OK)
    writer = threading.Thread(target=driver.stage, args=(T.RESUMED,), kwargs={"while_in": {T.VERIFIED}})
    writer.start()
    while not driver._staged:  # the write ahead is under way (registered, blocked on ``release``)
        writer.join(0.001)
    committer = threading.Thread(target=driver.feed, args=(Msg.COMMIT,))
    committer.start()
    committer.join(0.05)
    assert ran == [] and load_record(files.record) is None  # COMMIT's step waits for the write
    release.set()
    committer.join(10)
    writer.join(10)
    assert ran == [HandoverRecord(Role.TARGET, "00" * 16, 2, T.RESUMED)]
    assert [p.name for p in tmp_path.iterdir()] == [files.record.name]
