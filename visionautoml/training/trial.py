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
import shutil
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
from visionautoml.data.sources import TrainingData, resolve_training_data
from visionautoml.data.stats import compute_stats
from visionautoml.data.versions import default_store_root
from visionautoml.errors import VisionAutoMLError
from visionautoml.evaluation.scoring import Evaluation, evaluate_predictions, write_evaluation
from visionautoml.files import atomic_write_text
from visionautoml.models.saved import ModelSpec, save_model
from visionautoml.models.zoo import build_model, concrete_parameters
from visionautoml.redact import scrub
from visionautoml.tracking.runs import TrialRun, is_active_run
from visionautoml.tracking.schema import PRIMARY_METRIC, Artifact, RunStatus, Tag, git_commit, metric_safe
from visionautoml.tracking.workspace import connect, workspace_dir
from visionautoml.training.dataset import make_data_loader
from visionautoml.training.evaluate import predict_loader
from visionautoml.training.start import load_start, resolve_start
from visionautoml.training.trainer import checkpoint_paths, default_device, fit, seed_everything

log = logging.getLogger(__name__)

RUN_FILE = "run.json"

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
    params = concrete_parameters(params or job.training_parameters)
    console = Console(stderr=True)
    checkpoint_dir = workspace_dir(job) / "checkpoints" / _trial_key(job, params)
    connect(job)
    run = TrialRun.open(
        resume_run_id=_resumable_run(checkpoint_dir, job, parent_run_id, run_name),
        run_name=run_name,
        parent_run_id=parent_run_id,
    )
    run.delete_tag(Tag.FAILURE_REASON)  # the reason a resumed attempt stopped no longer holds
    status = RunStatus.FAILED
    try:
        result = _train_and_log(job, params, run, checkpoint_dir, reporter, console)
        status = RunStatus.FINISHED
        return result
    except KeyboardInterrupt:
        status = RunStatus.KILLED
        run.set_tags(
            {Tag.FAILURE_REASON: "interrupted; run the same trial again to resume from the last checkpoint"}
        )
        raise
    except VisionAutoMLError as error:
        reason = scrub(str(error))
    except Exception as error:  # a bug must not end a sweep either; keep its traceback in the log
        log.exception("trial %s failed", run.run_id)
        reason = scrub(f"{type(error).__name__}: {error}")
    finally:
        run.end(status)
    run.record_failure(reason)
    return TrialResult(run.run_id, None, {}, RunStatus.FAILED, reason)


def _train_and_log(
    job: JobConfig,
    params: TrainingParameters,
    run: TrialRun,
    checkpoint_dir: Path,
    reporter: Reporter | None,
    console: Console,
) -> TrialResult:
    started = time.monotonic()
    data = load_trial_data(job, params)
    start = resolve_start(params)
    data_tags = dataset_tags(data)
    _adopt_checkpoints(checkpoint_dir, run.run_id, data_tags, job)
    classes = list(data.training.classes)
    tags = {
        **data_tags,
        Tag.MODEL_NAME: params.model_name,
        Tag.CONFIG_HASH: job.fingerprint(),
        Tag.CLASSES: json.dumps(classes),
    }
    if start is not None:
        tags[Tag.STARTED_FROM] = start.reference
    commit = git_commit()
    if commit:
        tags[Tag.GIT_COMMIT] = commit
    run.set_tags(tags)
    run.log_params(flat_params(params))
    run.log_json(dataset_counts(data), Artifact.DATASETS)
    console.print(
        f"trial {run.run_id}: {params.model_name} on {len(data.training.images)} training / "
        f"{len(data.validation.images)} validation images, classes {', '.join(classes)}",
        soft_wrap=True,
    )

    seed_everything(params.seed)
    device = default_device()
    model = build_model(params.model_name, len(classes) + 1, params)
    if start is not None:
        report = load_start(model, start)
        console.print(f"starting from {start.reference}: {report.summary()}", soft_wrap=True)
    train_loader, validation_loader = make_loaders(data, params)

    scores = _Scores()

    def evaluate(module: torch.nn.Module) -> dict[str, Any]:
        ground_truths, detections = predict_loader(
            module,
            validation_loader,
            device,
            tiling=params,
            detections_per_image=params.box_detections_per_image,
        )
        scores.latest = evaluate_predictions(ground_truths, detections, classes, params)
        return scores.latest.metrics

    def on_evaluation(epoch: int, metrics: dict[str, Any]) -> bool:
        latest = scores.latest
        assert latest is not None
        run.log_metrics(flat_metrics(latest.metrics), step=epoch)  # the losses went in on_epoch
        if scores.best is None or latest.metrics[PRIMARY_METRIC] > scores.best.metrics[PRIMARY_METRIC]:
            scores.best = latest
        return bool(reporter(epoch, flat_metrics(metrics))) if reporter else False

    outcome = fit(
        model,
        train_loader,
        evaluate,
        params,
        checkpoint_dir,
        on_epoch=lambda epoch, losses: run.log_metrics(losses, step=epoch),
        on_evaluation=on_evaluation,
        device=device,
        console=console,
    )
    evaluation = scores.best
    if evaluation is None or evaluation.metrics[PRIMARY_METRIC] != outcome.best_metrics.get(PRIMARY_METRIC):
        evaluate(model)  # the best epoch was before a resume: score its weights again
        evaluation = scores.latest

    summary = {
        Tag.BEST_EPOCH: str(outcome.best_epoch),
        Tag.STOP_REASON: outcome.stop_reason,
        Tag.EPOCHS_COMPLETED: str(outcome.epochs_completed),
    }
    if outcome.resumed_from_epoch is not None:  # a retried or interrupted trial carried on, not restarted
        summary[Tag.RESUMED_FROM_EPOCH] = str(outcome.resumed_from_epoch)
    run.set_tags(summary)
    run.log_metrics(
        {f"best_{key}": value for key, value in flat_metrics(evaluation.metrics).items()},
        step=outcome.best_epoch,
    )
    run.log_metrics({"training_minutes": (time.monotonic() - started) / 60})
    with tempfile.TemporaryDirectory(prefix="visionautoml-trial-") as scratch:
        saved = save_model(model, ModelSpec.from_params(params, classes), Path(scratch) / "model")
        evaluation_dir = Path(scratch) / "evaluation"
        write_evaluation(evaluation_dir, evaluation)
        _write_plots(evaluation_dir, evaluation, data.validation, params)
        run.log_folder(evaluation_dir, Artifact.EVALUATION_DIR)
        model_uri = run.log_model(saved)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return TrialResult(
        run_id=run.run_id,
        model_uri=model_uri,
        metrics=evaluation.metrics,
        status=RunStatus.FINISHED,
        best_epoch=outcome.best_epoch,
        stop_reason=outcome.stop_reason,
        tags={**tags, **summary},
    )


# --- data ---------------------------------------------------------------------------------------


def load_trial_data(job: JobConfig, params: TrainingParameters) -> TrainingData:
    """The trial's datasets, through the one resolver of every command (:mod:`visionautoml.data.sources`)."""
    return resolve_training_data(
        job.training_data,
        job.validation_data,
        validation_data_size=job.validation_data_size,
        seed=params.seed,
        store_root=default_store_root(job.workspace),
        datastore_root=Path(job.datastore_root) if job.datastore_root else None,
        drop_invalid=job.invalid_data == "drop",
    )


def dataset_tags(data: TrainingData) -> dict[str, str]:
    """The run's dataset tags: version (or digest), digest and where the files were, per role."""
    tags = {}
    for role in ("training", "validation"):
        tags[Tag.dataset(role)] = data.reference(role)
        tags[Tag.dataset(role, "digest")] = data.digest(role)
        tags[Tag.dataset(role, "path")] = data.location(role)
    if data.split_of:
        tags[Tag.DATASET_SOURCE] = data.split_of
    return tags


def dataset_counts(data: TrainingData) -> dict[str, dict[str, Any]]:
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


def make_loaders(data: TrainingData, params: TrainingParameters) -> tuple[DataLoader, DataLoader]:
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


def _trial_key(job: JobConfig, params: TrainingParameters) -> str:
    identity = {
        "job": job.fingerprint(),
        "params": params.model_dump(mode="json"),
        "training_data": job.training_data,
        "validation_data": job.validation_data,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _mirrored(job: JobConfig) -> bool:
    """Whether this trial's checkpoints are copied to the tracking server: a retry may run on another node."""
    from visionautoml.tracking.datasets import copies_through_server

    return copies_through_server(job)


def _resumable_run(
    checkpoint_dir: Path, job: JobConfig, parent_run_id: str | None, run_name: str | None
) -> str | None:
    """The MLflow run an interrupted trial with these checkpoints was logging to, if it is still there.

    A sweep trial retried on another node than its first attempt finds no checkpoints here:
    it fetches the earlier attempt's copies from the tracking server first (see
    :mod:`visionautoml.tracking.checkpoints`).
    """
    if not checkpoint_paths(checkpoint_dir)[1].is_file() and parent_run_id and run_name and _mirrored(job):
        from visionautoml.tracking.checkpoints import fetch_checkpoints
        from visionautoml.tracking.workspace import current_tracking_uri

        fetch_checkpoints(parent_run_id, run_name, checkpoint_dir, tracking_uri=current_tracking_uri())
    if not checkpoint_paths(checkpoint_dir)[1].is_file():
        return None  # it failed before its first checkpoint: nothing to resume
    try:
        recorded = json.loads((checkpoint_dir / RUN_FILE).read_text(encoding="utf-8"))["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return recorded if isinstance(recorded, str) and is_active_run(recorded) else None


def _adopt_checkpoints(checkpoint_dir: Path, run_id: str, data_tags: dict[str, str], job: JobConfig) -> None:
    """Keep checkpoints only if they were made from this very data; then record this run as their owner.

    On a cluster the checkpoints are copied to the run from now on, for a retry elsewhere.
    """
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
    if _mirrored(job):
        from visionautoml.tracking.checkpoints import mirror_checkpoints
        from visionautoml.tracking.workspace import current_tracking_uri

        mirror_checkpoints(checkpoint_dir, run_id, tracking_uri=current_tracking_uri())


def _write_plots(out_dir: Path, evaluation: Evaluation, dataset: Dataset, tiling: TrainingParameters) -> None:
    """Diagnostic plots are a help, not the result: a failure to draw them must not fail the trial."""
    from visionautoml.reports.plots import write_trial_plots

    try:
        write_trial_plots(out_dir / "plots", evaluation, dataset, tiling=tiling)
    except Exception:
        log.warning("could not draw the trial's plots", exc_info=True)
