"""The tracking vocabulary: every tag, artifact path, state and metric name, and the version tags.

Runs written by one command are read by others (the report, ``models show``, the pipeline's
reuse check, ``promote_if_better``), often by another version of the program on another
machine, so a name lives here once and every writer and reader uses it from here.

Trial runs (children of a sweep's run, or a single ``train``) carry ``model_name``,
``classes``, ``config_hash``, ``git_commit``, the dataset tags, ``started_from`` for
incremental training and at the end ``best_epoch``/``stop_reason``/``epochs_completed`` or
``failure_reason``; a sweep sets ``trial_state`` on each when it settles them. A sweep's own
run carries ``visionautoml.kind = sweep``, the best trial and the registered model. A model
version carries :func:`model_version_tags`.
"""

from __future__ import annotations

import re
import subprocess
from enum import StrEnum
from pathlib import Path

PRIMARY_METRIC = "mean_average_precision"
"""What every trial is ranked by and early termination watches: the configured metric type's mAP."""


class Tag:
    """Run and model-version tag names."""

    KIND = "visionautoml.kind"
    MODEL_NAME = "model_name"
    CLASSES = "classes"
    CONFIG_HASH = "config_hash"
    GIT_COMMIT = "git_commit"
    TRACKING_URI = "tracking_uri"
    STARTED_FROM = "started_from"
    FAILURE_REASON = "failure_reason"
    STOP_REASON = "stop_reason"
    BEST_EPOCH = "best_epoch"
    EPOCHS_COMPLETED = "epochs_completed"
    RESUMED_FROM_EPOCH = "resumed_from_epoch"
    TRIAL_STATE = "trial_state"
    TUNE_TRIAL_ID = "tune_trial_id"
    RAY_NODE_ID = "ray_node_id"
    RETRIES = "retries"
    BEST_TRIAL = "best_trial"
    BEST_TRIAL_RUN_ID = "best_trial_run_id"
    REGISTERED_MODEL = "registered_model"
    PRIMARY_METRIC = "primary_metric"
    SWEEP_PARENT_RUN_ID = "sweep_parent_run_id"
    SOURCE_RUN_ID = "source_run_id"
    PIPELINE_KEY = "visionautoml.pipeline_key"
    PIPELINE_RESULT = "visionautoml.pipeline_result"
    TRAINING_DATASET = "dataset.training"
    VALIDATION_DATASET = "dataset.validation"
    DATASET_SOURCE = "dataset.source"
    METRIC_PREFIX = "metric."
    ONNX_PARITY = "onnx.parity"
    MLFLOW_PARENT_RUN_ID = "mlflow.parentRunId"

    @staticmethod
    def dataset(role: str, what: str = "") -> str:
        """``dataset.training``, ``dataset.validation.digest``, ``dataset.training.path`` ..."""
        return f"dataset.{role}" + (f".{what}" if what else "")


SWEEP_KIND = "sweep"
MAX_TAG_LENGTH = 5000
"""MLflow's limit on a tag value; longer texts (a failure's reason) are cut to it."""


class Artifact:
    """Artifact paths inside a run."""

    MODEL = "model"
    EVALUATION_DIR = "evaluation"
    PLOTS_DIR = "evaluation/plots"
    METRICS = "evaluation/metrics.json"
    DATASETS = "data/datasets.json"
    REPORT = "report.html"
    LEADERBOARD_MARKDOWN = "leaderboard.md"
    LEADERBOARD_CSV = "leaderboard.csv"
    CONFIG = "config.yaml"
    SEARCH_SPACE = "search_space.json"


class RunStatus(StrEnum):
    """MLflow's run statuses, as runs are ended with them."""

    RUNNING = "RUNNING"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    KILLED = "KILLED"


class TrialState(StrEnum):
    """A sweep trial's outcome, as the leaderboard, ``--output-json`` and the ``trial_state`` tag show it."""

    COMPLETED = "completed"
    EARLY_TERMINATED = "early_terminated"
    FAILED = "failed"
    NOT_STARTED = "not_started"
    INTERRUPTED = "interrupted"
    """An earlier attempt of a trial that ran again (resumed or retried); its newest run counts."""


TRIAL_RUN_STATUS = {
    TrialState.COMPLETED: RunStatus.FINISHED,
    TrialState.EARLY_TERMINATED: RunStatus.KILLED,
    TrialState.FAILED: RunStatus.FAILED,
    TrialState.NOT_STARTED: RunStatus.KILLED,
    TrialState.INTERRUPTED: RunStatus.KILLED,
}

CANDIDATE_ALIAS = "candidate"
CHAMPION_ALIAS = "champion"


def model_version_tags(
    *,
    metrics: dict[str, float],
    dataset_tags: dict[str, str],
    config_hash: str,
    model_name: str,
    sweep_parent_run_id: str | None = None,
    started_from: str | None = None,
) -> dict[str, str]:
    """The tags a registered version carries, whoever registers it (a sweep, a trial, the pipeline).

    ``promote_if_better`` compares ``metric.<PRIMARY_METRIC>`` of two versions only when their
    ``dataset.validation`` tags agree, so both must always be there.
    """
    tags = {
        **{f"{Tag.METRIC_PREFIX}{key}": f"{value:.6g}" for key, value in metrics.items()},
        Tag.PRIMARY_METRIC: PRIMARY_METRIC,
        **dataset_tags,
        Tag.CONFIG_HASH: config_hash,
        Tag.GIT_COMMIT: git_commit() or "unknown",
        Tag.MODEL_NAME: model_name,
    }
    if sweep_parent_run_id:
        tags[Tag.SWEEP_PARENT_RUN_ID] = sweep_parent_run_id
    if started_from:
        tags[Tag.STARTED_FROM] = started_from
    return tags


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
