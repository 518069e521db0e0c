"""One sweep trial as it runs in a Ray worker: a trainer run that reports every evaluation to Tune.

The trial function (``run_trial`` or a stand-in with its signature) does the training and
the MLflow child run; this wrapper turns its evaluations into Tune results, keeps the
best metric so far in every result (what the live table and the leaderboard show), and
reports an unusable outcome (NaN metric, failed run, no model, an exception) as the trial's
last result, flagged with its reason. Only a lost process or node then reaches Tune as an
error, and only those are retried (``compute.max_failures``): a diverged trial fails the
same way every time.

On a node that shares no disk with the sweep's driver, the trial first fetches the sweep's
dataset versions from the parent run into a node-local cache (:mod:`visionautoml.tracking.datasets`).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray import tune

from visionautoml.automl import space
from visionautoml.automl.schedulers import FINAL_KEY, INTERVAL_KEY
from visionautoml.config import JobConfig
from visionautoml.errors import first_line
from visionautoml.redact import scrub
from visionautoml.tracking.schema import PRIMARY_METRIC
from visionautoml.tracking.workspace import resolve_tracking_uri, workspace_dir

BEST_KEY = f"best_{PRIMARY_METRIC}"
FAILED_KEY = "failure_reason"
"""Set in a trial's last result when it failed for good (not retried); the value is the reason."""
TRIAL_RUN_PREFIX = "trial-"

TrialFunction = Callable[..., Any]
DatasetSpecs = dict[str, dict[str, str]]
"""Per role (training, validation): the version's ``digest``, and ``published`` when the parent run has it."""


class TrialFailed(Exception):
    """Raised inside a trial to end it as failed, with the reason as message."""


def run_tune_trial(
    config: dict[str, Any],
    *,
    job_json: str,
    trial_fn: TrialFunction,
    parent_run_id: str,
    deadline: float | None,
    datasets: DatasetSpecs | None = None,
) -> None:
    """Run one trainer run and report each evaluation to Tune.

    The reporter returns True once the sweep's deadline has passed, so a trial running
    then finishes with its best model instead of being killed. A NaN metric fails the
    trial: the training diverged, and going on would only burn the budget.
    """
    job = JobConfig.model_validate_json(job_json)
    params = space.trial_parameters(job.training_parameters, config["params"])
    if deadline is not None:
        remaining = max(0.5, (deadline - time.time()) / 60)
        params = params.model_copy(update={"max_minutes": min(params.max_minutes or remaining, remaining)})
    node_id = ray.get_runtime_context().get_node_id()
    state = {"evaluations": 0, "epoch": 0, "best": -math.inf}

    def reporter(epoch: int, metrics: dict[str, Any]) -> bool:
        value = metrics.get(PRIMARY_METRIC)
        if not state["evaluations"]:
            # A resumed attempt starts past epoch 1: count the evaluations the earlier one made.
            state["evaluations"] = (epoch - 1) // max(1, params.evaluation_frequency)
        state["evaluations"] += 1
        state["epoch"] = epoch
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise TrialFailed(
                f"{PRIMARY_METRIC} is {value} at epoch {epoch}: the training diverged; lower learning_rate"
            )
        state["best"] = max(state["best"], float(value))
        tune.report(
            {
                **numbers(metrics),
                "epoch": epoch,
                INTERVAL_KEY: state["evaluations"],
                BEST_KEY: state["best"],
                "node_id": node_id,
            }
        )
        return deadline is not None and time.time() >= deadline

    def fail(reason: str) -> None:
        """The trial's last result: failed, with why; NaN as the metric, which Tune's searchers skip."""
        result: dict[str, Any] = {PRIMARY_METRIC: math.nan, FAILED_KEY: reason, "node_id": node_id}
        result.update({"epoch": state["epoch"]} if state["epoch"] else {})
        result.update({BEST_KEY: state["best"]} if finite(state["best"]) else {})
        tune.report(result)

    tracking_uri = resolve_tracking_uri(job)
    try:
        job = _local_data(job, datasets or {}, parent_run_id, tracking_uri)
        result = trial_fn(
            job,
            params=params,
            reporter=reporter,
            parent_run_id=parent_run_id,
            run_name=TRIAL_RUN_PREFIX + tune.get_context().get_trial_id(),
        )
    except TrialFailed as error:
        fail(str(error))
        return
    except Exception as error:  # a bug or bad data: it would fail again, so it is not retried
        fail(scrub(f"{type(error).__name__}: {first_line(error)}"))
        return
    if result.run_id:
        _discard_checkpoints(job, result.run_id, tracking_uri)
    if str(result.status).upper() != "FINISHED" or not result.model_uri:
        reason = (result.failure_reason or "").removeprefix(f"{TrialFailed.__name__}: ")
        fail(reason or f"the trial ended with status {result.status} and no model")
        return
    metrics = numbers(result.metrics or {})
    if not finite(metrics.get(PRIMARY_METRIC)):
        fail(f"the trial finished without a finite {PRIMARY_METRIC}")
        return
    tune.report(
        {
            **metrics,
            INTERVAL_KEY: state["evaluations"],
            "epoch": state["epoch"],
            BEST_KEY: max(state["best"], metrics[PRIMARY_METRIC]),
            FINAL_KEY: 1,
            "run_id": result.run_id,
            "model_uri": result.model_uri,
            "node_id": node_id,
        }
    )


def _local_data(job: JobConfig, datasets: DatasetSpecs, parent_run_id: str, tracking_uri: str) -> JobConfig:
    """The job with data paths this node can read: the driver's, or copies fetched from the parent run."""
    published = {role: spec for role, spec in datasets.items() if spec.get("published")}
    if not published:
        return job
    from visionautoml.tracking.datasets import local_version

    cache = dataset_cache(job)
    update = {}
    for role, field in (("training", "training_data"), ("validation", "validation_data")):
        if role in published:
            update[field] = local_version(
                getattr(job, field) or "",
                published[role]["digest"],
                run_id=parent_run_id,
                role=role,
                cache=cache,
                tracking_uri=tracking_uri,
            )
    return job.model_copy(update=update)


def dataset_cache(job: JobConfig) -> Path:
    """Node-local: the workspace's cache where the driver's workspace path can be made, else a temp folder."""
    preferred = workspace_dir(job) / "cache" / "datasets"
    try:
        preferred.mkdir(parents=True, exist_ok=True)
        return preferred
    except OSError:
        fallback = Path(tempfile.gettempdir()) / "visionautoml-cache" / "datasets"
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


def _discard_checkpoints(job: JobConfig, run_id: str, tracking_uri: str) -> None:
    """The trial ended (with a model or for good): the copies of its checkpoints are of no more use."""
    from visionautoml.tracking.datasets import copies_through_server

    if copies_through_server(job):
        from visionautoml.tracking.checkpoints import discard_checkpoints

        discard_checkpoints(run_id, tracking_uri=tracking_uri)


def numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        key: float(value)
        for key, value in metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


def finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)
