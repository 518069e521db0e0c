"""A sweep's or a trial's runs as the reports read them back from the tracking store.

The reports are built from the tracking store alone (params, metric histories, tags and
artifacts of the runs), so ``visionautoml report RUN_ID`` regenerates them wherever the store
is reachable, long after the machines that ran the sweep are gone. This module reads what
``automl/`` and ``training/trial.py`` write (the names are :mod:`visionautoml.tracking.schema`'s)
and holds the parts both pages show: the best model's metrics and plots, the datasets.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from visionautoml.redact import scrub
from visionautoml.reports.page import html_table, image_html, image_uri, note
from visionautoml.tracking.schema import PRIMARY_METRIC, Artifact, RunStatus, Tag, TrialState
from visionautoml.tracking.store import RunView, Store

LOSS_METRIC = "loss"
SUMMARY_METRICS = (
    "mean_average_precision",
    "map",
    "map_50",
    "map_75",
    "map_voc",
    "mar_100",
    "precision",
    "recall",
)
STATE_COLOURS = {
    TrialState.COMPLETED: "#1a7f37",
    TrialState.EARLY_TERMINATED: "#d4a72c",
    TrialState.FAILED: "#cf222e",
}
# The diagnostics of reports/plots.py, the drawn predictions first: what a person looks at first.
PLOT_ORDER = ("validation_images.png", "precision_recall.png", "confusion_matrix.png")
PLOT_CAPTIONS = {
    "validation_images.png": "Validation images, worst first: ground truth green, predictions orange.",
    "precision_recall.png": "Precision against recall per class (VOC matching, IoU 0.5).",
    "confusion_matrix.png": "Confusion matrix: rows ground truth, columns predictions, background = missed "
    "objects (column) or false alarms (row).",
}


@dataclass
class Trial:
    """One child run as the report shows it; ``score`` is the value the trial is ranked by."""

    run_id: str
    number: int
    state: str
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, float]
    score: float | None
    epochs: int
    seconds: float | None
    reason: str
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def trials_of(store: Store, runs: Sequence[RunView], primary: str) -> list[Trial]:
    """The child runs as trials, numbered as Tune numbered them (start order when a run has no Tune id).

    A run the sweep marked ``interrupted`` was replaced by a later run of the same trial (``--resume``)
    and is left out, as the sweep's own leaderboard leaves it out.
    """
    current = [run for run in runs if run.tags.get(Tag.TRIAL_STATE) != TrialState.INTERRUPTED]
    ordered = sorted(current, key=lambda run: (_tune_number(run) or math.inf, run.start_time or 0))
    trials = []
    for position, run in enumerate(ordered, start=1):
        tags, metrics = dict(run.tags), dict(run.metrics)
        curves = {key: store.metric_history(run.run_id, key) for key in (primary, LOSS_METRIC)}
        evaluated = curves[primary]
        best = metrics.get(f"best_{primary}")
        score = best if finite(best) else max((v for _, v in evaluated if finite(v)), default=None)
        ended = run.end_time
        trials.append(
            Trial(
                run_id=run.run_id,
                number=_tune_number(run) or position,
                state=tags.get(Tag.TRIAL_STATE) or _state_of(run.status),
                params=dict(run.params),
                tags=tags,
                metrics=metrics,
                score=score,
                epochs=max((step for step, _ in evaluated), default=0),
                seconds=(ended - run.start_time) / 1000 if ended and run.start_time else None,
                reason=scrub(tags.get(Tag.FAILURE_REASON) or tags.get(Tag.STOP_REASON) or ""),
                curves=curves,
            )
        )
    return trials


def _tune_number(run: RunView) -> int | None:
    """Tune's trial ids end in ``_00003`` for the fourth trial, as the sweep's leaderboard numbers them."""
    suffix = run.tags.get(Tag.TUNE_TRIAL_ID, "").rsplit("_", 1)[-1]
    return int(suffix) + 1 if suffix.isdigit() else None


def _state_of(status: str) -> str:
    return {RunStatus.FINISHED: TrialState.COMPLETED, RunStatus.FAILED: TrialState.FAILED}.get(
        status, status.lower()
    )


def ranked(trials: Sequence[Trial]) -> list[Trial]:
    """Completed trials by score, then the rest by their best score: the sweep's own leaderboard order."""

    def key(trial: Trial) -> tuple:
        return (
            trial.state != TrialState.COMPLETED,
            -(trial.score if finite(trial.score) else -math.inf),
            trial.number,
        )

    return sorted(trials, key=key)


def primary_metric(run: RunView) -> str:
    return run.params.get(Tag.PRIMARY_METRIC) or PRIMARY_METRIC


def searched_names(store: Store, run: RunView, trials: Sequence[Trial]) -> list[str]:
    """The search space's parameters; without ``search_space.json``, the params that differ between trials."""
    text = store.read_text(run.run_id, Artifact.SEARCH_SPACE)
    names: list[str] = []
    try:
        for subspace in json.loads(text) if text else []:
            names += [name for name in subspace if name not in names]
    except (ValueError, TypeError, AttributeError):
        names = []
    if names:
        return names
    keys = sorted({key for trial in trials for key in trial.params})
    return [key for key in keys if len({trial.params.get(key) for trial in trials}) > 1]


def metrics_table(metrics: dict[str, float]) -> str:
    """The best epoch's headline metrics as the trainer logged them (``best_*``); per class further down."""
    rows = [(key, number(metrics[f"best_{key}"])) for key in SUMMARY_METRICS if f"best_{key}" in metrics]
    if not rows:
        return ""
    return "<h3>Metrics of the best epoch</h3>" + html_table(["metric", "value"], rows, numeric=["value"])


def trial_plots(store: Store, run_id: str) -> str:
    with tempfile.TemporaryDirectory(prefix="visionautoml-report-") as folder:
        local = store.download_folder(run_id, Artifact.PLOTS_DIR, Path(folder))
        if local is None:
            return note(
                f"Run {run_id} has no {Artifact.PLOTS_DIR}/ artifacts (the trial did not draw its plots)."
            )
        files = {path.name: path.read_bytes() for path in local.iterdir() if path.is_file()}
    pictures = sorted((name for name in files if name.endswith(".png")), key=_plot_rank)
    parts = [
        image_html(image_uri(files[name], "image/png"), name, PLOT_CAPTIONS.get(name, name))
        for name in pictures
    ]
    if "per_class_ap.md" in files:
        table = files["per_class_ap.md"].decode("utf-8", errors="replace")
        parts.append("<h3>Per-class average precision</h3>" + _markdown_html(table))
    return "".join(parts)


def _plot_rank(name: str) -> tuple[int, str]:
    return (PLOT_ORDER.index(name) if name in PLOT_ORDER else len(PLOT_ORDER), name)


def _markdown_html(text: str) -> str:
    """The pipe tables and paragraphs that ``per_class_ap.md`` holds; nothing more of Markdown is needed."""
    parts: list[str] = []
    table: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if not all(re.fullmatch(r":?-+:?", cell) for cell in cells):
                table.append(cells)
            continue
        if table:
            parts.append(html_table(table[0], table[1:], numeric=table[0][1:]))
            table = []
        if line.strip():
            parts.append(note(line.strip()))
    return "".join(parts)


def datasets_section(store: Store, run: RunView, best: Trial | None, trials: Sequence[Trial]) -> str:
    """The training and validation versions with their per-class box counts.

    The tracking store holds the versions and digests, and the counts in the trial's
    ``data/datasets.json``; for runs logged before trials wrote that file, the counts come from the
    dataset itself when its path (tag ``dataset.<role>.path``) is readable here, else, for
    validation, from the best trial's ``evaluation/metrics.json``.
    """
    source = best or next(iter(trials), None)
    tags = {
        **(source.tags if source else {}),
        **{k: v for k, v in run.tags.items() if k.startswith("dataset.")},
    }
    evaluation = _evaluation_counts(store, best.run_id) if best else None
    logged = _logged_counts(store, source.run_id) if source else {}
    rows = []
    for role in ("training", "validation"):
        tag = Tag.dataset(role)
        counts = logged.get(role)
        origin = f"logged by trial {source.number}" if counts and source else ""
        if counts is None:
            counts = _read_counts(tags.get(f"{tag}.path", ""))
            origin = f"read from {tags.get(f'{tag}.path')}" if counts else ""
        if counts is None and role == "validation" and evaluation:
            counts, origin = evaluation, "from the best trial's evaluation/metrics.json"
        images, boxes, per_class = counts or ("", "", {})
        if not per_class:
            origin = "counts not available: the dataset is not readable here"
            per_class = {label: "?" for label in _classes_tag(tags)}
        rows.append(
            (
                role,
                tags.get(tag, "not recorded"),
                tags.get(f"{tag}.digest", "")[:16],
                images,
                boxes,
                ", ".join(f"{label} {count}" for label, count in per_class.items()),
                origin,
            )
        )
    columns = ["dataset", "version", "digest", "images", "boxes", "boxes per class", "counts"]
    return html_table(columns, rows, table_id="datasets-table", numeric=["images", "boxes"])


def _logged_counts(store: Store, run_id: str) -> dict[str, tuple[int, int, dict[str, int]]]:
    """The trial's ``data/datasets.json``: role -> (images, boxes, boxes per class)."""
    text = store.read_text(run_id, Artifact.DATASETS)
    try:
        record = json.loads(text) if text else {}
        return {
            role: (
                int(counts["images"]),
                int(counts["boxes"]),
                {str(label): int(count) for label, count in counts["boxes_per_class"].items()},
            )
            for role, counts in record.items()
        }
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}


def _read_counts(path: str) -> tuple[int, int, dict[str, int]] | None:
    if not path or not Path(path).exists():
        return None
    from visionautoml.data.formats import read_dataset
    from visionautoml.data.problems import ProblemLog
    from visionautoml.data.stats import compute_stats
    from visionautoml.errors import VisionAutoMLError

    try:
        stats = compute_stats(read_dataset(path, problems=ProblemLog()))
    except (VisionAutoMLError, OSError):
        return None
    return stats.image_count, stats.box_count, stats.boxes_per_class


def _evaluation_counts(store: Store, run_id: str) -> tuple[int, int, dict[str, int]] | None:
    text = store.read_text(run_id, Artifact.METRICS)
    try:
        record = json.loads(text) if text else {}
        per_class = {
            name: int(values["ground_truth_boxes"]) for name, values in record["per_class_metrics"].items()
        }
        return int(record["evaluation"]["images"]), sum(per_class.values()), per_class
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _classes_tag(tags: dict[str, str]) -> list[str]:
    try:
        classes = json.loads(tags.get(Tag.CLASSES, "[]"))
    except ValueError:
        return []
    return [str(label) for label in classes] if isinstance(classes, list) else []


def finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def number(value: float | None) -> str:
    return f"{value:.4f}" if finite(value) else ""


def as_float(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def param_text(value: str) -> str:
    """A searched float as the sweep's table shows it (4 significant digits); anything else as logged.

    A parameter another sub-space searched and this trial left unset was logged as ``None``: the
    model's default.
    """
    if value == "None":
        return "default"
    number = as_float(value)
    if number is None or re.fullmatch(r"-?\d+", value.strip()) or len(value) <= 8:
        return value
    return f"{number:.4g}"


def timestamp(milliseconds: int | None) -> str:
    if not milliseconds:
        return ""
    return datetime.fromtimestamp(milliseconds / 1000).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def duration(start: int | None, end: int | None) -> str:
    if not start or not end:
        return "still running" if start else ""
    seconds = (end - start) / 1000
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"
