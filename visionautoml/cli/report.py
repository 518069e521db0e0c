"""`visionautoml report`: the HTML report of a sweep or a trial, from the tracking store alone."""

from __future__ import annotations

from pathlib import Path

import typer

from visionautoml.cli.common import console, err_console
from visionautoml.config import DEFAULT_WORKSPACE


def report(
    run_id: str = typer.Argument(..., help="MLflow run id of a sweep's parent run, or of a single trial."),
    out: Path = typer.Option(..., "--out", "-o", help="HTML file to write (one self-contained file)."),
    workspace: Path = typer.Option(
        Path(DEFAULT_WORKSPACE),
        "--workspace",
        "-w",
        help="Workspace whose SQLite MLflow store holds the run.",
    ),
    tracking_uri: str | None = typer.Option(
        None, "--tracking-uri", help="MLflow store to read instead (overrides MLFLOW_TRACKING_URI too)."
    ),
) -> None:
    """Write the HTML report of a sweep or a trial, from the tracking store alone.

    A sweep's report has its leaderboard, the metric curves of every trial on one chart,
    hyperparameters against the primary metric, which trials early termination stopped and
    when, the best model's diagnostic plots (drawn predictions, precision-recall, confusion
    matrix), the dataset versions with their class counts and the config. A trial's report has
    its curves, plots, datasets and parameters. Images are embedded: open the file anywhere,
    offline. The store is `--tracking-uri`, else `MLFLOW_TRACKING_URI`, else the workspace's
    `mlflow.db`; credentials come from MLflow's usual environment variables.

    Examples:

    * `visionautoml report 3f2a9c... --out sweep.html` (run id from the sweep's output or `mlflow ui`)
    * `visionautoml report 3f2a9c... --out sweep.html --workspace /srv/visionautoml`
    * `MLFLOW_TRACKING_URI=https://mlflow.example.org visionautoml report 3f2a9c... -o report.html`
    """
    from visionautoml.reports.sweep import build_report_from

    with err_console.status(f"reading run {run_id}"):
        path = build_report_from(run_id, out, tracking_uri=tracking_uri, workspace=workspace)
    console.print(f"report written to {path}", soft_wrap=True)
