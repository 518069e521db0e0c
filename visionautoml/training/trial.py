"""One trial end to end: data, model, training, MLflow run, logged model, result.

This is the unit a sweep repeats: :func:`run_trial` never lets a trial's failure escape
as an exception (only Ctrl-C, and a tracking store that cannot even open the run, do). A
diverged loss, bad data or a bug is recorded in the MLflow run (status FAILED, a
``failure_reason`` tag) and returned in the :class:`TrialResult`, so the sweep goes on and
the reason is on record; the CLI turns a failed single trial into exit code 1.

An interrupted trial resumes: checkpoints live in ``<workspace>/checkpoints/<key>``, the
key hashing the config, the hyperparameters and the data paths, and running the same
trial again continues its MLflow run from the last checkpoint. The folder is removed
once the model is logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch.utils.data import DataLoader

from visionautoml.config import JobConfig, TrainingParameters
from visionautoml.data.annotations import Dataset
from visionautoml.data.formats import read_dataset
from visionautoml.data.formats.jsonl import TRAIN_FILE, VALIDATION_FILE
from visionautoml.data.split import split_fraction
from visionautoml.data.stats import compute_stats
from visionautoml.data.versions import (
    VERSION_FILE,
    DatasetStore,
    dataset_digest,
    default_store_root,
    image_sha256,
    parse_ref,
)
from visionautoml.errors import DataError, VisionAutoMLError
from visionautoml.files import atomic_write_text
from visionautoml.models.saved import ModelSpec, save_model
from visionautoml.models.zoo import build_model
from visionautoml.tracking.auth import scrub_credentials, scrubbed_tracking_errors
from visionautoml.tracking.models import log_saved_model
from visionautoml.tracking.workspace import connect, resolve_tracking_uri, workspace_dir
from visionautoml.training.dataset import make_data_loader
from visionautoml.training.evaluate import Evaluation, evaluate_predictions, predict_loader, write_evaluation
from visionautoml.training.trainer import (
    PRIMARY_METRIC,
    checkpoint_paths,
    default_device,
    fit,
    seed_everything,
)

log = logging.getLogger(__name__)

FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"
FAILURE_TAG = "failure_reason"
RUN_FILE = "run.json"
_MAX_TAG_LENGTH = 5000

Reporter = Callable[[int, dict[str, float]], "bool | None"]


@dataclass
class TrialResult:
    """What a sweep needs from a trial: where its run and model are, how good it was, or why it failed.

    ``metrics`` are the best evaluation's, with the keys of ``metrics.json`` (``map``, ``map_50``,
    ``mean_average_precision``, ``per_class`` ...); empty when the trial failed before one.
    """

    run_id: str | None
    model_uri: str | None
    metrics: dict[str, Any]
    status: str
    failure_reason: str | None = None
    best_epoch: int = 0
    stop_reason: str | None = None
    tags: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "model_uri": self.model_uri,
            "metrics": self.metrics,
            "status": self.status,
            "failure_reason": self.failure_reason,
            "best_epoch": self.best_epoch,
            "stop_reason": self.stop_reason,
        }


def write_result(result: TrialResult, path: str | Path) -> Path:
    """The ``--output-json`` file: a CI step reads the run, the model URI and the metrics from it."""
    return atomic_write_text(path, json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n")


def summary_line(result: TrialResult) -> str:
    shown = ", ".join(
        f"{key} {result.metrics[key]:.4f}" for key in ("map", "map_50", "map_voc") if key in result.metrics
    )
    return (
        f"run {result.run_id}: {PRIMARY_METRIC} {result.metrics.get(PRIMARY_METRIC, 0.0):.4f} ({shown}) "
        f"at epoch {result.best_epoch}, stopped: {result.stop_reason}; model {result.model_uri}"
    )


@dataclass
class _Scores:
    """The latest and the best validation run, kept whole for the evaluation files and plots."""

    latest: Evaluation | None = None
    best: Evaluation | None = None


DATASETS_ARTIFACT = "data/datasets.json"


@dataclass
class TrialData:
    """The two datasets of a trial and how to name them in tags (store version or content digest)."""

    training: Dataset
    validation: Dataset
    tags: dict[str, str]


def run_trial(
    job: JobConfig,
    *,
    params: TrainingParameters | None = None,
    reporter: Reporter | None = None,
    parent_run_id: str | None = None,
    run_name: str | None = None,
) -> TrialResult:
    """Train one model with ``params`` (default ``job.training_parameters``) and log it to MLflow.

    ``reporter(epoch, metrics)`` gets every evaluation's flat float metrics (what Ray Tune
    reports); returning True stops the trial after that evaluation, keeping its best model.
    ``parent_run_id`` nests the run under a sweep's run.
    """
    import mlflow

    params = params or job.training_parameters
    console = Console(stderr=True)
    checkpoint_dir = workspace_dir(job) / "checkpoints" / _trial_key(job, params)
    connect(job)
    resumed_run_id = _resumable_run(checkpoint_dir)
    with scrubbed_tracking_errors(resolve_tracking_uri(job)):  # no run to record a failure in yet
        run = mlflow.start_run(
            run_id=resumed_run_id,
            run_name=None if resumed_run_id else run_name,
            parent_run_id=None if resumed_run_id else parent_run_id,
            nested=mlflow.active_run() is not None,
        )
    run_id = run.info.run_id
    if FAILURE_TAG in run.data.tags:  # the reason the resumed attempt stopped no longer holds
        mlflow.delete_tag(FAILURE_TAG)
    status = FAILED
    try:
        result = _train_and_log(job, params, run_id, checkpoint_dir, reporter, console)
        status = FINISHED
        return result
    except KeyboardInterrupt:
        status = KILLED
        mlflow.set_tag(
            FAILURE_TAG, "interrupted; run the same trial again to resume from the last checkpoint"
        )
        raise
    except VisionAutoMLError as error:
        reason = scrub_credentials(str(error))
    except Exception as error:  # a bug must not end a sweep either; keep its traceback in the log
        log.exception("trial %s failed", run_id)
        reason = scrub_credentials(f"{type(error).__name__}: {error}")
    finally:
        mlflow.end_run(status)
    _record_failure(run_id, reason)
    return TrialResult(run_id, None, {}, FAILED, reason)


def _train_and_log(
    job: JobConfig,
    params: TrainingParameters,
    run_id: str,
    checkpoint_dir: Path,
    reporter: Reporter | None,
    console: Console,
) -> TrialResult:
    import mlflow

    started = time.monotonic()
    data = load_trial_data(job, params)
    _adopt_checkpoints(checkpoint_dir, run_id, data.tags)
    classes = list(data.training.classes)
    tags = {
        **data.tags,
        "model_name": params.model_name,
        "config_fingerprint": job.fingerprint(),
        "classes": json.dumps(classes),
    }
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    mlflow.set_tags(tags)
    mlflow.log_params(flat_params(params))
    mlflow.log_dict(dataset_counts(data), DATASETS_ARTIFACT)
    console.print(
        f"trial {run_id}: {params.model_name} on {len(data.training.images)} training / "
        f"{len(data.validation.images)} validation images, classes {', '.join(classes)}",
        soft_wrap=True,
    )

    seed_everything(params.seed)
    device = default_device()
    model = build_model(params.model_name, len(classes) + 1, params)
    train_loader, validation_loader = make_loaders(data, params)

    scores = _Scores()

    def evaluate(module: torch.nn.Module) -> dict[str, Any]:
        ground_truths, detections = predict_loader(module, validation_loader, device)
        scores.latest = evaluate_predictions(ground_truths, detections, classes, params)
        return scores.latest.metrics

    def on_evaluation(epoch: int, metrics: dict[str, Any]) -> bool:
        latest = scores.latest
        assert latest is not None
        mlflow.log_metrics(flat_metrics(latest.metrics), step=epoch)  # the losses went in on_epoch
        if scores.best is None or latest.metrics[PRIMARY_METRIC] > scores.best.metrics[PRIMARY_METRIC]:
            scores.best = latest
        return bool(reporter(epoch, flat_metrics(metrics))) if reporter else False

    outcome = fit(
        model,
        train_loader,
        evaluate,
        params,
        checkpoint_dir,
        on_epoch=lambda epoch, losses: mlflow.log_metrics(losses, step=epoch),
        on_evaluation=on_evaluation,
        device=device,
        console=console,
    )
    evaluation = scores.best
    if evaluation is None or evaluation.metrics[PRIMARY_METRIC] != outcome.best_metrics.get(PRIMARY_METRIC):
        evaluate(model)  # the best epoch was before a resume: score its weights again
        evaluation = scores.latest

    summary = {
        "best_epoch": str(outcome.best_epoch),
        "stop_reason": outcome.stop_reason,
        "epochs_completed": str(outcome.epochs_completed),
    }
    mlflow.set_tags(summary)
    mlflow.log_metrics(
        {f"best_{key}": value for key, value in flat_metrics(evaluation.metrics).items()},
        step=outcome.best_epoch,
    )
    mlflow.log_metric("training_minutes", (time.monotonic() - started) / 60)
    with tempfile.TemporaryDirectory(prefix="visionautoml-trial-") as scratch:
        saved = save_model(model, ModelSpec.from_params(params, classes), Path(scratch) / "model")
        evaluation_dir = Path(scratch) / "evaluation"
        write_evaluation(evaluation_dir, evaluation)
        _write_plots(evaluation_dir, evaluation, data.validation)
        mlflow.log_artifacts(str(evaluation_dir), artifact_path="evaluation")
        model_uri = log_saved_model(saved)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return TrialResult(
        run_id=run_id,
        model_uri=model_uri,
        metrics=evaluation.metrics,
        status=FINISHED,
        best_epoch=outcome.best_epoch,
        stop_reason=outcome.stop_reason,
        tags={**tags, **summary},
    )


# --- data ---------------------------------------------------------------------------------------


def dataset_counts(data: TrialData) -> dict[str, dict[str, Any]]:
    """Images, boxes and boxes per class of both datasets: the report shows them from the run alone."""
    counts = {}
    for role, dataset in (("training", data.training), ("validation", data.validation)):
        stats = compute_stats(dataset)
        counts[role] = {
            "images": stats.image_count,
            "boxes": stats.box_count,
            "boxes_per_class": stats.boxes_per_class,
        }
    return counts


def load_trial_data(job: JobConfig, params: TrainingParameters) -> TrialData:
    """Read ``training_data`` and ``validation_data`` (any format, a converted folder, or a store ref).

    A folder written by ``data convert`` holds ``train_annotations.jsonl`` and
    ``validation_annotations.jsonl``: given as ``training_data`` it supplies both. Without
    validation data, ``validation_data_size`` of the training images are split off
    deterministically (by name and ``seed``).
    """
    if not job.training_data:
        raise DataError(
            "no training data: set training_data in the config or pass --training-data "
            "(a dataset folder or file in any format, a `data convert` output folder, or a registered "
            "NAME:VERSION)"
        )
    store_root = default_store_root(job.workspace)
    training_source = _locate(job.training_data, store_root)
    training_path = training_source.path
    validation_source = job.validation_data
    if validation_source is None and training_path.is_dir() and (training_path / VALIDATION_FILE).is_file():
        validation_source = str(training_path / VALIDATION_FILE)
    if training_path.is_dir() and (training_path / TRAIN_FILE).is_file():
        training_path = training_path / TRAIN_FILE

    training = read_dataset(training_path)
    if not training.images:
        raise DataError(f"{training_path}: no annotated images; training needs at least one")
    tags = {"dataset.training.path": str(training_path)}
    if validation_source is None:
        training, validation = split_fraction(training, job.validation_data_size, params.seed)
        # Each is a part of what was given, so neither is that version nor has its digest.
        if training_source.ref:
            tags["dataset.source"] = training_source.ref
        training_source = validation_origin = _Source(training_path)
        tags["dataset.validation.path"] = f"{training_path} (validation_data_size {job.validation_data_size})"
    else:
        validation_origin = _locate(validation_source, store_root)
        validation_path = validation_origin.path
        if validation_path.is_dir() and (validation_path / VALIDATION_FILE).is_file():
            validation_path = validation_path / VALIDATION_FILE
        validation = read_dataset(validation_path, classes=list(training.classes))
        tags["dataset.validation.path"] = str(validation_path)
    if not validation.images:
        raise DataError(
            f"no validation images (from {validation_source or training_path}); give validation_data or a "
            "larger validation_data_size"
        )
    for role, dataset, origin in (
        ("training", training, training_source),
        ("validation", validation, validation_origin),
    ):
        digest = origin.digest or content_digest(dataset)
        tags[f"dataset.{role}.digest"] = digest
        tags[f"dataset.{role}"] = origin.ref or f"sha256:{digest[:16]}"
    return TrialData(training, validation, tags)


def content_digest(dataset: Dataset) -> str:
    """The dataset store's digest of this content: equal for equal images and boxes, whatever the format."""
    hashes = {image.name: image_sha256(image.path) for image in dataset.images}
    return dataset_digest(dataset, hashes)


@dataclass(frozen=True)
class _Source:
    """Where a dataset was read from; ``ref`` and ``digest`` when it is a dataset-store version."""

    path: Path
    ref: str | None = None
    digest: str | None = None


def _locate(source: str, store_root: str) -> _Source:
    """A path as given (inside the store or not), or the JSONL of a registered ``NAME`` / ``NAME:VERSION``."""
    path = Path(source).expanduser()
    if path.exists():
        version_file = (path if path.is_dir() else path.parent) / VERSION_FILE
        try:
            info = json.loads(version_file.read_text(encoding="utf-8"))
            return _Source(path, f"{info['name']}:{info['version']}", str(info["digest"]))
        except (OSError, ValueError, KeyError, TypeError):
            return _Source(path)
    try:
        name, version = parse_ref(source)
        registered = DatasetStore(store_root).get(name, version) if Path(store_root).is_dir() else None
    except DataError:
        registered = None
    if registered is not None:
        return _Source(Path(registered.annotations), registered.ref, registered.digest)
    raise DataError(
        f"{source}: no such file or folder, nor a dataset registered in {store_root}. Give a dataset "
        "folder or file, a `data convert` output folder, or NAME[:VERSION] of `visionautoml data list`"
    )


def make_loaders(data: TrialData, params: TrainingParameters) -> tuple[DataLoader, DataLoader]:
    return (
        make_data_loader(data.training, params, train=True),
        make_data_loader(data.validation, params, train=False),
    )


# --- tracking helpers ---------------------------------------------------------------------------


def flat_params(params: TrainingParameters) -> dict[str, str]:
    return {key: str(value) for key, value in params.model_dump(mode="json").items()}


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Scalars as they are, ``per_class`` as ``ap_<label>``; nested tables stay in metrics.json."""
    flat = {key: float(value) for key, value in metrics.items() if isinstance(value, int | float)}
    for label, value in (metrics.get("per_class") or {}).items():
        flat[f"ap_{metric_safe(label)}"] = float(value)
    return flat


def metric_safe(name: str) -> str:
    """MLflow metric names allow letters, digits, ``_ - . /`` and spaces only."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)


def git_commit(directory: Path | None = None) -> str | None:
    """The commit of the git checkout around ``directory`` (default: the working directory), if any."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", commit) else None


def _trial_key(job: JobConfig, params: TrainingParameters) -> str:
    identity = {
        "job": job.fingerprint(),
        "params": params.model_dump(mode="json"),
        "training_data": job.training_data,
        "validation_data": job.validation_data,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _resumable_run(checkpoint_dir: Path) -> str | None:
    """The MLflow run an interrupted trial with these checkpoints was logging to, if it is still there."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if not checkpoint_paths(checkpoint_dir)[1].is_file():
        return None  # it failed before its first checkpoint: nothing to resume
    try:
        recorded = json.loads((checkpoint_dir / RUN_FILE).read_text(encoding="utf-8"))["run_id"]
        run = mlflow.get_run(recorded)
    except (OSError, ValueError, KeyError, TypeError, MlflowException):
        return None
    return recorded if run.info.lifecycle_stage == "active" else None


def _adopt_checkpoints(checkpoint_dir: Path, run_id: str, data_tags: dict[str, str]) -> None:
    """Keep checkpoints only if they were made from this very data; then record this run as their owner."""
    digests = {key: value for key, value in data_tags.items() if key.endswith(".digest")}
    try:
        recorded = json.loads((checkpoint_dir / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        recorded = None
    if recorded is not None and recorded.get("digests") != digests:
        log.warning(
            "%s: the data changed since these checkpoints were written; starting over", checkpoint_dir
        )
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(checkpoint_dir / RUN_FILE, json.dumps({"run_id": run_id, "digests": digests}, indent=2))


def _write_plots(out_dir: Path, evaluation: Evaluation, dataset: Dataset) -> None:
    """Diagnostic plots are a help, not the result: a failure to draw them must not fail the trial."""
    from visionautoml.training.plots import write_trial_plots

    try:
        write_trial_plots(out_dir / "plots", evaluation, dataset)
    except Exception:
        log.warning("could not draw the trial's plots", exc_info=True)


def _record_failure(run_id: str, reason: str) -> None:
    from mlflow import MlflowClient

    try:
        MlflowClient().set_tag(run_id, FAILURE_TAG, reason[:_MAX_TAG_LENGTH])
    except Exception:
        log.warning("could not record the failure reason on run %s", run_id, exc_info=True)
