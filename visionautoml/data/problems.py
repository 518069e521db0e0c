"""Problems found in a dataset, collected instead of raised one at a time.

Validation must report every problem, not only the first, so readers record what
they find in a :class:`ProblemLog` and go on with what they can still read.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum

from visionautoml.errors import DataError


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True, slots=True)
class Problem:
    severity: Severity
    file: str
    message: str
    line: int | None = None
    field: str | None = None

    def location(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where} [{self.field}]" if self.field else where

    def __str__(self) -> str:
        return f"{self.severity.value}: {self.location()}: {self.message}"


@dataclass(slots=True)
class ProblemLog:
    problems: list[Problem] = field(default_factory=list)

    def error(self, file: object, message: str, *, line: int | None = None, field: str | None = None) -> None:
        self.problems.append(Problem(Severity.ERROR, str(file), message, line, field))

    def warning(
        self, file: object, message: str, *, line: int | None = None, field: str | None = None
    ) -> None:
        self.problems.append(Problem(Severity.WARNING, str(file), message, line, field))

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity is Severity.ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity is Severity.WARNING]

    def raise_if_errors(self, what: str) -> None:
        """Stop a command that cannot go on with broken input, listing every error."""
        if self.errors:
            shown = "\n".join(f"  {p}" for p in self.errors[:20])
            more = f"\n  ... and {len(self.errors) - 20} more" if len(self.errors) > 20 else ""
            raise DataError(
                f"{what}: {len(self.errors)} error(s) in the dataset:\n{shown}{more}\n"
                "Run `visionautoml data validate` on it for the full report."
            )

    def to_json(self) -> str:
        return json.dumps([asdict(p) for p in self.problems], indent=2)
