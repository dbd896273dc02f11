"""The error types the CLI turns into clean messages (never a traceback).

A ``ConfplanError`` is something the user can act on: it carries what went wrong, where, and a hint that
says what to do. Anything else that escapes to the CLI is an internal error (exit 1).
"""

from __future__ import annotations


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
