"""One sweep trial as it runs in a Ray worker: a trainer run that reports every evaluation to Tune.

The trial function (``run_trial`` or a stand-in with its signature) does the training and
the MLflow child run; this wrapper turns its evaluations into Tune results, keeps the
best metric so far in every result (what the live table and the leaderboard show), and
turns an unusable outcome (NaN metric, failed run, no model) into an exception so that
Tune records the trial as errored with the reason as message.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import ray
from ray import tune

from visionautoml.automl import space
from visionautoml.automl.schedulers import FINAL_KEY, INTERVAL_KEY
from visionautoml.config import JobConfig
from visionautoml.tracking.schema import PRIMARY_METRIC

BEST_KEY = f"best_{PRIMARY_METRIC}"
TRIAL_RUN_PREFIX = "trial-"

TrialFunction = Callable[..., Any]


class TrialFailed(Exception):
    """Raised inside a trial so that Tune records it as errored, with the reason as message."""


def run_tune_trial(
    config: dict[str, Any],
    *,
    job_json: str,
    trial_fn: TrialFunction,
    parent_run_id: str,
    deadline: float | None,
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
    context = tune.get_context()
    node_id = ray.get_runtime_context().get_node_id()
    state = {"evaluations": 0, "epoch": 0, "best": -math.inf}

    def reporter(epoch: int, metrics: dict[str, Any]) -> bool:
        value = metrics.get(PRIMARY_METRIC)
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

    result = trial_fn(
        job,
        params=params,
        reporter=reporter,
        parent_run_id=parent_run_id,
        run_name=TRIAL_RUN_PREFIX + context.get_trial_id(),
    )
    if str(result.status).upper() != "FINISHED" or not result.model_uri:
        reason = (result.failure_reason or "").removeprefix(f"{TrialFailed.__name__}: ")
        raise TrialFailed(reason or f"the trial ended with status {result.status} and no model")
    metrics = numbers(result.metrics or {})
    if not finite(metrics.get(PRIMARY_METRIC)):
        raise TrialFailed(f"the trial finished without a finite {PRIMARY_METRIC}")
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


def numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        key: float(value)
        for key, value in metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


def finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)
