"""The MLflow run one trial logs to: opened (or resumed), written to, ended with its outcome.

A trial's run is MLflow's active run while it trains, because logging a model as a pyfunc
goes through the active run; :class:`TrialRun` keeps that detail here and gives the trial
a handle with the few calls it makes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from visionautoml.errors import first_line
from visionautoml.redact import scrub
from visionautoml.tracking.auth import scrubbed_tracking_errors
from visionautoml.tracking.schema import MAX_TAG_LENGTH, RunStatus, Tag
from visionautoml.tracking.workspace import current_tracking_uri

log = logging.getLogger(__name__)


class TrialRun:
    """The active MLflow run of a trial; ``tags`` are the ones it had when it was opened."""

    def __init__(self, run_id: str, tags: dict[str, str]) -> None:
        self.run_id = run_id
        self.tags = tags

    @classmethod
    def open(cls, *, resume_run_id: str | None, run_name: str | None, parent_run_id: str | None) -> TrialRun:
        """Start the trial's run (nested under ``parent_run_id``), or continue ``resume_run_id``."""
        import mlflow

        with scrubbed_tracking_errors(current_tracking_uri()):  # no run to record a failure in yet
            run = mlflow.start_run(
                run_id=resume_run_id,
                run_name=None if resume_run_id else run_name,
                parent_run_id=None if resume_run_id else parent_run_id,
                nested=mlflow.active_run() is not None,
            )
        return cls(run.info.run_id, dict(run.data.tags))

    def set_tags(self, tags: dict[str, Any]) -> None:
        import mlflow

        mlflow.set_tags({key: str(value)[:MAX_TAG_LENGTH] for key, value in tags.items()})

    def delete_tag(self, key: str) -> None:
        import mlflow

        if key in self.tags:
            mlflow.delete_tag(key)

    def log_params(self, params: dict[str, Any]) -> None:
        import mlflow

        mlflow.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import mlflow

        mlflow.log_metrics(metrics, step=step)

    def log_json(self, data: Any, path: str) -> None:
        import mlflow

        mlflow.log_dict(data, path)

    def log_folder(self, local: Path, path: str) -> None:
        import mlflow

        mlflow.log_artifacts(str(local), artifact_path=path)

    def log_model(self, saved_model: Path) -> str:
        """Log a saved-model folder as the run's pyfunc model; returns ``runs:/RUN_ID/model``."""
        from visionautoml.tracking.models import log_saved_model

        return log_saved_model(saved_model)

    def end(self, status: str) -> None:
        import mlflow

        mlflow.end_run(str(status))

    def record_failure(self, reason: str) -> None:
        """Tag the (ended) run with why it failed; a failure to do so is logged, never raised."""
        from mlflow import MlflowClient

        try:
            MlflowClient(current_tracking_uri()).set_tag(
                self.run_id, Tag.FAILURE_REASON, scrub(reason)[:MAX_TAG_LENGTH]
            )
        except Exception as error:
            log.warning("could not record the failure reason on run %s: %s", self.run_id, first_line(error))


def is_active_run(run_id: str) -> bool:
    """Whether ``run_id`` exists in the current store and is not deleted (a trial may resume it)."""
    from visionautoml.tracking.store import Store

    try:
        run = Store().find_run(run_id)
    except Exception:
        return False
    return run is not None and run.lifecycle_stage == "active"


__all__ = ["RunStatus", "TrialRun", "is_active_run"]
