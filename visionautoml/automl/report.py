"""The sweep report: one HTML page that says what a sweep tried, what won, and what stopped early.

It is built from the tracking store alone (params, metric histories, tags and artifacts of the
parent run and its child runs), so ``visionautoml report RUN_ID`` regenerates it wherever the
MLflow store is reachable, long after the machines that ran the sweep are gone; ``run_sweep``
writes it at the end and logs it to the parent run as ``report.html``. A single trial's run id
gives the same page for that one run: its config, its curves and its diagnostic plots.

What it reads is what ``automl/sweep.py`` and ``training/trial.py`` write:

* parent run: params (the sweep settings, ``primary_metric``), tags ``dataset.training`` /
  ``dataset.validation`` (dataset versions) and ``best_trial_run_id``, artifacts ``config.yaml``
  and ``search_space.json``;
* child runs (tag ``mlflow.parentRunId``): params (the trial's hyperparameters), tags
  ``trial_state``, ``tune_trial_id``, ``stop_reason`` / ``failure_reason`` and ``dataset.*``,
  per-epoch metric histories, the ``best_*`` metrics and the artifacts ``evaluation/metrics.json``
  and ``evaluation/plots/*``.

The page itself is :mod:`visionautoml.data.overview`'s: self-contained, escaped, no script.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from visionautoml.data.overview import (
    Section,
    chart_label,
    escape,
    figure_uri,
    html_table,
    image_html,
    image_uri,
    note,
    palette,
    render_page,
    write_page,
)
from visionautoml.errors import TrackingError
from visionautoml.tracking.auth import scrub_credentials, scrubbed_tracking_errors, server_name
from visionautoml.tracking.registry import PRIMARY_METRIC, TRAINING_DATASET_TAG, VALIDATION_DATASET_TAG

log = logging.getLogger(__name__)

REPORT_ARTIFACT = "report.html"
PLOTS_ARTIFACT_DIR = "evaluation/plots"
METRICS_ARTIFACT = "evaluation/metrics.json"
DATASETS_ARTIFACT = "data/datasets.json"  # written by training.trial.run_trial
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
COMPLETED, EARLY_TERMINATED, FAILED, INTERRUPTED = "completed", "early_terminated", "failed", "interrupted"
STATE_COLOURS = {COMPLETED: "#1a7f37", EARLY_TERMINATED: "#d4a72c", FAILED: "#cf222e"}
# The diagnostics of training/plots.py, the drawn predictions first: what a person looks at first.
PLOT_ORDER = ("validation_images.png", "precision_recall.png", "confusion_matrix.png")
PLOT_CAPTIONS = {
    "validation_images.png": "Validation images, worst first: ground truth green, predictions orange.",
    "precision_recall.png": "Precision against recall per class (VOC matching, IoU 0.5).",
    "confusion_matrix.png": "Confusion matrix: rows ground truth, columns predictions, background = missed "
    "objects (column) or false alarms (row).",
}
_RUN_ID = re.compile(r"^[0-9a-zA-Z_-]{1,64}$")


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


def build_sweep_report(
    parent_run_id: str, out_path: str | Path, client: Any = None, *, log_artifact: bool = False
) -> Path:
    """Write the report of a sweep (its parent run id) or of a single trial run to ``out_path``.

    ``client`` is an ``MlflowClient`` (default: the current tracking URI). With ``log_artifact``
    the page is also logged to the run as ``report.html``; ``run_sweep`` asks for that, while
    regenerating a report later leaves the tracking store as it was.
    """
    from mlflow import MlflowClient

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client = client or MlflowClient()
    uri = server_name(str(client.tracking_uri))
    if not _RUN_ID.match(parent_run_id):
        raise TrackingError(
            f"'{parent_run_id}' is not an MLflow run id (32 hex digits, as `mlflow ui` shows)"
        )
    with scrubbed_tracking_errors(uri):
        run = _get_run(client, parent_run_id, uri)
        children = _child_runs(client, run)
        if children or run.data.tags.get("visionautoml.kind") == "sweep":
            page = _sweep_page(client, run, children, uri)
        else:
            page = _trial_page(client, run, uri)
        path = write_page(out_path, page)
        if log_artifact:
            with tempfile.TemporaryDirectory(prefix="visionautoml-report-") as folder:
                copy = Path(folder) / REPORT_ARTIFACT
                copy.write_bytes(path.read_bytes())
                client.log_artifact(parent_run_id, str(copy))
    return path


def report_after_sweep(parent_run_id: str, out_path: str | Path) -> Path | None:
    """What ``run_sweep`` calls at its end: the report written and logged to the parent run.

    The report is a help, not the sweep's result: a failure to build it is logged as a warning
    (with its traceback) and never fails a sweep whose models are already trained.
    """
    try:
        return build_sweep_report(parent_run_id, out_path, log_artifact=True)
    except Exception:
        log.warning("could not write the sweep report %s", out_path, exc_info=True)
        return None


# --- reading the tracking store -------------------------------------------------------------------


def _get_run(client: Any, run_id: str, uri: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    raise TrackingError(
        f"run {run_id} is not in the tracking store {uri}; check the run id, or point at the store "
        "that holds it (--tracking-uri, --workspace or MLFLOW_TRACKING_URI)"
    )


def _child_runs(client: Any, run: Any) -> list[Any]:
    runs = client.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'",
        max_results=5000,
    )
    return list(runs)


def _trials(client: Any, runs: Sequence[Any], primary: str) -> list[Trial]:
    """The child runs as trials, numbered as Tune numbered them (start order when a run has no Tune id).

    A run the sweep marked ``interrupted`` was replaced by a later run of the same trial (``--resume``)
    and is left out, as the sweep's own leaderboard leaves it out.
    """
    current = [run for run in runs if run.data.tags.get("trial_state") != INTERRUPTED]
    ordered = sorted(current, key=lambda run: (_tune_number(run) or math.inf, run.info.start_time or 0))
    trials = []
    for position, run in enumerate(ordered, start=1):
        tags, metrics = dict(run.data.tags), dict(run.data.metrics)
        curves = {key: _history(client, run.info.run_id, key) for key in (primary, LOSS_METRIC)}
        evaluated = curves[primary]
        best = metrics.get(f"best_{primary}")
        score = best if _finite(best) else max((v for _, v in evaluated if _finite(v)), default=None)
        ended = run.info.end_time
        trials.append(
            Trial(
                run_id=run.info.run_id,
                number=_tune_number(run) or position,
                state=tags.get("trial_state") or _state_of(run.info.status),
                params=dict(run.data.params),
                tags=tags,
                metrics=metrics,
                score=score,
                epochs=max((step for step, _ in evaluated), default=0),
                seconds=(ended - run.info.start_time) / 1000 if ended and run.info.start_time else None,
                reason=scrub_credentials(tags.get("failure_reason") or tags.get("stop_reason") or ""),
                curves=curves,
            )
        )
    return trials


def _tune_number(run: Any) -> int | None:
    """Tune's trial ids end in ``_00003`` for the fourth trial, as the sweep's leaderboard numbers them."""
    suffix = run.data.tags.get("tune_trial_id", "").rsplit("_", 1)[-1]
    return int(suffix) + 1 if suffix.isdigit() else None


def _state_of(status: str) -> str:
    return {"FINISHED": COMPLETED, "FAILED": FAILED}.get(status, status.lower())


def _history(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    points = sorted(
        (metric.step, metric.timestamp, metric.value) for metric in client.get_metric_history(run_id, key)
    )
    latest = {step: value for step, _, value in points}  # a resumed trial may log an epoch twice
    return sorted(latest.items())


def _ranked(trials: Sequence[Trial]) -> list[Trial]:
    """Completed trials by score, then the rest by their best score: the sweep's own leaderboard order."""

    def key(trial: Trial) -> tuple:
        return (trial.state != COMPLETED, -(trial.score if _finite(trial.score) else -math.inf), trial.number)

    return sorted(trials, key=key)


def _text_artifact(client: Any, run_id: str, path: str) -> str | None:
    data = _artifact_bytes(client, run_id, path)
    return data.decode("utf-8", errors="replace") if data is not None else None


def _artifact_bytes(client: Any, run_id: str, path: str) -> bytes | None:
    parent = path.rpartition("/")[0]
    if path not in {item.path for item in client.list_artifacts(run_id, parent or None)}:
        return None
    with tempfile.TemporaryDirectory(prefix="visionautoml-report-") as folder:
        return Path(client.download_artifacts(run_id, path, folder)).read_bytes()


def _primary_metric(run: Any) -> str:
    return run.data.params.get("primary_metric") or PRIMARY_METRIC


def _searched_names(client: Any, run: Any, trials: Sequence[Trial]) -> list[str]:
    """The search space's parameters; without ``search_space.json``, the params that differ between trials."""
    text = _text_artifact(client, run.info.run_id, "search_space.json")
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


# --- the sweep page ----------------------------------------------------------------------------------


def _sweep_page(client: Any, run: Any, children: Sequence[Any], uri: str) -> str:
    primary = _primary_metric(run)
    trials = _trials(client, children, primary)
    ranked = _ranked(trials)
    searched = _searched_names(client, run, trials)
    best_id = run.data.tags.get("best_trial_run_id") or next(
        (trial.run_id for trial in ranked if trial.state == COMPLETED and trial.score is not None), None
    )
    best = next((trial for trial in trials if trial.run_id == best_id), None)
    sections = [
        Section("summary", "Summary", _sweep_summary(run, trials, best, primary)),
        Section("leaderboard", "Leaderboard", _leaderboard(ranked, searched, primary, best_id)),
        Section("curves", "Metric curves", _sweep_curves(trials, primary)),
        Section("hyperparameters", "Hyperparameters", _hyperparameters(trials, searched, primary, best_id)),
        Section("early-termination", "Early termination", _early_termination(run, trials, primary)),
        Section("best-model", "Best model", _best_model(client, best, primary)),
        Section("datasets", "Datasets", _datasets(client, run, best, trials)),
        Section("configuration", "Configuration", _sweep_configuration(client, run)),
    ]
    name = run.info.run_name or run.info.run_id
    counts = _state_counts(trials)
    subtitle = f"{len(trials)} trials ({counts}); primary metric {primary}; run {run.info.run_id}"
    return render_page(f"Sweep report: {name}", sections, subtitle=subtitle, footer=f"Tracking store: {uri}.")


def _state_counts(trials: Sequence[Trial]) -> str:
    counts: dict[str, int] = {}
    for trial in trials:
        counts[trial.state] = counts.get(trial.state, 0) + 1
    return ", ".join(f"{count} {state}" for state, count in counts.items()) or "none ran"


def _sweep_summary(run: Any, trials: Sequence[Trial], best: Trial | None, primary: str) -> str:
    tags = run.data.tags
    rows = [
        ("parent run", run.info.run_id),
        ("status", run.info.status),
        ("started", _time(run.info.start_time)),
        ("duration", _duration(run.info.start_time, run.info.end_time)),
        ("trials", f"{len(trials)}: {_state_counts(trials)}"),
        ("best trial", f"trial {best.number}, run {best.run_id}" if best else "none completed"),
        (f"best {primary}", _number(best.score) if best else ""),
        ("registered model", tags.get("registered_model", "none")),
        ("git commit", tags.get("git_commit", "unknown")),
        ("config hash", tags.get("config_hash", "")),
    ]
    return html_table(["field", "value"], rows, table_id="summary-table")


def _leaderboard(ranked: Sequence[Trial], searched: Sequence[str], primary: str, best_id: str | None) -> str:
    if not ranked:
        return note("No trial ran: the sweep has no child runs.")
    columns = ["rank", "trial", "state", *searched, "epochs", primary, "seconds", "reason", "run_id"]
    rows = [
        (
            rank,
            trial.number,
            trial.state,
            *(_param_text(trial.params.get(name, "")) for name in searched),
            trial.epochs,
            _number(trial.score),
            f"{trial.seconds:.1f}" if trial.seconds is not None else "",
            trial.reason,
            trial.run_id,
        )
        for rank, trial in enumerate(ranked, start=1)
    ]
    marks = ["best" if trial.run_id == best_id else "" for trial in ranked]
    explain = note(
        f"Completed trials first, by {primary} of their best epoch; the others by the best value they "
        "reached before they stopped or failed. epochs: the last evaluated epoch."
    )
    numeric = ["rank", "trial", "epochs", primary, "seconds"]
    return explain + html_table(
        columns, rows, table_id="leaderboard-table", numeric=numeric, row_classes=marks
    )


def _sweep_curves(trials: Sequence[Trial], primary: str) -> str:
    shown = [trial for trial in trials if trial.curves.get(primary)]
    if not shown:
        return note(f"No trial logged {primary} per epoch.")
    keys = [primary] + ([LOSS_METRIC] if any(trial.curves.get(LOSS_METRIC) for trial in shown) else [])
    figure = Figure(figsize=(13, 4.6), layout="constrained")
    colours = palette(len(shown))
    for column, key in enumerate(keys):
        axes = figure.add_subplot(1, len(keys), column + 1)
        for colour, trial in zip(colours, shown, strict=True):
            points = trial.curves.get(key) or []
            if not points:
                continue
            steps, values = zip(*points, strict=True)
            style = "--" if trial.state == FAILED else "-"
            label = f"trial {trial.number} ({trial.state})"
            axes.plot(steps, values, style, marker=".", color=colour, label=label)
            if trial.state == EARLY_TERMINATED:
                axes.plot(steps[-1], values[-1], "X", color=colour, markeredgecolor="black", markersize=10)
        axes.set(xlabel="epoch", ylabel=key, title=f"{key} per epoch, every trial")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    figure.axes[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
    missing = [str(trial.number) for trial in trials if trial not in shown]
    text = "An X marks where early termination stopped a trial; failed trials are dashed."
    if missing:
        text += f" No curve for trial(s) {', '.join(missing)}: they logged no evaluation."
    return image_html(figure_uri(figure), f"{primary} and loss per epoch for every trial") + note(text)


def _hyperparameters(
    trials: Sequence[Trial], searched: Sequence[str], primary: str, best_id: str | None
) -> str:
    scored = [trial for trial in trials if trial.score is not None]
    if not searched or not scored:
        return note("Nothing to plot: no searched hyperparameter, or no trial reached an evaluation.")
    columns = min(4, len(searched))
    rows = math.ceil(len(searched) / columns)
    figure = Figure(figsize=(3.6 * columns, 3.1 * rows), layout="constrained")
    for index, name in enumerate(searched):
        axes = figure.add_subplot(rows, columns, index + 1)
        raw = [trial.params.get(name, "") for trial in scored]
        numbers = [_float(value) for value in raw]
        if all(number is not None for number in numbers):
            positions = numbers
            positive = [number for number in numbers if number > 0]
            if len(positive) == len(numbers) and max(positive) / min(positive) >= 20:
                axes.set_xscale("log")
        else:
            categories = sorted(set(raw))
            positions = [categories.index(value) for value in raw]
            axes.set_xticks(
                range(len(categories)), [chart_label(c) for c in categories], rotation=20, fontsize=7
            )
            axes.set_xlim(-0.5, len(categories) - 0.5)
        for trial, x in zip(scored, positions, strict=True):
            is_best = trial.run_id == best_id
            axes.scatter(
                x,
                trial.score,
                s=140 if is_best else 40,
                marker="*" if is_best else "o",
                color=STATE_COLOURS.get(trial.state, "#616e7c"),
                edgecolors="black",
                linewidths=0.5,
                zorder=3,
            )
        axes.set_title(chart_label(name), fontsize=10)
        axes.set_ylabel(primary if index % columns == 0 else "")
        axes.grid(alpha=0.3)
    text = (
        f"Each point is a trial: its value of this hyperparameter against its {primary} (green: completed, "
        "amber: stopped early; the star is the best trial). Failed trials without an evaluation are left out."
    )
    return image_html(figure_uri(figure), f"hyperparameters against {primary}") + note(text)


def _early_termination(run: Any, trials: Sequence[Trial], primary: str) -> str:
    params = run.data.params
    policy = params.get("early_termination", "none")
    settings = ", ".join(
        f"{key.split('.', 1)[1]} {value}"
        for key, value in sorted(params.items())
        if key.startswith("early_termination.") and key != "early_termination.type"
    )
    intro = note(f"Policy: {policy}" + (f" ({settings})." if settings else "."))
    stopped = [trial for trial in trials if trial.state == EARLY_TERMINATED]
    if not stopped:
        return intro + note("No trial was stopped early.")
    rows = []
    for trial in sorted(stopped, key=lambda item: item.number):
        last = trial.curves.get(primary) or []
        rows.append(
            (
                trial.number,
                trial.run_id,
                trial.epochs,
                _number(last[-1][1]) if last else "",
                _number(trial.score),
                trial.reason,
            )
        )
    columns = ["trial", "run_id", "stopped after epoch", f"{primary} then", f"best {primary}", "reason"]
    numeric = ["trial", "stopped after epoch", f"{primary} then", f"best {primary}"]
    return intro + html_table(columns, rows, table_id="early-termination-table", numeric=numeric)


def _best_model(client: Any, best: Trial | None, primary: str) -> str:
    if best is None:
        return note("No trial completed, so there is no best model.")
    head = note(f"Trial {best.number} (run {best.run_id}), {primary} {_number(best.score)}.")
    return head + _metrics_table(best.metrics) + _trial_plots(client, best.run_id)


def _metrics_table(metrics: dict[str, float]) -> str:
    """The best epoch's headline metrics as the trainer logged them (``best_*``); per class further down."""
    rows = [(key, _number(metrics[f"best_{key}"])) for key in SUMMARY_METRICS if f"best_{key}" in metrics]
    if not rows:
        return ""
    return "<h3>Metrics of the best epoch</h3>" + html_table(["metric", "value"], rows, numeric=["value"])


def _trial_plots(client: Any, run_id: str) -> str:
    if not client.list_artifacts(run_id, PLOTS_ARTIFACT_DIR):
        return note(
            f"Run {run_id} has no {PLOTS_ARTIFACT_DIR}/ artifacts (the trial did not draw its plots)."
        )
    with tempfile.TemporaryDirectory(prefix="visionautoml-report-") as folder:
        local = Path(client.download_artifacts(run_id, PLOTS_ARTIFACT_DIR, folder))
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


# --- datasets and configuration --------------------------------------------------------------------


def _datasets(client: Any, run: Any, best: Trial | None, trials: Sequence[Trial]) -> str:
    """The training and validation versions with their per-class box counts.

    The tracking store holds the versions and digests, and the counts in the trial's
    ``data/datasets.json``; for runs logged before trials wrote that file, the counts come from the
    dataset itself when its path (tag ``dataset.<role>.path``) is readable here, else, for
    validation, from the best trial's ``evaluation/metrics.json``.
    """
    source = best or next(iter(trials), None)
    tags = {
        **(source.tags if source else {}),
        **{k: v for k, v in run.data.tags.items() if k.startswith("dataset.")},
    }
    evaluation = _evaluation_counts(client, best.run_id) if best else None
    logged = _logged_counts(client, source.run_id) if source else {}
    rows = []
    for role, tag in (("training", TRAINING_DATASET_TAG), ("validation", VALIDATION_DATASET_TAG)):
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


def _logged_counts(client: Any, run_id: str) -> dict[str, tuple[int, int, dict[str, int]]]:
    """The trial's ``data/datasets.json``: role -> (images, boxes, boxes per class)."""
    text = _text_artifact(client, run_id, DATASETS_ARTIFACT)
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


def _evaluation_counts(client: Any, run_id: str) -> tuple[int, int, dict[str, int]] | None:
    text = _text_artifact(client, run_id, METRICS_ARTIFACT)
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
        classes = json.loads(tags.get("classes", "[]"))
    except ValueError:
        return []
    return [str(label) for label in classes] if isinstance(classes, list) else []


def _sweep_configuration(client: Any, run: Any) -> str:
    settings = html_table(
        ["setting", "value"], sorted(run.data.params.items()), table_id="sweep-settings-table"
    )
    parts = ["<h3>Sweep settings</h3>", settings]
    space = _text_artifact(client, run.info.run_id, "search_space.json")
    if space:
        parts += ["<h3>Search space</h3>", _search_space_table(space)]
    config = _text_artifact(client, run.info.run_id, "config.yaml")
    if config:
        parts += [
            "<h3>config.yaml (credentials left out)</h3>",
            f"<pre>{escape(scrub_credentials(config))}</pre>",
        ]
    return "".join(parts)


def _search_space_table(text: str) -> str:
    try:
        subspaces = json.loads(text)
        rows = [
            (number, name, distribution.get("type", ""), _distribution_text(distribution))
            for number, subspace in enumerate(subspaces, start=1)
            for name, distribution in subspace.items()
        ]
    except (ValueError, TypeError, AttributeError):
        return f"<pre>{escape(text)}</pre>"
    return html_table(
        ["sub-space", "parameter", "distribution", "arguments"], rows, table_id="search-space-table"
    )


def _distribution_text(distribution: dict[str, Any]) -> str:
    return ", ".join(f"{key} {json.dumps(value)}" for key, value in distribution.items() if key != "type")


# --- the single-trial page ----------------------------------------------------------------------------


def _trial_page(client: Any, run: Any, uri: str) -> str:
    primary = _primary_metric(run)
    trial = _trials(client, [run], primary)[0]
    sections = [
        Section("summary", "Summary", _trial_summary(run, trial, primary)),
        Section("curves", "Metric curves", _trial_curves(client, run, primary)),
        Section(
            "plots", "Diagnostic plots", _metrics_table(trial.metrics) + _trial_plots(client, run.info.run_id)
        ),
        Section(
            "datasets",
            "Datasets",
            _datasets(client, run, trial if trial.state == COMPLETED else None, [trial]),
        ),
        Section("configuration", "Configuration", _trial_configuration(client, run)),
    ]
    name = run.info.run_name or run.info.run_id
    subtitle = f"{run.data.tags.get('model_name', '')} trial, {run.info.status}; run {run.info.run_id}"
    return render_page(f"Trial report: {name}", sections, subtitle=subtitle, footer=f"Tracking store: {uri}.")


def _trial_summary(run: Any, trial: Trial, primary: str) -> str:
    tags = run.data.tags
    rows = [
        ("run", run.info.run_id),
        ("status", run.info.status),
        ("started", _time(run.info.start_time)),
        ("duration", _duration(run.info.start_time, run.info.end_time)),
        ("model", tags.get("model_name", run.data.params.get("model_name", ""))),
        (f"best {primary}", _number(trial.score)),
        ("best epoch", tags.get("best_epoch", "")),
        ("epochs completed", tags.get("epochs_completed", trial.epochs)),
        ("stopped because", tags.get("stop_reason", "")),
        ("failure", scrub_credentials(tags.get("failure_reason", ""))),
        ("git commit", tags.get("git_commit", "unknown")),
    ]
    return html_table(["field", "value"], [row for row in rows if row[1] != ""], table_id="summary-table")


def _trial_curves(client: Any, run: Any, primary: str) -> str:
    wanted = [primary, "map_50", LOSS_METRIC, "lr"]
    curves = {key: _history(client, run.info.run_id, key) for key in wanted if key in run.data.metrics}
    curves = {key: points for key, points in curves.items() if points}
    if not curves:
        return note("The run logged no metric per epoch.")
    figure = Figure(figsize=(3.4 * len(curves), 3.4), layout="constrained")
    for index, (key, points) in enumerate(curves.items()):
        axes = figure.add_subplot(1, len(curves), index + 1)
        steps, values = zip(*points, strict=True)
        axes.plot(steps, values, marker=".", color="#2f6fbf")
        axes.set(xlabel="epoch", title=key)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    return image_html(figure_uri(figure), "metrics per epoch")


def _trial_configuration(client: Any, run: Any) -> str:
    params = html_table(["parameter", "value"], sorted(run.data.params.items()), table_id="parameters-table")
    tags = sorted((k, scrub_credentials(v)) for k, v in run.data.tags.items() if not k.startswith("mlflow."))
    parts = ["<h3>Training parameters</h3>", params, "<h3>Tags</h3>", html_table(["tag", "value"], tags)]
    config = _text_artifact(client, run.info.run_id, "config.yaml")
    if config:
        parts += ["<h3>config.yaml</h3>", f"<pre>{escape(scrub_credentials(config))}</pre>"]
    return "".join(parts)


# --- formatting -----------------------------------------------------------------------------------------


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _number(value: float | None) -> str:
    return f"{value:.4f}" if _finite(value) else ""


def _float(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _param_text(value: str) -> str:
    """A searched float as the sweep's table shows it (4 significant digits); anything else as logged.

    A parameter another sub-space searched and this trial left unset was logged as ``None``: the
    model's default.
    """
    if value == "None":
        return "default"
    number = _float(value)
    if number is None or re.fullmatch(r"-?\d+", value.strip()) or len(value) <= 8:
        return value
    return f"{number:.4g}"


def _time(milliseconds: int | None) -> str:
    if not milliseconds:
        return ""
    return datetime.fromtimestamp(milliseconds / 1000).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def _duration(start: int | None, end: int | None) -> str:
    if not start or not end:
        return "still running" if start else ""
    seconds = (end - start) / 1000
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"
