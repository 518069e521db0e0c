"""Problems found in a dataset, collected instead of raised one at a time.

Validation must report every problem, not only the first, so readers record what
they find in a :class:`ProblemLog` and go on with what they can still read.

Real datasets are imperfect, and one bad box among thousands must not stop a user who
cannot edit the source. So a problem can carry two more facts: ``record``, the image
(or per-image annotation) an error makes unusable, which lets ``drop_invalid`` skip that
image instead of refusing the dataset; and ``repair``, what was done about a problem that
could be fixed in the canonical model (a box clipped or dropped), so the repairs can be
counted and recorded with a dataset version. The source files are never changed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum

from visionautoml.errors import DataError


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"


class Repair(StrEnum):
    CLIPPED = "clipped box"
    DROPPED_BOX = "dropped box"
    SKIPPED_IMAGE = "skipped image"


@dataclass(frozen=True, slots=True)
class Problem:
    severity: Severity
    file: str
    message: str
    line: int | None = None
    field: str | None = None
    record: str | None = None
    repair: Repair | None = None

    def location(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where} [{self.field}]" if self.field else where

    def __str__(self) -> str:
        return f"{self.severity.value}: {self.location()}: {self.message}"


@dataclass(slots=True)
class ProblemLog:
    problems: list[Problem] = field(default_factory=list)

    def error(
        self,
        file: object,
        message: str,
        *,
        line: int | None = None,
        field: str | None = None,
        record: object = None,
    ) -> None:
        """``record``: the image path (or annotation) this error makes unusable, if it is one image's."""
        where = None if record is None else str(record)
        self.problems.append(Problem(Severity.ERROR, str(file), message, line, field, where))

    def warning(
        self,
        file: object,
        message: str,
        *,
        line: int | None = None,
        field: str | None = None,
        repair: Repair | None = None,
    ) -> None:
        self.problems.append(Problem(Severity.WARNING, str(file), message, line, field, None, repair))

    def skip_records(self, skipped: set[str] | None = None) -> set[str]:
        """Turn every error that concerns one image into a warning that the image is skipped.

        Returns the records skipped (image paths or annotation locations); errors of the
        dataset as a whole (a class list, an unreadable COCO file) stay errors. Only errors
        named in ``skipped`` are turned when it is given.
        """
        turned: set[str] = set()
        kept: list[Problem] = []
        for problem in self.problems:
            record = problem.record
            if (
                problem.severity is Severity.ERROR
                and record is not None
                and (skipped is None or record in skipped)
            ):
                problem = replace(
                    problem,
                    severity=Severity.WARNING,
                    message=f"{problem.message} (image skipped: drop_invalid)",
                    repair=Repair.SKIPPED_IMAGE,
                )
                turned.add(record)
            kept.append(problem)
        self.problems = kept
        return turned

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity is Severity.ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity is Severity.WARNING]

    @property
    def repairs(self) -> list[Problem]:
        """Boxes clipped or dropped to make the dataset usable (not the skipped images)."""
        return [p for p in self.problems if p.repair in (Repair.CLIPPED, Repair.DROPPED_BOX)]

    @property
    def skipped(self) -> list[Problem]:
        return [p for p in self.problems if p.repair is Repair.SKIPPED_IMAGE]

    def summary(self) -> dict[str, int]:
        """The counts a command prints and a dataset version records."""
        skipped = {p.record for p in self.skipped}
        return {
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "clipped_boxes": sum(p.repair is Repair.CLIPPED for p in self.problems),
            "dropped_boxes": sum(p.repair is Repair.DROPPED_BOX for p in self.problems),
            "skipped_images": len(skipped),
        }

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
