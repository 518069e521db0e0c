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

import csv
import io
import json
import logging
import math
import os
import re
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import ray
from ray import tune
from rich.console import Console
from rich.live import Live
from rich.table import Table

from visionautoml.automl import compute, space
from visionautoml.automl.schedulers import FINAL_KEY, INTERVAL_KEY, build_scheduler, stop_reasons
from visionautoml.config import JobConfig
from visionautoml.errors import ConfigError, TrainingError, VisionAutoMLError
from visionautoml.files import atomic_write_text
from visionautoml.tracking import registry
from visionautoml.tracking.auth import scrub_credentials, server_name
from visionautoml.tracking.workspace import connect, resolve_tracking_uri, workspace_dir

PRIMARY_METRIC = registry.PRIMARY_METRIC
MODE = "max"
BEST_KEY = f"best_{PRIMARY_METRIC}"
SWEEPS_DIR = "sweeps"
TRIAL_RUN_PREFIX = "trial-"

# Trial states, as the leaderboard and the child runs' ``trial_state`` tag show them.
COMPLETED, EARLY_TERMINATED, FAILED, NOT_STARTED = "completed", "early_terminated", "failed", "not_started"
_RUN_STATUS = {COMPLETED: "FINISHED", EARLY_TERMINATED: "KILLED", FAILED: "FAILED", NOT_STARTED: "KILLED"}

TrialFunction = Callable[..., Any]


class TrialFailed(Exception):
    """Raised inside a trial so that Tune records it as errored, with the reason as message."""


@dataclass
class TrialRecord:
    """One trial as the leaderboard, the console and ``--output-json`` show it."""

    trial_id: str
    number: int
    state: str
    params: dict[str, Any]
    evaluations: int = 0
    epoch: int = 0
    best_metric: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None
    model_uri: str | None = None
    node_id: str | None = None
    seconds: float = 0.0
    reason: str = ""


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
        }


@dataclass
class _Prepared:
    """What every trial shares: the job with absolute data paths, and the dataset versions."""

    job: JobConfig
    training_ref: str
    training_digest: str
    validation_ref: str
    validation_digest: str
    image_count: int


# --- the trial, as it runs in a Ray worker ----------------------------------------------------------


def _tune_trial(
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
                **_numbers(metrics),
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
        raise TrialFailed(
            result.failure_reason or f"the trial ended with status {result.status} and no model"
        )
    metrics = _numbers(result.metrics or {})
    if not _finite(metrics.get(PRIMARY_METRIC)):
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


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        key: float(value)
        for key, value in metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


# --- the live table ------------------------------------------------------------------------------------


class Board:
    """The trials as they run: what the live table and the leaderboard are drawn from."""

    def __init__(self, searched: list[str], total: int):
        self.searched = searched
        self.total = total
        self.rows: dict[str, dict[str, Any]] = {}

    def update(self, trial: Any, state: str, result: dict[str, Any] | None = None) -> None:
        row = self.rows.setdefault(
            trial.trial_id, {"params": dict(trial.config.get("params", {})), "evaluations": 0, "epoch": 0}
        )
        row["state"] = state
        if result:
            row["evaluations"] = int(result.get(INTERVAL_KEY, row["evaluations"]))
            row["epoch"] = int(result.get("epoch", row["epoch"]) or row["epoch"])
            if _finite(result.get(BEST_KEY)):
                row["best"] = float(result[BEST_KEY])

    def render(self) -> Table:
        done = sum(1 for row in self.rows.values() if row["state"] not in ("running", "pending"))
        table = Table(title=f"Sweep: {done}/{self.total} trials done", title_justify="left")
        for column in ("trial", "state", "model", *_short_names(self.searched), "epoch", f"best {_abbrev()}"):
            table.add_column(column, justify="right" if column in ("epoch",) else "left")
        for number, (trial_id, row) in enumerate(self.rows.items(), start=1):
            params = row["params"]
            table.add_row(
                f"{number} {trial_id[-5:]}",
                _styled_state(row["state"]),
                str(params.get("model_name", "")),
                *(_format_value(params.get(name)) for name in self.searched if name != "model_name"),
                str(row["epoch"] or ""),
                f"{row['best']:.4f}" if "best" in row else "",
            )
        return table


def _abbrev() -> str:
    return "mAP" if PRIMARY_METRIC == "mean_average_precision" else PRIMARY_METRIC


def _short_names(searched: list[str]) -> list[str]:
    return [name for name in searched if name != "model_name"]


def _styled_state(state: str) -> str:
    colour = {
        "running": "cyan",
        COMPLETED: "green",
        EARLY_TERMINATED: "yellow",
        FAILED: "red",
        "stopped": "yellow",
    }.get(state)
    return f"[{colour}]{state}[/{colour}]" if colour else state


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


class BoardCallback(tune.Callback):
    """Feeds Tune's trial events to the live table.

    Tune pickles its callbacks into the experiment folder (for ``--resume``); the table
    holds a console, which does not pickle, so the callback reaches the table of the sweep
    in progress through a class attribute instead of holding it.
    """

    active: ClassVar[tuple[Board, Live] | None] = None

    def _show(self, trial: Any, state: str, result: dict | None = None) -> None:
        if BoardCallback.active is None:
            return
        board, live = BoardCallback.active
        board.update(trial, state, result)
        live.update(board.render())

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._show(trial, "running")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._show(trial, "running", result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        final = bool((trial.last_result or {}).get(FINAL_KEY))
        self._show(trial, COMPLETED if final else "stopped", trial.last_result)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._show(trial, FAILED)


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


# --- the sweep ---------------------------------------------------------------------------------------


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
    job = job.model_copy(update={"workspace": str(workspace_dir(job))})
    sweeps = Path(job.workspace) / SWEEPS_DIR
    state_file = sweeps / f"{fingerprint}.json"
    state = _load_state(state_file, resume, fingerprint)

    experiment_id = connect(job)
    prepared = _prepare_data(job, state, console)
    model_name = job.register.model_name or job.experiment_name
    limits = job.limits

    with compute.ray_session(
        job.compute, on_status=lambda text: console.print(f"[dim]{text}[/dim]")
    ) as cluster:
        console.print(f"Ray: {cluster.describe()}")
        subspaces, automatic = space.effective_space(
            job, image_count=prepared.image_count, gpus=job.compute.gpus_per_trial or cluster.gpus
        )
        available = _available_models()
        if automatic:
            subspaces = space.automatic_space(
                image_count=prepared.image_count, gpus=cluster.gpus, available_models=available
            )
            console.print("No search_space given: searching an automatic space (light models on CPU).")
        space.validate_space(subspaces, job.training_parameters, available)
        plan = space.plan_search(
            subspaces, job.sweep.sampling_algorithm, limits.max_trials, job.training_parameters.seed
        )
        for note in plan.notes:
            console.print(f"[yellow]note:[/yellow] {note}")
        resources = compute.trial_resources(job.compute, cluster, limits.max_concurrent_trials)

        parent_run_id = state.get("parent_run_id") or _start_parent_run(
            job, experiment_id, fingerprint, prepared, plan, automatic
        )
        if resume:
            _reopen_run(parent_run_id)
        storage = state.get("storage") or str(
            sweeps / f"{_slug(job.experiment_name)}-{fingerprint[:8]}-{_now()}"
        )
        _save_state(
            state_file, {**state, "parent_run_id": parent_run_id, "storage": storage, **_refs(prepared)}
        )

        started = time.time()
        deadline = started + limits.timeout_minutes * 60 if limits.timeout_minutes else None
        trainable = _trainable(prepared.job, trial_fn, parent_run_id, deadline, resources)
        total = len(plan.trials) or limits.max_trials
        board = Board(space.searched_names(subspaces), total)
        tuner, scheduler = _tuner(job, plan, trainable, storage, resume, deadline)
        console.print(
            f"Sweep: {total} trial(s), {job.sweep.sampling_algorithm} sampling, "
            f"{limits.max_concurrent_trials} at a time, early termination: "
            f"{job.sweep.early_termination.type if job.sweep.early_termination else 'none'}; "
            f"parent run {parent_run_id}"
        )
        with Live(
            board.render(), console=console, refresh_per_second=2, transient=console.is_terminal
        ) as live:
            BoardCallback.active = (board, live)
            try:
                with _quiet_tune_logs():
                    tuner.fit()
            finally:
                BoardCallback.active = None
        records = _collect(storage, stop_reasons(scheduler), deadline)

    interrupted = _interrupted(records, total, deadline)
    _settle_child_runs(experiment_id, parent_run_id, records)
    leaderboard = _leaderboard(records, board.searched)
    _log_leaderboard(parent_run_id, records, board.searched, leaderboard)
    console.print(_leaderboard_table(records, board.searched))
    if interrupted:
        _end_run(parent_run_id, "KILLED")
        raise SweepInterrupted(
            f"the sweep stopped after {sum(r.state != NOT_STARTED for r in records)} of {total} trials; "
            "run the same command with --resume to continue it"
        )

    best = _best(records)
    registered = promotion = None
    if best is not None:
        registered = _register(job, model_name, best, prepared, fingerprint, parent_run_id)
        console.print(
            f"Registered [bold]{registered.name}[/bold] version {registered.version} "
            f"(aliases: {', '.join(registered.aliases)}) from trial {best.number} ({best.run_id})"
        )
        if job.register.promote_if_better:
            promotion = registry.promote_if_better(
                registered.name, registered.version, job.register.promote_if_better, metric=PRIMARY_METRIC
            )
            console.print(promotion.message)
            if promotion.promoted:
                registered.aliases = sorted({*registered.aliases, promotion.alias})
    _tag_parent(parent_run_id, best, registered)
    _end_run(parent_run_id, "FINISHED" if registered else "FAILED")
    _save_state(state_file, {**_load_json(state_file), "finished": True})

    result = SweepResult(parent_run_id, experiment_id, records, best, registered, promotion, leaderboard)
    if output_json:
        atomic_write_text(output_json, json.dumps(result.to_dict(), indent=2) + "\n")
    if registered is None:
        reasons = "; ".join(f"trial {r.number}: {r.state} {r.reason}".strip() for r in records)
        raise TrainingError(
            f"no trial produced a model, so nothing was registered ({reasons}). "
            f"The leaderboard is in the parent run {parent_run_id}"
        )
    return result


class SweepInterrupted(VisionAutoMLError):
    """The sweep stopped before every trial ran (Ctrl+C); ``--resume`` continues it."""


def _available_models() -> list[str] | None:
    try:
        from visionautoml.models.zoo import ZOO
    except ImportError:
        return None
    return list(ZOO)


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


def _refs(prepared: _Prepared) -> dict[str, str]:
    return {"training": prepared.training_ref, "validation": prepared.validation_ref}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:60] or "sweep"


def _now() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")


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


def _trainable(
    job: JobConfig,
    trial_fn: TrialFunction,
    parent_run_id: str,
    deadline: float | None,
    resources: dict[str, float],
) -> Any:
    return tune.with_resources(
        tune.with_parameters(
            _tune_trial,
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


# --- after the trials ---------------------------------------------------------------------------------


def _collect(storage: str, reasons: dict[str, str], deadline: float | None) -> list[TrialRecord]:
    """Every trial of the experiment (this run's and, after ``--resume``, the earlier ones')."""
    analysis = tune.ExperimentAnalysis(storage)
    records = []
    for trial in sorted(analysis.trials, key=lambda item: item.trial_id):
        last = trial.last_result or {}
        params = dict((trial.config or {}).get("params", {}))
        if trial.status == "ERROR":
            state, reason = FAILED, scrub_credentials(_error_reason(trial))
        elif last.get(FINAL_KEY):
            state, reason = COMPLETED, ""
        elif trial.status == "TERMINATED" and last:
            state = EARLY_TERMINATED
            reason = reasons.get(trial.trial_id) or _stop_reason(last, deadline)
        else:
            state, reason = NOT_STARTED, "the sweep ended before this trial ran"
        records.append(
            TrialRecord(
                trial_id=trial.trial_id,
                number=_trial_number(trial.trial_id),
                state=state,
                params=params,
                evaluations=int(last.get(INTERVAL_KEY, 0) or 0),
                epoch=int(last.get("epoch", 0) or 0),
                best_metric=float(last[BEST_KEY]) if _finite(last.get(BEST_KEY)) else None,
                metrics=_trial_metrics(last),
                run_id=last.get("run_id"),
                model_uri=last.get("model_uri"),
                node_id=last.get("node_id"),
                seconds=round(float(last.get("time_total_s", 0.0) or 0.0), 1),
                reason=reason,
            )
        )
    return records


def _trial_number(trial_id: str) -> int:
    suffix = trial_id.rsplit("_", 1)[-1]
    return int(suffix) + 1 if suffix.isdigit() else 0


def _trial_metrics(result: dict[str, Any]) -> dict[str, float]:
    skip = {INTERVAL_KEY, FINAL_KEY, BEST_KEY, "epoch", "training_iteration", "timestamp", "pid"}
    return {
        key: value
        for key, value in _numbers(result).items()
        if key not in skip and not key.startswith(("time_", "iterations_", "done"))
    }


def _stop_reason(last: dict[str, Any], deadline: float | None) -> str:
    if deadline is not None and last.get("timestamp", 0) >= deadline:
        return "stopped at the sweep's timeout_minutes"
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
        if record.state == COMPLETED and record.model_uri and _finite(record.metrics.get(PRIMARY_METRIC))
    ]
    return max(finished, key=lambda record: record.metrics[PRIMARY_METRIC], default=None)


def _ranked(records: list[TrialRecord]) -> list[TrialRecord]:
    def key(record: TrialRecord) -> tuple:
        value = record.metrics.get(PRIMARY_METRIC) if record.state == COMPLETED else record.best_metric
        return (record.state != COMPLETED, -(value if _finite(value) else -math.inf), record.number)

    return sorted(records, key=key)


def _score(record: TrialRecord) -> float | None:
    value = record.metrics.get(PRIMARY_METRIC) if record.state == COMPLETED else record.best_metric
    return value if _finite(value) else None


def _leaderboard_rows(records: list[TrialRecord], searched: list[str]) -> list[dict[str, Any]]:
    rows = []
    for rank, record in enumerate(_ranked(records), start=1):
        score = _score(record)
        rows.append(
            {
                "rank": rank,
                "trial": record.number,
                "state": record.state,
                **{name: _format_value(record.params.get(name)) for name in searched},
                "epochs": record.epoch,
                PRIMARY_METRIC: f"{score:.4f}" if score is not None else "",
                "seconds": record.seconds,
                "run_id": record.run_id or "",
                "reason": record.reason,
            }
        )
    return rows


def _leaderboard(records: list[TrialRecord], searched: list[str]) -> str:
    """The leaderboard as Markdown (the parent run's ``leaderboard.md``)."""
    rows = _leaderboard_rows(records, searched)
    if not rows:
        return "No trials ran.\n"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row[column]).replace("|", "/") for column in columns) + " |")
    return "\n".join(lines) + "\n"


def _leaderboard_csv(records: list[TrialRecord], searched: list[str]) -> str:
    rows = _leaderboard_rows(records, searched)
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def _leaderboard_table(records: list[TrialRecord], searched: list[str]) -> Table:
    """The console's leaderboard: the CSV's columns without run ids, long names kept on one line."""
    table = Table(title="Leaderboard", title_justify="left")
    rows = _leaderboard_rows(records, searched)
    columns = [column for column in (rows[0] if rows else ["rank"]) if column != "run_id"]
    for column in columns:
        header = _abbrev() if column == PRIMARY_METRIC else column
        wrap = column == "reason"
        table.add_column(header, no_wrap=not wrap, overflow="fold" if wrap else "ellipsis")
    for row in rows:
        table.add_row(*(_styled_state(str(row[c])) if c == "state" else str(row[c]) for c in columns))
    return table


# --- MLflow --------------------------------------------------------------------------------------------


def _client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient()


def _public_config(job: JobConfig) -> dict[str, Any]:
    """The config as logged: credentials left out, a URI's ``user:password@`` redacted."""
    config = job.model_dump(mode="json", exclude={"tracking": {"username", "password", "token"}})
    if config["tracking"].get("uri"):
        config["tracking"]["uri"] = server_name(config["tracking"]["uri"])
    return config


def _start_parent_run(
    job: JobConfig,
    experiment_id: str,
    fingerprint: str,
    prepared: _Prepared,
    plan: space.SearchPlan,
    automatic: bool,
) -> str:
    import yaml

    client = _client()
    tags = {
        "visionautoml.kind": "sweep",
        "config_hash": fingerprint,
        "git_commit": git_commit(),
        registry.TRAINING_DATASET_TAG: prepared.training_ref,
        registry.VALIDATION_DATASET_TAG: prepared.validation_ref,
        "tracking_uri": server_name(resolve_tracking_uri(job)),
    }
    run = client.create_run(experiment_id, run_name=f"sweep-{_now()}", tags=tags)
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


def _reopen_run(run_id: str) -> None:
    _client().update_run(run_id, status="RUNNING")


def _end_run(run_id: str, status: str) -> None:
    _client().set_terminated(run_id, status=status)


def _settle_child_runs(experiment_id: str, parent_run_id: str, records: list[TrialRecord]) -> None:
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


def _log_leaderboard(
    parent_run_id: str, records: list[TrialRecord], searched: list[str], markdown: str
) -> None:
    client = _client()
    with tempfile.TemporaryDirectory(prefix="visionautoml-leaderboard-") as folder:
        for name, text in (
            ("leaderboard.md", markdown),
            ("leaderboard.csv", _leaderboard_csv(records, searched)),
        ):
            (Path(folder) / name).write_text(text, encoding="utf-8")
            client.log_artifact(parent_run_id, str(Path(folder) / name))
    counts: dict[str, int] = {}
    for record in records:
        counts[record.state] = counts.get(record.state, 0) + 1
    for state, count in counts.items():
        client.log_metric(parent_run_id, f"trials_{state}", count)


def _tag_parent(parent_run_id: str, best: TrialRecord | None, registered: RegisteredModel | None) -> None:
    client = _client()
    if best is not None:
        client.set_tag(parent_run_id, "best_trial", best.trial_id)
        client.set_tag(parent_run_id, "best_trial_run_id", best.run_id or "")
        for key, value in best.metrics.items():
            client.log_metric(parent_run_id, f"best_{key}", value)
    if registered is not None:
        client.set_tag(parent_run_id, "registered_model", f"{registered.name}/{registered.version}")


def _register(
    job: JobConfig,
    model_name: str,
    best: TrialRecord,
    prepared: _Prepared,
    fingerprint: str,
    parent_run_id: str,
) -> RegisteredModel:
    tags = {
        **{f"{registry.METRIC_TAG_PREFIX}{key}": f"{value:.6g}" for key, value in best.metrics.items()},
        "primary_metric": PRIMARY_METRIC,
        registry.TRAINING_DATASET_TAG: prepared.training_ref,
        f"{registry.TRAINING_DATASET_TAG}.digest": prepared.training_digest,
        registry.VALIDATION_DATASET_TAG: prepared.validation_ref,
        f"{registry.VALIDATION_DATASET_TAG}.digest": prepared.validation_digest,
        "config_hash": fingerprint,
        "git_commit": git_commit(),
        "sweep_parent_run_id": parent_run_id,
        "model_name": str(best.params.get("model_name", job.training_parameters.model_name)),
    }
    version = registry.register_model(
        best.model_uri, model_name, tags=tags, aliases=(registry.CANDIDATE_ALIAS,)
    )
    return RegisteredModel(version.name, version.version, version.aliases)


def git_commit(directory: str | Path | None = None) -> str:
    """The commit the code and config come from, or ``unknown`` outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=directory or os.getcwd(),
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
