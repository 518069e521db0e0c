"""An AutoML sweep: many trials on Ray Tune, tracked in MLflow, the best one registered.

``run_sweep`` does, in order: register the training and validation data once as dataset
versions (trials get their paths, never the data), create the parent MLflow run, run the
trials on Ray Tune (each one a trainer run in a child MLflow run, reporting every
evaluation to Tune's early-termination scheduler), then settle every child run's state
(Tune kills stopped trials, so their runs are closed here with the reason), write the
leaderboard to the parent run, register the best model with the alias ``candidate`` and
promote it if asked. The sweep's state lives in ``<workspace>/sweeps/`` and in the parent
run's tags (config hash, dataset versions, Tune's storage), so that an interrupted sweep
continues with ``--resume`` (Tune's ``Tuner.restore``), also from another machine when
Tune's storage is ``compute.storage_path`` on object storage: finished trials are kept,
trials that were running start again from their last checkpoint.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live

from visionautoml.automl import compute, runs, space, tuner
from visionautoml.automl.automatic import AutomaticPlan, automatic_plan
from visionautoml.automl.leaderboard import (
    Board,
    BoardCallback,
    TrialRecord,
    leaderboard_markdown,
    leaderboard_table,
)
from visionautoml.automl.outcome import TrainOutcome, register_and_promote
from visionautoml.automl.schedulers import stop_reasons
from visionautoml.automl.sweep_data import PreparedData, dataset_names, prepare_data, publish, slug
from visionautoml.automl.trial_runner import TrialFunction, finite
from visionautoml.config import JobConfig
from visionautoml.errors import ConfigError, TrainingError, VisionAutoMLError
from visionautoml.files import atomic_write_text
from visionautoml.redact import strip_userinfo
from visionautoml.tracking.schema import PRIMARY_METRIC, RunStatus, TrialState
from visionautoml.tracking.workspace import connect, resolve_tracking_uri

SWEEPS_DIR = "sweeps"


class SweepInterrupted(VisionAutoMLError):
    """The sweep stopped before every trial ran (Ctrl+C); ``--resume`` continues it."""


@dataclass
class _Trials:
    records: list[TrialRecord]
    searched: list[str]
    total: int
    interrupted: bool


def run_sweep(
    job: JobConfig,
    *,
    fingerprint: str,
    resume: bool = False,
    report_path: Path | None = None,
    trial_fn: TrialFunction | None = None,
    console: Console | None = None,
) -> TrainOutcome:
    """Run (or with ``resume`` continue) the settled job's sweep; raises unless a model was registered.

    ``job`` is settled (:func:`visionautoml.automl.train.settle`): credentials in the
    environment, workspace absolute. ``fingerprint`` is the hash of the config as the user
    wrote it, which names the sweep's state. ``trial_fn`` has
    :func:`visionautoml.training.trial.run_trial`'s signature and is that function unless
    given (tests pass a quick stand-in).
    """
    console = console or Console()
    if trial_fn is None:
        from visionautoml.training import trial

        trial_fn = trial.run_trial
    state_file = Path(job.workspace) / SWEEPS_DIR / f"{fingerprint}.json"
    experiment_id = connect(job)
    tracking_uri = resolve_tracking_uri(job)
    state = _load_state(state_file, resume, fingerprint, experiment_id, console)
    prepared = prepare_data(job, state, console, tracking_uri=tracking_uri)

    _start_importing("visionautoml.models.zoo")  # for _plan, while Ray starts
    with compute.ray_session(
        job.compute, on_status=lambda text: console.print(f"[dim]{text}[/dim]")
    ) as cluster:
        console.print(f"Ray: {cluster.describe()}")
        plan, automatic = _plan(job, prepared, cluster, console)
        if automatic is not None:
            limits = job.limits.model_copy(update={"max_concurrent_trials": automatic.concurrent})
            chosen = job.sweep.model_copy(update={"early_termination": automatic.early_termination})
            job = job.model_copy(update={"limits": limits, "sweep": chosen})
        storage = state.get("storage") or _new_storage(job, state_file, fingerprint)
        parent_run_id = state.get("parent_run_id") or runs.start_parent_run(
            job, experiment_id, fingerprint, prepared.tags(), plan, automatic is not None, storage=storage
        )
        if automatic is not None and not state.get("parent_run_id"):
            runs.log_automatic_plan(parent_run_id, automatic.reasons, automatic.fixed)
        if resume:
            runs.reopen_run(parent_run_id)
        _save_state(
            state_file, {**state, "parent_run_id": parent_run_id, "storage": storage, **prepared.state()}
        )
        prepared = publish(prepared, parent_run_id, tracking_uri=tracking_uri)
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
        runs.end_run(parent_run_id, RunStatus.KILLED)
        ran = sum(record.state != TrialState.NOT_STARTED for record in records)
        raise SweepInterrupted(
            f"the sweep stopped after {ran} of {trials.total} trials; "
            "run the same command with --resume to continue it"
        )

    best = _best(records)
    outcome = TrainOutcome(
        kind="sweep",
        experiment_id=experiment_id,
        parent_run_id=parent_run_id,
        trials=records,
        best=best,
        leaderboard_markdown=leaderboard,
    )
    if best is not None and best.model_uri:
        register_and_promote(
            job,
            outcome,
            best.model_uri,
            best.metrics,
            prepared.tags(),
            fingerprint=fingerprint,
            model_name=str(best.params.get("model_name", job.training_parameters.model_name)),
            console=console,
        )
    registered = outcome.registered_model
    runs.tag_parent(parent_run_id, best, f"{registered.name}/{registered.version}" if registered else None)
    runs.end_run(parent_run_id, RunStatus.FINISHED if registered else RunStatus.FAILED)
    _save_state(state_file, {**_load_json(state_file), "finished": True})
    from visionautoml.reports.sweep import report_after_sweep  # matplotlib: only once trials are done

    outcome.report = report_after_sweep(
        parent_run_id, report_path or state_file.parent / f"{parent_run_id}.html"
    )
    if outcome.report:
        console.print(f"Report: {outcome.report} (also the parent run's report.html)", soft_wrap=True)
    if registered is None:
        reasons = "; ".join(f"trial {r.number}: {r.state} {r.reason}".strip() for r in records)
        outcome.failure_reason = (
            f"no trial produced a model, so nothing was registered ({reasons}). "
            f"The leaderboard is in the parent run {parent_run_id}"
        )
    return outcome


def _load_state(
    path: Path, resume: bool, fingerprint: str, experiment_id: str, console: Console
) -> dict[str, Any]:
    """The interrupted sweep to resume, or a fresh state; a clear error when there is nothing to resume.

    Without a state file here (another machine started the sweep, or a pod that is gone), the
    newest sweep of this config in the tracking store is the one resumed.
    """
    if not resume:
        return {}
    state = _load_json(path)
    if not state.get("storage"):
        state = runs.find_sweep(experiment_id, fingerprint)
        if state.get("storage") and not state.get("finished"):
            console.print(f"Resuming sweep {state['parent_run_id']}, found in the tracking store")
    if not state.get("storage"):
        raise ConfigError(
            f"--resume: no sweep of this config (hash {fingerprint}) was started in {path.parent.parent} "
            "or found in the tracking store; run without --resume to start one (a changed config is a "
            "new sweep)"
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


def _new_storage(job: JobConfig, state_file: Path, fingerprint: str) -> str:
    """Where Tune keeps this sweep: in ``compute.storage_path`` (a URL stays a string), else the workspace."""
    name = f"{slug(job.experiment_name)}-{fingerprint[:8]}-{runs.now()}"
    root = job.compute.storage_path
    if root and "://" in root:
        return f"{root.rstrip('/')}/{name}"
    return str((Path(root).expanduser().resolve() if root else state_file.parent) / name)


def _plan(
    job: JobConfig, prepared: PreparedData, cluster: compute.ClusterInfo, console: Console
) -> tuple[space.SearchPlan, AutomaticPlan | None]:
    """The search space (the job's, checked when the config loaded, or the automatic one) and its trials.

    The automatic plan's fixed settings (epochs sized to the time, the recipe) go into the
    trials' job, ``prepared.job``.
    """
    subspaces, automatic = list(job.search_space), None
    if not job.search_space:
        automatic = automatic_plan(
            prepared.profile,
            cpus=cluster.cpus,
            gpus=job.compute.gpus_per_trial or cluster.gpus,
            timeout_minutes=job.limits.timeout_minutes,
            max_trials=job.limits.max_trials,
            max_concurrent=(
                job.limits.max_concurrent_trials
                if "max_concurrent_trials" in job.limits.model_fields_set
                else None
            ),
            available=_available_models() or [],
            choose_start="pretrained" not in job.training_parameters.model_fields_set,
            early_termination=job.sweep.early_termination,
        )
        subspaces = automatic.subspaces
        fixed = prepared.job.training_parameters.model_copy(update=automatic.fixed)
        prepared.job = prepared.job.model_copy(update={"training_parameters": fixed})
        console.print(
            "No search_space given: the automatic mode chose the space from the data and the machine:"
        )
        for reason in automatic.reasons:
            console.print(f"  - {reason}", soft_wrap=True, highlight=False)
    plan = space.plan_search(
        subspaces,
        job.sweep.sampling_algorithm,
        automatic.trials if automatic else job.limits.max_trials,
        job.training_parameters.seed,
        each_subspace_in_turn=automatic is not None,
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
    prepared: PreparedData,
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
    trainable = tuner.trainable(
        _trial_job(prepared.job), trial_fn, parent_run_id, deadline, resources, prepared.specs()
    )
    total = len(plan.trials) or limits.max_trials
    board = Board(space.searched_names(plan.subspaces), total)
    tune_run, scheduler = tuner.build_tuner(job, plan, trainable, storage, resume, deadline)
    termination = job.sweep.early_termination
    console.print(
        f"Sweep: {total} trial(s), {plan.algorithm} sampling, {limits.max_concurrent_trials} at a time, "
        f"early termination: {termination.type if termination else 'none'}; parent run {parent_run_id}"
    )
    with Live(board.render(), console=console, refresh_per_second=2, transient=True) as live:
        BoardCallback.active = (board, live)
        try:
            with tuner.quiet_tune_logs():
                grid = tune_run.fit()
        finally:
            BoardCallback.active = None
    records = tuner.collect(
        tuner.final_trials(grid, storage),
        stop_reasons(scheduler),
        deadline,
        tuner.TrialTimeLimit(limits.trial_timeout_minutes).limit_s,
    )
    return _Trials(records, board.searched, total, _interrupted(records, total, deadline))


def _trial_job(job: JobConfig) -> JobConfig:
    """The job as trials get it: with the driver's tracking URI, so a node without one logs there too.

    A URI with a password in it is left out (it would travel in the job): such a node needs
    ``MLFLOW_TRACKING_URI`` of its own, as it needs its login.
    """
    uri = resolve_tracking_uri(job)
    if job.tracking.uri == uri or strip_userinfo(uri) != uri:
        return job
    return job.model_copy(update={"tracking": job.tracking.model_copy(update={"uri": uri})})


def _interrupted(records: list[TrialRecord], total: int, deadline: float | None) -> bool:
    """Fewer trials ran than planned, and not because the sweep's time was up."""
    ran = sum(1 for record in records if record.state != TrialState.NOT_STARTED)
    out_of_time = deadline is not None and time.time() >= deadline
    return ran < total and not out_of_time


def _best(records: list[TrialRecord]) -> TrialRecord | None:
    finished = [
        record
        for record in records
        if record.state == TrialState.COMPLETED
        and record.model_uri
        and finite(record.metrics.get(PRIMARY_METRIC))
    ]
    return max(finished, key=lambda record: record.metrics[PRIMARY_METRIC], default=None)


__all__ = ["SweepInterrupted", "TrainingError", "dataset_names", "run_sweep"]
