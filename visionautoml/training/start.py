"""Incremental training: a trial that starts from an earlier model instead of from ``pretrained``.

As in the cloud service, ``checkpoint_run_id`` names a run: a trial's run gives its model, a
sweep's parent run its best trial's model. ``checkpoint_path`` names a model anywhere else: a
registered ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``, a ``runs:/`` URI, a saved-model
folder or a weights file. Tensors are matched by name and shape, so a model trained on other
classes keeps everything but its class-dependent head, which starts fresh (with a warning
naming it). :func:`resolve_start` runs when the job is settled, so a reference that does not
resolve fails before any run exists; the trial records where it started as a tag.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from visionautoml.config import TrainingParameters
from visionautoml.errors import ConfigError, TrackingError
from visionautoml.models.weights import LoadReport, load_weights
from visionautoml.tracking.models import resolve_model
from visionautoml.tracking.schema import SWEEP_KIND, Tag
from visionautoml.tracking.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StartPoint:
    """Where a trial's weights come from: a tracked model URI or a local file or folder."""

    reference: str
    """What the config said, and what it resolved to, for the ``started_from`` tag."""
    model_uri: str | None = None
    path: Path | None = None


def resolve_start(
    params: TrainingParameters, *, tracking_uri: str | None = None, download: bool = False
) -> StartPoint | None:
    """The start point the parameters name, or None; :class:`ConfigError` when it does not resolve.

    Runs are looked up in ``tracking_uri`` (default: the store this process is connected to).
    With ``download`` the model is fetched once, which proves the reference holds a model.
    """
    if params.checkpoint_run_id and params.checkpoint_path:
        raise ConfigError(
            "training_parameters: set checkpoint_run_id or checkpoint_path, not both (one start point)"
        )
    if params.checkpoint_run_id:
        start = _from_run(params.checkpoint_run_id, tracking_uri)
    elif params.checkpoint_path:
        start = _from_path(params.checkpoint_path)
    else:
        return None
    if download and start.model_uri:
        field = "checkpoint_run_id" if params.checkpoint_run_id else "checkpoint_path"
        _download(start, f"training_parameters.{field}", tracking_uri)
    return start


def load_start(model: nn.Module, start: StartPoint) -> LoadReport:
    """Load the start point's tensors into ``model``; a head shaped for other classes is re-initialised."""
    path = start.path or _download(start, "the start point")
    report = load_weights(model, path)
    if report.reshaped:
        log.warning(
            "started from %s: %d tensors are shaped for other classes and were re-initialised (%s); the rest "
            "of the model continues from there",
            start.reference,
            len(report.reshaped),
            ", ".join(report.reshaped),
        )
    return report


def _from_run(run_id: str, tracking_uri: str | None) -> StartPoint:
    where = "training_parameters.checkpoint_run_id"
    try:
        run = Store(tracking_uri).find_run(run_id)
    except TrackingError as error:
        raise ConfigError(f"{where}: cannot look up run '{run_id}': {error}") from None
    if run is None:
        raise ConfigError(
            f"{where}: no run '{run_id}' in the tracking store; give the id of a trial's run or of a sweep's "
            "parent run (`mlflow ui`, or run_id / parent_run_id in a --output-json)"
        )
    if run.tags.get(Tag.KIND) == SWEEP_KIND:
        best = run.tags.get(Tag.BEST_TRIAL_RUN_ID)
        if not best:
            raise ConfigError(
                f"{where}: sweep {run_id} has no best trial (none completed); give a trial's run"
            )
        return StartPoint(f"run {best} (best trial of sweep {run_id})", model_uri=f"runs:/{best}/model")
    return StartPoint(f"run {run_id}", model_uri=f"runs:/{run_id}/model")


def _from_path(text: str) -> StartPoint:
    if text.startswith(("runs:/", "models:/")):
        return StartPoint(text, model_uri=text)
    path = Path(text).expanduser()
    if not path.exists():
        raise ConfigError(
            f"training_parameters.checkpoint_path: '{text}' is no file or folder; give a saved-model folder, "
            "a weights file, models:/NAME@ALIAS or runs:/RUN_ID/model"
        )
    return StartPoint(str(path.resolve()), path=path.resolve())


def _download(start: StartPoint, where: str, tracking_uri: str | None = None) -> Path:
    assert start.model_uri is not None
    try:
        return resolve_model(start.model_uri, tracking_uri=tracking_uri)
    except TrackingError as error:
        raise ConfigError(f"{where}: {start.reference} has no model to start from ({error})") from None
