"""The report of one trial run: its curves, its diagnostic plots, its datasets and its configuration."""

from __future__ import annotations

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from visionautoml.redact import scrub
from visionautoml.reports.page import Section, escape, figure_uri, html_table, image_html, note, render_page
from visionautoml.reports.runs import (
    LOSS_METRIC,
    Trial,
    datasets_section,
    duration,
    metrics_table,
    number,
    primary_metric,
    timestamp,
    trial_plots,
    trials_of,
)
from visionautoml.tracking.schema import Artifact, Tag, TrialState
from visionautoml.tracking.store import RunView, Store


def trial_page(store: Store, run: RunView) -> str:
    primary = primary_metric(run)
    trial = trials_of(store, [run], primary)[0]
    sections = [
        Section("summary", "Summary", _trial_summary(run, trial, primary)),
        Section("curves", "Metric curves", _trial_curves(store, run, primary)),
        Section("plots", "Diagnostic plots", metrics_table(trial.metrics) + trial_plots(store, run.run_id)),
        Section(
            "datasets",
            "Datasets",
            datasets_section(store, run, trial if trial.state == TrialState.COMPLETED else None, [trial]),
        ),
        Section("configuration", "Configuration", _trial_configuration(store, run)),
    ]
    name = run.name or run.run_id
    subtitle = f"{run.tags.get('model_name', '')} trial, {run.status}; run {run.run_id}"
    return render_page(
        f"Trial report: {name}", sections, subtitle=subtitle, footer=f"Tracking store: {store.name}."
    )


def _trial_summary(run: RunView, trial: Trial, primary: str) -> str:
    tags = run.tags
    rows = [
        ("run", run.run_id),
        ("status", run.status),
        ("started", timestamp(run.start_time)),
        ("duration", duration(run.start_time, run.end_time)),
        ("model", tags.get(Tag.MODEL_NAME, run.params.get("model_name", ""))),
        (f"best {primary}", number(trial.score)),
        ("best epoch", tags.get(Tag.BEST_EPOCH, "")),
        ("epochs completed", tags.get(Tag.EPOCHS_COMPLETED, trial.epochs)),
        ("stopped because", tags.get(Tag.STOP_REASON, "")),
        ("failure", scrub(tags.get("failure_reason", ""))),
        ("git commit", tags.get(Tag.GIT_COMMIT, "unknown")),
    ]
    return html_table(["field", "value"], [row for row in rows if row[1] != ""], table_id="summary-table")


def _trial_curves(store: Store, run: RunView, primary: str) -> str:
    wanted = [primary, "map_50", LOSS_METRIC, "lr"]
    curves = {key: store.metric_history(run.run_id, key) for key in wanted if key in run.metrics}
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


def _trial_configuration(store: Store, run: RunView) -> str:
    params = html_table(["parameter", "value"], sorted(run.params.items()), table_id="parameters-table")
    tags = sorted((k, scrub(v)) for k, v in run.tags.items() if not k.startswith("mlflow."))
    parts = ["<h3>Training parameters</h3>", params, "<h3>Tags</h3>", html_table(["tag", "value"], tags)]
    config = store.read_text(run.run_id, Artifact.CONFIG)
    if config:
        parts += ["<h3>config.yaml</h3>", f"<pre>{escape(scrub(config))}</pre>"]
    return "".join(parts)
