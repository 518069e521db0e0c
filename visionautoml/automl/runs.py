"""The sweep in MLflow: the parent run, the trials' child runs, the leaderboard and the registered model.

Trials open their own child runs (the trainer does); everything here happens in the
driver: the parent run with the config and search space, the final state and reason of
every child run (Tune kills stopped trials, whose runs are left open), the leaderboard
and the best trial as tags, and the registration with the tags ``promote_if_better``
compares on.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from mlflow import MlflowClient

from visionautoml.automl import space
from visionautoml.automl.leaderboard import (
    COMPLETED,
    EARLY_TERMINATED,
    FAILED,
    NOT_STARTED,
    TrialRecord,
    leaderboard_csv,
)
from visionautoml.automl.trial_runner import PRIMARY_METRIC, TRIAL_RUN_PREFIX
from visionautoml.config import JobConfig
from visionautoml.tracking import registry
from visionautoml.tracking.auth import server_name
from visionautoml.tracking.workspace import resolve_tracking_uri

_RUN_STATUS = {COMPLETED: "FINISHED", EARLY_TERMINATED: "KILLED", FAILED: "FAILED", NOT_STARTED: "KILLED"}


def now() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def _git_commit() -> str:
    from visionautoml.training.trial import git_commit

    return git_commit() or "unknown"


def _client() -> MlflowClient:
    return MlflowClient()


def _public_config(job: JobConfig) -> dict[str, Any]:
    """The config as logged: credentials left out, a URI's ``user:password@`` redacted."""
    config = job.model_dump(mode="json", exclude={"tracking": {"username", "password", "token"}})
    if config["tracking"].get("uri"):
        config["tracking"]["uri"] = server_name(config["tracking"]["uri"])
    return config


def start_parent_run(
    job: JobConfig,
    experiment_id: str,
    fingerprint: str,
    dataset_tags: dict[str, str],
    plan: space.SearchPlan,
    automatic: bool,
) -> str:
    """The sweep's own run: its settings as params, the config and search space as artifacts."""
    client = _client()
    tags = {
        "visionautoml.kind": "sweep",
        "config_hash": fingerprint,
        "git_commit": _git_commit(),
        **dataset_tags,
        "tracking_uri": server_name(resolve_tracking_uri(job)),
    }
    run = client.create_run(experiment_id, run_name=f"sweep-{now()}", tags=tags)
    run_id = run.info.run_id
    termination = job.sweep.early_termination
    params = {
        "sampling_algorithm": plan.algorithm,
        "early_termination": termination.type if termination else "none",
        "max_trials": job.limits.max_trials,
        "max_concurrent_trials": job.limits.max_concurrent_trials,
        "timeout_minutes": job.limits.timeout_minutes,
        "trial_timeout_minutes": job.limits.trial_timeout_minutes,
        "automatic_search_space": automatic,
        "primary_metric": PRIMARY_METRIC,
    }
    if termination:
        params.update(
            {f"early_termination.{k}": v for k, v in termination.model_dump().items() if v is not None}
        )
    for key, value in params.items():
        client.log_param(run_id, key, value)
    search_space = [
        {name: distribution.model_dump(exclude_none=True) for name, distribution in subspace.items()}
        for subspace in plan.subspaces
    ]
    with tempfile.TemporaryDirectory(prefix="visionautoml-sweep-") as folder:
        (Path(folder) / "config.yaml").write_text(yaml.safe_dump(_public_config(job), sort_keys=False))
        (Path(folder) / "search_space.json").write_text(json.dumps(search_space, indent=2))
        client.log_artifact(run_id, str(Path(folder) / "config.yaml"))
        client.log_artifact(run_id, str(Path(folder) / "search_space.json"))
    return run_id


def reopen_run(run_id: str) -> None:
    _client().update_run(run_id, status="RUNNING")


def end_run(run_id: str, status: str) -> None:
    _client().set_terminated(run_id, status=status)


def settle_child_runs(experiment_id: str, parent_run_id: str, records: list[TrialRecord]) -> None:
    """Give every trial's child run its final state and reason.

    Tune kills stopped and failed trials' processes, so their runs are still RUNNING;
    a trial that failed before it opened a run gets one here, so that every trial is in
    MLflow. A trial that ran twice (interrupted, then resumed) keeps its newest run.
    """
    client = _client()
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=5000
    )
    by_name: dict[str, list[Any]] = {}
    for run in runs:
        by_name.setdefault(run.info.run_name, []).append(run)
    for record in records:
        name = TRIAL_RUN_PREFIX + record.trial_id
        candidates = sorted(by_name.get(name, []), key=lambda run: run.info.start_time or 0)
        for stale in candidates[:-1]:
            if stale.info.status == "RUNNING":
                client.set_tag(stale.info.run_id, "trial_state", "interrupted")
                client.set_terminated(stale.info.run_id, status="KILLED")
        if candidates:
            run = candidates[-1]
        elif record.state == NOT_STARTED:
            continue
        else:
            run = client.create_run(experiment_id, run_name=name, tags={"mlflow.parentRunId": parent_run_id})
            for key, value in record.params.items():
                client.log_param(run.info.run_id, key, value)
        run_id = run.info.run_id
        record.run_id = record.run_id or run_id
        client.set_tag(run_id, "trial_state", record.state)
        client.set_tag(run_id, "tune_trial_id", record.trial_id)
        if record.node_id:
            client.set_tag(run_id, "ray_node_id", record.node_id)
        if record.reason:
            client.set_tag(
                run_id, "failure_reason" if record.state == FAILED else "stop_reason", record.reason
            )
        if record.state != COMPLETED or run.info.status in ("RUNNING", "SCHEDULED"):
            client.set_terminated(run_id, status=_RUN_STATUS[record.state])


def log_leaderboard(
    parent_run_id: str, records: list[TrialRecord], searched: list[str], markdown: str
) -> None:
    client = _client()
    with tempfile.TemporaryDirectory(prefix="visionautoml-leaderboard-") as folder:
        for name, text in (
            ("leaderboard.md", markdown),
            ("leaderboard.csv", leaderboard_csv(records, searched)),
        ):
            (Path(folder) / name).write_text(text, encoding="utf-8")
            client.log_artifact(parent_run_id, str(Path(folder) / name))
    counts: dict[str, int] = {}
    for record in records:
        counts[record.state] = counts.get(record.state, 0) + 1
    for state, count in counts.items():
        client.log_metric(parent_run_id, f"trials_{state}", count)


def tag_parent(parent_run_id: str, best: TrialRecord | None, registered: str | None) -> None:
    """The best trial and the registered ``NAME/VERSION`` on the parent run, for finding them from it."""
    client = _client()
    if best is not None:
        client.set_tag(parent_run_id, "best_trial", best.trial_id)
        client.set_tag(parent_run_id, "best_trial_run_id", best.run_id or "")
        for key, value in best.metrics.items():
            client.log_metric(parent_run_id, f"best_{key}", value)
    if registered is not None:
        client.set_tag(parent_run_id, "registered_model", registered)


@contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """MLflow's registration prints progress lines of its own; the sweep prints one line for it."""
    registry_logger = logging.getLogger("mlflow.tracking._model_registry")
    level = registry_logger.level
    registry_logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        registry_logger.setLevel(level)


def register_best(
    job: JobConfig,
    model_name: str,
    best: TrialRecord,
    dataset_tags: dict[str, str],
    fingerprint: str,
    parent_run_id: str,
) -> registry.ModelVersionInfo:
    """Register the best trial's model with everything needed to judge it later as tags."""
    tags = {
        **{f"{registry.METRIC_TAG_PREFIX}{key}": f"{value:.6g}" for key, value in best.metrics.items()},
        "primary_metric": PRIMARY_METRIC,
        **dataset_tags,
        "config_hash": fingerprint,
        "git_commit": _git_commit(),
        "sweep_parent_run_id": parent_run_id,
        "model_name": str(best.params.get("model_name", job.training_parameters.model_name)),
    }
    with _quiet_mlflow():
        return registry.register_model(
            best.model_uri, model_name, tags=tags, aliases=(registry.CANDIDATE_ALIAS,)
        )
