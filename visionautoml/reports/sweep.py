"""The sweep report: one HTML page that says what a sweep tried, what won, and what stopped early.

``run_sweep`` writes it at the end and logs it to the parent run as ``report.html``;
``visionautoml report RUN_ID`` regenerates it from the tracking store alone
(:mod:`visionautoml.reports.runs`). A single trial's run id gives the trial page instead
(:mod:`visionautoml.reports.trial`). The page itself is :mod:`visionautoml.reports.page`'s:
self-contained, escaped, no script.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from visionautoml.errors import TrackingError
from visionautoml.redact import scrub
from visionautoml.reports.page import (
    Section,
    chart_label,
    escape,
    figure_uri,
    html_table,
    image_html,
    note,
    palette,
    render_page,
    write_page,
)
from visionautoml.reports.runs import (
    LOSS_METRIC,
    STATE_COLOURS,
    Trial,
    as_float,
    datasets_section,
    duration,
    metrics_table,
    number,
    param_text,
    primary_metric,
    ranked,
    searched_names,
    timestamp,
    trial_plots,
    trials_of,
)
from visionautoml.tracking.schema import SWEEP_KIND, Artifact, Tag, TrialState
from visionautoml.tracking.store import RunView, Store

log = logging.getLogger(__name__)

_RUN_ID = re.compile(r"^[0-9a-zA-Z_-]{1,64}$")


def build_report(
    run_id: str, out_path: str | Path, store: Store | None = None, *, log_artifact: bool = False
) -> Path:
    """Write the report of a sweep (its parent run id) or of a single trial run to ``out_path``.

    ``store`` defaults to the current tracking store. With ``log_artifact`` the page is also
    logged to the run as ``report.html``; ``run_sweep`` asks for that, while regenerating a
    report later leaves the tracking store as it was.
    """
    from visionautoml.reports.trial import trial_page

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    store = store or Store()
    if not _RUN_ID.match(run_id):
        raise TrackingError(f"'{run_id}' is not an MLflow run id (32 hex digits, as `mlflow ui` shows)")
    run = store.find_run(run_id)
    if run is None:
        raise TrackingError(
            f"run {run_id} is not in the tracking store {store.name}; check the run id, or point at the "
            "store that holds it (--tracking-uri, --workspace or MLFLOW_TRACKING_URI)"
        )
    children = store.child_runs(run.experiment_id, run.run_id)
    if children or run.tags.get(Tag.KIND) == SWEEP_KIND:
        page = _sweep_page(store, run, children)
    else:
        page = trial_page(store, run)
    path = write_page(out_path, page)
    if log_artifact:
        store.log_files(run_id, {Artifact.REPORT: path.read_text(encoding="utf-8")})
    return path


def build_report_from(
    run_id: str, out_path: str | Path, *, tracking_uri: str | None, workspace: Path
) -> Path:
    """``visionautoml report``'s store: ``tracking_uri``, else MLFLOW_TRACKING_URI, else the workspace's."""
    from visionautoml.config import JobConfig
    from visionautoml.tracking.workspace import resolve_tracking_uri, sqlite_path

    uri = tracking_uri or resolve_tracking_uri(JobConfig(workspace=str(workspace)))
    database = sqlite_path(uri)
    if database is not None and not database.is_file():
        raise TrackingError(
            f"{database}: no MLflow store there; pass the sweep's --workspace, or --tracking-uri / "
            "MLFLOW_TRACKING_URI for a tracking server"
        )
    return build_report(run_id, out_path, Store(uri))


def report_after_sweep(parent_run_id: str, out_path: str | Path) -> Path | None:
    """What ``run_sweep`` calls at its end: the report written and logged to the parent run.

    The report is a help, not the sweep's result: a failure to build it is logged as a warning
    (with its traceback) and never fails a sweep whose models are already trained.
    """
    try:
        return build_report(parent_run_id, out_path, log_artifact=True)
    except Exception:
        log.warning("could not write the sweep report %s", out_path, exc_info=True)
        return None


def _sweep_page(store: Store, run: RunView, children: Sequence[RunView]) -> str:
    primary = primary_metric(run)
    trials = trials_of(store, children, primary)
    order = ranked(trials)
    searched = searched_names(store, run, trials)
    best_id = run.tags.get(Tag.BEST_TRIAL_RUN_ID) or next(
        (trial.run_id for trial in order if trial.state == TrialState.COMPLETED and trial.score is not None),
        None,
    )
    best = next((trial for trial in trials if trial.run_id == best_id), None)
    sections = [
        Section("summary", "Summary", _sweep_summary(run, trials, best, primary)),
        Section("leaderboard", "Leaderboard", _leaderboard(order, searched, primary, best_id)),
        Section("curves", "Metric curves", _sweep_curves(trials, primary)),
        Section("hyperparameters", "Hyperparameters", _hyperparameters(trials, searched, primary, best_id)),
        Section("early-termination", "Early termination", _early_termination(run, trials, primary)),
        Section("best-model", "Best model", _best_model(store, best, primary)),
        Section("datasets", "Datasets", datasets_section(store, run, best, trials)),
        Section("configuration", "Configuration", _sweep_configuration(store, run)),
    ]
    name = run.name or run.run_id
    counts = _state_counts(trials)
    subtitle = f"{len(trials)} trials ({counts}); primary metric {primary}; run {run.run_id}"
    return render_page(
        f"Sweep report: {name}", sections, subtitle=subtitle, footer=f"Tracking store: {store.name}."
    )


def _state_counts(trials: Sequence[Trial]) -> str:
    counts: dict[str, int] = {}
    for trial in trials:
        counts[trial.state] = counts.get(trial.state, 0) + 1
    return ", ".join(f"{count} {state}" for state, count in counts.items()) or "none ran"


def _sweep_summary(run: RunView, trials: Sequence[Trial], best: Trial | None, primary: str) -> str:
    tags = run.tags
    rows = [
        ("parent run", run.run_id),
        ("status", run.status),
        ("started", timestamp(run.start_time)),
        ("duration", duration(run.start_time, run.end_time)),
        ("trials", f"{len(trials)}: {_state_counts(trials)}"),
        ("best trial", f"trial {best.number}, run {best.run_id}" if best else "none completed"),
        (f"best {primary}", number(best.score) if best else ""),
        ("registered model", tags.get(Tag.REGISTERED_MODEL, "none")),
        ("git commit", tags.get(Tag.GIT_COMMIT, "unknown")),
        ("config hash", tags.get(Tag.CONFIG_HASH, "")),
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
            *(param_text(trial.params.get(name, "")) for name in searched),
            trial.epochs,
            number(trial.score),
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
            style = "--" if trial.state == TrialState.FAILED else "-"
            label = f"trial {trial.number} ({trial.state})"
            axes.plot(steps, values, style, marker=".", color=colour, label=label)
            if trial.state == TrialState.EARLY_TERMINATED:
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
        numbers = [as_float(value) for value in raw]
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


def _early_termination(run: RunView, trials: Sequence[Trial], primary: str) -> str:
    params = run.params
    policy = params.get("early_termination", "none")
    settings = ", ".join(
        f"{key.split('.', 1)[1]} {value}"
        for key, value in sorted(params.items())
        if key.startswith("early_termination.") and key != "early_termination.type"
    )
    intro = note(f"Policy: {policy}" + (f" ({settings})." if settings else "."))
    stopped = [trial for trial in trials if trial.state == TrialState.EARLY_TERMINATED]
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
                number(last[-1][1]) if last else "",
                number(trial.score),
                trial.reason,
            )
        )
    columns = ["trial", "run_id", "stopped after epoch", f"{primary} then", f"best {primary}", "reason"]
    numeric = ["trial", "stopped after epoch", f"{primary} then", f"best {primary}"]
    return intro + html_table(columns, rows, table_id="early-termination-table", numeric=numeric)


def _best_model(store: Store, best: Trial | None, primary: str) -> str:
    if best is None:
        return note("No trial completed, so there is no best model.")
    head = note(f"Trial {best.number} (run {best.run_id}), {primary} {number(best.score)}.")
    return head + metrics_table(best.metrics) + trial_plots(store, best.run_id)


def _sweep_configuration(store: Store, run: RunView) -> str:
    settings = html_table(["setting", "value"], sorted(run.params.items()), table_id="sweep-settings-table")
    parts = ["<h3>Sweep settings</h3>", settings]
    space = store.read_text(run.run_id, Artifact.SEARCH_SPACE)
    if space:
        parts += ["<h3>Search space</h3>", _search_space_table(space)]
    config = store.read_text(run.run_id, Artifact.CONFIG)
    if config:
        parts += [
            "<h3>config.yaml (credentials left out)</h3>",
            f"<pre>{escape(scrub(config))}</pre>",
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
