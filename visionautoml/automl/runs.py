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
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import yaml

from visionautoml.automl import space
from visionautoml.automl.leaderboard import TrialRecord, leaderboard_csv
from visionautoml.automl.trial_runner import TRIAL_RUN_PREFIX
from visionautoml.config import JobConfig
from visionautoml.redact import strip_userinfo
from visionautoml.tracking import registry
from visionautoml.tracking.schema import (
    PRIMARY_METRIC,
    SWEEP_KIND,
    TRIAL_RUN_STATUS,
    Artifact,
    RunStatus,
    Tag,
    TrialState,
    git_commit,
    model_version_tags,
)
from visionautoml.tracking.store import Store
from visionautoml.tracking.workspace import resolve_tracking_uri

TUNE_STORAGE_TAG = "tune_storage"
"""The parent run's tag naming where Ray Tune keeps the sweep (a folder or an ``s3://`` URL)."""


def now() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def _public_config(job: JobConfig) -> dict[str, Any]:
    """The config as logged: credentials left out, a URI's ``user:password@`` redacted."""
    config = job.model_dump(mode="json", exclude={"tracking": {"username", "password", "token"}})
    if config["tracking"].get("uri"):
        config["tracking"]["uri"] = strip_userinfo(config["tracking"]["uri"])
    return config


def start_parent_run(
    job: JobConfig,
    experiment_id: str,
    fingerprint: str,
    dataset_tags: dict[str, str],
    plan: space.SearchPlan,
    automatic: bool,
    *,
    storage: str,
) -> str:
    """The sweep's own run: its settings as params, the config and search space as artifacts.

    Its tags (the config hash, the dataset versions, Tune's ``storage``) are what a
    ``--resume`` on a machine without the sweep's state file finds it by (:func:`find_sweep`).
    """
    store = Store()
    tags = {
        Tag.KIND: SWEEP_KIND,
        Tag.CONFIG_HASH: fingerprint,
        Tag.GIT_COMMIT: git_commit() or "unknown",
        **dataset_tags,
        Tag.TRACKING_URI: strip_userinfo(resolve_tracking_uri(job)),
        TUNE_STORAGE_TAG: strip_userinfo(storage),
    }
    run_id = store.create_run(experiment_id, f"sweep-{now()}", tags)
    termination = job.sweep.early_termination
    params = {
        "sampling_algorithm": plan.algorithm,
        "early_termination": termination.type if termination else "none",
        "max_trials": job.limits.max_trials,
        "max_concurrent_trials": job.limits.max_concurrent_trials,
        "timeout_minutes": job.limits.timeout_minutes,
        "trial_timeout_minutes": job.limits.trial_timeout_minutes,
        "automatic_search_space": automatic,
        Tag.PRIMARY_METRIC: PRIMARY_METRIC,
    }
    if termination:
        params.update(
            {f"early_termination.{k}": v for k, v in termination.model_dump().items() if v is not None}
        )
    store.log_params(run_id, params)
    search_space = [
        {name: distribution.model_dump(exclude_none=True) for name, distribution in subspace.items()}
        for subspace in plan.subspaces
    ]
    store.log_files(
        run_id,
        {
            Artifact.CONFIG: yaml.safe_dump(_public_config(job), sort_keys=False),
            Artifact.SEARCH_SPACE: json.dumps(search_space, indent=2),
        },
    )
    return run_id


def log_automatic_plan(run_id: str, reasons: list[str], fixed: dict[str, Any]) -> None:
    """Why the automatic mode chose its space, beside the space itself (``search_space.json``)."""
    text = "\n".join(f"- {reason}" for reason in reasons) + "\n\nFixed for every trial: " + json.dumps(fixed)
    Store().log_files(run_id, {"automatic_space.md": text + "\n"})


def find_sweep(experiment_id: str, fingerprint: str) -> dict[str, Any]:
    """The newest sweep of this config in the tracking store, as the state ``--resume`` needs; {} if none.

    It is ``finished`` once its run ended FINISHED or FAILED (it registered a model, or no
    trial produced one); a RUNNING or KILLED one was interrupted.
    """
    found = Store().search(
        [experiment_id],
        f"tags.`{Tag.KIND}` = '{SWEEP_KIND}' and tags.`{Tag.CONFIG_HASH}` = '{fingerprint}'",
        limit=1,
    )
    if not found or not found[0].tags.get(TUNE_STORAGE_TAG):
        return {}
    run = found[0]
    state: dict[str, Any] = {"parent_run_id": run.run_id, "storage": run.tags[TUNE_STORAGE_TAG]}
    for role in ("training", "validation"):
        state[role] = run.tags.get(Tag.dataset(role))
        state[f"{role}_digest"] = run.tags.get(Tag.dataset(role, "digest"))
    if run.status in (RunStatus.FINISHED, RunStatus.FAILED):
        state["finished"] = True
    return state


def reopen_run(run_id: str) -> None:
    Store().reopen_run(run_id)


def end_run(run_id: str, status: str) -> None:
    Store().end_run(run_id, status)


def settle_child_runs(experiment_id: str, parent_run_id: str, records: list[TrialRecord]) -> None:
    """Give every trial's child run its final state and reason.

    Tune kills stopped and failed trials' processes, so their runs are still RUNNING;
    a trial that failed before it opened a run gets one here, so that every trial is in
    MLflow. A trial that ran more than once (interrupted, retried) keeps its newest run.
    """
    store = Store()
    by_name: dict[str, list[Any]] = {}
    for run in store.child_runs(experiment_id, parent_run_id):
        by_name.setdefault(run.name, []).append(run)
    for record in records:
        name = TRIAL_RUN_PREFIX + record.trial_id
        candidates = sorted(by_name.get(name, []), key=lambda run: run.start_time or 0)
        for stale in candidates[:-1]:
            if stale.status == RunStatus.RUNNING:
                store.set_tags(stale.run_id, {Tag.TRIAL_STATE: TrialState.INTERRUPTED})
                store.end_run(stale.run_id, RunStatus.KILLED)
        if candidates:
            run_id, status = candidates[-1].run_id, candidates[-1].status
        elif record.state == TrialState.NOT_STARTED:
            continue
        else:
            run_id = store.create_run(experiment_id, name, {Tag.MLFLOW_PARENT_RUN_ID: parent_run_id})
            store.log_params(run_id, record.params)
            status = RunStatus.RUNNING
        record.run_id = record.run_id or run_id
        tags = {Tag.TRIAL_STATE: record.state, Tag.TUNE_TRIAL_ID: record.trial_id}
        if record.node_id:
            tags[Tag.RAY_NODE_ID] = record.node_id
        if record.retries:
            tags[Tag.RETRIES] = record.retries
        if record.reason:
            tags[Tag.FAILURE_REASON if record.state == TrialState.FAILED else Tag.STOP_REASON] = record.reason
        store.set_tags(run_id, tags)
        if record.state != TrialState.COMPLETED or status in (RunStatus.RUNNING, "SCHEDULED"):
            store.end_run(run_id, TRIAL_RUN_STATUS[TrialState(record.state)])


def log_leaderboard(
    parent_run_id: str, records: list[TrialRecord], searched: list[str], markdown: str
) -> None:
    store = Store()
    store.log_files(
        parent_run_id,
        {
            Artifact.LEADERBOARD_MARKDOWN: markdown,
            Artifact.LEADERBOARD_CSV: leaderboard_csv(records, searched),
        },
    )
    counts: dict[str, int] = {}
    for record in records:
        counts[record.state] = counts.get(record.state, 0) + 1
    store.log_metrics(parent_run_id, {f"trials_{state}": count for state, count in counts.items()})


def tag_parent(parent_run_id: str, best: TrialRecord | None, registered: str | None) -> None:
    """The best trial and the registered ``NAME/VERSION`` on the parent run, for finding them from it."""
    store = Store()
    if best is not None:
        store.set_tags(
            parent_run_id, {Tag.BEST_TRIAL: best.trial_id, Tag.BEST_TRIAL_RUN_ID: best.run_id or ""}
        )
        store.log_metrics(parent_run_id, {f"best_{key}": value for key, value in best.metrics.items()})
    if registered is not None:
        store.set_tags(parent_run_id, {Tag.REGISTERED_MODEL: registered})


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


def register_model_version(
    job: JobConfig,
    model_uri: str,
    metrics: dict[str, float],
    dataset_tags: dict[str, str],
    *,
    config_hash: str,
    model_name: str,
    sweep_parent_run_id: str | None = None,
    started_from: str | None = None,
) -> registry.ModelVersionInfo:
    """Register a trained model (a sweep's best trial or a single trial) with the tags to judge it by."""
    tags = model_version_tags(
        metrics=metrics,
        dataset_tags=dataset_tags,
        config_hash=config_hash,
        model_name=model_name,
        sweep_parent_run_id=sweep_parent_run_id,
        started_from=started_from,
    )
    with _quiet_mlflow():
        return registry.register_model(model_uri, job.register.model_name or job.experiment_name, tags=tags)
