"""The error types the CLI turns into clean messages (never a traceback).

A ``ConfplanError`` is something the user can act on: it carries what went wrong, where, and a hint that
says what to do. Anything else that escapes to the CLI is an internal error (exit 1).
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Every exit code of the ``confplan`` command, one per class of outcome (``confplan --help``)."""

    OK = 0  # done
    INTERNAL = 1  # a bug in confplan
    USAGE = 2  # a wrong command line or an invalid plan
    ENVIRONMENT = 3  # the machine lacks something (preflight): nothing was launched or changed
    MIGRATION_FAILED = 4  # the migration failed; the guest runs on the source
    BUSY = 5  # the plan is in use, or going on would stop a running guest without consent
    GUEST_LOST = 6  # the guest's only current copy is gone
    HANDOVER_IN_DOUBT = 7  # neither side may run the guest until the silent one answers
    INTERRUPTED = 130  # Ctrl-C (the shell's convention for SIGINT)


EXIT_CODE_MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "done",
    ExitCode.INTERNAL: "internal error (a bug in confplan)",
    ExitCode.USAGE: "usage error or invalid plan",
    ExitCode.ENVIRONMENT: "the host lacks something (preflight); nothing was launched",
    ExitCode.MIGRATION_FAILED: "the migration failed; the guest runs on the source",
    ExitCode.BUSY: "plan busy, or it would stop a running guest without consent",
    ExitCode.GUEST_LOST: "the guest's only current copy is gone",
    ExitCode.HANDOVER_IN_DOUBT: "handover in doubt: no side may run the guest yet",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C)",
}


class ConfplanError(Exception):
    """A failure the user can act on. ``exit_code`` is what the CLI exits with."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def render(self) -> str:
        """The text the CLI prints: the message, then the hint on its own line."""
        if self.hint:
            return f"error: {self.message}\nhint: {self.hint}"
        return f"error: {self.message}"


class EnvironmentProblem(ConfplanError):
    """The machine lacks something confplan needs (/dev/kvm, the built firmware, the C core)."""

    exit_code = 3


class PlanBusy(ConfplanError):
    """Going on would stop or replace a guest that runs (or another plan's VMM): refused without consent."""

    exit_code = 5
