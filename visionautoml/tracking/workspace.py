"""Where runs are tracked: the workspace's embedded MLflow store unless the user points elsewhere.

The default needs no server: a SQLite database and a local artifact folder inside the
workspace, so a laptop run is tracked with nothing to set up. ``MLFLOW_TRACKING_URI``
wins over the config, as every MLflow user expects, so the same config can log to a team
server in CI without being edited.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from visionautoml.config import JobConfig
from visionautoml.errors import TrackingError, first_line
from visionautoml.redact import scrub, strip_userinfo

ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"

# Chatty loggers of the embedded store: schema migrations on first use, one line per table.
_QUIET_LOGGERS = ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent", "mlflow.models.model")

_connected_uri: str | None = None


def workspace_dir(job: JobConfig) -> Path:
    return Path(job.workspace).expanduser().resolve()


def resolve_tracking_uri(job: JobConfig) -> str:
    """``MLFLOW_TRACKING_URI`` > ``job.tracking.uri`` > ``sqlite:///<workspace>/mlflow.db``."""
    uri = os.environ.get(ENV_TRACKING_URI) or job.tracking.uri
    if uri:
        return uri
    return f"sqlite:///{workspace_dir(job) / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` store (the embedded default), else None."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def connect(job: JobConfig, experiment_name: str | None = None) -> str:
    """Point MLflow at the job's store, create or reuse the experiment, and return its id.

    Credentials are not this function's business: :func:`~visionautoml.tracking.auth.login` put
    them into MLflow's environment once, when the job was settled.

    Experiments created here in a SQLite store keep their artifacts in ``artifacts/`` next to
    the database (``<workspace>/artifacts`` by default), so one folder holds the whole history;
    elsewhere the store's or server's own artifact root applies.
    """
    global _connected_uri
    import mlflow
    from mlflow.exceptions import MlflowException

    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    uri = resolve_tracking_uri(job)
    database = sqlite_path(uri)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    _connected_uri = uri

    name = experiment_name or job.experiment_name
    try:
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            artifacts = (database.parent / "artifacts").resolve().as_uri() if database else None
            try:
                experiment_id = mlflow.create_experiment(name, artifact_location=artifacts)
            except MlflowException:
                # Another trial of the same sweep may have created it a moment ago.
                experiment = mlflow.get_experiment_by_name(name)
                if experiment is None:
                    raise
                experiment_id = experiment.experiment_id
        elif experiment.lifecycle_stage == "deleted":
            raise TrackingError(
                f"experiment '{name}' at {strip_userinfo(uri)} is deleted: restore it "
                f"(`mlflow experiments restore --experiment-id {experiment.experiment_id}`) "
                "or set another experiment_name"
            )
        else:
            experiment_id = experiment.experiment_id
        mlflow.set_experiment(experiment_id=experiment_id)
    except MlflowException as error:
        raise TrackingError(
            f"cannot use the MLflow tracking store {strip_userinfo(uri)} (experiment '{name}'): "
            f"{scrub(first_line(error))}. Check the URI (config tracking.uri or "
            "MLFLOW_TRACKING_URI) and the server's credentials"
        ) from None
    return experiment_id


def current_tracking_uri() -> str:
    """The store :func:`connect` chose in this process, else the default job's (env or workspace)."""
    return _connected_uri or resolve_tracking_uri(JobConfig())


@contextmanager
def use_tracking_uri(uri: str) -> Iterator[None]:
    """Make ``uri`` MLflow's current store, then restore exactly what was there before.

    ``models:/`` URIs are looked up in the process-wide registry whatever ``tracking_uri`` says.
    ``mlflow.set_tracking_uri`` also exports MLFLOW_TRACKING_URI (and unsets it on None), so both
    the module global and the variable are put back by hand.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils

    saved_global, saved_variable = utils._tracking_uri, os.environ.get(ENV_TRACKING_URI)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        utils._tracking_uri = saved_global
        if saved_variable is None:
            os.environ.pop(ENV_TRACKING_URI, None)
        else:
            os.environ[ENV_TRACKING_URI] = saved_variable
