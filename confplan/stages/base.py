"""What a stage module provides, and what the executor hands it.

A stage module defines one ``Stage`` subclass and registers it::

    @register_stage
    class Precopy(Stage):
        name = "precopy"
        needs = ("start-incoming",)          # stages whose recorded results it reads (checked first)
        provides = ("rounds", "decision")    # the keys of its own result's data
        policy = ResumePolicy(redo_from="start-incoming", reason="the target's received pages are gone")

        def run(self, ctx) -> StageResult:  # idempotent: may run again after a failure or a crash
            ...

``check`` (by default: every stage in ``needs`` has succeeded) may be extended to refuse early.

``run`` registers the undo of everything it sets up with ``ctx.add_teardown``; after a failure the executor
runs every registered tear-down in reverse. Until resume-target has succeeded, tear-downs must leave the
source guest running and intact (resume its vCPUs, close streams), never destroy it.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from confplan.errors import ConfplanError
from confplan.plan import Plan, StageSpec
from confplan.stages.checkpoint import StageRecord, StageStatus

if TYPE_CHECKING:
    from confplan.agent.handle import VmmHandle


@dataclass(frozen=True)
class ResumePolicy:
    """What a later apply redoes when this stage did not finish.

    ``redo_from``: the earliest stage to run again (None: this stage itself), because what this stage
    needs from it did not survive the failure. ``unsafe_if_interrupted``: when set, a crash in the middle
    of this stage (status still ``running``) is not resumed automatically; the text says why.
    ``settled_on_rerun``: when set, what this stage does may have finished without it (the VMMs' handover):
    a rerun first asks the VMMs what is, so the failure's hint says that instead of a stage to resume at.
    """

    redo_from: str | None = None
    reason: str = ""
    unsafe_if_interrupted: str | None = None
    settled_on_rerun: str | None = None


def stage_inputs(spec: StageSpec) -> str:
    """Digest of what a stage's action depends on besides the plan (its name and parameters)."""
    text = json.dumps({"stage": spec.name, "params": spec.params}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class StageResult:
    """What a successful action reports; ``data`` must be JSON (a later apply's stages read it back)."""

    bytes_shared: int = 0
    bytes_sealed: int = 0
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Progress:
    """How far a stage is. ``fields``: its own figures for machine readers (precopy: round, bytes_sent,
    rate_bytes_per_second, dirty_pages_left, eta_seconds); ``milestone``: a step worth a line of its own
    (a round's end), never thinned out the way frequent progress is."""

    done: int
    total: int | None = None
    unit: str = ""
    message: str = ""
    fields: Mapping[str, Any] = field(default_factory=dict)
    milestone: bool = False


class TeardownWhen(enum.Enum):
    ON_FAILURE = "on-failure"  # undo: only when the apply fails (resume the source's vCPUs, say)
    ALWAYS = "always"  # release: also when the apply succeeds (close an RPC connection, say)


@dataclass
class Teardown:
    """A registered undo; ``cancel`` it once a later stage has made it wrong to run."""

    label: str
    stage: str
    action: Callable[[], None]
    when: TeardownWhen
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class StageContext:
    """What a stage sees: the plan, earlier stages' results, live objects, progress and tear-downs."""

    def __init__(
        self,
        plan: Plan,
        run_id: int,
        records: Mapping[str, StageRecord],
        report_progress: Callable[[str, Progress], None],
    ) -> None:
        self.plan = plan
        self.run_id = run_id
        self.records: dict[str, StageRecord] = dict(records)
        # What one stage hands later ones within this apply, in memory (never checkpointed):
        self.vmms: dict[str, VmmHandle] = {}  # the live RPC handles of the VMMs, by role
        self.pause_started: float | None = None  # monotonic time stop-and-copy paused the guest
        self.mac_tables = False  # precopy filled both helpers' MAC tables: verify folds them
        self.teardowns: list[Teardown] = []
        # What a stage got done so far (precopy: its rounds): should it fail, its record keeps this as its
        # result, so a report of the failure still shows the work (docs/report.md).
        self.partial: dict[str, dict[str, Any]] = {}
        self.current = ""
        self._report_progress = report_progress

    def result_of(self, stage: str) -> Mapping[str, Any]:
        """The recorded result of an earlier stage; a ConfplanError when it has not succeeded."""
        record = self.records.get(stage)
        if record is None or record.status not in (StageStatus.DONE, StageStatus.SKIPPED):
            status = "not run" if record is None else record.status.value
            raise ConfplanError(
                f"stage {self.current or '?'} needs the result of stage {stage}, which is {status}",
                hint=f"list {stage} before {self.current or 'it'} in the plan's stages",
            )
        return record.result

    def progress(
        self, done: int, total: int | None = None, *, unit: str = "", message: str = "",
        fields: Mapping[str, Any] | None = None, milestone: bool = False,
    ) -> None:  # fmt: skip
        """Tell the observer how far the current stage is (also from another thread: an RPC event)."""
        self._report_progress(self.current, Progress(done, total, unit, message, fields or {}, milestone))

    def add_teardown(
        self, label: str, action: Callable[[], None], *, when: TeardownWhen = TeardownWhen.ON_FAILURE
    ) -> Teardown:
        teardown = Teardown(label, self.current, action, when)
        self.teardowns.append(teardown)
        return teardown


class Stage:
    """One stage: what it needs and provides, a precondition check, an idempotent action, a resume policy."""

    name: ClassVar[str] = ""
    needs: ClassVar[tuple[str, ...]] = ()  # earlier stages whose results ``run`` reads
    provides: ClassVar[tuple[str, ...]] = ()  # keys its StageResult.data always holds
    policy: ClassVar[ResumePolicy] = ResumePolicy()  # what a rerun redoes when this stage did not finish

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.params = dict(params)

    def check(self, ctx: StageContext) -> None:
        """Raise ConfplanError naming what is missing before ``run`` may start: by default, a stage in
        ``needs`` that has not succeeded."""
        for stage in self.needs:
            ctx.result_of(stage)

    def run(self, ctx: StageContext) -> StageResult:
        raise NotImplementedError(f"stage {self.name} has no action")

    def resume_safe(self, previous: StageRecord) -> bool:
        """May a later apply skip this stage, done earlier as ``previous``? False when what it produced is
        gone (the VMM it started has exited, say): then it runs again, and every stage after it."""
        return True

    def check_result(self, result: StageResult) -> None:
        """The stage kept its contract: every key of ``provides`` is in its result (a bug otherwise)."""
        missing = [key for key in self.provides if key not in result.data]
        if missing:
            raise TypeError(f"stage {self.name} did not provide {', '.join(missing)} in its result")


StageRegistry = dict[str, type[Stage]]
REGISTRY: StageRegistry = {}


@dataclass
class Reconciled:
    """What a rerun found out about the world before it decides anything from the checkpoint: stages the
    world settled (``done``, with the result to record; ``failed``, with the error), whether stages' products
    are still there (``still_valid``, over their own ``resume_safe``), and what it saw (``notes``)."""

    done: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    still_valid: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# (plan, the run's records) -> what really is; raises ConfplanError when no rerun may go on (a lost guest).
Reconciler = Callable[[Plan, Mapping[str, StageRecord]], Reconciled]
RECONCILERS: list[Reconciler] = []  # the pipeline's (stages.modules registers it)


def stage_policies(registry: StageRegistry | None = None) -> dict[str, ResumePolicy]:
    """Each registered stage's resume policy, by name (the real pipeline's: ``confplan.stages.modules``)."""
    return {name: cls.policy for name, cls in (REGISTRY if registry is None else registry).items()}


def register_stage(cls: type[Stage], registry: StageRegistry | None = None) -> type[Stage]:
    """Class decorator: make ``cls`` the action of stage ``cls.name``."""
    target = REGISTRY if registry is None else registry
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no stage name")
    if cls.name in target and target[cls.name] is not cls:
        raise ValueError(f"stage {cls.name} is already registered by {target[cls.name].__qualname__}")
    target[cls.name] = cls
    return cls
