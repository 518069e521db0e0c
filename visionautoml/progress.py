"""Progress for people at a terminal and for CI logs, from one constructor.

A terminal gets a rich progress bar that redraws in place. A log file (CI, a detached run,
a Ray worker) cannot redraw, and a silent log looks like a hung job, so there the same
object prints a plain line per task at most every :data:`LOG_INTERVAL_S` seconds, and one
when the task completes.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

LOG_INTERVAL_S = 30.0


class _LogLines(Progress):
    """A disabled rich Progress that prints ``description: done/total`` lines now and then instead."""

    def __init__(self, *columns: ProgressColumn, console: Console, **kwargs: Any) -> None:
        super().__init__(*columns, console=console, disable=True, **kwargs)
        self._log_console = console
        self._logged: dict[TaskID, float] = {}

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        self._maybe_log(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._maybe_log(task_id)

    def _maybe_log(self, task_id: TaskID) -> None:
        task = self._tasks[task_id]
        now = time.monotonic()
        finished = task.total is not None and task.completed >= task.total
        if finished and self._logged.get(task_id) == -1.0:
            return
        if not finished and now - self._logged.get(task_id, now - LOG_INTERVAL_S * 0.9) < LOG_INTERVAL_S:
            return
        self._logged[task_id] = -1.0 if finished else now
        total = f"/{task.total:g}" if task.total is not None else ""
        extra = " ".join(str(value) for value in task.fields.values() if value)
        line = (
            f"{task.description}: {task.completed:g}{total} after {task.elapsed or 0:.0f} s {extra}".rstrip()
        )
        self._log_console.print(line, soft_wrap=True, highlight=False, markup=False)


def progress_bar(
    console: Console | None = None,
    *,
    eta: bool = False,
    transfer: bool = False,
    fields: tuple[str, ...] = (),
    transient: bool = True,
) -> Progress:
    """A bar with ``done/total`` and elapsed (or remaining, ``eta``) time, or bytes and speed (``transfer``).

    ``fields`` are task fields shown after the bar (the trainer's running loss). Without a
    terminal the bar becomes periodic log lines (see the module docstring).
    """
    console = console or Console(stderr=True)
    counts: list[ProgressColumn] = (
        [DownloadColumn(), TransferSpeedColumn()] if transfer else [MofNCompleteColumn()]
    )
    timing = TimeRemainingColumn() if eta or transfer else TimeElapsedColumn()
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        *counts,
        timing,
        *(TextColumn(f"{{task.fields[{name}]}}") for name in fields),
    ]
    if not console.is_terminal:
        return _LogLines(*columns, console=console)
    return Progress(*columns, console=console, transient=transient)
