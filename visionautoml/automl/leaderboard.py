"""The trials for people: the live table while a sweep runs, then the leaderboard.

The leaderboard ranks completed trials by their final metric, then the others by the best
metric they reached; it is printed, and logged to the parent run as Markdown and CSV.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ray import tune
from rich.live import Live
from rich.table import Table

from visionautoml.automl.schedulers import FINAL_KEY, INTERVAL_KEY
from visionautoml.automl.trial_runner import BEST_KEY, finite
from visionautoml.tracking.schema import PRIMARY_METRIC, TrialState

COMPLETED, EARLY_TERMINATED, FAILED, NOT_STARTED = (
    TrialState.COMPLETED,
    TrialState.EARLY_TERMINATED,
    TrialState.FAILED,
    TrialState.NOT_STARTED,
)


@dataclass
class TrialRecord:
    """One trial as the leaderboard, the console and ``--output-json`` show it."""

    trial_id: str
    number: int
    state: str
    params: dict[str, Any]
    evaluations: int = 0
    epoch: int = 0
    best_metric: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None
    model_uri: str | None = None
    node_id: str | None = None
    seconds: float = 0.0
    reason: str = ""
    retries: int = 0
    """How often Ray Tune restarted the trial after its process or node was lost."""


class Board:
    """The trials as they run: what the live table and the leaderboard are drawn from."""

    def __init__(self, searched: list[str], total: int):
        self.searched = searched
        self.total = total
        self.rows: dict[str, dict[str, Any]] = {}

    def update(self, trial: Any, state: str, result: dict[str, Any] | None = None) -> None:
        row = self.rows.setdefault(
            trial.trial_id, {"params": dict(trial.config.get("params", {})), "evaluations": 0, "epoch": 0}
        )
        row["state"] = state
        if result:
            row["evaluations"] = int(result.get(INTERVAL_KEY, row["evaluations"]))
            row["epoch"] = int(result.get("epoch", row["epoch"]) or row["epoch"])
            if finite(result.get(BEST_KEY)):
                row["best"] = float(result[BEST_KEY])

    def evaluation_line(self, trial_id: str, result: dict[str, Any]) -> str:
        """``trial 2 epoch 5: loss 3.2100, mAP 0.6120 (best 0.6310)`` for a log that cannot redraw."""
        row = self.rows[trial_id]
        loss = f"loss {result['loss']:.4f}, " if finite(result.get("loss")) else ""
        value = result.get(PRIMARY_METRIC)
        score = f"{_abbrev()} {value:.4f}" if finite(value) else f"{_abbrev()} -"
        best = f" (best {row['best']:.4f})" if "best" in row else ""
        return f"trial {trial_number(trial_id)} epoch {row['epoch']}: {loss}{score}{best}"

    def line(self, trial_id: str) -> str:
        number = trial_number(trial_id)
        row = self.rows[trial_id]
        params = ", ".join(f"{name}={format_value(value)}" for name, value in row["params"].items())
        best = f", best {_abbrev()} {row['best']:.4f} after {row['epoch']} epoch(s)" if "best" in row else ""
        return f"trial {number} ({trial_id}) {row['state']}: {params}{best}"

    def render(self) -> Table:
        done = sum(1 for row in self.rows.values() if row["state"] not in ("running", "pending"))
        table = Table(title=f"Sweep: {done}/{self.total} trials done", title_justify="left")
        for column in ("trial", "state", "model", *_short_names(self.searched), "epoch", f"best {_abbrev()}"):
            table.add_column(column, justify="right" if column in ("epoch",) else "left")
        for trial_id, row in sorted(self.rows.items()):
            number = trial_number(trial_id)
            params = row["params"]
            table.add_row(
                f"{number} {trial_id[-5:]}",
                _styled_state(row["state"]),
                str(params.get("model_name", "")),
                *(format_value(params.get(name)) for name in self.searched if name != "model_name"),
                str(row["epoch"] or ""),
                f"{row['best']:.4f}" if "best" in row else "",
            )
        return table


class BoardCallback(tune.Callback):
    """Feeds Tune's trial events to the live table.

    Tune pickles its callbacks into the experiment folder (for ``--resume``); the table
    holds a console, which does not pickle, so the callback reaches the table of the sweep
    in progress through a class attribute instead of holding it.
    """

    active: ClassVar[tuple[Board, Live] | None] = None

    def _show(self, trial: Any, state: str, result: dict | None = None) -> None:
        if BoardCallback.active is None:
            return
        board, live = BoardCallback.active
        board.update(trial, state, result)
        if live.console.is_terminal:
            live.update(board.render())
        elif state != "running" or result is None:
            # A log file (CI) gets one line per trial start and end instead of a redrawn table,
            live.console.print(board.line(trial.trial_id), soft_wrap=True, highlight=False)
        elif not result.get(FINAL_KEY):
            # and one per evaluation, so the log moves while trials train.
            live.console.print(board.evaluation_line(trial.trial_id, result), soft_wrap=True, highlight=False)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._show(trial, "running")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._show(trial, "running", result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        final = bool((trial.last_result or {}).get(FINAL_KEY))
        self._show(trial, COMPLETED if final else "stopped", trial.last_result)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._show(trial, FAILED)
        if BoardCallback.active is not None and getattr(trial, "error_file", None):
            # One line, not the worker's traceback: the reason is in the leaderboard, the trace is here.
            BoardCallback.active[1].console.print(
                f"trial {trial_number(trial.trial_id)} failed; its traceback: {trial.error_file}",
                soft_wrap=True,
                highlight=False,
                markup=False,
            )


def trial_number(trial_id: str) -> int:
    suffix = trial_id.rsplit("_", 1)[-1]
    return int(suffix) + 1 if suffix.isdigit() else 0


def _abbrev() -> str:
    return "mAP" if PRIMARY_METRIC == "mean_average_precision" else PRIMARY_METRIC


def _short_names(searched: list[str]) -> list[str]:
    return [name for name in searched if name != "model_name"]


def _styled_state(state: str) -> str:
    colour = {
        "running": "cyan",
        COMPLETED: "green",
        EARLY_TERMINATED: "yellow",
        FAILED: "red",
        "stopped": "yellow",
    }.get(state)
    return f"[{colour}]{state}[/{colour}]" if colour else state


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def ranked(records: list[TrialRecord]) -> list[TrialRecord]:
    def key(record: TrialRecord) -> tuple:
        value = record.metrics.get(PRIMARY_METRIC) if record.state == COMPLETED else record.best_metric
        return (record.state != COMPLETED, -(value if finite(value) else -math.inf), record.number)

    return sorted(records, key=key)


def _score(record: TrialRecord) -> float | None:
    value = record.metrics.get(PRIMARY_METRIC) if record.state == COMPLETED else record.best_metric
    return value if finite(value) else None


def leaderboard_rows(records: list[TrialRecord], searched: list[str]) -> list[dict[str, Any]]:
    """One row per trial, best first; a ``retries`` column only when some trial was retried."""
    retried = any(record.retries for record in records)
    rows = []
    for rank, record in enumerate(ranked(records), start=1):
        score = _score(record)
        row = {
            "rank": rank,
            "trial": record.number,
            "state": str(record.state),
            **{name: format_value(record.params.get(name)) for name in searched},
            "epochs": record.epoch,
            PRIMARY_METRIC: f"{score:.4f}" if score is not None else "",
            "seconds": f"{record.seconds:g}",
        }
        if retried:
            row["retries"] = record.retries
        rows.append({**row, "run_id": record.run_id or "", "reason": record.reason})
    return rows


def leaderboard_markdown(records: list[TrialRecord], searched: list[str]) -> str:
    """The leaderboard as Markdown (the parent run's ``leaderboard.md``)."""
    rows = leaderboard_rows(records, searched)
    if not rows:
        return "No trials ran.\n"
    return markdown_table(list(rows[0]), rows)


def markdown_table(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """A Markdown table of ``rows`` (dicts) in ``columns`` order; ``|`` escaped, floats to 4 places."""

    def cell(value: Any) -> str:
        text = f"{value:.4f}" if isinstance(value, float) else ("" if value is None else str(value))
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def leaderboard_csv(records: list[TrialRecord], searched: list[str]) -> str:
    rows = leaderboard_rows(records, searched)
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def leaderboard_table(records: list[TrialRecord], searched: list[str]) -> Table:
    """The console's leaderboard: the CSV's columns without run ids, long names kept on one line."""
    table = Table(title="Leaderboard", title_justify="left")
    rows = leaderboard_rows(records, searched)
    columns = [column for column in (rows[0] if rows else ["rank"]) if column != "run_id"]
    for column in columns:
        header = _abbrev() if column == PRIMARY_METRIC else column
        wrap = column == "reason"
        table.add_column(header, no_wrap=not wrap, overflow="fold" if wrap else "ellipsis")
    for row in rows:
        table.add_row(*(_styled_state(str(row[c])) if c == "state" else str(row[c]) for c in columns))
    return table
