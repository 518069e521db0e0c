"""Ray Tune's side of a sweep: the Tuner, its stopping rules, and each trial's outcome read back.

Kept apart from :mod:`visionautoml.automl.sweep` (which decides what to run and what to do
with the results) because this is where Ray's API and its quirks are handled: a fresh
process per trial, the Tuner's own trial objects rather than its stale saved state, the
worker's exception turned into one line.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray
from ray import tune

from visionautoml.automl import space
from visionautoml.automl.leaderboard import BoardCallback, TrialRecord, trial_number
from visionautoml.automl.schedulers import FINAL_KEY, INTERVAL_KEY, build_scheduler
from visionautoml.automl.trial_runner import (
    BEST_KEY,
    FAILED_KEY,
    DatasetSpecs,
    TrialFailed,
    TrialFunction,
    finite,
    numbers,
    run_tune_trial,
)
from visionautoml.config import JobConfig
from visionautoml.errors import first_line
from visionautoml.redact import scrub
from visionautoml.tracking.schema import PRIMARY_METRIC, TrialState

MODE = "max"


def trainable(
    job: JobConfig,
    trial_fn: TrialFunction,
    parent_run_id: str,
    deadline: float | None,
    resources: dict[str, float],
    datasets: DatasetSpecs | None = None,
) -> Any:
    return tune.with_resources(
        tune.with_parameters(
            run_tune_trial,
            job_json=job.model_dump_json(),
            trial_fn=trial_fn,
            parent_run_id=parent_run_id,
            deadline=deadline,
            datasets=datasets,
        ),
        resources,
    )


def storage_location(storage: str) -> tuple[str, Any]:
    """``(path, filesystem)`` as Tune takes them: a folder as it is, ``s3://`` through pyarrow's S3.

    The S3 endpoint and region come from the standard variables (``AWS_ENDPOINT_URL_S3`` or
    ``AWS_ENDPOINT_URL``, ``AWS_REGION`` or ``AWS_DEFAULT_REGION``), the keys from AWS's usual
    chain, read where the file system is used: the driver. Trials write nothing there (they
    checkpoint through the tracking server), so the workers need no keys.
    """
    if not storage.startswith("s3://"):
        return storage, None
    import pyarrow.fs

    path = storage.removeprefix("s3://").strip("/")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not endpoint and not region:
        region = pyarrow.fs.resolve_s3_region(path.split("/", 1)[0])
    options = {key: value for key, value in (("endpoint_override", endpoint), ("region", region)) if value}
    return path, pyarrow.fs.S3FileSystem(**options)


def build_tuner(
    job: JobConfig,
    plan: space.SearchPlan,
    trainable: Any,
    storage: str,
    resume: bool,
    deadline: float | None,
) -> tuple[tune.Tuner, Any]:
    """A new Tuner, or with ``resume`` the interrupted one; with the scheduler when it is new.

    A restored Tuner brings back its own scheduler and searcher from the experiment folder.
    """
    param_space = {"params": tune.grid_search(plan.trials)} if plan.trials else {}
    location, filesystem = storage_location(storage)
    if resume and tune.Tuner.can_restore(location, storage_filesystem=filesystem):
        restored = tune.Tuner.restore(
            location,
            trainable=trainable,
            storage_filesystem=filesystem,
            param_space=param_space or None,
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=False,
        )
        return restored, None
    limits = job.limits
    scheduler = build_scheduler(
        job.sweep.early_termination,
        metric=PRIMARY_METRIC,
        mode=MODE,
        max_intervals=math.ceil(
            job.training_parameters.number_of_epochs / job.training_parameters.evaluation_frequency
        ),
    )
    search_alg = None
    if plan.algorithm == "bayesian":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        with warnings.catch_warnings():
            # ``group`` (conditional parameters, exactly what sub-spaces are) is marked experimental.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.TPESampler(
                seed=job.training_parameters.seed,
                n_startup_trials=max(1, min(10, limits.max_trials // 3)),
                multivariate=True,
                group=True,
            )
        search_alg = OptunaSearch(
            space.OptunaSpace(plan.subspaces), metric=PRIMARY_METRIC, mode=MODE, sampler=sampler
        )
    folder, _, name = location.rstrip("/").rpartition("/")
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            num_samples=1 if plan.trials else limits.max_trials,
            search_alg=search_alg,
            scheduler=scheduler,
            max_concurrent_trials=limits.max_concurrent_trials,
            time_budget_s=(deadline - time.time() + grace_s(limits.timeout_minutes)) if deadline else None,
            # A fresh process per trial: with reused actors (Ray 2.60), a trial whose process dies is
            # left PENDING and never recorded as failed.
            reuse_actors=False,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=folder or ".",
            storage_filesystem=filesystem,
            verbose=0,
            stop=TrialTimeLimit(limits.trial_timeout_minutes),
            callbacks=[BoardCallback()],
            # Only a lost process or node reaches Tune as an error (trial_runner reports the rest).
            failure_config=tune.FailureConfig(max_failures=job.compute.max_failures, fail_fast=False),
        ),
    )
    return tuner, scheduler


class TrialTimeLimit(tune.Stopper):
    """A backstop for ``trial_timeout_minutes``; the trainer's own ``max_minutes`` normally ends a trial."""

    def __init__(self, trial_timeout_minutes: float | None):
        minutes = trial_timeout_minutes
        self.limit_s = minutes * 60 + grace_s(minutes) if minutes else None

    def __call__(self, trial_id: str, result: dict) -> bool:
        return self.limit_s is not None and result.get("time_total_s", 0) > self.limit_s

    def stop_all(self) -> bool:
        return False


def grace_s(timeout_minutes: float | None) -> float:
    """Time past a deadline for running trials to finish their last evaluation and save their model."""
    return min(300.0, max(30.0, 0.1 * (timeout_minutes or 0) * 60))


@contextmanager
def quiet_tune_logs() -> Iterator[None]:
    """Tune logs each failed trial's traceback; the table and the leaderboard say it in one line."""
    tune_logger = logging.getLogger("ray.tune")
    level = tune_logger.level
    tune_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        tune_logger.setLevel(level)


def final_trials(grid: Any, storage: str) -> list[Any]:
    """Every trial of the experiment (this run's and, after ``--resume``, the earlier ones').

    The Tuner's own trial objects, not the experiment state it saved: Ray 2.60 may save a
    trial whose process died as PENDING (a stale cached state) although it ended in ERROR,
    which would make a finished sweep look interrupted.
    """
    analysis = getattr(grid, "_experiment_analysis", None)  # no public accessor for the trials
    if getattr(analysis, "trials", None):
        trials = analysis.trials
    else:
        location, filesystem = storage_location(storage)
        trials = tune.ExperimentAnalysis(location, storage_filesystem=filesystem).trials
    return sorted(trials, key=lambda item: item.trial_id)


def collect(
    trials: list[Any], reasons: dict[str, str], deadline: float | None, trial_limit_s: float | None
) -> list[TrialRecord]:
    """One record per trial: its state, why it ended, its last metrics."""
    records = []
    for trial in trials:
        last = trial.last_result or {}
        params = dict((trial.config or {}).get("params", {}))
        failures = int(getattr(trial, "num_failures", 0) or 0)
        if trial.status == "ERROR":
            state, reason = TrialState.FAILED, scrub(_error_reason(trial))
            failures -= 1  # the last failure was not retried
        elif last.get(FAILED_KEY):
            state, reason = TrialState.FAILED, str(last[FAILED_KEY])
        elif last.get(FINAL_KEY):
            state, reason = TrialState.COMPLETED, ""
        elif trial.status == "TERMINATED" and last:
            state = TrialState.EARLY_TERMINATED
            reason = reasons.get(trial.trial_id) or _stop_reason(last, deadline, trial_limit_s)
        else:
            state, reason = TrialState.NOT_STARTED, "the sweep ended before this trial ran"
        records.append(
            TrialRecord(
                trial_id=trial.trial_id,
                number=trial_number(trial.trial_id),
                state=state,
                params=params,
                evaluations=int(last.get(INTERVAL_KEY, 0) or 0),
                epoch=int(last.get("epoch", 0) or 0),
                best_metric=float(last[BEST_KEY]) if finite(last.get(BEST_KEY)) else None,
                metrics=_trial_metrics(last),
                run_id=last.get("run_id"),
                model_uri=last.get("model_uri"),
                node_id=last.get("node_id"),
                seconds=round(float(last.get("time_total_s", 0.0) or 0.0), 1),
                reason=reason,
                retries=max(0, failures),
            )
        )
    return records


def _trial_metrics(result: dict[str, Any]) -> dict[str, float]:
    skip = {INTERVAL_KEY, FINAL_KEY, BEST_KEY, "epoch", "training_iteration", "timestamp", "pid"}
    return {
        key: value
        for key, value in numbers(result).items()
        if key not in skip and finite(value) and not key.startswith(("time_", "iterations_", "done"))
    }


def _stop_reason(last: dict[str, Any], deadline: float | None, trial_limit_s: float | None) -> str:
    """Why Tune stopped a trial, when the scheduler did not say: a time limit, else the policy."""
    if trial_limit_s is not None and last.get("time_total_s", 0) > trial_limit_s:
        return "stopped at limits.trial_timeout_minutes"
    if deadline is not None and last.get("timestamp", 0) >= deadline:
        return "stopped at limits.timeout_minutes"
    return "stopped early by the early-termination policy"


def _error_reason(trial: Any) -> str:
    """One line saying why a trial failed, from the exception its worker raised."""
    error = None
    try:
        error = trial.get_pickled_error()
    except Exception:  # an unreadable error file must not hide the others
        error = None
    if error is not None:
        cause = getattr(error, "cause", None) or error
        if isinstance(cause, ray.exceptions.RayActorError):
            return "the trial's process died (killed, or out of memory)"
        if isinstance(cause, TrialFailed):
            return str(cause)
        return f"{type(cause).__name__}: {first_line(cause)}"
    text = trial.get_error() or ""
    lines = [line for line in str(text).splitlines() if line.strip()]
    return lines[-1].strip() if lines else "the trial failed (no error recorded)"
