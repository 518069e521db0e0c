"""An AutoML sweep: many trials on Ray Tune, tracked in MLflow, the best one registered.

``run_sweep`` does, in order: register the training and validation data once as dataset
versions (trials get their paths, never the data), create the parent MLflow run, run the
trials on Ray Tune (each one a trainer run in a child MLflow run, reporting every
evaluation to Tune's early-termination scheduler), then settle every child run's state
(Tune kills stopped trials, so their runs are closed here with the reason), write the
leaderboard to the parent run, register the best model with the alias ``candidate`` and
promote it if asked. The sweep's state lives in ``<workspace>/sweeps/`` so that an
interrupted sweep continues with ``--resume`` (Tune's ``Tuner.restore``): finished
trials are kept, trials that were running start again.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import re
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from rich.console import Console
from rich.live import Live

from visionautoml.automl import compute, runs, space
from visionautoml.automl.leaderboard import (
    COMPLETED,
    EARLY_TERMINATED,
    FAILED,
    NOT_STARTED,
    Board,
    BoardCallback,
    TrialRecord,
    leaderboard_markdown,
    leaderboard_table,
    trial_number,
)
from visionautoml.automl.schedulers import FINAL_KEY, INTERVAL_KEY, build_scheduler, stop_reasons
from visionautoml.automl.trial_runner import (
    BEST_KEY,
    PRIMARY_METRIC,
    TrialFailed,
    TrialFunction,
    finite,
    numbers,
    run_tune_trial,
)
from visionautoml.config import JobConfig
from visionautoml.errors import ConfigError, TrainingError, VisionAutoMLError
from visionautoml.files import atomic_write_text
from visionautoml.tracking import registry
from visionautoml.tracking.auth import apply_credentials, scrub_credentials
from visionautoml.tracking.workspace import connect, workspace_dir

MODE = "max"
SWEEPS_DIR = "sweeps"


@dataclass
class RegisteredModel:
    name: str
    version: int
    aliases: list[str]


@dataclass
class SweepResult:
    parent_run_id: str
    experiment_id: str
    trials: list[TrialRecord]
    best: TrialRecord | None
    registered_model: RegisteredModel | None
    promotion: registry.PromotionDecision | None
    leaderboard_markdown: str
    report: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        best = self.best
        return {
            "status": "FINISHED" if self.registered_model else "FAILED",
            "parent_run_id": self.parent_run_id,
            "experiment_id": self.experiment_id,
            "run_id": best.run_id if best else None,
            "model_uri": best.model_uri if best else None,
            "metrics": best.metrics if best else {},
            "best_trial": best.trial_id if best else None,
            "trials": [asdict(trial) for trial in self.trials],
            "registered_model": asdict(self.registered_model) if self.registered_model else None,
            "promotion": self.promotion.to_dict() if self.promotion else None,
            "report": str(self.report) if self.report else None,
        }


class SweepInterrupted(VisionAutoMLError):
    """The sweep stopped before every trial ran (Ctrl+C); ``--resume`` continues it."""


@dataclass
class _Prepared:
    """What every trial shares: the job with absolute data paths, and the dataset versions."""

    job: JobConfig
    training_ref: str
    training_digest: str
    validation_ref: str
    validation_digest: str
    image_count: int

    def refs(self) -> dict[str, str]:
        return {"training": self.training_ref, "validation": self.validation_ref}

    def tags(self) -> dict[str, str]:
        """The dataset versions as the parent run and the registered model carry them."""
        return {
            registry.TRAINING_DATASET_TAG: self.training_ref,
            f"{registry.TRAINING_DATASET_TAG}.digest": self.training_digest,
            registry.VALIDATION_DATASET_TAG: self.validation_ref,
            f"{registry.VALIDATION_DATASET_TAG}.digest": self.validation_digest,
        }


@dataclass
class _Trials:
    records: list[TrialRecord]
    searched: list[str]
    total: int
    interrupted: bool


def run_sweep(
    job: JobConfig,
    *,
    resume: bool = False,
    output_json: str | Path | None = None,
    trial_fn: TrialFunction | None = None,
    console: Console | None = None,
) -> SweepResult:
    """Run (or with ``resume`` continue) the job's sweep; raises unless a model was registered.

    ``trial_fn`` has :func:`visionautoml.training.trial.run_trial`'s signature and is that
    function unless given (tests pass a quick stand-in).
    """
    console = console or Console()
    if trial_fn is None:
        from visionautoml.training import trial

        trial_fn = trial.run_trial
    fingerprint = job.fingerprint()
    # Credentials go to the environment (and so to local trials); the job handed on holds none.
    job = apply_credentials(job).model_copy(update={"workspace": str(workspace_dir(job))})
    state_file = Path(job.workspace) / SWEEPS_DIR / f"{fingerprint}.json"
    state = _load_state(state_file, resume, fingerprint)
    if job.search_space:  # a bad space fails now, before any work; model names are checked with the zoo
        space.validate_space(job.search_space, job.training_parameters)
        space.plan_search(job.search_space, job.sweep.sampling_algorithm, 1, 0)
    experiment_id = connect(job)
    prepared = _prepare_data(job, state, console)

    _start_importing("visionautoml.models.zoo")  # for _plan, while Ray starts
    with compute.ray_session(
        job.compute, on_status=lambda text: console.print(f"[dim]{text}[/dim]")
    ) as cluster:
        console.print(f"Ray: {cluster.describe()}")
        plan, automatic = _plan(job, prepared.image_count, cluster, console)
        parent_run_id = state.get("parent_run_id") or runs.start_parent_run(
            job, experiment_id, fingerprint, prepared.tags(), plan, automatic
        )
        if resume:
            runs.reopen_run(parent_run_id)
        storage = state.get("storage") or str(
            state_file.parent / f"{_slug(job.experiment_name)}-{fingerprint[:8]}-{runs.now()}"
        )
        _save_state(
            state_file, {**state, "parent_run_id": parent_run_id, "storage": storage, **prepared.refs()}
        )
        trials = _run_trials(job, plan, prepared, trial_fn, parent_run_id, storage, resume, cluster, console)

    records, searched = trials.records, trials.searched
    runs.settle_child_runs(experiment_id, parent_run_id, records)
    leaderboard = leaderboard_markdown(records, searched)
    runs.log_leaderboard(parent_run_id, records, searched, leaderboard)
    if console.is_terminal:
        console.print(leaderboard_table(records, searched))
    else:  # a log file: Markdown lines stay readable at any width
        console.print(f"Leaderboard\n{leaderboard}", soft_wrap=True, markup=False, highlight=False)
    if trials.interrupted:
        runs.end_run(parent_run_id, "KILLED")
        ran = sum(record.state != NOT_STARTED for record in records)
        raise SweepInterrupted(
            f"the sweep stopped after {ran} of {trials.total} trials; "
            "run the same command with --resume to continue it"
        )

    best = _best(records)
    registered, promotion = _register(job, best, prepared, fingerprint, parent_run_id, console)
    runs.tag_parent(parent_run_id, best, f"{registered.name}/{registered.version}" if registered else None)
    runs.end_run(parent_run_id, "FINISHED" if registered else "FAILED")
    _save_state(state_file, {**_load_json(state_file), "finished": True})
    report_path = (
        Path(output_json).with_name("report.html")
        if output_json
        else state_file.parent / f"{parent_run_id}.html"
    )
    from visionautoml.automl.report import report_after_sweep  # matplotlib: only once trials are done

    report = report_after_sweep(parent_run_id, report_path)
    if report:
        console.print(f"Report: {report} (also the parent run's report.html)", soft_wrap=True)

    result = SweepResult(
        parent_run_id, experiment_id, records, best, registered, promotion, leaderboard, report
    )
    if output_json:
        atomic_write_text(output_json, json.dumps(result.to_dict(), indent=2) + "\n")
    if registered is None:
        reasons = "; ".join(f"trial {r.number}: {r.state} {r.reason}".strip() for r in records)
        raise TrainingError(
            f"no trial produced a model, so nothing was registered ({reasons}). "
            f"The leaderboard is in the parent run {parent_run_id}"
        )
    return result


def _load_state(path: Path, resume: bool, fingerprint: str) -> dict[str, Any]:
    """The interrupted sweep to resume, or a fresh state; a clear error when there is nothing to resume."""
    if not resume:
        return {}
    state = _load_json(path)
    if not state.get("storage"):
        raise ConfigError(
            f"--resume: no sweep of this config (hash {fingerprint}) was started in {path.parent.parent}; "
            "run without --resume to start one (a changed config is a new sweep)"
        )
    if state.get("finished"):
        raise ConfigError(
            f"--resume: the last sweep of this config (parent run {state.get('parent_run_id')}) already "
            "finished; run without --resume to start a new one"
        )
    return state


def _load_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path}: unreadable sweep state ({error}); delete it to start afresh") from None


def _save_state(path: Path, state: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(state, indent=2) + "\n")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:60] or "sweep"


def _prepare_data(job: JobConfig, state: dict[str, Any], console: Console) -> _Prepared:
    """Read, split and register the data once; every trial then reads the same two versions.

    Registering makes the validation set a versioned, content-addressed thing the model's
    tags can point at, which ``promote_if_better`` needs to compare like with like.
    """
    from visionautoml.data.versions import DatasetStore, default_store_root

    store = DatasetStore(default_store_root(job.workspace))
    if state.get("training") and state.get("validation"):
        training = _get_version(store, state["training"])
        validation = _get_version(store, state["validation"])
    else:
        from visionautoml.data.formats import read_dataset
        from visionautoml.data.split import split_fraction

        if not job.training_data:
            raise ConfigError("training_data: a sweep needs training data (a folder, JSONL file or archive)")
        with console.status("reading the training data"):
            train = read_dataset(job.training_data)
            if job.validation_data:
                validation_set = read_dataset(job.validation_data, classes=train.classes)
            else:
                train, validation_set = split_fraction(
                    train, job.validation_data_size, job.training_parameters.seed
                )
        name = _slug(job.experiment_name)
        training = store.register_dataset(train, f"{name}-train", source=str(job.training_data))
        validation = store.register_dataset(
            validation_set, f"{name}-validation", source=str(job.validation_data or job.training_data)
        )
        console.print(
            f"Data: {training.ref} ({training.image_count} images) for training, "
            f"{validation.ref} ({validation.image_count} images) for validation"
        )
    trial_job = job.model_copy(
        update={"training_data": training.annotations, "validation_data": validation.annotations}
    )
    return _Prepared(
        trial_job,
        training.ref,
        training.digest,
        validation.ref,
        validation.digest,
        training.image_count + validation.image_count,
    )


def _get_version(store: Any, ref: str) -> Any:
    name, _, version = ref.partition(":")
    return store.get(name, int(version))


def _plan(
    job: JobConfig, image_count: int, cluster: compute.ClusterInfo, console: Console
) -> tuple[space.SearchPlan, bool]:
    """The checked search space (the job's, or the automatic one) and what grid/random will run."""
    available = _available_models()
    subspaces, automatic = list(job.search_space), not job.search_space
    if automatic:
        gpus = job.compute.gpus_per_trial or cluster.gpus
        subspaces = space.automatic_space(image_count=image_count, gpus=gpus, available_models=available)
        console.print("No search_space given: searching an automatic space (light models on CPU).")
    space.validate_space(subspaces, job.training_parameters, available)
    plan = space.plan_search(
        subspaces, job.sweep.sampling_algorithm, job.limits.max_trials, job.training_parameters.seed
    )
    for note in plan.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    return plan, automatic


def _start_importing(module: str) -> None:
    """Import ``module`` in a background thread: torch takes seconds, which the sweep spends waiting for Ray.

    A later ``import`` of the module waits for this one; a failure here is left for it to report.
    """

    def load() -> None:
        with contextlib.suppress(Exception):
            importlib.import_module(module)

    threading.Thread(target=load, name=f"import {module}", daemon=True).start()


def _available_models() -> list[str] | None:
    try:
        from visionautoml.models.zoo import ZOO
    except ImportError:
        return None
    return list(ZOO)


def _run_trials(
    job: JobConfig,
    plan: space.SearchPlan,
    prepared: _Prepared,
    trial_fn: TrialFunction,
    parent_run_id: str,
    storage: str,
    resume: bool,
    cluster: compute.ClusterInfo,
    console: Console,
) -> _Trials:
    """The Tune run, drawn live; every trial's record afterwards."""
    limits = job.limits
    resources = compute.trial_resources(job.compute, cluster, limits.max_concurrent_trials)
    deadline = time.time() + limits.timeout_minutes * 60 if limits.timeout_minutes else None
    trainable = _trainable(prepared.job, trial_fn, parent_run_id, deadline, resources)
    total = len(plan.trials) or limits.max_trials
    board = Board(space.searched_names(plan.subspaces), total)
    tuner, scheduler = _tuner(job, plan, trainable, storage, resume, deadline)
    termination = job.sweep.early_termination
    console.print(
        f"Sweep: {total} trial(s), {plan.algorithm} sampling, {limits.max_concurrent_trials} at a time, "
        f"early termination: {termination.type if termination else 'none'}; parent run {parent_run_id}"
    )
    with Live(board.render(), console=console, refresh_per_second=2, transient=True) as live:
        BoardCallback.active = (board, live)
        try:
            with _quiet_tune_logs():
                grid = tuner.fit()
        finally:
            BoardCallback.active = None
    records = _collect(
        _final_trials(grid, storage),
        stop_reasons(scheduler),
        deadline,
        TrialTimeLimit(limits.trial_timeout_minutes).limit_s,
    )
    return _Trials(records, board.searched, total, _interrupted(records, total, deadline))


def _trainable(
    job: JobConfig,
    trial_fn: TrialFunction,
    parent_run_id: str,
    deadline: float | None,
    resources: dict[str, float],
) -> Any:
    return tune.with_resources(
        tune.with_parameters(
            run_tune_trial,
            job_json=job.model_dump_json(),
            trial_fn=trial_fn,
            parent_run_id=parent_run_id,
            deadline=deadline,
        ),
        resources,
    )


def _tuner(
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
    if resume and tune.Tuner.can_restore(storage):
        restored = tune.Tuner.restore(
            storage,
            trainable=trainable,
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
    path = Path(storage)
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            num_samples=1 if plan.trials else limits.max_trials,
            search_alg=search_alg,
            scheduler=scheduler,
            max_concurrent_trials=limits.max_concurrent_trials,
            time_budget_s=(deadline - time.time() + _grace_s(limits.timeout_minutes)) if deadline else None,
            # A fresh process per trial: with reused actors (Ray 2.60), a trial whose process dies is
            # left PENDING and never recorded as failed.
            reuse_actors=False,
        ),
        run_config=tune.RunConfig(
            name=path.name,
            storage_path=str(path.parent),
            verbose=0,
            stop=TrialTimeLimit(limits.trial_timeout_minutes),
            callbacks=[BoardCallback()],
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
        ),
    )
    return tuner, scheduler


class TrialTimeLimit(tune.Stopper):
    """A backstop for ``trial_timeout_minutes``; the trainer's own ``max_minutes`` normally ends a trial."""

    def __init__(self, trial_timeout_minutes: float | None):
        minutes = trial_timeout_minutes
        self.limit_s = minutes * 60 + _grace_s(minutes) if minutes else None

    def __call__(self, trial_id: str, result: dict) -> bool:
        return self.limit_s is not None and result.get("time_total_s", 0) > self.limit_s

    def stop_all(self) -> bool:
        return False


def _grace_s(timeout_minutes: float | None) -> float:
    """Time past a deadline for running trials to finish their last evaluation and save their model."""
    return min(300.0, max(30.0, 0.1 * (timeout_minutes or 0) * 60))


@contextmanager
def _quiet_tune_logs() -> Iterator[None]:
    """Tune logs each failed trial's traceback; the table and the leaderboard say it in one line."""
    tune_logger = logging.getLogger("ray.tune")
    level = tune_logger.level
    tune_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        tune_logger.setLevel(level)


def _final_trials(grid: Any, storage: str) -> list[Any]:
    """Every trial of the experiment (this run's and, after ``--resume``, the earlier ones').

    The Tuner's own trial objects, not the experiment state it saved: Ray 2.60 may save a
    trial whose process died as PENDING (a stale cached state) although it ended in ERROR,
    which would make a finished sweep look interrupted.
    """
    analysis = getattr(grid, "_experiment_analysis", None)  # no public accessor for the trials
    trials = getattr(analysis, "trials", None) or tune.ExperimentAnalysis(storage).trials
    return sorted(trials, key=lambda item: item.trial_id)


def _collect(
    trials: list[Any], reasons: dict[str, str], deadline: float | None, trial_limit_s: float | None
) -> list[TrialRecord]:
    """One record per trial: its state, why it ended, its last metrics."""
    records = []
    for trial in trials:
        last = trial.last_result or {}
        params = dict((trial.config or {}).get("params", {}))
        if trial.status == "ERROR":
            state, reason = FAILED, scrub_credentials(_error_reason(trial))
        elif last.get(FINAL_KEY):
            state, reason = COMPLETED, ""
        elif trial.status == "TERMINATED" and last:
            state = EARLY_TERMINATED
            reason = reasons.get(trial.trial_id) or _stop_reason(last, deadline, trial_limit_s)
        else:
            state, reason = NOT_STARTED, "the sweep ended before this trial ran"
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
            )
        )
    return records


def _trial_metrics(result: dict[str, Any]) -> dict[str, float]:
    skip = {INTERVAL_KEY, FINAL_KEY, BEST_KEY, "epoch", "training_iteration", "timestamp", "pid"}
    return {
        key: value
        for key, value in numbers(result).items()
        if key not in skip and not key.startswith(("time_", "iterations_", "done"))
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
        return f"{type(cause).__name__}: {_first_line(str(cause))}"
    text = trial.get_error() or ""
    lines = [line for line in str(text).splitlines() if line.strip()]
    return lines[-1].strip() if lines else "the trial failed (no error recorded)"


def _first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def _interrupted(records: list[TrialRecord], total: int, deadline: float | None) -> bool:
    """Fewer trials ran than planned, and not because the sweep's time was up."""
    ran = sum(1 for record in records if record.state != NOT_STARTED)
    out_of_time = deadline is not None and time.time() >= deadline
    return ran < total and not out_of_time


def _best(records: list[TrialRecord]) -> TrialRecord | None:
    finished = [
        record
        for record in records
        if record.state == COMPLETED and record.model_uri and finite(record.metrics.get(PRIMARY_METRIC))
    ]
    return max(finished, key=lambda record: record.metrics[PRIMARY_METRIC], default=None)


def _register(
    job: JobConfig,
    best: TrialRecord | None,
    prepared: _Prepared,
    fingerprint: str,
    parent_run_id: str,
    console: Console,
) -> tuple[RegisteredModel | None, registry.PromotionDecision | None]:
    """Register the best trial's model as ``candidate``; promote it if asked and it earns it."""
    if best is None:
        return None, None
    model_name = job.register.model_name or job.experiment_name
    version = runs.register_best(job, model_name, best, prepared.tags(), fingerprint, parent_run_id)
    registered = RegisteredModel(version.name, version.version, list(version.aliases))
    console.print(
        f"Registered [bold]{registered.name}[/bold] version {registered.version} "
        f"(aliases: {', '.join(registered.aliases)}) from trial {best.number} ({best.run_id})"
    )
    promotion = None
    if job.register.promote_if_better:
        promotion = registry.promote_if_better(
            registered.name, registered.version, job.register.promote_if_better, metric=PRIMARY_METRIC
        )
        console.print(promotion.message)
        if promotion.promoted:
            registered.aliases = sorted({*registered.aliases, promotion.alias})
    return registered, promotion
