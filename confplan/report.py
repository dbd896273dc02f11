"""The report (``confplan.report/v1``, docs/report.md): one JSON document for a plan's run, whatever the
command and the outcome. ``build_report`` makes it from what a command knows (a pure function but for the
liveness probe of the VMM pids); ``report_for_plan`` reads the checkpoint for it, as ``confplan status``
does. Its JSON Schema ships beside this module as ``report_schema.json`` (``confplan schema --report``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Protocol

# Registers the pipeline's stages, so the steps of the next apply use their resume policies.
import confplan.stages.modules  # noqa: F401
from confplan import __version__
from confplan.agent.handle import connect_remote, vmm_alive
from confplan.errors import ConfplanError, ExitCode
from confplan.plan import Plan, PlanError
from confplan.stages.base import stage_policies
from confplan.stages.checkpoint import (
    DB_NAME,
    LOCK_NAME,
    CheckpointStore,
    RunOutcome,
    RunRecord,
    StageRecord,
)
from confplan.stages.executor import RunChoice, StageFailed, Step, choose_run, plan_steps
from confplan.stages.observers import EVENT_SCHEMA, iso

__all__ = ["EVENT_SCHEMA", "SCHEMA", "build_report", "iso", "report_for_plan", "report_schema", "schema_text"]

SCHEMA: Final = "confplan.report/v1"
SCHEMA_PATH: Final = Path(__file__).with_name("report_schema.json")
KINDS: Final = ("apply", "dry-run", "preflight", "status")

_CLASSES: Final[dict[int, str]] = {
    ExitCode.INTERNAL: "internal", ExitCode.USAGE: "usage", ExitCode.ENVIRONMENT: "environment",
    ExitCode.MIGRATION_FAILED: "migration", ExitCode.BUSY: "busy", ExitCode.GUEST_LOST: "guest-lost",
    ExitCode.HANDOVER_IN_DOUBT: "handover-in-doubt", ExitCode.INTERRUPTED: "interrupted",
}  # fmt: skip


class _Json(Protocol):
    def to_json(self) -> Mapping[str, Any]: ...


PidProbe = Callable[[int], bool | None]
AgentProbe = Callable[[str, str, int], Mapping[str, Any] | None]  # role, host, port -> the agent's info


def schema_text() -> str:
    """The report's JSON Schema, as ``confplan schema --report`` prints it."""
    return SCHEMA_PATH.read_text()


def report_schema() -> dict[str, Any]:
    result: dict[str, Any] = json.loads(schema_text())
    return result


# ---- errors and exit codes ----


def exit_code_of(error: BaseException | None) -> int:
    """The exit code ``confplan`` exits with for ``error`` (the CLI's own rule, cli.main)."""
    if error is None:
        return ExitCode.OK
    if isinstance(error, KeyboardInterrupt):
        return ExitCode.INTERRUPTED
    if isinstance(error, ConfplanError):
        return int(error.exit_code)
    if isinstance(error, SystemExit):
        return error.code if isinstance(error.code, int) else (0 if error.code is None else 1)
    return ExitCode.INTERNAL


def error_class(error: BaseException, code: int) -> str:
    """The class of ``error`` (docs/report.md), from its exit code: they cannot disagree."""
    if isinstance(error, PlanError):
        return "plan"
    return _CLASSES.get(code, "internal")


def error_json(error: BaseException | None, code: int) -> dict[str, Any] | None:
    if error is None:
        return None
    if isinstance(error, ConfplanError):
        message, hint = error.message, error.hint
    elif isinstance(error, KeyboardInterrupt):
        message, hint = "interrupted (Ctrl-C)", None
    else:
        message = f"internal error: {type(error).__name__}: {error}"
        hint = "this is a bug in confplan; rerun with CONFPLAN_DEBUG=1 for the traceback and report it"
    stage = error.stage if isinstance(error, StageFailed) else None
    return {"class": error_class(error, code), "stage": stage, "message": message, "hint": hint}


# ---- the parts ----


def run_json(run: RunRecord | None) -> dict[str, Any] | None:
    if run is None:
        return None
    return {"id": run.run_id, "outcome": run.outcome.value, "started": iso(run.started),
            "finished": iso(run.finished), "attempts": run.attempts, "plan_hash": run.plan_hash}  # fmt: skip


def stage_json(record: StageRecord) -> dict[str, Any]:
    return {
        "name": record.stage, "status": record.status.value, "attempt": record.attempt,
        "started": iso(record.started), "finished": iso(record.finished),
        "duration_seconds": record.duration, "bytes_shared": record.bytes_shared,
        "bytes_sealed": record.bytes_sealed, "error": record.error, "result": dict(record.result),
    }  # fmt: skip


def step_json(step: Step | Mapping[str, Any]) -> dict[str, Any]:
    return step.to_json() if isinstance(step, Step) else dict(step)


def migration_json(records: Mapping[str, StageRecord]) -> dict[str, Any]:
    """The summary: precopy's rounds and the pause's final one, the byte totals, downtime, the pause."""

    def data(stage: str) -> Mapping[str, Any]:
        record = records.get(stage)
        return record.result if record is not None and record.result else {}

    precopy, final, resume = data("precopy"), data("stop-and-copy"), data("resume-target")
    rounds = [{**r, "final": False} for r in precopy.get("rounds", [])]
    if final.get("final_round"):
        rounds.append({**final["final_round"], "final": True})
    return {
        "rounds": rounds,
        "bytes_shared": sum(record.bytes_shared for record in records.values()),
        "bytes_sealed": sum(record.bytes_sealed for record in records.values()),
        "downtime_seconds": resume.get("downtime_seconds"),
        "guest_downtime_seconds": resume.get("guest_downtime_seconds"),
        "clock_monotonic": resume.get("clock_monotonic"),
        "source_paused_seconds": final.get("source_paused_seconds"),
        "pause": dict(final["steps"]) if final.get("steps") else None,
        "decision": precopy.get("decision"),
        "target_pid": resume.get("target_pid"),
    }


def processes_json(
    records: Mapping[str, StageRecord], probe: PidProbe = vmm_alive, remote: AgentProbe | None = None
) -> list[dict[str, Any]]:
    """The VMM processes the run's records name (the source launch-source started, the target
    provision-target started or reached), each checked now: a local pid with ``probe``; a remote agent's
    guest with ``remote`` (the agent's ``info``: ``alive`` = it holds the guest), else not at all
    (``alive`` null)."""
    found = []
    for role, stage in (("source", "launch-source"), ("target", "provision-target")):
        record = records.get(stage)
        pid = record.result.get("pid") if record is not None else None
        if not isinstance(pid, int):
            continue
        agent = record.result.get("agent") if record is not None else None
        if not agent:
            found.append({"role": role, "pid": pid, "host": "local", "alive": probe(pid)})
            continue
        entry: dict[str, Any] = {"role": role, "pid": pid, "host": f"{agent[0]}:{agent[1]}", "alive": None}
        info = remote(role, str(agent[0]), int(agent[1])) if remote is not None else None
        if info is not None:
            entry.update(alive=bool(info.get("machine")), guest_running=bool(info.get("running")))
        found.append(entry)
    return found


def _outcome(kind: str, error: dict[str, Any] | None, run: RunRecord | None, running: bool) -> str:
    if error is not None:
        if error["class"] == "interrupted":
            return "interrupted"
        if kind == "preflight" or (error["class"] == "environment" and run is None):
            return "refused"
        return "failed"
    if kind in ("dry-run", "preflight"):
        return "planned"
    if kind == "apply":
        return "succeeded" if run is None else run.outcome.value
    if run is None:
        return "none"
    if run.outcome is RunOutcome.RUNNING:
        return "running" if running else "interrupted"
    return run.outcome.value


def _status_interrupted(records: Mapping[str, StageRecord]) -> bool:
    return any((record.error or "").startswith("interrupted") for record in records.values())


def build_report(
    *,
    kind: str,
    plan: Plan | None,
    plan_file: str,
    run: RunRecord | None = None,
    records: Mapping[str, StageRecord] | None = None,
    steps: Iterable[Step | Mapping[str, Any]] = (),
    error: BaseException | None = None,
    preflight: Sequence[Mapping[str, Any] | _Json] = (),
    diagnostics: Sequence[Mapping[str, Any] | _Json] = (),
    choice: RunChoice | None = None,
    apply_running: bool = True,
    probe: PidProbe = vmm_alive,
    remote: AgentProbe | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """The ``confplan.report/v1`` document of ``kind`` (apply, dry-run, preflight, status).

    ``run``/``records``: the run it is about and its stage records (the checkpoint's); ``steps``: what
    this apply did, would do, or the next apply would do; ``error``: what ended the command (its exit code
    and class follow from it; a PlanError's diagnostics are taken when ``diagnostics`` is empty);
    ``preflight``: the checks run (dicts or objects with ``to_json``); ``choice``: the run apply chose;
    ``apply_running``: for status, whether an apply holds the checkpoint (a ``running`` run without one
    was interrupted); ``probe``: tells whether a local VMM pid is alive; ``remote``: asks a remote agent
    (status does, through the agent's ``info``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown report kind {kind!r}")
    records = dict(records or {})
    code = exit_code_of(error)
    err = error_json(error, code)
    outcome = _outcome(kind, err, run, apply_running)
    if outcome == "failed" and kind == "status" and _status_interrupted(records):
        outcome = "interrupted"
    if kind == "status" and error is None:  # status itself worked: its exit code says how the run ended
        code = ExitCode.MIGRATION_FAILED if outcome in ("failed", "interrupted") else code
    if not diagnostics and isinstance(error, PlanError):
        diagnostics = error.diagnostics
    return {
        "schema": SCHEMA,
        "kind": kind,
        "confplan_version": __version__,
        "generated_at": iso(time.time() if now is None else now),
        "plan": {
            "file": plan_file,
            "name": plan.metadata.name if plan else None,
            "hash": plan.plan_hash() if plan else None,
        },
        "checkpoint": str(plan.checkpoint.dir / DB_NAME) if plan else None,
        "outcome": outcome,
        "exit_code": int(code),
        "error": err,
        "run": run_json(run),
        "run_choice": choice.to_json() if choice is not None else None,
        "steps": [step_json(step) for step in steps],
        "stages": [stage_json(record) for record in records.values()],
        "preflight": [_plain(check) for check in preflight],
        "migration": migration_json(records),
        "processes": processes_json(records, probe, remote),
        "diagnostics": [_plain(diagnostic) for diagnostic in diagnostics],
    }


def _plain(item: Mapping[str, Any] | _Json) -> dict[str, Any]:
    return dict(item) if isinstance(item, Mapping) else dict(item.to_json())


# ---- reading the checkpoint ----


def read_run(plan: Plan, run_id: int | None = None) -> tuple[RunRecord | None, dict[str, StageRecord]]:
    """Run ``run_id`` (default: the plan's latest) and its stage records; nothing is created."""
    if not (plan.checkpoint.dir / DB_NAME).exists():
        return None, {}
    with CheckpointStore.open(plan.checkpoint.dir, create=False) as store:
        run = store.latest_run(plan.metadata.name) if run_id is None else store.run(run_id)
        return run, store.stage_records(run.run_id) if run is not None else {}


def apply_holds(plan: Plan) -> bool:
    """Does an apply hold this plan's checkpoint lock now? (No lock file: no.)"""
    path = plan.checkpoint.dir / LOCK_NAME
    try:
        lock = open(path, "rb")  # noqa: SIM115 - closed below, whatever happens
    except OSError:
        return False
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        with contextlib.suppress(OSError):
            fcntl.flock(lock, fcntl.LOCK_UN)
        return False


def report_for_plan(
    plan: Plan, plan_file: str, *, probe: PidProbe = vmm_alive, remote: AgentProbe | None = None
) -> dict[str, Any]:
    """The ``status`` report of ``plan`` from its checkpoint: the latest run, its stages, the steps the
    next ``confplan apply`` would take (the same pure decision apply makes), and its VMMs as they are now
    (a remote target asked through its agent, pinned as the plan pins it: ``ask_agent``)."""
    run, records = read_run(plan)
    choice = choose_run(run, plan.plan_hash())
    steps = plan_steps(plan.stages, records if choice.resume else {}, policies=stage_policies())
    running = run is not None and run.outcome is RunOutcome.RUNNING and apply_holds(plan)
    return build_report(kind="status", plan=plan, plan_file=plan_file, run=run, records=records,
                        steps=steps, choice=choice, apply_running=running, probe=probe,
                        remote=remote if remote is not None else ask_agent(plan))  # fmt: skip


def ask_agent(plan: Plan) -> AgentProbe:
    """An ``AgentProbe`` for ``plan``: the agent's ``info`` over mutual TLS, pinned as the plan pins that
    side; None when it cannot be reached (the report then says it cannot tell)."""

    def info(role: str, host: str, port: int) -> Mapping[str, Any] | None:
        endpoint = plan.target if role == "target" else plan.source
        try:
            handle = connect_remote(host, port, role, pin=endpoint.fingerprint)
        except (ConfplanError, OSError):
            return None
        try:
            answer: Mapping[str, Any] = handle.call("info", timeout=5.0)
            return answer
        except (ConfplanError, OSError):
            return None
        finally:
            handle.close()

    return info
