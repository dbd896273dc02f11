"""The SQLite checkpoint store, on a real file in tmp_path."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from confplan.errors import ConfplanError
from confplan.stages.checkpoint import (
    DB_NAME,
    SCHEMA_VERSION,
    CheckpointStore,
    RunOutcome,
    StageStatus,
)

STAGES = [("launch-source", "i1"), ("provision-target", "i2"), ("precopy", "i3")]


def test_round_trip_survives_reopen(tmp_path: Path) -> None:
    with CheckpointStore.open(tmp_path) as store:
        run = store.begin_run("quickstart", "ab" * 32, STAGES)
        store.mark_running(run.run_id, "launch-source")
        store.mark_done(
            run.run_id,
            "launch-source",
            duration=1.5,
            bytes_shared=10,
            bytes_sealed=20,
            result={"control": "/run/x.sock", "pid": 42},
        )
        store.mark_running(run.run_id, "provision-target")
        store.mark_failed(run.run_id, "provision-target", duration=0.25, error="boom\nsecond line")
        store.finish_run(run.run_id, RunOutcome.FAILED)
    with CheckpointStore.open(tmp_path, create=False) as store:
        latest = store.latest_run("quickstart")
        assert latest is not None
        assert (latest.run_id, latest.plan_hash, latest.outcome) == (run.run_id, "ab" * 32, RunOutcome.FAILED)
        assert latest.finished is not None and latest.finished >= latest.started
        records = store.stage_records(run.run_id)
    assert list(records) == ["launch-source", "provision-target", "precopy"]
    done = records["launch-source"]
    assert done.status is StageStatus.DONE and done.attempt == 1 and done.inputs == "i1"
    assert (done.duration, done.bytes_shared, done.bytes_sealed) == (1.5, 10, 20)
    assert done.result == {"control": "/run/x.sock", "pid": 42}
    failed = records["provision-target"]
    assert failed.status is StageStatus.FAILED and failed.error == "boom\nsecond line"
    assert records["precopy"].status is StageStatus.PENDING


def test_wal_mode_and_full_sync(tmp_path: Path) -> None:
    CheckpointStore.open(tmp_path).close()
    db = sqlite3.connect(tmp_path / DB_NAME)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    with CheckpointStore.open(tmp_path) as store:
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_runs_are_per_plan_name_and_latest_wins(tmp_path: Path) -> None:
    with CheckpointStore.open(tmp_path) as store:
        first = store.begin_run("a", "h1", STAGES)
        store.begin_run("b", "h2", STAGES)
        second = store.begin_run("a", "h3", STAGES)
        latest = store.latest_run("a")
        assert latest is not None and latest.run_id == second.run_id != first.run_id
        assert store.latest_run("nobody") is None
        reopened = store.reopen_run(first.run_id)
        assert reopened.attempts == 2 and reopened.outcome is RunOutcome.RUNNING


def test_refuses_other_schema_version(tmp_path: Path) -> None:
    CheckpointStore.open(tmp_path).close()
    db = sqlite3.connect(tmp_path / DB_NAME)
    db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    db.commit()
    db.close()
    with pytest.raises(ConfplanError) as caught:
        CheckpointStore.open(tmp_path)
    assert f"schema version {SCHEMA_VERSION + 1}" in caught.value.message
    assert f"reads version {SCHEMA_VERSION}" in caught.value.message
    assert caught.value.hint


def test_refuses_foreign_sqlite_and_garbage(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / DB_NAME)
    db.execute("CREATE TABLE other (x)")
    db.commit()
    db.close()
    with pytest.raises(ConfplanError, match="not a confplan checkpoint"):
        CheckpointStore.open(tmp_path)
    garbage = tmp_path / "g"
    garbage.mkdir()
    (garbage / DB_NAME).write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(ConfplanError, match="not a confplan checkpoint"):
        CheckpointStore.open(garbage)


def test_status_without_checkpoint_does_not_create_one(tmp_path: Path) -> None:
    with pytest.raises(ConfplanError, match="has not been applied"):
        CheckpointStore.open(tmp_path / "none", create=False)
    assert not (tmp_path / "none").exists()


def test_running_record_left_by_a_crash_is_visible(tmp_path: Path) -> None:
    # A process that dies between mark_running and mark_done leaves "running" on disk.
    with CheckpointStore.open(tmp_path) as store:
        run = store.begin_run("p", "h", STAGES)
        store.mark_running(run.run_id, "launch-source")
    with CheckpointStore.open(tmp_path) as store:
        record = store.stage_records(run.run_id)["launch-source"]
    assert record.status is StageStatus.RUNNING and record.finished is None


def test_result_must_be_json(tmp_path: Path) -> None:
    with CheckpointStore.open(tmp_path) as store:
        run = store.begin_run("p", "h", STAGES)
        with pytest.raises(TypeError, match="must be JSON"):
            bad = {"x": object()}
            store.mark_done(
                run.run_id, "launch-source", duration=0, bytes_shared=0, bytes_sealed=0, result=bad
            )
        # The failed write left the stage as it was.
        assert store.stage_records(run.run_id)["launch-source"].status is StageStatus.PENDING


def test_exclusive_lock_refuses_a_second_apply(tmp_path: Path) -> None:
    refused = pytest.raises(ConfplanError, match="another `confplan apply`")
    # Entered left to right: the first lock is held while the second store tries.
    one, two = CheckpointStore.open(tmp_path), CheckpointStore.open(tmp_path)
    with one, two, one.exclusive(), refused, two.exclusive():
        pass
    with CheckpointStore.open(tmp_path) as three, three.exclusive():
        pass  # released
