"""The tracking store as the rest of the package sees it: runs as plain records, artifacts as files.

MLflow is imported in ``tracking/`` only, so the sweep, the report, the pipeline and the
exporter talk to a :class:`Store` and get :class:`RunView` records back. That keeps
MLflow's entity types, its exceptions and its global state out of the layers above, and
gives one place where a failed request becomes a :class:`TrackingError` without
credentials in its text.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visionautoml.errors import TrackingError, first_line
from visionautoml.redact import scrub, strip_userinfo
from visionautoml.tracking.schema import MAX_TAG_LENGTH, RunStatus, Tag


@dataclass(frozen=True)
class RunView:
    """One run as read from the store; ``start_time``/``end_time`` in epoch milliseconds."""

    run_id: str
    name: str
    experiment_id: str
    status: str
    start_time: int | None
    end_time: int | None
    lifecycle_stage: str
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def parent_run_id(self) -> str | None:
        return self.tags.get(Tag.MLFLOW_PARENT_RUN_ID)


def _view(run: Any) -> RunView:
    return RunView(
        run_id=run.info.run_id,
        name=run.info.run_name or "",
        experiment_id=run.info.experiment_id,
        status=run.info.status,
        start_time=run.info.start_time,
        end_time=run.info.end_time,
        lifecycle_stage=run.info.lifecycle_stage,
        tags=dict(run.data.tags),
        params=dict(run.data.params),
        metrics=dict(run.data.metrics),
    )


class Store:
    """One tracking store, by URI (default: the store this process is connected to)."""

    def __init__(self, uri: str | None = None) -> None:
        from mlflow import MlflowClient

        from visionautoml.tracking.workspace import current_tracking_uri

        self.uri = uri or current_tracking_uri()
        self._client = MlflowClient(self.uri)

    @property
    def name(self) -> str:
        """The URI as shown to people (no user info)."""
        return strip_userinfo(self.uri)

    @contextmanager
    def _requests(self, what: str) -> Iterator[None]:
        from mlflow.exceptions import MlflowException

        try:
            yield
        except MlflowException as error:
            raise TrackingError(f"tracking store {self.name}: {what}: {scrub(first_line(error))}") from None

    # --- reading ---------------------------------------------------------------------------

    def find_run(self, run_id: str) -> RunView | None:
        """The run, or None when the store has no run with that id."""
        from mlflow.exceptions import MlflowException

        try:
            return _view(self._client.get_run(run_id))
        except MlflowException as error:
            if getattr(error, "error_code", "") == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(error):
                return None
            raise TrackingError(
                f"tracking store {self.name}: cannot read run {run_id}: {scrub(first_line(error))}"
            ) from None

    def child_runs(self, experiment_id: str, parent_run_id: str) -> list[RunView]:
        """Every run nested under ``parent_run_id`` (a sweep's trials), oldest first."""
        return self.search(
            [experiment_id], f"tags.`{Tag.MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'", oldest_first=True
        )

    def search(
        self, experiment_ids: list[str], filter_string: str, *, oldest_first: bool = False, limit: int = 5000
    ) -> list[RunView]:
        order = "ASC" if oldest_first else "DESC"
        with self._requests("cannot search runs"):
            runs = self._client.search_runs(
                experiment_ids,
                filter_string=filter_string,
                order_by=[f"attributes.start_time {order}"],
                max_results=limit,
            )
        return [_view(run) for run in runs]

    def experiment_id(self, name: str) -> str | None:
        with self._requests(f"cannot read experiment '{name}'"):
            experiment = self._client.get_experiment_by_name(name)
        return experiment.experiment_id if experiment is not None else None

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` of every logged value, by step; the last value logged at a step wins."""
        with self._requests(f"cannot read metric '{key}' of run {run_id}"):
            history = self._client.get_metric_history(run_id, key)
        points = sorted((metric.step, metric.timestamp, metric.value) for metric in history)
        return sorted({step: value for step, _, value in points}.items())

    def artifact_paths(self, run_id: str, folder: str = "") -> list[str]:
        with self._requests(f"cannot list the artifacts of run {run_id}"):
            return [item.path for item in self._client.list_artifacts(run_id, folder or None)]

    def read_artifact(self, run_id: str, path: str) -> bytes | None:
        """One artifact file's bytes, or None when the run has no such file."""
        parent = path.rpartition("/")[0]
        if path not in self.artifact_paths(run_id, parent):
            return None
        with tempfile.TemporaryDirectory(prefix="visionautoml-artifact-") as folder:
            with self._requests(f"cannot download {path} of run {run_id}"):
                local = self._client.download_artifacts(run_id, path, folder)
            return Path(local).read_bytes()

    def read_text(self, run_id: str, path: str) -> str | None:
        data = self.read_artifact(run_id, path)
        return data.decode("utf-8") if data is not None else None

    def download_folder(self, run_id: str, path: str, destination: Path) -> Path | None:
        """Download an artifact folder below ``destination``; None when the run has none there."""
        if not self.artifact_paths(run_id, path):
            return None
        with self._requests(f"cannot download {path} of run {run_id}"):
            return Path(self._client.download_artifacts(run_id, path, str(destination)))

    # --- writing ---------------------------------------------------------------------------

    def create_run(self, experiment_id: str, name: str, tags: dict[str, str] | None = None) -> str:
        with self._requests(f"cannot create run '{name}'"):
            return self._client.create_run(experiment_id, run_name=name, tags=tags or {}).info.run_id

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        with self._requests(f"cannot tag run {run_id}"):
            for key, value in tags.items():
                self._client.set_tag(run_id, key, str(value)[:MAX_TAG_LENGTH])

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        with self._requests(f"cannot log parameters of run {run_id}"):
            for key, value in params.items():
                self._client.log_param(run_id, key, value)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        with self._requests(f"cannot log metrics of run {run_id}"):
            for key, value in metrics.items():
                self._client.log_metric(run_id, key, value, step=step)

    def log_files(self, run_id: str, files: dict[str, str | bytes], folder: str = "") -> None:
        """Write each ``name: content`` as an artifact file of the run (in ``folder``)."""
        with tempfile.TemporaryDirectory(prefix="visionautoml-upload-") as scratch:
            for name, content in files.items():
                path = Path(scratch) / name
                if isinstance(content, bytes):
                    path.write_bytes(content)
                else:
                    path.write_text(content, encoding="utf-8")
            with self._requests(f"cannot upload artifacts of run {run_id}"):
                for name in files:
                    self._client.log_artifact(run_id, str(Path(scratch) / name), folder or None)

    def log_json(self, run_id: str, data: Any, path: str) -> None:
        folder, _, name = path.rpartition("/")
        self.log_files(run_id, {name: json.dumps(data, indent=2)}, folder)

    def log_folder(self, run_id: str, local: Path, path: str) -> None:
        with self._requests(f"cannot upload {local} to run {run_id}"):
            self._client.log_artifacts(run_id, str(local), path)

    def end_run(self, run_id: str, status: str = RunStatus.FINISHED) -> None:
        with self._requests(f"cannot end run {run_id}"):
            self._client.set_terminated(run_id, status=str(status))

    def reopen_run(self, run_id: str) -> None:
        with self._requests(f"cannot reopen run {run_id}"):
            self._client.update_run(run_id, status=str(RunStatus.RUNNING))
