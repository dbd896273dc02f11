"""The error types the CLI turns into clean messages (never a traceback).

A ``ConfplanError`` is something the user can act on: it carries what went wrong, where, and a hint that
says what to do. Anything else that escapes to the CLI is an internal error (exit 1).
"""

from __future__ import annotations

import enum
import errno
import os
import sqlite3
from pathlib import Path


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


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def environment_problem(err: BaseException, *, where: str | Path | None = None) -> EnvironmentProblem | None:
    """``err`` as the host's problem when it is one: no space left (ENOSPC, a quota, SQLite's "database
    or disk is full") or a read-only filesystem, naming the folder (``where``, else the file's folder);
    None for anything else, which stays what it is."""
    if isinstance(err, EnvironmentProblem):
        return err
    full = isinstance(err, sqlite3.OperationalError) and "disk is full" in str(err)
    if isinstance(err, OSError) and err.filename is not None and where is None:
        where = os.path.dirname(os.path.abspath(os.fsdecode(err.filename)))
    place = f" holding {where}" if where is not None else ""
    if full or (isinstance(err, OSError) and err.errno in _NO_SPACE):
        return EnvironmentProblem(
            f"no space left on the device{place} ({err})",
            hint=f"free space there (`df -h {where or '.'}` shows it), or give the plan a checkpoint folder "
            "on a device with room (checkpoint.dir, or --checkpoint-dir DIR)",
        )
    if isinstance(err, OSError) and err.errno == errno.EROFS:
        return EnvironmentProblem(
            f"the filesystem{place} is read-only ({err})",
            hint="give the plan a checkpoint folder on a writable filesystem (--checkpoint-dir DIR)",
        )
    return None
