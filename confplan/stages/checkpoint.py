"""The checkpoint store: what `confplan apply` has done, in SQLite at ``<checkpoint.dir>/checkpoint.db``.

A *run* is one attempt to carry out one version of a plan (its hash); applying the same plan again after a
failure continues that run, and a changed plan starts a new one. Each run has one record per stage, written
``running`` before the stage's action starts and ``done`` only after it succeeded, so a crash mid-stage
leaves ``running`` behind and the next apply redoes that stage.

Durability: WAL journal with ``synchronous=FULL``: every commit (there are a few per stage) is on disk
before the call returns, so a stage recorded ``done`` survives a power cut.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from confplan.errors import ConfplanError, EnvironmentProblem, environment_problem

SCHEMA_VERSION: Final = 1
DB_NAME: Final = "checkpoint.db"
LOCK_NAME: Final = "apply.lock"


class StageStatus(enum.StrEnum):
    """Where one stage of a run stands."""

    PENDING = "pending"  # listed in the plan, not started in this run
    RUNNING = "running"  # started; still running, or the process died before it finished
    DONE = "done"  # the action succeeded and its result is recorded
    FAILED = "failed"  # the action raised (or was interrupted); ``error`` says what
    SKIPPED = "skipped"  # not run by the last apply because it was already done


class RunOutcome(enum.StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
INSERT INTO schema_version (version) SELECT {SCHEMA_VERSION} WHERE NOT EXISTS (SELECT 1 FROM schema_version);
CREATE TABLE IF NOT EXISTS runs (
    run_id    INTEGER PRIMARY KEY AUTOINCREMENT,
    plan_name TEXT NOT NULL,
    plan_hash TEXT NOT NULL,
    started   REAL NOT NULL,
    finished  REAL,
    outcome   TEXT NOT NULL CHECK (outcome IN ({", ".join(repr(o.value) for o in RunOutcome)})),
    attempts  INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS stages (
    run_id       INTEGER NOT NULL REFERENCES runs(run_id),
    position     INTEGER NOT NULL,
    stage        TEXT NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ({", ".join(repr(s.value) for s in StageStatus)})),
    inputs       TEXT NOT NULL,
    attempt      INTEGER NOT NULL DEFAULT 0,
    started      REAL,
    finished     REAL,
    duration     REAL,
    bytes_shared INTEGER NOT NULL DEFAULT 0,
    bytes_sealed INTEGER NOT NULL DEFAULT 0,
    result       TEXT NOT NULL DEFAULT '{{}}',
    error        TEXT,
    PRIMARY KEY (run_id, stage)
);
CREATE INDEX IF NOT EXISTS runs_by_plan ON runs (plan_name, run_id);
"""


@dataclass(frozen=True)
class RunRecord:
    run_id: int
    plan_name: str
    plan_hash: str
    started: float
    finished: float | None
    outcome: RunOutcome
    attempts: int = 1

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "plan_name": self.plan_name,
            "plan_hash": self.plan_hash,
            "started": self.started,
            "finished": self.finished,
            "outcome": self.outcome.value,
            "attempts": self.attempts,
        }


@dataclass(frozen=True)
class StageRecord:
    """One stage of one run as the store holds it."""

    stage: str
    status: StageStatus
    inputs: str = ""
    position: int = 0
    run_id: int = 0
    attempt: int = 0
    started: float | None = None
    finished: float | None = None
    duration: float | None = None
    bytes_shared: int = 0
    bytes_sealed: int = 0
    result: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "status": self.status.value,
            "position": self.position,
            "attempt": self.attempt,
            "started": self.started,
            "finished": self.finished,
            "duration": self.duration,
            "bytes_shared": self.bytes_shared,
            "bytes_sealed": self.bytes_sealed,
            "result": dict(self.result),
            "error": self.error,
        }


class CheckpointDiskFull(EnvironmentProblem, sqlite3.OperationalError):
    """The checkpoint could not be written: the device is full (or read-only). An environment problem
    (exit 3, a clean message) that code catching ``sqlite3.Error`` still catches."""


def _host_problem(err: sqlite3.OperationalError, directory: Path) -> sqlite3.OperationalError:
    found = environment_problem(err, where=directory)
    return err if found is None else CheckpointDiskFull(found.message, hint=found.hint)


class CheckpointStore:
    """The SQLite checkpoint of one checkpoint folder. Use as a context manager, or call ``close``."""

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self._db = connection
        self.path = path

    # -- opening -------------------------------------------------------------------------------------

    @classmethod
    def open(cls, directory: Path, *, create: bool = True) -> CheckpointStore:
        """Open (or, with ``create``, make) ``<directory>/checkpoint.db``; refuse another schema version."""
        path = directory / DB_NAME
        if not create and not path.exists():
            raise ConfplanError(
                f"no checkpoint at {path}: this plan has not been applied yet",
                hint="run `confplan apply PLAN` first (or check checkpoint.dir in the plan)",
            )
        try:
            directory.mkdir(parents=True, exist_ok=True)
            # autocommit mode: transactions are explicit (``_transaction``), never implicit.
            connection = sqlite3.connect(path, isolation_level=None, timeout=10.0)
        except (OSError, sqlite3.Error) as err:
            problem = environment_problem(err, where=directory)
            if problem is not None:
                raise problem from None
            raise ConfplanError(
                f"cannot open the checkpoint {path}: {err}",
                hint="check that checkpoint.dir in the plan is a writable folder",
            ) from None
        store = cls(connection, path)
        try:
            store._prepare()
        except BaseException:
            connection.close()
            raise
        return store

    def _prepare(self) -> None:
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            tables = {row[0] for row in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as err:
            if isinstance(err, sqlite3.OperationalError) and environment_problem(err) is not None:
                raise _host_problem(err, self.path.parent) from err
            raise ConfplanError(
                f"{self.path} is not a confplan checkpoint ({err})",
                hint="move the file aside (its history is then forgotten) or point checkpoint.dir elsewhere",
            ) from None
        if not tables:
            # One script, one transaction; IF NOT EXISTS: two first applies may race to create it.
            try:
                self._db.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}COMMIT;")
            except sqlite3.OperationalError as err:
                raise _host_problem(err, self.path.parent) from err
            tables = {"schema_version"}
        self._check_version(tables)

    def _check_version(self, tables: set[str]) -> None:
        row = None
        if "schema_version" in tables:
            row = self._db.execute("SELECT version FROM schema_version").fetchone()
        if row is None:
            raise ConfplanError(
                f"{self.path} is an SQLite file but not a confplan checkpoint (no schema version)",
                hint="move the file aside or point checkpoint.dir in the plan to another folder",
            )
        if row[0] != SCHEMA_VERSION:
            raise ConfplanError(
                f"{self.path} has checkpoint schema version {row[0]}; this confplan reads version "
                f"{SCHEMA_VERSION}",
                hint="use the confplan release that wrote it, or move the folder aside to start afresh "
                "(its runs are then forgotten)",
            )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                with contextlib.suppress(sqlite3.Error):  # a full disk may have ended it already
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.OperationalError as err:
            raise _host_problem(err, self.path.parent) from err

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the folder's apply lock: two applies on one checkpoint would interleave their stages."""
        lock_path = self.path.parent / LOCK_NAME
        with open(lock_path, "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                holder = lock.read().strip() or "unknown"
                raise ConfplanError(
                    f"another `confplan apply` (pid {holder}) is using the checkpoint {self.path}",
                    hint="wait for it to finish or stop it: two applies of one plan would fight over the VMs",
                ) from None
            lock.truncate(0)
            lock.write(str(os.getpid()))
            lock.flush()
            try:
                yield
            finally:
                lock.truncate(0)
                fcntl.flock(lock, fcntl.LOCK_UN)

    # -- runs ----------------------------------------------------------------------------------------

    def latest_run(self, plan_name: str) -> RunRecord | None:
        row = self._db.execute(
            "SELECT run_id, plan_name, plan_hash, started, finished, outcome, attempts FROM runs "
            "WHERE plan_name = ? ORDER BY run_id DESC LIMIT 1",
            (plan_name,),
        ).fetchone()
        return None if row is None else _run_from_row(row)

    def run(self, run_id: int) -> RunRecord:
        row = self._db.execute(
            "SELECT run_id, plan_name, plan_hash, started, finished, outcome, attempts FROM runs "
            "WHERE run_id = ?",
            (run_id,),
        ).fetchone()
        if row is None:
            raise KeyError(run_id)
        return _run_from_row(row)

    def begin_run(self, plan_name: str, plan_hash: str, stages: Sequence[tuple[str, str]]) -> RunRecord:
        """A new run with every stage ``pending``; ``stages`` is [(name, inputs digest)] in plan order."""
        now = time.time()
        with self._transaction():
            cursor = self._db.execute(
                "INSERT INTO runs (plan_name, plan_hash, started, outcome) VALUES (?, ?, ?, ?)",
                (plan_name, plan_hash, now, RunOutcome.RUNNING.value),
            )
            run_id = cursor.lastrowid
            assert run_id is not None
            self._db.executemany(
                "INSERT INTO stages (run_id, position, stage, status, inputs) VALUES (?, ?, ?, ?, ?)",
                [
                    (run_id, position, name, StageStatus.PENDING.value, inputs)
                    for position, (name, inputs) in enumerate(stages)
                ],
            )
        return self.run(run_id)

    def reopen_run(self, run_id: int) -> RunRecord:
        """Continue ``run_id`` (a resume): outcome back to running, one more attempt."""
        with self._transaction():
            self._db.execute(
                "UPDATE runs SET outcome = ?, finished = NULL, attempts = attempts + 1 WHERE run_id = ?",
                (RunOutcome.RUNNING.value, run_id),
            )
        return self.run(run_id)

    def finish_run(self, run_id: int, outcome: RunOutcome) -> None:
        with self._transaction():
            self._db.execute(
                "UPDATE runs SET outcome = ?, finished = ? WHERE run_id = ?",
                (outcome.value, time.time(), run_id),
            )

    # -- stages --------------------------------------------------------------------------------------

    def stage_records(self, run_id: int) -> dict[str, StageRecord]:
        """Every stage of ``run_id`` by name, in plan order."""
        rows = self._db.execute(
            "SELECT stage, status, inputs, position, run_id, attempt, started, finished, duration, "
            "bytes_shared, bytes_sealed, result, error FROM stages WHERE run_id = ? ORDER BY position",
            (run_id,),
        ).fetchall()
        return {row[0]: _stage_from_row(row) for row in rows}

    def mark_running(self, run_id: int, stage: str) -> None:
        """Record that ``stage``'s action starts now (a crash leaves this behind: the stage is redone)."""
        self._update_stage(
            run_id,
            stage,
            "status = ?, attempt = attempt + 1, started = ?, finished = NULL, duration = NULL, error = NULL",
            (StageStatus.RUNNING.value, time.time()),
        )

    def mark_done(
        self,
        run_id: int,
        stage: str,
        *,
        duration: float,
        bytes_shared: int,
        bytes_sealed: int,
        result: Mapping[str, Any],
    ) -> None:
        """Record ``stage`` as done: call only after its action succeeded. Durable when this returns."""
        self._update_stage(
            run_id,
            stage,
            "status = ?, finished = ?, duration = ?, bytes_shared = ?, bytes_sealed = ?, result = ?, "
            "error = NULL",
            (StageStatus.DONE.value, time.time(), duration, bytes_shared, bytes_sealed, _to_json(result)),
        )

    def mark_failed(
        self, run_id: int, stage: str, *, duration: float, error: str, result: Mapping[str, Any] | None = None
    ) -> None:
        """Record ``stage`` as failed with ``error``; ``result``: what it got done before it failed."""
        self._update_stage(
            run_id,
            stage,
            "status = ?, finished = ?, duration = ?, error = ?, result = ?",
            (StageStatus.FAILED.value, time.time(), duration, error, _to_json(result or {})),
        )

    def mark_skipped(self, run_id: int, stage: str) -> None:
        """A done stage the last apply did not run again; its result and timings stay as they were."""
        # The result of a skipped stage is its earlier DONE record: keep it, only the status says "skipped".
        self._update_stage(run_id, stage, "status = ?", (StageStatus.SKIPPED.value,))

    def mark_pending(self, run_id: int, stage: str) -> None:
        """Forget ``stage``'s earlier outcome: it will run again in this run."""
        self._update_stage(
            run_id,
            stage,
            "status = ?, started = NULL, finished = NULL, duration = NULL, bytes_shared = 0, "
            "bytes_sealed = 0, result = '{}', error = NULL",
            (StageStatus.PENDING.value,),
        )

    def _update_stage(self, run_id: int, stage: str, assignments: str, values: tuple[Any, ...]) -> None:
        with self._transaction():
            cursor = self._db.execute(
                f"UPDATE stages SET {assignments} WHERE run_id = ? AND stage = ?", (*values, run_id, stage)
            )
            if cursor.rowcount != 1:
                raise KeyError(f"run {run_id} has no stage {stage!r}")


def _to_json(result: Mapping[str, Any]) -> str:
    try:
        return json.dumps(dict(result), sort_keys=True)
    except (TypeError, ValueError) as err:
        # A stage bug, not a user error: the result must be plain JSON so a later apply can read it.
        raise TypeError(f"a stage result must be JSON (str, numbers, lists, dicts): {err}") from None


def _run_from_row(row: tuple[Any, ...]) -> RunRecord:
    run_id, name, digest, started, finished, outcome, attempts = row
    return RunRecord(run_id, name, digest, started, finished, RunOutcome(outcome), attempts)


def _stage_from_row(row: tuple[Any, ...]) -> StageRecord:
    (
        stage,
        status,
        inputs,
        position,
        run_id,
        attempt,
        started,
        finished,
        duration,
        shared,
        sealed,
        result,
        error,
    ) = row
    return StageRecord(
        stage=stage,
        status=StageStatus(status),
        inputs=inputs,
        position=position,
        run_id=run_id,
        attempt=attempt,
        started=started,
        finished=finished,
        duration=duration,
        bytes_shared=shared,
        bytes_sealed=sealed,
        result=json.loads(result),
        error=error,
    )
