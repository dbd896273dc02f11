"""Compiler-style plan diagnostics and the error that carries them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from confplan.errors import ConfplanError


@dataclass(frozen=True, order=True)
class Diagnostic:
    """One problem in a plan file; ``line``, ``column`` are 1-based, ``field`` is e.g. "helper.aux_vcpus"."""

    file: str
    line: int
    column: int
    field: str
    message: str

    def render(self) -> str:
        """``plans/x.yaml:12:5: helper.aux_vcpus: must be at least 1 ...`` (no field part when empty)."""
        where = f"{self.file}:{self.line}:{self.column}"
        text = f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        return text.replace("\n", "\\n")  # one diagnostic, one line, whatever the plan's keys hold

    def to_json(self) -> dict[str, str | int]:
        return asdict(self)


class PlanError(ConfplanError):
    """A plan that cannot be used; ``diagnostics`` holds every problem found, in file order."""

    def __init__(self, file: str, diagnostics: Sequence[Diagnostic]) -> None:
        self.file = file
        self.diagnostics = sorted(set(diagnostics))
        count = len(self.diagnostics)
        super().__init__(
            f"{file}: not a valid plan ({count} error{'s' if count != 1 else ''})",
            hint="'confplan schema' prints every field with its description; docs/plan.md explains the rules",
        )

    def render(self) -> str:
        """All diagnostics, one per line, then the summary and hint."""
        lines = [diagnostic.render() for diagnostic in self.diagnostics]
        return "\n".join([*lines, super().render()])
