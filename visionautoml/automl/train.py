"""``visionautoml train``'s engine: settle a job once, then run one trial or a sweep, register, report.

The command line, the pipeline and tests all come through :func:`train`, so the same config
trains, registers and reports the same way whoever starts it. :func:`settle` does what must
happen once per job before any work: model names checked against the zoo (an unknown or
AGPL-only model fails in seconds, before a run exists), credentials put into MLflow's
environment and checked against the server, the workspace made absolute.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from visionautoml.automl.leaderboard import TrialRecord
from visionautoml.automl.outcome import TrainOutcome, register_and_promote
from visionautoml.automl.trial_runner import TrialFunction
from visionautoml.config import JobConfig
from visionautoml.errors import TrainingError
from visionautoml.files import atomic_write_text
from visionautoml.tracking.auth import login
from visionautoml.tracking.schema import RunStatus, Tag, TrialState
from visionautoml.tracking.workspace import resolve_tracking_uri, workspace_dir


@dataclass(frozen=True)
class SettledJob:
    """A job ready to run: ``job`` holds no password or token and an absolute workspace."""

    job: JobConfig
    fingerprint: str
    """The hash of the config as the user wrote it: it names the sweep's state and tags the runs."""
    login: str
    """Who the tracking server accepted, for the first line of output."""


def settle(job: JobConfig) -> SettledJob:
    """Check what fails fast, then put the credentials where MLflow reads them (see the module docstring).

    An incremental start (``checkpoint_run_id`` / ``checkpoint_path``) is resolved and fetched
    here too: a reference that holds no model fails before any run exists.
    """
    from visionautoml.models.zoo import check_model_names
    from visionautoml.training.start import resolve_start

    check_model_names(job)
    fingerprint = job.fingerprint()
    job, who = login(job)
    job = job.model_copy(update={"workspace": str(workspace_dir(job))})
    resolve_start(job.training_parameters, tracking_uri=resolve_tracking_uri(job), download=True)
    return SettledJob(job, fingerprint, who)


def train(
    settled: SettledJob,
    *,
    resume: bool = False,
    output_json: str | Path | None = None,
    trial_fn: TrialFunction | None = None,
    console: Console | None = None,
) -> TrainOutcome:
    """One trial, or a sweep when the config searches; the outcome is written to ``output_json``.

    Raises :class:`TrainingError` when no model came out (after writing ``output_json``, so a
    CI step can still read why).
    """
    console = console or Console(stderr=True)
    job = settled.job
    report_path = Path(output_json).with_name("report.html") if output_json else None
    if job.is_sweep:
        from visionautoml.automl.sweep import run_sweep

        outcome = run_sweep(
            job,
            fingerprint=settled.fingerprint,
            resume=resume,
            report_path=report_path,
            trial_fn=trial_fn,
            console=console,
        )
    else:
        outcome = _single_trial(settled, trial_fn, console)
    if output_json:
        atomic_write_text(output_json, json.dumps(outcome.to_dict(), indent=2, allow_nan=False) + "\n")
    if outcome.failure_reason:
        raise TrainingError(outcome.failure_reason)
    return outcome


def _single_trial(settled: SettledJob, trial_fn: TrialFunction | None, console: Console) -> TrainOutcome:
    """Train ``training_parameters`` once; register when ``register:`` names a model or a promotion."""
    from visionautoml.training.trial import flat_metrics, run_trial

    job = settled.job
    result = (trial_fn or run_trial)(job)
    finished = result.status == RunStatus.FINISHED and bool(result.model_uri)
    record = TrialRecord(
        trial_id="trial",
        number=1,
        state=TrialState.COMPLETED if finished else TrialState.FAILED,
        params={},
        epoch=result.best_epoch,
        metrics=flat_metrics(result.metrics),
        run_id=result.run_id,
        model_uri=result.model_uri,
        reason=result.failure_reason or result.stop_reason or "",
    )
    outcome = TrainOutcome(kind="trial", trials=[record], best=record if finished else None)
    if not finished:
        outcome.failure_reason = f"the trial failed (MLflow run {result.run_id}): {result.failure_reason}"
        return outcome
    if job.register.model_name or job.register.promote_if_better:
        dataset_tags = {key: value for key, value in result.tags.items() if key.startswith("dataset.")}
        register_and_promote(
            job,
            outcome,
            result.model_uri,
            result.metrics,
            dataset_tags,
            fingerprint=settled.fingerprint,
            model_name=job.training_parameters.model_name,
            started_from=result.tags.get(Tag.STARTED_FROM),
            console=console,
        )
    return outcome
